"""The node agent's pieces, run here on the controller (it is plain stdlib Python).

- parse_failures: which ranks failed and how, from torchrun's ChildFailedError report
- read_frames: the output protocol (`D <key> <n>\\n<n bytes>`), whole lines only
- job_pids / kill: exactly this job's processes, TERM then KILL
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from clusterrun import nodeagent
from clusterrun.nodeagent import DATA, EVENT, LAUNCHER_KEY, Command, Event, Mode, kill_command

AGENT = Path(nodeagent.__file__)


def data_frame(key: str, lines: bytes) -> bytes:
    """A data frame as the agent writes it (its header is the protocol's)."""
    return nodeagent.data_header(key, len(lines)) + lines


# --- the protocol ---------------------------------------------------------------------------


def test_the_wire_format_is_pinned():
    """The one place the bytes are spelled out: agents already on nodes (an `up --detach`
    collector, a reconnect after an upgrade) speak them, so a change must be deliberate."""
    assert nodeagent.AGENT_MARK == b"CLUSTERRUN-AGENT " and nodeagent.FAILED_MARK == "CLUSTERRUN-FAILED "
    assert nodeagent.data_header(LAUNCHER_KEY, 5) + b"done\n" == b"D L 5\ndone\n"
    assert nodeagent.event_frame(Event.EXIT, code=1) == b'S {"code": 1, "event": "exit"}\n'
    assert nodeagent.HEARTBEAT == b"H\n" and kill_command(2) == b"kill 2.0\n"
    assert (Command.GO, Command.STOP, Command.RM) == (b"go", b"stop", b"rm")
    modes = {v for k, v in vars(Mode).items() if k.isupper()}
    events = {v for k, v in vars(Event).items() if k.isupper()}
    assert modes == {"start", "attach", "kill", "stacks", "probe", "sync"}
    assert events == {"probe", "started", "running", "killed", "exit", "lost", "stacks", "synced"}


def test_the_agent_header_names_every_mode_and_event():
    header = nodeagent.__doc__ or ""
    protocol = AGENT.read_text().split("# --- the protocol", 1)[1].split("\n# ---", 1)[0]
    assert '"the protocol"' in header
    for name in [v for k, v in vars(Mode).items() if k.isupper()] + [v for k, v in vars(Event).items() if k.isupper()]:
        assert f'"{name}"' in protocol


# --- parse_failures ------------------------------------------------------------------

# Laid out exactly as torch/distributed/elastic/multiprocessing/errors/__init__.py
# (_MSG_FORMAT_TEMPLATE, _FAILURE_FORMAT_TEMPLATE) prints it, after torchrun's own log lines.
TORCHRUN_FAILURE = """\
W1126 19:01:02.123000 4242 torch/distributed/elastic/multiprocessing/api.py:897] Sending process 4250 closing signal SIGTERM
E1126 19:01:02.456000 4242 torch/distributed/elastic/multiprocessing/api.py:869] failed (exitcode: 7) local_rank: 1 (pid: 4251) of binary: /usr/bin/python3
Traceback (most recent call last):
  File "/usr/lib/python3.11/runpy.py", line 198, in _run_module_as_main
    return _run_code(code, main_globals, None,
  File "/opt/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 923, in <module>
    main()
  File "/opt/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 138, in __call__
    return launch_agent(self._config, self._entrypoint, list(args))
  File "/opt/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 269, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
sh FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-26_19:01:02
  host      : gpu-b.example.com
  rank      : 2 (local_rank: 0)
  exitcode  : -15 (pid: 4250) (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 4250
[2]:
  time      : 2026-11-26_19:01:02
  host      : gpu-b.example.com
  rank      : 12 (local_rank: 10)
  exitcode  : 1 (pid: 4260)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_19:01:01
  host      : gpu-b.example.com
  rank      : 3 (local_rank: 1)
  exitcode  : 7 (pid: 4251)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def test_parse_failures_root_cause_first_then_the_others_in_order():
    assert nodeagent.parse_failures(TORCHRUN_FAILURE) == [
        {"rank": 3, "local_rank": 1, "exitcode": 7, "pid": 4251},
        {"rank": 2, "local_rank": 0, "exitcode": -15, "pid": 4250},
        {"rank": 12, "local_rank": 10, "exitcode": 1, "pid": 4260},
    ]


def test_parse_failures_with_no_other_failures():
    only_root = """\
============================================================
train.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_19:01:01
  host      : node0
  rank      : 0 (local_rank: 0)
  exitcode  : -9 (pid: 77) (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 77
============================================================
"""
    assert nodeagent.parse_failures(only_root) == [{"rank": 0, "local_rank": 0, "exitcode": -9, "pid": 77}]


def test_parse_failures_uses_the_last_report_in_the_log():
    older = TORCHRUN_FAILURE.replace("rank      : 3 (local_rank: 1)", "rank      : 5 (local_rank: 1)")
    assert nodeagent.parse_failures(older + "\n...restart...\n" + TORCHRUN_FAILURE)[0]["rank"] == 3


@pytest.mark.parametrize("text", [
    "",
    "[node0] loss 0.1\n[node0] loss 0.05\n",
    "rank      : 3 (local_rank: 1)\n  exitcode  : 7 (pid: 1)\n",   # no report around it
])
def test_parse_failures_without_a_report_is_empty(text):
    assert nodeagent.parse_failures(text) == []


# --- read_frames -----------------------------------------------------------------------


class Files:
    """Node-side output files that grow, as a worker writes them, plus their sources."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sources: dict[str, nodeagent.Source] = {}

    def add(self, key: str, offset: int = 0, initial: bytes = b"") -> Path:
        p = self.root / key.replace("/", "_")
        p.write_bytes(initial)
        self.sources[key] = nodeagent.Source(key, str(p), offset)
        return p

    def append(self, key: str, data: bytes) -> None:
        with open(self.sources[key].path, "ab") as f:
            f.write(data)

    def frames(self, final: bool = False) -> bytes:
        return b"".join(nodeagent.read_frames(self.sources, final=final))

    def close(self) -> None:
        for s in self.sources.values():
            os.close(s.fd)


@pytest.fixture()
def files(tmp_path):
    f = Files(tmp_path)
    yield f
    f.close()


def test_discover_keys_launcher_output_L_and_each_worker_by_local_rank(tmp_path):
    """torchrun --log-dir=<job>/torchrun --redirects=3 writes <rdzv>_<rand>/attempt_0/<local>/stdout.log."""
    (tmp_path / "launcher.log").write_bytes(b"")
    for local in (0, 1, 10):
        d = tmp_path / "torchrun" / "run1_ab12cd" / "attempt_0" / str(local)
        d.mkdir(parents=True)
        (d / "stdout.log").write_bytes(b"")
    sources: dict = {}
    nodeagent.discover(str(tmp_path), sources, {"1": 0})
    try:
        assert sorted(sources) == ["0", "1", "10", LAUNCHER_KEY]
        assert sources["10"].path.endswith("/attempt_0/10/stdout.log")
    finally:
        for s in sources.values():
            os.close(s.fd)


def test_only_whole_lines_are_framed_and_a_partial_line_waits_for_its_newline(files):
    files.add("1")
    files.append("1", b"hello\nwor")
    assert files.frames() == data_frame("1", b"hello\n")
    assert files.frames() == b"", "nothing new: the partial line stays pending"
    files.append("1", b"ld")
    assert files.frames() == b""
    files.append("1", b"!\nnext\n")
    assert files.frames() == data_frame("1", b"world!\nnext\n")


def test_final_flushes_the_remainder_with_a_newline_added(files):
    files.add(LAUNCHER_KEY)
    files.append(LAUNCHER_KEY, b"done\nno newline at the end")
    assert files.frames() == data_frame(LAUNCHER_KEY, b"done\n")
    assert files.frames(final=True) == data_frame(LAUNCHER_KEY, b"no newline at the end\n")
    assert files.frames(final=True) == b"", "nothing is sent twice"


def test_final_on_whole_lines_adds_nothing(files):
    files.add("0")
    files.append("0", b"a\nb\n")
    assert files.frames(final=True) == data_frame("0", b"a\nb\n")


def test_frames_per_file_with_their_keys(files):
    files.add(LAUNCHER_KEY)
    files.add("0")
    files.add("1")
    files.append("1", b"from rank l1\n")
    files.append(LAUNCHER_KEY, b"torchrun says\n")
    out = files.frames()
    assert out.count(DATA + b" ") == 2
    assert data_frame(LAUNCHER_KEY, b"torchrun says\n") in out and data_frame("1", b"from rank l1\n") in out


def test_resume_from_an_offset_after_a_reconnect(files):
    files.add("0", offset=6, initial=b"first\nsecond\n")
    assert files.frames() == data_frame("0", b"second\n")


def test_a_runaway_line_without_newline_is_passed_on_in_pieces(files, monkeypatch):
    monkeypatch.setattr(nodeagent, "LINE_MAX", 10)
    files.add("0")
    files.append("0", b"x" * 25)
    assert files.frames() == data_frame("0", b"x" * 25)


def test_a_progress_bars_redraws_go_at_once_and_a_last_carriage_return_waits(files):
    def frame(data: bytes) -> bytes:
        return data_frame("0", data)

    files.add("0")
    files.append("0", b"epoch 1\n\r  0%|")
    assert files.frames() == frame(b"epoch 1\n\r  0%|")     # not held until the bar ends
    files.append("0", b"\r 50%|##")
    assert files.frames() == frame(b"\r 50%|##")
    files.append("0", b"\r100%|####|\r")        # the last \r may be the start of a \r\n
    assert files.frames() == frame(b"\r100%|####|")
    files.append("0", b"\nnext")
    assert files.frames() == frame(b"\r\n"), "the \\r\\n goes whole; `next` waits for its newline"


def test_binary_and_crlf_bytes_pass_through_unchanged(files):
    files.add("0")
    payload = b"\xff\xfe\x00 progress\r 50%\r100%\r\n"
    files.append("0", payload)
    assert files.frames() == data_frame("0", payload)


# --- job_pids and kill -----------------------------------------------------------------


def spawn(marker: str, script: str = "exec sleep 30") -> subprocess.Popen:
    """A job process: its own session, the job marker in its environment."""
    return subprocess.Popen(["sh", "-c", script], env={**os.environ, "CLUSTERRUN_JOB": marker},
                            start_new_session=True)


@pytest.fixture()
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def test_job_pids_finds_exactly_the_processes_with_this_marker(procs):
    run = uuid.uuid4().hex
    mine = spawn(f"{run}.1")
    other_node = spawn(f"{run}.10")         # a marker that merely starts with ours
    other_run = spawn(f"{uuid.uuid4().hex}.1")
    procs += [mine, other_node, other_run]
    pids = nodeagent.job_pids(f"{run}.1")
    assert pids == [mine.pid]


def test_job_pids_for_an_unknown_marker_is_empty():
    assert nodeagent.job_pids(uuid.uuid4().hex) == []


def run_kill(job_dir: Path, marker: str, grace: float) -> dict:
    """`kill` mode as the controller runs it: the agent, its spec on stdin, one event on stdout."""
    spec = {"mode": Mode.KILL, "job_dir": str(job_dir), "marker": marker, "grace": grace}
    out = subprocess.run([sys.executable, str(AGENT)], stdout=subprocess.PIPE,
                         input=json.dumps(spec).encode() + b"\n", timeout=30, check=True).stdout
    assert out.startswith(EVENT + b" ") and out.endswith(b"\n") and out.count(b"\n") == 1, out
    return json.loads(out[2:])


def reaped(p: subprocess.Popen) -> threading.Thread:
    """Reap p as soon as it dies (on a node, init does that for the session leader)."""
    t = threading.Thread(target=p.wait, daemon=True)
    t.start()
    return t


def test_kill_terms_the_job(tmp_path, procs):
    marker = f"{uuid.uuid4().hex}.0"
    p = spawn(marker)
    procs.append(p)
    (tmp_path / "pgid").write_text(str(p.pid))
    waiter = reaped(p)
    ev = run_kill(tmp_path, marker, grace=5)
    waiter.join(5)
    assert ev == {"event": Event.KILLED, "forced": False, "left": 0}
    assert p.returncode == -signal.SIGTERM


def test_kill_forces_a_job_that_ignores_term(tmp_path, procs):
    marker = f"{uuid.uuid4().hex}.0"
    p = spawn(marker, "trap '' TERM; exec sleep 30")    # SIG_IGN survives exec
    procs.append(p)
    (tmp_path / "pgid").write_text(str(p.pid))
    waiter = reaped(p)
    ev = run_kill(tmp_path, marker, grace=0.3)
    waiter.join(5)
    assert ev == {"event": Event.KILLED, "forced": True, "left": 0}
    assert p.returncode == -signal.SIGKILL
    assert nodeagent.job_pids(marker) == []


def test_kill_does_not_wait_for_torchrun_once_its_workers_are_gone(tmp_path, procs):
    """torchrun (the group) shuts down slowly after a TERM; its workers (sessions of their
    own) die at once. Once they are gone the group is KILLed, long before the grace ends."""
    marker = f"{uuid.uuid4().hex}.0"
    torchrun = spawn(marker, "trap '' TERM; exec sleep 60")   # stands in for the slow shutdown
    worker = spawn(marker)
    procs += [torchrun, worker]
    (tmp_path / "pgid").write_text(str(torchrun.pid))
    waiters = [reaped(torchrun), reaped(worker)]
    ev = run_kill(tmp_path, marker, grace=600)    # run_kill gives up after 30 s
    for w in waiters:
        w.join(5)
    assert ev == {"event": Event.KILLED, "forced": True, "left": 0}
    assert worker.returncode == -signal.SIGTERM and torchrun.returncode == -signal.SIGKILL


def test_kill_finds_marked_processes_outside_the_process_group(tmp_path, procs):
    """torchrun puts workers in sessions of their own: the marker still finds them."""
    marker = f"{uuid.uuid4().hex}.0"
    worker = spawn(marker)                  # own session, not in any recorded group
    procs.append(worker)
    waiter = reaped(worker)
    ev = run_kill(tmp_path, marker, grace=5)   # no pgid file at all
    waiter.join(5)
    assert ev["event"] == Event.KILLED and ev["left"] == 0
    assert worker.returncode == -signal.SIGTERM


def test_kill_leaves_other_jobs_alone(tmp_path, procs):
    run = uuid.uuid4().hex
    target, bystander = spawn(f"{run}.0"), spawn(f"{run}.01")
    procs += [target, bystander]
    waiter = reaped(target)
    run_kill(tmp_path, f"{run}.0", grace=5)
    waiter.join(5)
    assert target.returncode is not None
    assert bystander.poll() is None, "a job with another marker must survive"


# --- kill while streaming: "kill <grace>" on the streaming agent's stdin ------------------

def attach_agent(job_dir: Path, marker: str, inotify: bool = True) -> subprocess.Popen:
    """The agent in attach mode, as the node runs it: the loader, then code and spec on stdin.
    inotify=False: as on a Python without ctypes, where the stream polls instead."""
    import base64
    import zlib

    from clusterrun.run.remote import _AGENT_LINE, AGENT_LOADER

    line = _AGENT_LINE
    if not inotify:
        code = b"import sys\nsys.modules['ctypes'] = None\n" + zlib.decompress(base64.b64decode(line))
        line = base64.b64encode(zlib.compress(code)) + b"\n"
    p = subprocess.Popen([sys.executable, "-c", AGENT_LOADER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    p.stdin.write(line + json.dumps({"mode": Mode.ATTACH, "job_dir": str(job_dir), "marker": marker,
                                     "offsets": {}, "follow": True}).encode() + b"\n")
    return p


def events(out) -> list[dict]:
    """Read frames until the agent's final event (lost or exit); the events in order."""
    seen = []
    while True:
        line = out.readline()
        assert line, f"the agent ended without a final event after {seen}"
        if line.startswith(DATA + b" "):
            out.read(int(line.split()[2]))
        elif line.startswith(EVENT + b" "):
            seen.append(json.loads(line[2:]))
            if seen[-1]["event"] in (Event.LOST, Event.EXIT):
                return seen


@pytest.mark.parametrize("early", [True, False], ids=["sent-with-the-spec", "sent-while-streaming"])
def test_a_streaming_agent_kills_its_job_when_told(tmp_path, procs, early):
    """The collector's kill goes down the stream it already has; one sent before the
    agent even read its spec (read ahead into Python's stdin buffer) must not get lost."""
    marker = f"{uuid.uuid4().hex}.0"
    job = spawn(marker)
    procs.append(job)
    (tmp_path / "pgid").write_text(str(job.pid))
    waiter = reaped(job)
    agent = attach_agent(tmp_path, marker)
    procs.append(agent)
    if not early:
        agent.stdin.flush()
        (tmp_path / "launcher.log").write_text("streaming\n")
        assert agent.stdout.readline() == nodeagent.data_header(LAUNCHER_KEY, 10) and agent.stdout.read(10) == b"streaming\n"
    agent.stdin.write(kill_command(5.0))
    agent.stdin.flush()
    seen = events(agent.stdout)
    waiter.join(5)
    assert seen[0] == {"event": Event.KILLED, "forced": False, "left": 0}
    assert seen[-1]["event"] == Event.LOST          # no supervisor here to write exit.json
    assert job.returncode == -signal.SIGTERM
    agent.stdin.write(Command.RM + b"\n")
    agent.stdin.close()
    assert agent.wait(10) == 0
    assert not tmp_path.exists()                # "rm" removed the job directory


def test_a_kill_that_comes_after_the_job_ended_does_not_keep_the_job_directory(tmp_path):
    """The job exited just as the controller sent `kill`: the agent still takes the `rm`."""
    (tmp_path / "pgid").write_text("0")
    (tmp_path / "exit.json").write_text('{"code": 0, "failures": []}')
    agent = attach_agent(tmp_path, f"{uuid.uuid4().hex}.0")
    seen = events(agent.stdout)
    assert seen == [{"event": Event.EXIT, "code": 0, "failures": []}]
    agent.stdin.write(kill_command(5.0) + Command.RM + b"\n")
    agent.stdin.close()
    assert agent.wait(10) == 0
    assert not tmp_path.exists()


# --- waking the quiet stream (inotify) -----------------------------------------------------

def woke(changes: nodeagent.Changes) -> bool:
    import select
    return bool(select.select([changes.fd], [], [], 0)[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_a_quiet_stream_wakes_for_a_new_rank_log_and_for_output(tmp_path):
    """discover() watches every directory on the way to the rank logs, including ones
    that do not exist yet; the logs get one-shot watches when the stream falls quiet.
    torchrun making them, a worker's first write, the supervisor's exit.json (written
    by rename) each wake the agent; the writes after the first wake nobody."""
    changes = nodeagent.Changes()
    assert changes, "inotify is on every Linux this runs on"
    sources: dict = {}
    nodeagent.discover(str(tmp_path), sources, {}, changes)
    assert not woke(changes)
    rank_dir = tmp_path / "torchrun" / "run1_ab12cd" / "attempt_0" / "0"
    for d in [*reversed(rank_dir.parents[:3]), rank_dir]:     # torchrun makes the tree level by level
        d.mkdir()
        assert woke(changes) and changes.drain() is True
        nodeagent.discover(str(tmp_path), sources, {}, changes)
    (rank_dir / "stdout.log").write_bytes(b"")
    assert woke(changes) and changes.drain() is True
    nodeagent.discover(str(tmp_path), sources, {}, changes)
    try:
        assert sorted(sources) == ["0"]
        assert not woke(changes)
        changes.arm([sources["0"].path])
        with open(rank_dir / "stdout.log", "ab", buffering=0) as f:
            f.write(b"a line\n")
            assert woke(changes) and changes.drain() is False  # it grew; nothing new appeared
            f.write(b"another line\n")
            assert not woke(changes), "the watch was one-shot: output that flows costs no events"
            changes.arm([sources["0"].path])
            f.write(b"a line after a quiet spell\n")
            assert woke(changes) and changes.drain() is False
        nodeagent.write_atomic(str(tmp_path / "exit.json"), "{}")
        assert woke(changes) and changes.drain() is True
        assert not woke(changes)
    finally:
        for s in sources.values():
            os.close(s.fd)
        os.close(changes.fd)


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "polling"])
def test_a_quiet_stream_passes_on_new_lines_new_rank_logs_and_the_end(tmp_path, procs, inotify):
    """Each thing the agent waits for, arriving while it waits: a line, a rank's log
    made level by level as torchrun does, the exit.json of the job's end."""
    marker = f"{uuid.uuid4().hex}.0"
    job = spawn(marker)
    procs.append(job)
    (tmp_path / "pgid").write_text(str(job.pid))
    (tmp_path / "launcher.log").write_bytes(b"")
    agent = attach_agent(tmp_path, marker, inotify)
    procs.append(agent)
    agent.stdin.flush()

    def frame() -> tuple[bytes, bytes]:
        head = agent.stdout.readline()
        assert head.startswith(DATA + b" "), head
        _, key, n = head.split()
        return key, agent.stdout.read(int(n))

    with open(tmp_path / "launcher.log", "ab") as f:
        f.write(b"rendezvous\n")
    assert frame() == (LAUNCHER_KEY.encode(), b"rendezvous\n")
    rank_dir = tmp_path / "torchrun" / "run1_ab12cd" / "attempt_0" / "1"
    rank_dir.mkdir(parents=True)
    (rank_dir / "stdout.log").write_bytes(b"hello from local rank 1\n")
    assert frame() == (b"1", b"hello from local rank 1\n")
    nodeagent.write_atomic(str(tmp_path / "exit.json"), '{"code": 0, "failures": []}')
    head = agent.stdout.readline()
    assert json.loads(head[2:]) == {"event": Event.EXIT, "code": 0, "failures": []}
    agent.stdin.write(Command.RM + b"\n")
    agent.stdin.close()
    assert agent.wait(10) == 0


def test_job_argv_expands_only_its_own_paths_not_the_users_arguments(monkeypatch):
    """The plan's python and --log-dir under ~ are made real on the node; a script
    argument that happens to equal either is the user's and stays as written."""
    from clusterrun.hostsfile import parse_hosts
    from clusterrun.options import LaunchOptions
    from clusterrun.plan import make_plan

    monkeypatch.setenv("HOME", "/home/alice")
    hosts = parse_hosts({"python": "~/venv/bin/python", "hosts": ["gpu-a"]})
    job_dir = "~/.clusterrun/jobs/r1/0"
    log_dir = f"--log-dir={job_dir}/torchrun"
    opts = LaunchOptions("train.py", ("~/venv/bin/python", log_dir, "~/data"))
    (node,) = make_plan(hosts, opts, run_id="r1", master_addr="10.0.0.1", master_port=29500,
                        controller_python="/usr/bin/python3", local_home="/tmp/h").nodes
    spec = {"argv": list(node.argv), "python": node.python, "job_dir": node.job_dir}
    argv = nodeagent.job_argv(spec, "/home/alice/.clusterrun/jobs/r1/0")
    assert argv[0] == "/home/alice/venv/bin/python"
    assert "--log-dir=/home/alice/.clusterrun/jobs/r1/0/torchrun" in argv
    assert argv[argv.index("train.py") - 2] == "/home/alice/venv/bin/python"   # the workers' python
    assert argv[-3:] == ["~/venv/bin/python", log_dir, "~/data"]              # the user's, untouched


# --- each rank's end, recorded on the node (issue 13) --------------------------------

FAKE_TORCHRUN = r"""
import os, subprocess, sys, time
kids = [
    subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(0.3); sys.exit(3)"],
                     env={**os.environ, "RANK": "5", "LOCAL_RANK": "0"}),
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                     env={**os.environ, "RANK": "6", "LOCAL_RANK": "1"}),
]
while kids[0].poll() is None:       # torchrun's monitor: a look every 0.1 s
    time.sleep(0.1)
kids[1].terminate()                 # then it ends the node's other workers
kids[1].wait()
"""


def test_rank_watch_records_when_and_how_each_worker_ended():
    """The supervisor sees each worker's end: the order, and the status torchrun is about to
    reap. (A worker torchrun ends itself it reaps at once: that status may be gone first;
    torchrun's own report has it then.)"""
    torchrun = subprocess.Popen([sys.executable, "-c", FAKE_TORCHRUN])
    watch = nodeagent.RankWatch(torchrun.pid)
    watch.start()
    assert torchrun.wait(timeout=30) == 0
    watch.finish()
    ranks = {r["rank"]: r for r in watch.ranks.values()}
    assert set(ranks) == {5, 6}
    assert (ranks[5]["local_rank"], ranks[5]["status"]) == (0, 3)
    assert ranks[6]["local_rank"] == 1 and ranks[6]["status"] in (-15, None)
    assert ranks[5]["exit_time"] < ranks[6]["exit_time"]


# Both workers end by SIGKILL; torchrun reaps them only later, so their statuses are there to read.
KILLED_TORCHRUN = r"""
import os, subprocess, sys, time
kids = [
    subprocess.Popen([sys.executable, "-c", "import os, time; time.sleep(0.5); os.kill(os.getpid(), 9)"],
                     env={**os.environ, "RANK": "5", "LOCAL_RANK": "0"}),
    subprocess.Popen([sys.executable, "-c", "import os, time; time.sleep(1.0); os.kill(os.getpid(), 9)"],
                     env={**os.environ, "RANK": "6", "LOCAL_RANK": "1"}),
]
time.sleep(3)
for k in kids:
    k.wait()
"""


def test_a_worker_sigkilled_as_the_kernels_oom_kill_count_rises_is_marked_out_of_memory(tmp_path, monkeypatch):
    vmstat = tmp_path / "vmstat"
    vmstat.write_text("pgfault 100\noom_kill 5\n")
    monkeypatch.setattr(nodeagent, "VMSTAT", str(vmstat))
    torchrun = subprocess.Popen([sys.executable, "-c", KILLED_TORCHRUN])
    watch = nodeagent.RankWatch(torchrun.pid)
    watch.start()
    vmstat.write_text("pgfault 100\noom_kill 6\n")       # one OOM kill, before rank 5's end
    assert torchrun.wait(timeout=30) == 0
    watch.finish()
    ranks = {r["rank"]: r for r in watch.ranks.values()}
    assert (ranks[5]["status"], ranks[5].get("oom")) == (-9, True)
    assert (ranks[6]["status"], ranks[6].get("oom")) == (-9, None), "one OOM kill marks one worker"
    out = nodeagent.rank_outcomes(watch.ranks, [], stop_time=None)
    assert [(f["rank"], f["oom"]) for f in out] == [(5, True), (6, False)]


def watched(rank, local, t, status):
    return {"rank": rank, "local_rank": local, "exit_time": t, "status": status}


def test_rank_outcomes_in_order_of_exit_and_stopped_only_after_the_stop():
    ranks = {1: watched(0, 0, 10.0, 0), 2: watched(1, 1, 10.2, 1), 3: watched(2, 2, 10.1, 1),
             4: watched(3, 3, 12.5, -15)}
    out = nodeagent.rank_outcomes(ranks, [], stop_time=12.0)
    assert [(f["rank"], f["exitcode"], f["stopped"]) for f in out] == [(2, 1, False), (1, 1, False), (3, -15, True)]


def test_rank_outcomes_take_torchruns_codes_when_a_status_was_missed():
    ranks = {1: watched(0, 0, 10.0, None), 2: watched(1, 1, 10.5, None)}
    reported = [{"rank": 0, "local_rank": 0, "exitcode": 7}]
    out = nodeagent.rank_outcomes(ranks, reported, stop_time=None)
    assert [(f["rank"], f["exitcode"], f["stopped"]) for f in out] == [(0, 7, False)]
    # ...and a rank torchrun reports that was never seen running still counts.
    out = nodeagent.rank_outcomes({}, reported, stop_time=None)
    assert [(f["rank"], f["exitcode"], f["exit_time"]) for f in out] == [(0, 7, None)]


def test_a_rank_too_quick_for_the_watch_is_stopped_only_if_a_signal_ended_it():
    """A script that fails at once (an ImportError, an argparse error) ends before the watch
    first looks: its exit code, not clusterrun's later stop, says it failed on its own."""
    reported = [{"rank": 0, "local_rank": 0, "exitcode": 2}, {"rank": 1, "local_rank": 1, "exitcode": -15}]
    out = nodeagent.rank_outcomes({}, reported, stop_time=12.0)
    assert [(f["rank"], f["exitcode"], f["stopped"]) for f in out] == [(0, 2, False), (1, -15, True)]


# --- a rank that dies after its script finished ----------------------------------------

def _site(tmp_path):
    site, where = tmp_path / "site", tmp_path / "stacks"
    site.mkdir()
    where.mkdir()
    (site / "sitecustomize.py").write_text(nodeagent.STACKS_SITE)
    env = dict(os.environ, PYTHONPATH=str(site), CLUSTERRUN_STACKS=str(where), RANK="1", LOCAL_RANK="1")
    return where, env


@pytest.mark.parametrize("script, finished", [
    ("import atexit, os; atexit.register(os.abort)", True),     # dies in the interpreter's teardown
    ("import sys; sys.exit(0)", True),
    ("import os; os.abort()", False),                           # dies while the script runs
    ("raise ValueError('bad config')", False),                  # an uncaught error is not a finish
])
def test_a_worker_marks_that_its_script_is_over_only_when_it_is(tmp_path, script, finished):
    where, env = _site(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    err = proc.communicate(timeout=60)[1]
    assert nodeagent.script_finished(str(where), proc.pid) is finished, err


def test_a_rank_killed_after_its_script_finished_is_told_so():
    """Seen by the watch, or only in torchrun's report (by its pid), the fact carries over."""
    ranks = {41: dict(watched(1, 1, 10.0, -6), finished=True), 42: watched(2, 0, 10.1, -6)}
    out = nodeagent.rank_outcomes(ranks, [], stop_time=None)
    assert [(f["rank"], f["finished"]) for f in out] == [(1, True), (2, False)]
    reported = [{"rank": 3, "local_rank": 1, "exitcode": -6, "pid": 77},
                {"rank": 4, "local_rank": 0, "exitcode": -6, "pid": 78}]
    out = nodeagent.rank_outcomes({}, reported, stop_time=None, finished=lambda pid: pid == 77)
    assert [(f["rank"], f["finished"]) for f in out] == [(3, True), (4, False)]
    assert "pid" not in out[0] and reported[0]["pid"] == 77


# --- a rank that raised its own exception ---------------------------------------------

@pytest.mark.parametrize("script, raised", [
    ("raise ValueError('bad config')", "ValueError"),
    ("import atexit, time; atexit.register(time.sleep, 0.1); raise KeyError(3)", "KeyError"),
    ("import sys; sys.exit(3)", None),                          # an exit code, not an exception
    ("try:\n    raise ValueError(1)\nexcept ValueError:\n    pass", None),    # caught: nothing raised
])
def test_a_worker_marks_an_exception_its_script_did_not_catch(tmp_path, script, raised):
    where, env = _site(tmp_path)
    before = time.time()
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    err = proc.communicate(timeout=60)[1]
    got = nodeagent.script_raised(str(where), proc.pid)
    assert (got[1] if got else None) == raised, err
    if got:
        assert before <= got[0] <= time.time()
        assert err.decode().rstrip().splitlines()[-1].startswith(raised), "the traceback still prints"


def test_a_rank_that_raised_before_the_stop_failed_by_itself_whatever_ended_it():
    """Rank 1 raised at 11.0 and was ended by SIGTERM at 12.5, after the stop (12.0): its own
    failure. Rank 2 raised after the stop (a SIGTERM handler's exception): stopped."""
    ranks = {1: watched(0, 0, 11.5, 1), 2: dict(watched(1, 1, 12.5, -15), raised=(11.0, "ValueError")),
             3: dict(watched(2, 2, 12.6, -15), raised=(12.1, "RuntimeError")), 4: watched(3, 3, 12.7, -15)}
    out = nodeagent.rank_outcomes(ranks, [], stop_time=12.0)
    assert [(f["rank"], f["exitcode"], f["stopped"], f["raised"]) for f in out] == [
        (0, 1, False, ""), (1, -15, False, "ValueError"), (2, -15, True, "RuntimeError"), (3, -15, True, "")]
    # Seen only in torchrun's report, by its pid: the same.
    reported = [{"rank": 5, "local_rank": 1, "exitcode": -15, "pid": 77}]
    out = nodeagent.rank_outcomes({}, reported, stop_time=12.0, raised=lambda pid: (11.0, "ValueError"))
    assert [(f["rank"], f["stopped"], f["raised"]) for f in out] == [(5, False, "ValueError")]
