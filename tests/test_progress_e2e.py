"""End-to-end: a progress bar (tqdm's way: redraws with \\r, a newline when done) on the
sshd test cluster, watched from a terminal as a user would.

The stream path is the same on either transport: this runs on paramiko only.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from kit import assert_nothing_left, hosts_file, read_until, write

pytestmark = [pytest.mark.e2e, pytest.mark.transports("paramiko")]

# Rank 0 draws a bar and keeps it open (no newline) until the test has seen it; the other
# ranks print a line. Written as tqdm writes: "\r" + the bar, flushed, on stderr.
BAR = """\
    import os, pathlib, sys, time
    rank, gate = int(os.environ["RANK"]), pathlib.Path(sys.argv[1])
    if rank == 0:
        for i in range(3):
            sys.stderr.write(f"\\r{i}/3 steps"); sys.stderr.flush(); time.sleep(0.2)
        deadline = time.time() + 120
        while not gate.exists() and time.time() < deadline:
            time.sleep(0.1)
        sys.stderr.write("\\r3/3 steps"); sys.stderr.flush()
        sys.stderr.write("\\n")
    print(f"rank {rank} done", flush=True)
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_a_progress_bar_redraws_live_on_the_terminal_and_ends_as_one_line(cluster, tmp_path):
    n1, n2 = cluster.names[:2]
    script = write(tmp_path / "bar.py", BAR)
    gate = tmp_path / "gate"
    hosts = hosts_file(tmp_path, [n1, n2], nproc_per_node=1)
    home = tmp_path / "crhome"
    master, slave = os.openpty()
    p = subprocess.Popen([sys.executable, "-m", "clusterrun", "up", str(hosts), str(script), str(gate)],
                         env=cluster.env(clusterrun_home=home), cwd=tmp_path,
                         stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    seen = {master: bytearray()}
    try:
        # While the bar is still open (rank 0 waits for the gate), its last redraw so far is
        # the terminal's progress line...
        read_until(seen, lambda: b"\x1b[K[" + f"{n1} g0 l0] 2/3 steps".encode() in seen[master], 120)
        live = bytes(seen[master]).decode(errors="replace")
        assert f"\x1b[K[{n1} g0 l0] 2/3 steps" in live, live
        assert f"{n1} g0 l0] 3/3" not in live
        # ...and the controller's log of rank 0 already has every redraw, byte for byte.
        (log,) = home.glob("runs/*/logs/rank0.log")
        assert log.read_bytes() in (b"\r0/3 steps\r1/3 steps\r2/3 steps", b"\r0/3 steps\r1/3 steps\r2/3 steps\r")
        gate.write_text("go")
        read_until(seen, lambda: p.poll() is not None, 120)
        assert p.wait(30) == 0, bytes(seen[master]).decode(errors="replace")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        read_until(seen, lambda: False, 0.5)
        os.close(master)
    # Once the bar ends, its line is printed whole, as its last redraw.
    lines = [ANSI.sub("", line).rsplit("\r", 1)[-1]       # each line as the terminal leaves it
             for line in bytes(seen[master]).decode(errors="replace").split("\r\n")]
    assert f"[{n1} g0 l0] 3/3 steps" in lines, lines
    assert f"[{n2} g1 l0] rank 1 done" in lines and f"[{n1} g0 l0] rank 0 done" in lines
    assert log.read_bytes() == b"\r0/3 steps\r1/3 steps\r2/3 steps\r3/3 steps\nrank 0 done\n"
    assert_nothing_left(cluster)
