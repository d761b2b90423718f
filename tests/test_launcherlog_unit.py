"""Unit: what the terminal shows of torchrun's own lines (launcherlog.LauncherFilter).

The samples are torchrun 2.13's own output on a node, as written to its launcher
log: a rank failing (ChildFailedError and its box), and a node stopped (SignalException).
"""

from __future__ import annotations

import random

import pytest

from clusterrun.run.launcherlog import LauncherFilter

FAILED = """\
W1130 02:25:04.416000 30273 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 30278 closing signal SIGTERM
E1130 02:25:04.418000 30273 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 1 (pid: 30279) of binary: /venv/bin/python
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "<frozen runpy>", line 88, in _run_code
  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1032, in <module>
    main()
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/errors/__init__.py", line 367, in wrapper
    return f(*args, **kwargs)
           ^^^^^^^^^^^^^^^^^^
  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1028, in main
    run(args)
  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1019, in run
    elastic_launch(
  File "/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 194, in __call__
    return launch_agent(
           ^^^^^^^^^^^^^
  File "/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
fail.py FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-30_02:25:04
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 30278)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 30278
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_02:25:04
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 30279) 
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""

STOPPED = """\
W1130 02:25:26.307000 30331 torch/distributed/elastic/agent/server/api.py:753] Received 15 death signal, shutting down workers
W1130 02:25:26.308000 30331 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 30337 closing signal SIGTERM
W1130 02:25:26.308000 30331 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 30338 closing signal SIGTERM
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "<frozen runpy>", line 88, in _run_code
  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1032, in <module>
    main()
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/errors/__init__.py", line 367, in wrapper
    return f(*args, **kwargs)
           ^^^^^^^^^^^^^^^^^^
  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1028, in main
    run(args)
  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1019, in run
    elastic_launch(
  File "/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 194, in __call__
    return launch_agent(
           ^^^^^^^^^^^^^
  File "/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 374, in launch_agent
    result = agent.run()
             ^^^^^^^^^^^
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/metrics/api.py", line 134, in wrapper
    result = f(*args, **kwargs)
             ^^^^^^^^^^^^^^^^^^
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/agent/server/api.py", line 745, in run
    result = self._invoke_run(role)
             ^^^^^^^^^^^^^^^^^^^^^^
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/agent/server/api.py", line 923, in _invoke_run
    time.sleep(monitor_interval)
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 86, in _terminate_process_handler
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
torch.distributed.elastic.multiprocessing.api.SignalException: Process 30331 got signal: 15
"""

OTHER = """\
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1019, in run
    elastic_launch(
torch.distributed.DistNetworkError: The server socket has failed to listen on any local network address. port: 29500, useIPv6: false, code: -98, name: EADDRINUSE, message: address already in use
"""


def hint(n: int) -> bytes:
    return f"<{n} held back>\n".encode()


def shown(text: str, seed: int | None = None) -> str:
    """Feed text in chunks of whole lines (random sizes when seeded), then end the stream."""
    lines = text.encode().splitlines(keepends=True)
    f, out, i = LauncherFilter(hint), [], 0
    rnd = random.Random(seed)
    while i < len(lines):
        n = rnd.randint(1, 7) if seed is not None else len(lines)
        out.append(f.feed(b"".join(lines[i:i + n])))
        i += n
    out.append(f.flush())
    return b"".join(out).decode()


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_a_failed_nodes_report_becomes_one_line(seed):
    assert shown("banner\n" + FAILED, seed) == f"banner\n<{len(FAILED.splitlines())} held back>\n"


@pytest.mark.parametrize("seed", [None, 4, 5])
def test_a_stopped_nodes_signal_traceback_becomes_one_line(seed):
    assert shown(STOPPED + "after\n", seed) == f"<{len(STOPPED.splitlines())} held back>\nafter\n"


@pytest.mark.parametrize("seed", [None, 8, 9])
def test_a_chain_of_torchruns_own_tracebacks_becomes_one_line(seed):
    """Stopped while it was closing its workers: SignalException during SignalException."""
    tb = STOPPED[STOPPED.index("Traceback"):]
    chained = STOPPED + "\nDuring handling of the above exception, another exception occurred:\n\n" + tb
    assert shown(chained + "after\n", seed) == f"<{len(chained.splitlines())} held back>\nafter\n"


@pytest.mark.parametrize("seed", [None, 6, 7])
def test_any_other_traceback_of_torchrun_is_shown_whole(seed):
    assert shown("a\n" + OTHER + "b\n", seed) == "a\n" + OTHER + "b\n"


def test_a_traceback_cut_off_by_the_end_of_the_stream_is_shown():
    cut = "".join(FAILED.splitlines(keepends=True)[2:8])   # from "Traceback", frames only
    assert shown(cut) == cut


def test_lines_that_only_mention_the_words_pass_untouched():
    text = "we are closing signal handlers\nprint: Traceback (most recent call last): not really\n"
    f = LauncherFilter(hint)
    assert f.feed(text.encode()) == text.encode()
    assert f.flush() == b""


# The shapes below are torchrun 2.13's own, on a node whose worker had failed when
# clusterrun's stop reached it: torchrun got SIGTERM twice (the group's, then its own), and
# its handler raised wherever Python was as it exited.

# In a finalizer at exit: a frame whose source line is `def ...:` is followed by a blank line.
IN_A_FINALIZER = """\
Traceback (most recent call last):
  File "/usr/lib/python3.11/weakref.py", line 666, in _exitfunc
    f()
  File "/usr/lib/python3.11/weakref.py", line 590, in __call__
    return info.func(*info.args, **(info.kwargs or {}))
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/venv/lib/python3.11/site-packages/torch/library.py", line 662, in _del_library
    handle.destroy()
  File "/venv/lib/python3.11/site-packages/torch/_library/utils.py", line 32, in destroy
    def destroy(self) -> None:

  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 86, in _terminate_process_handler
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
torch.distributed.elastic.multiprocessing.api.SignalException: Process 14693 got signal: 15
"""

# In an atexit callback: Python's own header first, and a whitespace-only line.
IN_AN_ATEXIT_CALLBACK = """\
Exception ignored in atexit callback: <function dump_cache_stats at 0x7f7591d865c0>
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/_subclasses/fake_tensor.py", line 3628, in dump_cache_stats
    log.info("FakeTensor cache stats:")
  File "/usr/lib/python3.11/logging/__init__.py", line 1753, in isEnabledFor
    _releaseLock()
  File "/usr/lib/python3.11/logging/__init__.py", line 237, in _releaseLock
    def _releaseLock():
    
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 86, in _terminate_process_handler
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
torch.distributed.elastic.multiprocessing.api.SignalException: Process 22800 got signal: 15
"""

# While the traceback itself was printed: Python gives up on it and dumps the exception object.
WHILE_PRINTED = """\
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/errors/__init__.py", line 367, in wrapper
    return f(*args, **kwargs)
object address  : 0x7fa37b17ea40
object refcount : 2
object type     : 0x55feb7f4b950
object type name: ChildFailedError
object repr     : ChildFailedError('\\n=====================\\nworker.py FAILED\\n')
lost sys.stderr
"""

# The second SIGTERM ran the handler again inside the first one's `signal.Signals(signum)`,
# while torchrun handled an error of another kind: the chain ends in torchrun's exception.
INSIDE_SIGNALS_NEW = """\
Traceback (most recent call last):
  File "/usr/lib/python3.11/selectors.py", line 415, in select
    fd_event_list = self._selector.poll(timeout)
                    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^
InterruptedError: [Errno 4] Interrupted system call

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 85, in _terminate_process_handler
    sigval = signal.Signals(signum)
             ^^^^^^^^^^^^^^^^^^^^^^
  File "/usr/lib/python3.11/enum.py", line 714, in __call__
    return cls.__new__(cls, value)
           ^^^^^^^^^^^^^^^^^^^^^^^
  File "/usr/lib/python3.11/enum.py", line 1104, in __new__
    def __new__(cls, value):

  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 86, in _terminate_process_handler
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
torch.distributed.elastic.multiprocessing.api.SignalException: Process 30331 got signal: 15
"""


@pytest.mark.parametrize("seed", [None, 10, 11, 12])
@pytest.mark.parametrize("shape", [IN_A_FINALIZER, IN_AN_ATEXIT_CALLBACK, WHILE_PRINTED, INSIDE_SIGNALS_NEW],
                         ids=["finalizer", "atexit", "while-printed", "inside-signals-new"])
def test_every_shape_of_torchruns_report_on_a_stopped_node_becomes_one_line(shape, seed):
    """After the failed node's report (its box), or alone: nothing of it is shown raw."""
    for before in (FAILED, STOPPED, ""):
        text = before + shape
        assert shown("banner\n" + text + "after\n", seed) == (
            f"banner\n<{len(text.splitlines())} held back>\nafter\n"), before[:40]


@pytest.mark.parametrize("seed", [None, 13, 14])
def test_a_chain_of_other_tracebacks_is_shown_whole_and_in_order(seed):
    """A chain that does not end in torchrun's report is someone else's: every line of it shows,
    also after a report held back (its hint first)."""
    foreign = OTHER + "\nDuring handling of the above exception, another exception occurred:\n\n" + OTHER
    assert shown("a\n" + foreign + "b\n", seed) == "a\n" + foreign + "b\n"
    assert shown(STOPPED + foreign, seed) == f"<{len(STOPPED.splitlines())} held back>\n" + foreign
