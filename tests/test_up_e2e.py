"""End-to-end: `clusterrun up` over real SSH to the namespace test cluster, real torchrun (gloo, CPU).

Each test checks what a user would: the tag on every line against the rank the
worker itself reports, arguments arriving literally, a failing rank named with
its exit code, and a burst of lines from every rank arriving whole and in order.
"""

from __future__ import annotations

import itertools
import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kit import REPORT, TAG, Controller, assert_nothing_left, check_tags, hosts_file, reports, up, write

pytestmark = pytest.mark.e2e


def test_two_nodes_two_procs_tags_match_worker_ranks(cluster, tmp_path):
    script = write(tmp_path / "report.py", REPORT)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2)
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    check_tags(r.stdout, cluster.names[:2], [2, 2])
    # torchrun's own lines are tagged by node only.
    launcher = [l for l in r.stdout.splitlines() if re.match(rf"^\[{re.escape(cluster.prefix)}-n\d+\] ", l)]
    assert all(not TAG.match(l) for l in launcher)


def test_megabytes_of_setup_stderr_do_not_hold_up_the_start(cluster, tmp_path):
    """More stderr than an SSH channel's window (2 MB) before the agent starts, as a
    setup's compiler warnings: the agent still starts and every rank's lines arrive."""
    script = write(tmp_path / "report.py", REPORT)
    noisy = "python3 -c \"import sys; sys.stderr.write('w' * 3000000)\""
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=1, setup=[noisy])
    r = up(cluster, tmp_path, str(hosts), str(script), timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    check_tags(r.stdout, cluster.names[:2], [1, 1])


@pytest.mark.transports("paramiko")      # the plan's ranks, not the transport
def test_uneven_nodes_three_plus_one(cluster, tmp_path):
    script = write(tmp_path / "report.py", REPORT)
    a, b = cluster.names[2], cluster.names[0]
    hosts = hosts_file(tmp_path, [f"{a}:3", {"host": b, "nproc_per_node": 1}])
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    check_tags(r.stdout, [a, b], [3, 1])


def test_arguments_arrive_literally_and_nothing_runs_in_a_shell(cluster, tmp_path):
    marker = tmp_path / "pwned"
    script = write(tmp_path / "report.py", REPORT)
    args = ["--lr", "0.1", "a b", "it's", 'say "hi"', f"$(touch {marker})", f"`touch {marker}`",
            f"; touch {marker}", "", "ünï cödé", "tab\there", "*", "~/x", "--flag=$HOME"]
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=1)
    r = up(cluster, tmp_path, str(hosts), str(script), *args)
    assert r.returncode == 0, r.stdout + r.stderr
    got = reports(r.stdout)
    assert len(got) == 2
    for _, rep in got:
        assert rep["args"] == args
    assert not marker.exists()


@pytest.mark.transports("paramiko")      # the interface the node picks, not the transport
def test_an_rpc_job_across_two_nodes_runs_with_no_extra_env(cluster, tmp_path):
    """torch.distributed.rpc (TensorPipe) binds where the node's hostname resolves unless told
    an interface; here, as on many clusters, the hostname does not resolve to the node."""
    script = write(tmp_path / "rpc.py", """\
        import os, socket
        import torch.distributed.rpc as rpc

        def where(asker):
            return f"{socket.gethostname()} answered {asker}"

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world)
        peer = (rank + 1) % world
        print(f"RPC {rank} -> {peer}: " + rpc.rpc_sync(f"worker{peer}", where, args=(rank,)), flush=True)
        rpc.shutdown()
    """)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2)
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    node_of = {0: cluster.names[0], 1: cluster.names[0], 2: cluster.names[1], 3: cluster.names[1]}
    for rank in range(4):
        peer = (rank + 1) % 4
        line = f"[{node_of[rank]} g{rank} l{rank % 2}] RPC {rank} -> {peer}: {node_of[peer]} answered {rank}"
        assert line in r.stdout.splitlines(), r.stdout
    assert "127.0.0.1" not in r.stdout + r.stderr
    assert_nothing_left(cluster)


@pytest.mark.transports("paramiko")      # what the node records, not the transport
def test_ranks_that_all_fail_on_their_own_are_all_named_and_none_is_called_stopped(cluster, tmp_path):
    """Every rank exits with its own code at about the same moment: the summary names each
    one as failed, first failure first, and agrees with `status --json`. (The ranks ignore
    SIGTERM: gloo's barrier does not free every rank at the same instant, and a rank that
    torchrun's SIGTERM reached first was stopped, truly: it happened in a CI run.)"""
    script = write(tmp_path / "allfail.py", """\
        import os, signal
        import torch.distributed as dist
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        dist.init_process_group("gloo")
        dist.barrier()
        os._exit(10 + dist.get_rank())
    """)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2)
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 1, r.stdout + r.stderr
    named = [l for l in r.stderr.splitlines() if l.startswith("clusterrun: rank ")]
    node_of = {0: cluster.names[0], 1: cluster.names[0], 2: cluster.names[1], 3: cluster.names[1]}
    assert sorted(named) == sorted(f"clusterrun: rank {g} ({node_of[g]}, local rank {g % 2}) exited with code {10 + g}"
                                   for g in range(4)), r.stderr
    assert "stopped" not in r.stderr, r.stderr
    run_id = next(l.split()[2].rstrip(":") for l in r.stderr.splitlines() if l.startswith("clusterrun: run "))
    st = subprocess.run([sys.executable, "-m", "clusterrun", "status", "--json", run_id],
                        env=cluster.env(clusterrun_home=tmp_path / "crhome"), capture_output=True, text=True,
                        timeout=60)
    data = json.loads(st.stdout)
    assert data["state"] == "failed"
    failures = sorted((f["rank"], f["exitcode"], f["stopped"]) for n in data["nodes"] for f in n["failures"])
    assert failures == [(g, 10 + g, False) for g in range(4)]
    # The summary's order is the order the nodes recorded.
    times = {f["rank"]: f["exit_time"] for n in data["nodes"] for f in n["failures"]}
    assert [int(l.split()[2]) for l in named] == sorted(times, key=times.get)
    assert_nothing_left(cluster)


@pytest.mark.transports("paramiko")
def test_a_script_that_fails_at_once_everywhere_is_named_failed_on_every_node(cluster, tmp_path):
    """An ImportError on every rank: each rank ends before the node's watch first looks. A rank
    that exited with a code of its own is never called stopped, whenever clusterrun's stop came."""
    script = write(tmp_path / "typo.py", "import clusterrun_no_such_module\n")
    names = cluster.names[:3]
    hosts = hosts_file(tmp_path, names, nproc_per_node=1)
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 1, r.stdout + r.stderr
    run_id = next(l.split()[2].rstrip(":") for l in r.stderr.splitlines() if l.startswith("clusterrun: run "))
    st = subprocess.run([sys.executable, "-m", "clusterrun", "status", "--json", run_id],
                        env=cluster.env(clusterrun_home=tmp_path / "crhome"), capture_output=True, text=True,
                        timeout=60)
    nodes = json.loads(st.stdout)["nodes"]
    own = [(n["node"], f["rank"]) for n in nodes for f in n["failures"] if f["exitcode"] == 1]
    assert own, st.stdout
    assert all(not f["stopped"] for n in nodes for f in n["failures"] if f["exitcode"] == 1), st.stdout
    err = r.stderr.splitlines()
    for node, g in own:
        assert f"clusterrun: rank {g} ({node}, local rank 0) exited with code 1" in err, r.stderr
        assert not [l for l in err if l.startswith(f"clusterrun: node {node} ") and "stopped" in l], r.stderr
    assert_nothing_left(cluster)


def test_failing_rank_is_named_with_its_exit_code_and_last_lines(cluster, tmp_path):
    script = write(tmp_path / "fail.py", """\
        import sys, time
        import torch.distributed as dist
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        print(f"rank {rank} starting")
        if rank == 3:
            print("loading shard 3", flush=True)
            print("ValueError: shard 3 is corrupt", file=sys.stderr)
            sys.exit(7)
        dist.barrier()      # the others wait here for rank 3, which never comes
        time.sleep(600)
    """)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2)
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr.splitlines()
    first = next(i for i, l in enumerate(err) if l.startswith("clusterrun: rank "))
    assert err[first] == f"clusterrun: rank 3 ({cluster.names[1]}, local rank 1) exited with code 7"
    # Its last lines follow, stderr included, in the order printed.
    tail = list(itertools.takewhile(lambda l: l.startswith("  | "), err[first + 1:]))
    assert tail[-3:] == ["  | rank 3 starting", "  | loading shard 3", "  | ValueError: shard 3 is corrupt"]
    assert f"[{cluster.names[1]} g3 l1] ValueError: shard 3 is corrupt" in r.stdout.splitlines()
    # The other node did not hang in the barrier: each of its ranks either failed by itself
    # (its peer closed the connection: it raised, and maybe a SIGTERM ended it as it exited)
    # or was stopped, and the summary says which.
    others = [l for l in err if l.startswith("clusterrun: ") and f"{cluster.names[0]}" in l
              and "failed: stopping" not in l]
    assert others and all(l.endswith("after rank 3 failed") or "exited with code" in l
                          or ") raised RuntimeError, then was killed by " in l for l in others), r.stderr
    # torchrun's own report of it (its traceback, the box, closing signals) stays in each
    # node's log; the terminal gets one line per node saying where.
    run_id = next(l.split()[2].rstrip(":") for l in err if l.startswith("clusterrun: run "))
    for name in cluster.names[:2]:
        torchruns = [l for l in r.stdout.splitlines() if l.startswith(f"[{name}] ")]
        for noise in ("ChildFailedError", "SignalException", "Root Cause", "closing signal", "Traceback"):
            assert not [l for l in torchruns if noise in l], r.stdout
        pointer = [l for l in torchruns if l.startswith(f"[{name}] (torchrun's own report")]
        assert len(pointer) == 1 and pointer[0].endswith(f"clusterrun logs {run_id} --node {name})"), r.stdout
    node_log = subprocess.run([sys.executable, "-m", "clusterrun", "logs", run_id, "--node", cluster.names[1]],
                              env=cluster.env(clusterrun_home=tmp_path / "crhome"), capture_output=True,
                              text=True, timeout=60)
    assert "ChildFailedError" in node_log.stdout and "Root Cause" in node_log.stdout, node_log.stdout
    assert_nothing_left(cluster)


@pytest.fixture
def memory_cgroup(tmp_path):
    """A memory cgroup of 64 MiB (v1 or v2) that a worker can move itself into, removed afterwards."""
    import os
    import uuid

    root = Path("/sys/fs/cgroup")
    v2 = (root / "cgroup.controllers").exists()
    parent = root if v2 else root / "memory"
    cg = parent / f"clusterrun-test-oom-{uuid.uuid4().hex[:8]}"
    try:
        cg.mkdir()
        if v2:
            (cg / "memory.max").write_text(str(64 << 20))
            if (cg / "memory.swap.max").exists():
                (cg / "memory.swap.max").write_text("0")
        else:
            (cg / "memory.limit_in_bytes").write_text(str(64 << 20))
            if (cg / "memory.memsw.limit_in_bytes").exists():
                (cg / "memory.memsw.limit_in_bytes").write_text(str(64 << 20))
    except OSError as e:
        reason = f"no memory cgroup can be made here ({e}), so no process can be OOM-killed safely"
        if cg.exists():
            cg.rmdir()
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so this is an error, not a skip")
        pytest.skip(reason)
    yield cg
    for _ in range(50):             # empty once the killed worker is gone
        try:
            cg.rmdir()
            break
        except OSError:
            import time
            time.sleep(0.1)


@pytest.mark.transports("paramiko")
def test_a_rank_the_oom_killer_ends_is_named_as_out_of_memory(cluster, tmp_path, memory_cgroup):
    """Rank 1 outgrows its memory cgroup and the kernel's OOM killer ends it (SIGKILL): the
    summary and `status --json` say out of memory, and its node's other rank was stopped."""
    import time

    # The nodes' /sys is their network namespace's, without the cgroup mounts, so the
    # test moves the rank into the cgroup, from here (the pids are the same).
    script = write(tmp_path / "hog.py", """\
        import os, pathlib, sys, time
        import torch.distributed as dist
        dist.init_process_group("gloo")
        rank, here = dist.get_rank(), pathlib.Path(sys.argv[1])
        if rank == 1:
            (here / "hog.pid").write_text(str(os.getpid()))
            deadline = time.time() + 60
            while not (here / "moved").exists() and time.time() < deadline:
                time.sleep(0.05)
            hog = bytearray(512 << 20)      # more than the cgroup's 64 MiB
            print("the hog survived", flush=True)
        dist.barrier()
        time.sleep(600)
    """)
    hosts = hosts_file(tmp_path, cluster.names[:1], nproc_per_node=2)
    ctl = Controller(cluster, tmp_path)
    p = ctl.start("up", str(hosts), str(script), str(tmp_path))
    deadline = time.monotonic() + 120
    while not (tmp_path / "hog.pid").exists():
        assert p.proc.poll() is None and time.monotonic() < deadline, "".join(p.err)
        time.sleep(0.1)
    (memory_cgroup / "cgroup.procs").write_text((tmp_path / "hog.pid").read_text())
    (tmp_path / "moved").touch()
    out, err_text = p.finish(120)
    assert p.returncode == 1, out + err_text
    n1 = cluster.names[0]
    err = err_text.splitlines()
    assert (f"clusterrun: rank 1 ({n1}, local rank 1) was killed by SIGKILL: out of memory "
            "(the node's kernel OOM killer ended it)") in err, err_text
    # Rank 0, in the barrier, was stopped by torchrun, or (its peer gone) raised gloo's error
    # first, its own traceback in its log, and a SIGTERM then ended it: failed by itself.
    assert {f"clusterrun: rank 0 ({n1}, local rank 0) was stopped (SIGTERM) after rank 1 failed",
            f"clusterrun: rank 0 ({n1}, local rank 0) raised RuntimeError, then was killed by SIGTERM "
            "while it exited"} & set(err), err_text
    assert "the hog survived" not in out
    (node,) = ctl.status()["nodes"]
    assert [(f["rank"], f["exitcode"], f["oom"]) for f in node["failures"]][0] == (1, -9, True)
    shown = ctl.run("status").stdout.splitlines()
    assert "(1 node, 2 ranks, " in shown[0] and shown[-1].endswith("(rank 1 out of memory)"), shown
    assert_nothing_left(cluster)


@pytest.mark.transports("paramiko")      # what the node records, not the transport
def test_a_rank_killed_while_python_shuts_down_is_told_its_work_was_done(cluster, tmp_path):
    """As gloo's teardown can do: a rank aborts after its script returned. The summary says
    the work was done; a rank aborting mid-script is not said to have finished."""
    script = write(tmp_path / "teardown.py", """\
        import atexit, os, sys, time
        import torch.distributed as dist
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        dist.barrier()
        print(f"rank {rank} done", flush=True)
        time.sleep(0.5)                 # long enough for the node's watch to have seen it
        if rank == 1:
            atexit.register(os.abort)   # dies in the interpreter's teardown
        if rank == 2 and sys.argv[1] == "mid":
            os.abort()                  # dies while its script runs
    """)
    n1, n2 = cluster.names[:2]
    hosts = hosts_file(tmp_path, [n1, n2], nproc_per_node=2)
    r = up(cluster, tmp_path, "--no-fail-fast", str(hosts), str(script), "mid")
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr.splitlines()
    assert (f"clusterrun: rank 1 ({n1}, local rank 1) was killed by SIGABRT after its script had finished, "
            "while Python shut down: its work was done") in err, r.stderr
    assert f"clusterrun: rank 2 ({n2}, local rank 0) was killed by SIGABRT" in err, r.stderr
    assert_nothing_left(cluster)


def test_burst_of_lines_from_every_rank_arrives_whole_and_in_order(cluster, tmp_path):
    n_lines = 20000
    script = write(tmp_path / "burst.py", f"""\
        import os, sys
        rank = os.environ["RANK"]
        out = sys.stdout
        for i in range({n_lines}):
            # stdout and stderr interleaved: per rank, order must survive both
            (sys.stderr if i % 1000 == 999 else out).write(f"tick {{rank}} {{i}} " + "x" * (i % 50) + "\\n")
    """)
    hosts = hosts_file(tmp_path, cluster.names[:2], nproc_per_node=2)
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 0, r.stderr
    seen: dict[int, list[int]] = {g: [] for g in range(4)}
    line_re = re.compile(rf"^\[({re.escape(cluster.prefix)}-n\d+) g(\d) l(\d)\] tick (\d) (\d+) (x*)$")
    for line in r.stdout.splitlines():
        if " tick " not in line:
            continue
        m = line_re.match(line)
        assert m, f"spliced or mangled line: {line!r}"
        g, i = int(m[2]), int(m[5])
        assert int(m[4]) == g and len(m[6]) == i % 50, line
        seen[g].append(i)
    for g in range(4):
        assert seen[g] == list(range(n_lines)), f"rank {g}: lost, repeated or reordered lines"
    # The same lines are in the per-rank logs of the run directory, which is private.
    home = tmp_path / "crhome"
    (run,) = (home / "runs").iterdir()
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    for g in range(4):
        log = (run / "logs" / f"rank{g}.log").read_text().splitlines()
        assert [int(l.split()[2]) for l in log] == list(range(n_lines))
    # And nothing is left behind on the nodes: no processes, no job directories.
    assert_nothing_left(cluster)
    assert not list(Path("~/.clusterrun/jobs").expanduser().glob(f"{run.name}*"))


PREFLIGHT_CASES = {
    # the second node's entry, and the cause `up` must give for it
    "workdir": ({"workdir": "/tmp/clusterrun-no-such-dir"},
                "workdir /tmp/clusterrun-no-such-dir: No such file or directory"),
    "python": ({"python": "/opt/no-such-python/bin/python3"},
               "python /opt/no-such-python/bin/python3 not found"),
    "torch": ({"python": "/usr/bin/python3"},
              "torch is not installed for /usr/bin/python3 (set `python:` or `setup:` in the hosts file)"),
    "setup": ({"setup": ["echo preparing", "ls /clusterrun-no-such-dir"]},
              "setup failed with exit code 2: ls: cannot access '/clusterrun-no-such-dir': "
              "No such file or directory"),
}


@pytest.mark.parametrize("case", [*PREFLIGHT_CASES, "script"])
def test_each_preflight_failure_names_its_own_cause_and_nothing_was_stopped(cluster, tmp_path, case):
    """A node that cannot run the job is named with the reason, before anything starts."""
    script = write(tmp_path / "ok.py", "print('never runs')\n")
    ok = {"host": cluster.names[0]}
    if case == "script":        # the script exists on the controller, not in the node's workdir
        bad, cause = ({"host": cluster.names[1], "workdir": "/tmp"},
                      f"script {script.name!r} not found in /tmp (copy it there, or use --sync)")
        ok["workdir"] = str(tmp_path)
        target = script.name
    else:
        entry, cause = PREFLIGHT_CASES[case]
        bad, target = {"host": cluster.names[1], **entry}, str(script)
    hosts = hosts_file(tmp_path, [ok, bad], nproc_per_node=1)
    r = up(cluster, tmp_path, str(hosts), target)
    assert r.returncode == 2, r.stdout + r.stderr          # a setup to fix, not a failed job
    err = [l for l in r.stderr.splitlines() if not l.startswith(f"[{cluster.names[1]}] ")]   # login lines
    assert err[0] == "clusterrun: preflight failed, nothing was started:", r.stderr
    assert f"  {cluster.names[1]}: {cause}" in err, r.stderr
    assert not [l for l in err if l.startswith(f"  {cluster.names[0]}")], r.stderr
    assert "stop" not in r.stderr and "never runs" not in r.stdout
    assert_nothing_left(cluster)


def test_unreachable_node_exits_3_and_starts_nothing(cluster, tmp_path):
    script = write(tmp_path / "report.py", REPORT)
    hosts = hosts_file(tmp_path, [cluster.names[0], {"host": cluster.names[1], "port": 2222}],
                       connect_timeout=5)
    r = up(cluster, tmp_path, str(hosts), str(script))
    assert r.returncode == 3, r.stdout + r.stderr
    assert cluster.names[1] in r.stderr and "nothing was started" in r.stderr
    assert "Traceback" not in r.stderr
    assert "REPORT" not in r.stdout
    assert_nothing_left(cluster)


def test_unknown_host_key_is_refused(cluster, tmp_path):
    script = write(tmp_path / "report.py", REPORT)
    # An alias whose known_hosts has no entry for the node.
    ssh = cluster.home / ".ssh"
    cfg = (ssh / "config").read_text()
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    alias = f"""
Host stranger
    HostName {cluster.addrs[0]}
    User root
    IdentityFile {ssh / 'id_ed25519'}
    UserKnownHostsFile {empty}
"""
    (ssh / "config").write_text(alias + cfg)
    try:
        hosts = hosts_file(tmp_path, ["stranger"])
        r = up(cluster, tmp_path, str(hosts), str(script))
    finally:
        (ssh / "config").write_text(cfg)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "unknown host key" in r.stderr and "--accept-new-host-keys" in r.stderr
