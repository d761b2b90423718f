"""End-to-end: the srun transport on a real Slurm cluster (fixture `slurm`, scripts/slurmcluster).

Every test runs in one allocation of the cluster's nodes made with `salloc --no-shell`
(no --exclusive: one CPU per node, so a second step on a node starts only because
every session is an --overlap step); it is cancelled at the end, and then nothing of
the tests is left in squeue.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from clusterrun.transports.srun import SrunTransport

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def job(slurm):
    jobid = slurm.allocate(f"--nodes={len(slurm.names)}")
    try:
        yield jobid
    finally:
        slurm.cancel(jobid)
        assert jobid not in slurm.jobs(), f"the holder job {jobid} outlived its scancel"


def run(transport: SrunTransport, command: str, stdin: bytes = b"", merge_stderr: bool = False,
        timeout: float = 60) -> tuple[bytes, int | None, str]:
    proc = transport.exec(command, merge_stderr)
    try:
        if stdin:
            assert proc.send(stdin)
        proc.close_stdin()
        proc.set_read_timeout(timeout)
        out = proc.stdout.read()
        return out, proc.wait(timeout), proc.stderr_text()
    finally:
        proc.close()


def test_exit_codes_come_back(slurm, job):
    node = SrunTransport(slurm.names[0], job)
    assert run(node, "true")[1] == 0
    out, code, err = run(node, "false")
    assert code == 1
    assert "srun:" not in err          # srun's "task 0: Exited with exit code 1" is left out
    assert run(node, "exit 7")[1] == 7
    assert run(node, "kill -9 $$")[1] == 137


def test_a_session_runs_on_its_node_as_a_login_without_the_controllers_environment(slurm, job, monkeypatch):
    monkeypatch.setenv("CLUSTERRUN_TEST_NOT_PASSED", "controller-only")
    name = slurm.names[1]
    node = SrunTransport(name, job)
    out, code, err = run(node, 'echo "$(hostname) $USER $HOME $PWD $SLURM_CONF"; '
                               'echo "[${CLUSTERRUN_TEST_NOT_PASSED-unset}]"')
    assert code == 0, err
    assert out.decode().splitlines() == [f"{name} root /root /root {slurm.conf}", "[unset]"]
    assert node.peer_addr == slurm.addr_of(name)


def test_stdin_reaches_the_command_and_its_end_is_seen(slurm, job):
    node = SrunTransport(slurm.names[0], job)
    data = b"".join(b"line %d \x00\xff\n" % i for i in range(20000)) + b"no newline at the end"
    out, code, err = run(node, "cat; echo; echo EOF-SEEN", stdin=data)
    assert code == 0, err
    assert out == data + b"\nEOF-SEEN\n"


def test_a_300kb_line_arrives_whole(slurm, job):
    node = SrunTransport(slurm.names[2], job)
    out, code, err = run(node, "head -c 300000 /dev/zero | tr '\\0' x; echo; echo after")
    assert code == 0, err
    assert out.split(b"\n") == [b"x" * 300000, b"after", b""]


def test_stderr_apart_or_merged(slurm, job):
    node = SrunTransport(slurm.names[0], job)
    out, code, err = run(node, "echo out; echo err >&2; exit 3")
    assert (out, code, err) == (b"out\n", 3, "err\n")
    out, code, err = run(node, "echo out; echo err >&2; exit 3", merge_stderr=True)
    assert (out, code, err) == (b"out\nerr\n", 3, "")


def test_two_sessions_at_once_on_one_node(slurm, job):
    # The first waits for a file only the second makes: it finishes only if the
    # second step starts while the first runs (each node has one allocated CPU).
    node = SrunTransport(slurm.names[1], job)
    flag = f"/tmp/clusterrun-srun-test-{uuid.uuid4().hex}"
    first = node.exec(f"i=0; while [ ! -e {flag} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; "
                      f"[ -e {flag} ] && echo first")
    try:
        first.close_stdin()
        time.sleep(1)                   # the first step runs by now
        out, code, err = run(node, f"touch {flag}; echo second")
        assert (out, code) == (b"second\n", 0), err
        first.set_read_timeout(40)
        assert first.stdout.read() == b"first\n"
        assert first.wait(10) == 0
    finally:
        first.close()
        if os.path.exists(flag):
            os.unlink(flag)


def test_nothing_is_left_after_close(slurm, job):
    name = slurm.names[2]
    node = SrunTransport(name, job)
    procs = [node.exec("setsid sleep 1000 & echo started; sleep 1000") for _ in range(2)]
    for proc in procs:
        proc.set_read_timeout(30)
        assert proc.stdout.readline() == b"started\n"
    assert len(slurm.node_pids(name, "sleep")) == 4
    node.close()
    deadline = time.monotonic() + 15
    while (slurm.steps(job) or slurm.node_pids(name, "sleep")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert slurm.steps(job) == []
    assert slurm.node_pids(name, "sleep") == []
    assert slurm.jobs() == [job]         # only the holder, which the fixture cancels
    with pytest.raises(Exception, match="closed"):
        node.exec("true")


def test_reads_time_out_on_a_silent_session(slurm, job):
    node = SrunTransport(slurm.names[0], job)
    proc = node.exec("sleep 30")
    try:
        proc.set_read_timeout(1.5)
        t0 = time.monotonic()
        with pytest.raises(OSError, match="no output"):
            proc.read_some(100)
        assert time.monotonic() - t0 < 10
    finally:
        proc.close()


def test_concurrent_sessions_on_every_node(slurm, job):
    results: dict[str, tuple[bytes, int | None, str]] = {}

    def one(name: str) -> None:
        results[name] = run(SrunTransport(name, job), "hostname")

    threads = [threading.Thread(target=one, args=(name,)) for name in slurm.names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {name: (out, code) for name, (out, code, _) in results.items()} == {
        name: (f"{name}\n".encode(), 0) for name in slurm.names}
