"""The node side of a run: started over SSH as `<python> -c <loader>`.

The loader reads this file (compressed) from stdin's first line, and the spec
(JSON) from the second; the rest of stdin belongs to the mode.

Standard library only, Python 3.8+, because it runs under whatever interpreter
the node has. It never imports clusterrun.

Every mode, event, frame and command of the wire protocol is defined once, in
the section "the protocol" below, with the spec each mode takes; the controller
imports those names from here (clusterrun/run/frames.py reads the frames).
"""

import errno
import io
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

# --- the protocol ----------------------------------------------------------------
# What the controller and this agent say to each other, defined here only: the
# controller imports these names (the agent itself ships alone, so it cannot import
# theirs).
#
# The login line (built by clusterrun/login.py) runs `cd WORKDIR`, then `setup:`; a
# step that fails writes FAILED_MARK and the step's name on stderr, then exits 1:
#   CLUSTERRUN-FAILED workdir missing|notdir|denied
#   CLUSTERRUN-FAILED setup <its exit status>
# Then the agent starts, and its first output is a newline (it ends a login line
# left open) and AGENT_MARK with the session's token (the loader's argument), so
# that nothing a login prints can be taken for a frame. Then frames, on stdout:
#   D <key> <n>\n<n bytes>   whole lines from one output file; key is "L" for
#                            torchrun's own output (LAUNCHER_KEY), the local rank
#                            for a worker
#   S <json>\n              an event: {"event": <Event name>, ...its fields}
#   H\n                     a heartbeat while the job is quiet (every HEARTBEAT_EVERY s)
# Anything else on stdout is not the agent's (a login that printed late).
#
# stdin: the agent's code (compressed), the spec (JSON), then, for start and
# attach, one Command a line. The sync mode has its own exchange instead: a JSON
# list of relative paths in, a JSON {path: [size, mtime]} line out for those the
# node has, then a tar stream in, and the `synced` event out.

AGENT_MARK = b"CLUSTERRUN-AGENT "
FAILED_MARK = "CLUSTERRUN-FAILED "
FAILED_WORKDIR = "workdir"          # ... and missing, notdir or denied (test(1)'s answer)
# The login line exports this, with the session's token, while `setup:` runs: a setup
# clusterrun gave up on is found by it (kill mode, "setup": true) and ended.
SETUP_VAR = "CLUSTERRUN_SETUP"
FAILED_SETUP = "setup"              # ... and the setup's exit status

DATA = b"D"
EVENT = b"S"
HEARTBEAT = b"H\n"
LAUNCHER_KEY = "L"                  # a data frame's key for launcher.log (torchrun's own output)


class Mode(object):
    """spec["mode"]: what the agent does (the spec each takes: the *Spec types below)."""
    START = "start"     # create the job directory, start torchrun in its own session under a
                        # supervisor that outlives the SSH connection, then stream its output
                        # (with "check": probe first, start only on Command.GO)
    ATTACH = "attach"   # stream an existing job's output from given byte offsets (reconnect);
                        # with "follow": false, stop once caught up (Event.RUNNING)
    KILL = "kill"       # TERM, then KILL after a grace period, every process of the job;
                        # answer Event.KILLED once none is left
    STACKS = "stacks"   # every selected rank's Python stacks (each worker dumps its own, see
                        # STACKS_SITE; py-spy adds native frames where asked and present)
    PROBE = "probe"     # what `check` and the preflight of `up` need to know (Event.PROBE)
    SYNC = "sync"       # receive the changed files of the workdir (`up --sync`)


class Event(object):
    """The events ("S" frames), by name; each with the fields that follow it."""
    PROBE = "probe"         # the probe's findings (Mode.PROBE; Mode.START with "check")
    STARTED = "started"     # pgid, ifname, hostname: torchrun runs
    RUNNING = "running"     # attach without follow: caught up, the job still runs
    KILLED = "killed"       # forced, left: the answer to Mode.KILL and Command.KILL
    EXIT = "exit"           # code, failures, stop_time: torchrun ended (final)
    LOST = "lost"           # reason: the job is gone without an exit code (final)
    STACKS = "stacks"       # ranks: the answer to Mode.STACKS
    SYNCED = "synced"       # files: the answer to Mode.SYNC


class Command(object):
    """The controller's lines on stdin, after the spec (start, attach)."""
    GO = b"go"          # after a probe event: start (anything else, STOP say, does not)
    STOP = b"stop"
    KILL = b"kill"      # "kill <grace>" while streaming: kill the job as Mode.KILL does,
                        # answer Event.KILLED, then stream to the end
    RM = b"rm"          # after the final event: remove the job directory (the controller
                        # has everything by then)


def data_header(key, size):
    """The header of a data frame: the next `size` bytes are lines of output file `key`."""
    return b"%s %s %d\n" % (DATA, key.encode(), size)


def event_frame(name, **fields):
    """An event frame ("event" last in its JSON)."""
    fields["event"] = name
    return EVENT + b" " + json.dumps(fields).encode() + b"\n"


def kill_command(grace):
    """Command.KILL with its grace period, as a line."""
    return Command.KILL + b" %r\n" % float(grace)


if __name__ != "__main__":
    # The specs, typed for the controller (mypy checks what it builds against them). Only
    # where this file is imported: the node runs it as __main__ and needs no typing.
    from typing import Dict, List, Optional, TypedDict, Union

    class _Spec(TypedDict):
        mode: str
        job_dir: str                # the job's directory on the node (~/... expanded there)

    class _ProbeFields(TypedDict, total=False):
        torch: bool                 # import torch (and its torchrun); else only look for it
        master_addr: str            # report the interface that reaches it
        inventory: bool             # torch, CUDA and NCCL versions, nvidia-smi's GPUs
        env: Dict[str, str]         # the job's env: nvidia-smi is looked for on its PATH
        script: str                 # report whether it is there (a module: importable)
        module: bool
        port: "int | str"           # report whether it is free; "auto": a free one

    class ProbeCheck(_ProbeFields):
        mode: str                   # (Mode.PROBE)

    class ProbeSpec(_Spec, _ProbeFields):
        pass

    class _StartFields(_Spec):
        argv: List[str]             # the plan's torchrun command
        env: Dict[str, str]
        python: str
        pick_ifname: List[str]      # env names to set to the interface that reaches master_addr
        master_addr: str
        marker: str                 # CLUSTERRUN_JOB: finds the job's processes

    class StartSpec(_StartFields, total=False):
        check: ProbeCheck           # probe first, start only on Command.GO

    class AttachSpec(_Spec):
        offsets: Dict[str, int]     # output file key -> bytes already received
        follow: bool
        marker: str

    class _KillFields(_Spec):
        marker: str
        grace: float

    class KillSpec(_KillFields, total=False):
        setup: bool                 # marker is a login's SETUP_VAR tag: end that setup

    class StacksSpec(_Spec):
        marker: str
        local_ranks: Optional[List[int]]    # None: every rank
        native: bool
        children: bool
        full: bool                          # a dump faulthandler cut: ask for every frame

    class SyncSpec(_Spec):
        pass

    Spec = Union[StartSpec, AttachSpec, KillSpec, StacksSpec, ProbeSpec, SyncSpec]


POLL_IDLE = 0.02            # seconds between polls when no file grew (without inotify)
READ_MAX = 1 << 20          # bytes read from one file per pass
LINE_MAX = 1 << 20          # a "line" longer than this is passed on in pieces
DISCOVER_EVERY = 0.2        # seconds between looks for new worker log files (while output flows)
HEARTBEAT_EVERY = 5.0       # an idle stream says HEARTBEAT this often, so a dead link shows
ALIVE_EVERY = 0.5           # seconds between checks that the job's process group exists
COMMAND_EVERY = 0.05        # seconds between looks at stdin while output keeps coming


def main(argv):
    # First, the line that tells the controller where the login's output ends and
    # the agent's frames begin (the newline ends a login line left open).
    if len(argv) > 1:
        write_out(b"\n" + AGENT_MARK + argv[1].encode() + b"\n")
    # The spec comes on stdin, after the agent's own code: nothing of it (env
    # values included) shows in the node's process list.
    spec = json.loads(sys.stdin.buffer.readline())
    mode = spec["mode"]
    job_dir = os.path.expanduser(spec["job_dir"])
    if mode in (Mode.START, Mode.ATTACH):
        commands = Commands()
    if mode == Mode.START:
        if spec.get("check"):       # the preflight: answer, then start only if told "go"
            event(Event.PROBE, **probe(spec["check"]))
            if commands.next() != Command.GO:
                return 0
        start(spec, job_dir)
        stream(job_dir, {}, commands, spec.get("marker"))
    elif mode == Mode.ATTACH:
        if not os.path.isdir(job_dir):
            event(Event.LOST, reason="no job directory on the node")
            return 0
        stream(job_dir, spec.get("offsets", {}), commands, spec.get("marker"), spec.get("follow", True))
    elif mode == Mode.KILL and spec.get("setup"):
        end_setup(spec["marker"], float(spec.get("grace", 5)))
    elif mode == Mode.KILL:
        kill(job_dir, spec["marker"], float(spec.get("grace", 5)))
    elif mode == Mode.STACKS:
        event(Event.STACKS, ranks=stacks(job_dir, spec))
    elif mode == Mode.PROBE:
        event(Event.PROBE, **probe(spec))
    elif mode == Mode.SYNC:
        sync(spec)
    return 0


# --- probe -------------------------------------------------------------------

def probe(spec):
    """What `check` and the preflight of `up` need to know about this node."""
    import platform
    info: dict = {"python": platform.python_version(), "executable": sys.executable,
            "hostname": socket.gethostname(), "cwd": os.getcwd()}
    if hasattr(os, "sched_getaffinity"):    # the CPUs this session may run on (a Slurm step's share)
        info["cpus"] = len(os.sched_getaffinity(0))
    script = spec.get("script")
    if script:
        if spec.get("module"):
            import importlib.util
            try:
                info["script_found"] = importlib.util.find_spec(script.split(".")[0]) is not None
            except (ImportError, ValueError):
                info["script_found"] = False
        else:
            info["script_found"] = os.path.isfile(os.path.expanduser(script))
    if spec.get("master_addr"):
        info["ifname"] = interface_to(spec["master_addr"])
    port = spec.get("port")
    if port == "auto":
        s = socket.socket()
        s.bind(("", 0))             # the kernel's pick of a free port
        info["free_port"] = s.getsockname()[1]
        s.close()
    elif port:
        info["port_free"] = port_free(int(port))
    loaded: object = None       # the imported torch, for the inventory
    if spec.get("torch"):
        try:
            import torch
            loaded = torch
            info["torch"] = torch.__version__
            import torch.distributed.run  # noqa: F401 - torchrun's entry point
            info["torchrun"] = True
        except Exception as e:      # ImportError, or a broken install
            info.setdefault("torch", None)
            info["torch_error"] = "%s: %s" % (type(e).__name__, e)
            info["torchrun"] = False
    else:
        import importlib.util
        info["torch_found"] = importlib.util.find_spec("torch") is not None
    if spec.get("inventory"):
        info["versions"] = torch_versions(loaded if info.get("torch") else None)
        info["smi"] = gpu_inventory(spec.get("env") or {})
    return info


def torch_versions(torch=None):
    """torch's version, the CUDA it was built for, and its NCCL. Without the imported
    module (the preflight of `up`: importing torch takes seconds), from torch's own
    version.py and the NCCL package that torch's wheel loads."""
    out: dict = {"torch": None, "cuda": None, "nccl": None}
    if torch is not None:
        out["torch"] = str(torch.__version__)
        out["cuda"] = getattr(torch.version, "cuda", None)
        if out["cuda"]:
            try:
                v = torch.cuda.nccl.version()
                out["nccl"] = ".".join(str(x) for x in v) if isinstance(v, tuple) else nccl_code(v)
            except Exception:       # built without NCCL, or it does not load
                pass
        site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    else:
        import importlib.util
        try:
            found = importlib.util.find_spec("torch")
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            return out
        return torch_file_versions(list(found.submodule_search_locations)[0])
    if out["cuda"] and out["nccl"] is None:
        out["nccl"] = nccl_package(site)
    return out


def torch_file_versions(root):
    """torch_versions from the files of the torch package in `root`, without importing it."""
    out: dict = {"torch": None, "cuda": None, "nccl": None}
    text = read_text(os.path.join(root, "version.py"))
    for key, name in (("torch", "__version__"), ("cuda", "cuda")):
        m = re.search(r"^%s\s*(?::[^=\n]*)?=\s*(?:'([^']*)'|\"([^\"]*)\")" % name, text, re.M)
        out[key] = (m.group(1) or m.group(2)) if m else None
    if out["cuda"]:
        out["nccl"] = nccl_package(os.path.dirname(root))
    return out


def nccl_code(code):
    """NCCL's version number as a string: 22105 -> 2.21.5 (2.9 and later), 2708 -> 2.7.8."""
    code = int(code)
    if code >= 10000:
        return "%d.%d.%d" % (code // 10000, code // 100 % 100, code % 100)
    return "%d.%d.%d" % (code // 1000, code // 100 % 10, code % 100)


def nccl_package(site):
    """The version of the nvidia-nccl-cu* package next to torch (what its wheel loads)."""
    try:
        names = os.listdir(site)
    except OSError:
        return None
    for name in sorted(names):
        m = re.match(r"nvidia_nccl_cu\d+-([^-]+)\.dist-info$", name)
        if m:
            return m.group(1)
    return None


# nvidia-smi's query fields; the free-text one last, so that a comma in it cannot shift the others.
SMI_GPU_FIELDS = ("index", "uuid", "memory.total", "memory.used", "driver_version", "name")
SMI_APP_FIELDS = ("gpu_uuid", "pid", "used_memory", "process_name")
SMI_TIMEOUT = 20.0


def gpu_inventory(env_over):
    """The GPUs as nvidia-smi sees them (it ignores CUDA_VISIBLE_DEVICES): each GPU's
    index, model and memory, the driver and the CUDA version it supports, and every
    process that holds GPU memory. nvidia-smi is looked for on the PATH the job gets."""
    import shutil
    env = dict(os.environ)
    env.update(env_over)
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if not smi:
        return {"found": False}
    csv = "--format=csv,noheader,nounits"
    argvs = {"gpus": [smi, "--query-gpu=" + ",".join(SMI_GPU_FIELDS), csv],
             "apps": [smi, "--query-compute-apps=" + ",".join(SMI_APP_FIELDS), csv],
             "head": [smi, "-q", "-d", "COMPUTE"]}
    out = {"found": True, "path": smi}
    procs = {}
    try:
        for key, argv in argvs.items():     # all at once: each one starts NVML, which can take a while
            procs[key] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=env)
        done = {}
        deadline = time.monotonic() + SMI_TIMEOUT
        for key, p in procs.items():
            o, e = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            done[key] = (p.returncode, o.decode("utf-8", "replace"), e.decode("utf-8", "replace"))
    except subprocess.TimeoutExpired:
        out["error"] = "nvidia-smi did not answer within %gs" % SMI_TIMEOUT
        return out
    except OSError as e:
        out["error"] = "nvidia-smi cannot be run: %s" % (e.strerror or e)
        return out
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    code, text, err = done["gpus"]
    if code != 0:
        said = [l.strip() for l in (text + "\n" + err).splitlines() if l.strip()]
        out["error"] = "nvidia-smi failed (exit %d)%s" % (code, ": " + said[0] if said else "")
        return out
    gpus, by_uuid = [], {}
    for row in csv_rows(text, len(SMI_GPU_FIELDS)):
        index, uuid, total, used, driver, name = row
        if smi_int(index) is None:
            continue
        gpus.append({"index": smi_int(index), "uuid": uuid, "name": name,
                     "memory_total": smi_int(total), "memory_used": smi_int(used)})
        by_uuid[uuid] = smi_int(index)
        out.setdefault("driver", driver)
    out["gpus"] = gpus
    code, text, _ = done["apps"]
    if code == 0:
        out["processes"] = [{"gpu": by_uuid.get(uuid), "pid": smi_int(pid), "memory": smi_int(mem), "name": name}
                            for uuid, pid, mem, name in csv_rows(text, len(SMI_APP_FIELDS))
                            if smi_int(pid) is not None]
    m = re.search(r"CUDA Version\s*:\s*([0-9][0-9.]*)", done["head"][1])
    out["driver_cuda"] = m.group(1) if m else None
    return out


def csv_rows(text, n):
    """nvidia-smi's csv,noheader lines as lists of n stripped fields (the last keeps its commas)."""
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",", n - 1)]
        if len(fields) == n:
            yield fields


def smi_int(text):
    """An integer field, or None for nvidia-smi's [N/A] and [Not Supported]."""
    try:
        return int(float(text))
    except ValueError:
        return None


def port_free(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


# --- sync ----------------------------------------------------------------------

def sync(spec):
    """Receive changed files for the workdir: list what is here, then untar stdin."""
    import tarfile
    root = os.getcwd()
    have = {}
    for rel in json.loads(sys.stdin.buffer.readline()):
        try:
            st = os.stat(os.path.join(root, rel))
            have[rel] = [st.st_size, int(st.st_mtime)]
        except OSError:
            pass
    write_out(json.dumps(have).encode() + b"\n")
    count = 0
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
        if hasattr(tarfile, "data_filter"):     # Python 3.12+, and security backports
            tar.extraction_filter = tarfile.data_filter
        for member in tar:
            name = os.path.normpath(member.name)
            if (name.startswith(("/", "..")) or not (member.isfile() or member.isdir())):
                continue            # only plain files and directories, inside the workdir
            member.name = name
            tar.extract(member, root, set_attrs=member.isfile())
            count += member.isfile()
    event(Event.SYNCED, files=count)


# --- start -------------------------------------------------------------------

def start(spec, job_dir):
    os.makedirs(os.path.dirname(job_dir), mode=0o700, exist_ok=True)
    os.mkdir(job_dir, 0o700)        # fails if a job with this run id and node exists
    env = dict(os.environ)
    env.update(spec["env"])
    arm_stacks(job_dir, env)
    ifname = None
    if spec["pick_ifname"]:
        ifname = interface_to(spec["master_addr"])
        if ifname:
            for var in spec["pick_ifname"]:
                env.setdefault(var, ifname)     # set by `setup:` or the node's env: theirs wins
    argv = job_argv(spec, job_dir)
    pid = os.fork()
    if pid == 0:                    # child: new session, then the supervisor
        try:
            os.setsid()
            if os.fork() == 0:
                supervise(job_dir, argv, env)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    # The child was the session leader, so the job's process group id is its pid.
    write_atomic(os.path.join(job_dir, "pgid"), str(pid))
    event(Event.STARTED, pgid=pid, ifname=ifname, hostname=socket.gethostname())


def supervise(job_dir, argv, env):
    """Run torchrun, wait, record its exit code. Detached from the SSH session."""
    devnull = os.open(os.devnull, os.O_RDWR)
    log = os.open(os.path.join(job_dir, "launcher.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.closerange(3, 65536)
    # A handler (not SIG_IGN, which exec would pass on to torchrun) keeps the
    # supervisor alive through a group TERM so it can record torchrun's exit.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    watch = None
    try:
        proc = subprocess.Popen(argv, env=env, stdin=0, stdout=1, stderr=2)
    except OSError as e:
        os.write(2, ("clusterrun: cannot run %s: %s\n" % (argv[0], e.strerror)).encode())
        code = 127
    else:
        watch = RankWatch(proc.pid, os.path.join(job_dir, "stacks"))
        watch.start()
        code = proc.wait()
        watch.finish()
    try:
        with open(os.path.join(job_dir, "launcher.log"), "rb") as f:
            reported = parse_failures(f.read()[-(1 << 20):].decode("utf-8", "replace"))
    except OSError:
        reported = []
    stop_time = read_text(os.path.join(job_dir, STOPPED))
    stacks_dir = os.path.join(job_dir, "stacks")
    failures = rank_outcomes(watch.ranks if watch else {}, reported, float(stop_time) if stop_time else None,
                             lambda pid: script_finished(stacks_dir, pid), lambda pid: script_raised(stacks_dir, pid))
    write_atomic(os.path.join(job_dir, "exit.json"), json.dumps({"code": code, "failures": failures,
                                                                "stop_time": float(stop_time) if stop_time else None}))
    os._exit(0)


# --- stacks on request ------------------------------------------------------------

# Every worker imports this first (it is the sitecustomize on its PYTHONPATH): the
# script still runs as `python -u SCRIPT` (or -m), so __main__, pickling of its
# classes and multiprocessing's spawn are untouched. Asked with STACK_SIGNAL, the
# worker's faulthandler writes all its threads' stacks to a file of its own, from
# the signal handler (C code: also while Python is blocked in a collective); a
# system call it interrupts is restarted (SA_RESTART). The .ready file says the
# handler is there, so a process without it is never sent the signal, whose
# default action would end it; it holds the main thread's id, as faulthandler names
# threads. A forked child (a DataLoader worker) arms its own.
#
# faulthandler writes at most 100 frames a thread, the innermost ones: a rank deep in
# an import chain loses the script's own frames. For such a dump, FULL_SIGNAL asks a
# Python-level handler for every frame of every thread: Python runs it in the main
# thread once that thread runs Python code again (at once from a sleep or a wait in
# Python, which the signal interrupts; not while it blocks in C, in a collective say).
# It writes <pid>.full.txt (renamed into place when whole) in faulthandler's format.
# It is sent only after a cut dump, to a process whose handler is in place.
STACK_SIGNAL_OFFSET = 6         # SIGRTMIN + 6: a real-time signal no library uses
FULL_SIGNAL_OFFSET = 7          # SIGRTMIN + 7: the same, for the Python-level handler
STACKS_SITE = r"""# clusterrun: lets `clusterrun stacks` ask this worker for its Python stacks.
import os
import sys


def _clusterrun_arm():
    where = os.environ.get("CLUSTERRUN_STACKS")
    if not where or "RANK" not in os.environ:
        return
    import _thread
    import faulthandler
    import signal

    def arm():
        try:
            out = open(os.path.join(where, "%d.txt" % os.getpid()), "a")
            faulthandler.register(signal.SIGRTMIN + OFFSET, file=out, all_threads=True)
            with open(os.path.join(where, "%d.ready" % os.getpid()), "w") as ready:
                ready.write("%d\n" % _thread.get_ident())
        except (OSError, ValueError, RuntimeError, AttributeError):
            pass

    arm()
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=arm)

    def dump_in_full(signum, frame):
        # Every frame of every thread; `frame` is where the main thread was (this
        # handler's own frame is not the script's). Never raises into the script.
        try:
            me = _thread.get_ident()
            frames = sys._current_frames()
            frames[me] = frame
            lines = []
            for ident in sorted(frames, key=lambda i: i != me):
                lines.append("%s 0x%016x (most recent call first):"
                             % ("Current thread" if ident == me else "Thread", ident))
                f = frames[ident]
                while f is not None:
                    code = f.f_code
                    lines.append('  File "%s", line %d in %s' % (code.co_filename, f.f_lineno or 0, code.co_name))
                    f = f.f_back
                lines.append("")
            path = os.path.join(where, "%d.full" % os.getpid())
            with open(path + ".tmp", "w") as out:
                out.write("\n".join(lines))
            os.rename(path + ".tmp", path + ".txt")
        except Exception:
            pass

    try:
        signal.signal(signal.SIGRTMIN + FULL_OFFSET, dump_in_full)
    except (OSError, ValueError, RuntimeError, AttributeError):
        pass

    # When the script is over (it returned or called sys.exit, with no uncaught
    # exception), say so before Python shuts down: a rank that a signal ends after this
    # died in the interpreter's teardown, its work done (gloo's worker threads can abort
    # the process there: docs/troubleshooting.md). threading's own exit hooks run before
    # any atexit handler and before the interpreter starts to finalize.
    pid = os.getpid()

    def finished():
        if os.getpid() == pid and not hasattr(sys, "last_type"):
            try:
                open(os.path.join(where, "%d.finished" % pid), "w").close()
            except OSError:
                pass

    import threading
    if hasattr(threading, "_register_atexit"):      # Python 3.9 and later
        threading._register_atexit(finished)

    # Registered first, this runs after every other atexit handler of the script. Past it,
    # Python finalizes and faulthandler lets go of the signal, whose default action would
    # end the process (torch's teardown may take seconds then): from here on the signal is
    # ignored, and the .exiting file tells `stacks` not to ask.
    def exiting():
        if os.getpid() != pid:
            return
        try:
            open(os.path.join(where, "%d.exiting" % pid), "w").close()
            faulthandler.unregister(signal.SIGRTMIN + OFFSET)
            signal.signal(signal.SIGRTMIN + OFFSET, signal.SIG_IGN)
        except (OSError, ValueError, RuntimeError):
            pass

    import atexit
    atexit.register(exiting)
    # An exception the script did not catch: say when, and which, before Python prints
    # its traceback. A rank that a signal ends after this (its node's torchrun stopping
    # the other workers, say) had failed by itself first.
    hook = sys.excepthook

    def raised(kind, value, tb):
        if os.getpid() == pid:
            try:
                import time
                with open(os.path.join(where, "%d.raised" % pid), "w") as f:
                    f.write("%r %s" % (time.time(), getattr(kind, "__name__", "an exception")))
            except Exception:
                pass
        hook(kind, value, tb)

    sys.excepthook = raised


def _clusterrun_chain():
    # The sitecustomize this one shadows (a conda env's, say) still runs.
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    me = sys.modules.pop("sitecustomize")
    try:
        import sitecustomize  # noqa: F401
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
        sys.modules["sitecustomize"] = me   # importlib looks it up once this file has run


_clusterrun_arm()
_clusterrun_chain()
""".replace("FULL_OFFSET", str(FULL_SIGNAL_OFFSET)).replace("OFFSET", str(STACK_SIGNAL_OFFSET))


def arm_stacks(job_dir, env):
    """Make every worker of this job answer `stacks` (see STACKS_SITE)."""
    site, where = os.path.join(job_dir, "site"), os.path.join(job_dir, "stacks")
    os.mkdir(site, 0o700)
    os.mkdir(where, 0o700)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(STACKS_SITE)
    env["CLUSTERRUN_STACKS"] = where
    env["PYTHONPATH"] = site + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")


def job_processes(marker):
    """{pid: (rank, local_rank, parent pid)} of the job's processes that carry a RANK:
    the workers, and their children (which inherit it)."""
    found = {}
    for pid in job_pids(marker):
        env = _environ(pid)
        if b"RANK" in env and b"LOCAL_RANK" in env:
            try:
                ppid = int(_stat_fields(pid)[1])
            except (OSError, ValueError, IndexError):
                continue
            found[pid] = (int(env[b"RANK"]), int(env[b"LOCAL_RANK"]), ppid)
    return found


def stacks(job_dir, spec):
    """Each selected rank's stacks: [{rank, local_rank, pid, how, text, children: [...]}]."""
    where = os.path.join(job_dir, "stacks")
    procs = job_processes(spec["marker"])
    wanted = spec.get("local_ranks")
    ranks = dict((pid, p) for pid, p in procs.items()
                 if p[2] not in procs and (wanted is None or p[1] in wanted))
    kids: dict = {}
    if spec.get("children"):
        for pid, p in procs.items():
            if p[2] in procs:
                top = p[2]
                while procs[top][2] in procs:
                    top = procs[top][2]
                kids.setdefault(top, []).append(pid)
    spy = _py_spy() if spec.get("native") else None
    every = list(ranks) + [k for pid in ranks for k in kids.get(pid, [])]
    # What each rank had used before it was asked, and after it answered: the dump
    # itself costs its main thread CPU time and a write, which the hang watch leaves out
    # by measuring from one answer to the next question.
    family = dict((pid, [pid] + _descendants(pid, procs)) for pid in ranks)
    before = dict((pid, usage(pid, family[pid])) for pid in ranks)
    full = spec.get("full", True)
    read = (dict((pid, _dump(pid, where, spy, full)) for pid in every) if spy
            else _dump_all(every, where, full=full))
    after = dict((pid, usage(pid, family[pid])) for pid in ranks)
    out = []
    for pid, (rank, local, _) in sorted(ranks.items(), key=lambda kv: kv[1][0]):
        how, text = read[pid]
        children = [dict(pid=k, how=read[k][0], text=read[k][1], main=_main_thread(where, k))
                    for k in sorted(kids.get(pid, []))]
        used = dict(before=before[pid], after=after[pid]) if before[pid] and after[pid] else None
        out.append(dict(rank=rank, local_rank=local, pid=pid, how=how, text=text,
                        main=_main_thread(where, pid), children=children, usage=used))
    return out


def _main_thread(where, pid):
    """The id of the process's main thread as faulthandler writes it (its .ready file
    holds it), or None (a site of an older clusterrun wrote none)."""
    try:
        with open(os.path.join(where, "%d.ready" % pid)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _descendants(pid, procs):
    """The job's processes below pid (a DataLoader's workers, say)."""
    out = []
    for k, p in procs.items():
        top = p[2]
        while top in procs and top != pid:
            top = procs[top][2]
        if top == pid and k != pid:
            out.append(k)
    return out


def usage(pid, family):
    """[CPU seconds of pid and its descendants (every thread), CPU seconds of pid's main
    thread, bytes its main thread and the descendants read and wrote (rchar + wchar)],
    from /proc; None if pid is gone. A descendant that is gone counts nothing."""
    tick = float(os.sysconf("SC_CLK_TCK"))
    try:
        main = _stat_fields_at("/proc/%d/task/%d/stat" % (pid, pid))
        main_cpu = (int(main[11]) + int(main[12])) / tick
        cpu, io = 0.0, _io_bytes("/proc/%d/task/%d/io" % (pid, pid))
    except (OSError, ValueError, IndexError):
        return None
    for p in family:
        try:
            f = _stat_fields(p)
            cpu += (int(f[11]) + int(f[12])) / tick
            if p != pid:
                io += _io_bytes("/proc/%d/io" % p)
        except (OSError, ValueError, IndexError):
            continue
    return [round(cpu, 3), round(main_cpu, 3), io]


def _io_bytes(path):
    """rchar + wchar of a /proc io file (0 where it may not be read)."""
    try:
        with open(path) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["rchar"]) + int(fields["wchar"])
    except (OSError, ValueError, KeyError):
        return 0


def _py_spy():
    for d in os.environ.get("PATH", "").split(os.pathsep) + [os.path.expanduser("~/.local/bin")]:
        path = os.path.join(d, "py-spy")
        if d and os.access(path, os.X_OK):
            return path
    return None


def _dump(pid, where, spy, full=True):
    """One process read by py-spy (native frames too); faulthandler if py-spy cannot attach."""
    try:
        r = subprocess.run([spy, "dump", "--native", "--full-filenames", "--pid", str(pid)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=20)
        if r.returncode == 0:
            return "py-spy", r.stdout.decode("utf-8", "replace")
        why = r.stderr.decode("utf-8", "replace").strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        why = [str(e)]
    how, text = _dump_all([pid], where, full=full)[pid]
    return how + " (py-spy: %s)" % (why[-1] if why else "failed"), text


def _dump_all(pids, where, settle=0.05, limit=5.0, full=True):
    """Ask each armed process for its stacks at once; read each file once the process
    is done writing it: the signal neither pending nor held blocked by the handler
    (faulthandler writes piece by piece, and a busy machine may pause it between
    pieces), and the file no longer growing."""
    sig = signal.SIGRTMIN + STACK_SIGNAL_OFFSET
    asked = {}
    out = {}
    for pid in pids:
        path = os.path.join(where, "%d.txt" % pid)
        if not os.path.exists(os.path.join(where, "%d.ready" % pid)):
            out[pid] = ("unavailable", "it was started without clusterrun's stack handler\n")
            continue
        if os.path.exists(os.path.join(where, "%d.exiting" % pid)):
            out[pid] = ("unavailable", "its script has ended: Python is shutting down\n")
            continue
        try:
            os.truncate(path, 0)
            blocked_before = _signal_state(pid, sig)[1]
            os.kill(pid, sig)
            asked[pid] = (path, blocked_before)
        except OSError as e:
            out[pid] = ("unavailable", "%s\n" % e.strerror)
    sizes: dict = {}
    deadline = time.monotonic() + limit
    while asked:
        late = time.monotonic() >= deadline
        if not late:
            time.sleep(settle)
        for pid, (path, blocked_before) in list(asked.items()):
            size = os.path.getsize(path) if os.path.exists(path) else 0
            pending, blocked = _signal_state(pid, sig)
            writing = pending or bool(blocked - blocked_before)
            if size and (late or (sizes.get(pid) == size and not writing)):
                with open(path) as f:
                    out[pid] = ("faulthandler", f.read())
                del asked[pid]
            elif late:
                out[pid] = ("unavailable", "no answer within %gs (the process may be stopped)\n" % limit)
                del asked[pid]
            sizes[pid] = size
    if full:
        _dump_in_full(out, where)
    return out


FAULTHANDLER_CUT = "\n  ...\n"     # faulthandler's line where it stopped at 100 frames
FULL_HOW = "Python (faulthandler stops at 100 frames)"


def _dump_in_full(out, where, limit=2.0):
    """Replace each dump faulthandler cut at its 100 frames with every frame, from the
    process's Python-level handler (see STACKS_SITE), where one comes within `limit`
    seconds; else the cut dump stays (the main thread blocks in C code)."""
    sig = signal.SIGRTMIN + FULL_SIGNAL_OFFSET
    asked = {}
    for pid, (how, text) in out.items():
        if how == "faulthandler" and FAULTHANDLER_CUT in text and _catches(pid, sig):
            path = os.path.join(where, "%d.full.txt" % pid)
            try:
                if os.path.exists(path):
                    os.unlink(path)     # a late answer to an earlier request
                os.kill(pid, sig)
                asked[pid] = path
            except OSError:
                pass
    deadline = time.monotonic() + limit
    while asked and time.monotonic() < deadline:
        time.sleep(0.05)
        for pid, path in list(asked.items()):
            try:
                with open(path) as f:
                    out[pid] = (FULL_HOW, f.read())
                del asked[pid]
            except OSError:
                pass


def _catches(pid, sig):
    """Whether the process has a handler for sig (SigCgt in /proc): the signal's default
    action would end it."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except (OSError, ValueError, IndexError):
        pass
    return False


def _signal_state(pid, sig):
    """Whether sig is pending for pid, and which of its threads block it (a thread in
    faulthandler's handler does: it is registered without SA_NODEFER). Linux's
    /proc; elsewhere nothing is known and the file's size alone decides."""
    bit = 1 << (sig - 1)
    pending = False
    blocked: set = set()
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return pending, blocked
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                for line in f:
                    name = line[:7]
                    if name in ("SigPnd:", "ShdPnd:", "SigBlk:") and int(line.split()[1], 16) & bit:
                        if name == "SigBlk:":
                            blocked.add(tid)
                        else:
                            pending = True
        except (OSError, ValueError, IndexError):
            continue
    return pending, blocked


def _stat_fields(pid):
    return _stat_fields_at("/proc/%d/stat" % pid)


def _stat_fields_at(path):
    """The fields of a /proc stat file after the name: [0] is the state (field 3)."""
    with open(path, "rb") as f:
        data = f.read()
    return data[data.rfind(b")") + 2:].split()


# --- each rank's end -------------------------------------------------------------

STOPPED = "stopped"         # in the job dir: when clusterrun's stop reached the node (time.time())


class RankWatch(threading.Thread):
    """When each worker (a child of torchrun) ended, and how, seen from the supervisor.

    A pidfd per worker wakes the thread the moment it exits, while torchrun has not
    yet reaped it, so its wait status is still in /proc/PID/stat. (Without pidfd,
    Python < 3.9 or Linux < 5.3, the workers are looked at every 0.1 s.) New workers
    are looked for every DISCOVER_EVERY seconds until torchrun ends.
    """

    def __init__(self, torchrun_pid, stacks_dir=None):
        threading.Thread.__init__(self, name="rank-watch", daemon=True)
        self.torchrun = torchrun_pid
        self.stacks_dir = stacks_dir    # where each worker marks that its script is over
        self.ranks = {}         # pid -> {"rank", "local_rank", "exit_time", "status"[, "oom", "finished"]}
        self._wake_r, self._wake_w = os.pipe()
        self._done = False
        self._oom_kills = oom_kills()   # the kernel's count, to tell a worker it OOM-killed

    def finish(self):
        self._done = True
        os.write(self._wake_w, b"x")
        self.join(2.0)

    def run(self):
        fds: dict = {}          # pidfd (or -pid without pidfd) -> pid
        while not self._done:
            self._discover(fds)
            if hasattr(os, "pidfd_open"):
                ready = select.select([self._wake_r] + [fd for fd in fds if fd >= 0], [], [],
                                      DISCOVER_EVERY)[0]
            else:
                ready = select.select([self._wake_r], [], [], 0.1)[0]
                ready += [key for key, pid in fds.items() if key < 0 and _gone(pid)]
            for key in ready:
                if key != self._wake_r:
                    self._ended(fds.pop(key))
                    if key >= 0:
                        os.close(key)
        for pid in fds.values():    # torchrun has ended: so have they
            self._ended(pid)

    def _discover(self, fds):
        known = set(self.ranks)
        for pid in _children(self.torchrun):
            if pid in known:
                continue
            env = _environ(pid)
            if b"RANK" not in env or b"LOCAL_RANK" not in env:
                continue
            self.ranks[pid] = {"rank": int(env[b"RANK"]), "local_rank": int(env[b"LOCAL_RANK"]),
                               "exit_time": None, "status": None}
            try:
                fds[os.pidfd_open(pid)] = pid
            except (AttributeError, OSError):
                fds[-pid] = pid

    def _ended(self, pid):
        r = self.ranks[pid]
        if r["exit_time"] is None:
            r["exit_time"] = time.time()
            r["status"] = _wait_status(pid)
            if r["status"] == -signal.SIGKILL:
                self._oom(r)
            if script_finished(self.stacks_dir, pid):
                r["finished"] = True
            r["raised"] = script_raised(self.stacks_dir, pid)

    def _oom(self, r):
        """A worker ended by SIGKILL while the kernel's OOM kill count went up: its OOM
        killer took it (the count is counted before the kill). One kill per worker."""
        now = oom_kills()
        if now is not None and self._oom_kills is not None and now > self._oom_kills:
            r["oom"] = True
            self._oom_kills += 1


def script_finished(stacks_dir, pid):
    """Whether worker `pid` marked that its script was over (see STACKS_SITE)."""
    return bool(stacks_dir) and os.path.exists(os.path.join(stacks_dir, "%d.finished" % pid))


def script_raised(stacks_dir, pid):
    """(when, the exception's type name) if worker `pid` raised an exception its script did
    not catch (see STACKS_SITE), else None."""
    text = read_text(os.path.join(stacks_dir, "%d.raised" % pid)) if stacks_dir else ""
    try:
        when, name = text.split(" ", 1)
        return float(when), name
    except ValueError:
        return None


VMSTAT = "/proc/vmstat"


def oom_kills():
    """How many processes the kernel's OOM killer has ended since boot (None: unknown)."""
    try:
        with open(VMSTAT, "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _children(pid):
    out = []
    try:
        for task in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                out += [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        pass
    return out


def _environ(pid):
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            return dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except OSError:
        return {}


def _gone(pid):
    try:
        return proc_stat(pid)[0] == b"Z"
    except (OSError, ValueError, IndexError):
        return True


def _wait_status(pid):
    """A zombie's exit code (its raw wait status, field 52 of /proc/PID/stat), or None if reaped."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        fields = data[data.rfind(b")") + 2:].split()
        if fields[0] != b"Z":
            return None
        status = int(fields[49])
    except (OSError, ValueError, IndexError):
        return None
    return -(status & 0x7F) if status & 0x7F else status >> 8


def rank_outcomes(watched, reported, stop_time, finished=None, raised=None):
    """Every rank that did not exit 0: its code (or None if unknown), when it ended,
    whether clusterrun's stop had reached the node by then, whether its script was
    over (`finished(pid)`, for a rank the watch never saw), and the exception its script
    raised (`raised(pid)`: (when, type name) or None). A rank that raised before the stop
    reached the node failed by itself, whatever ended it then. In order of exit time."""
    codes = dict((f["rank"], f["exitcode"]) for f in reported)
    finished = finished or (lambda pid: False)
    raised = raised or (lambda pid: None)

    def own(exc):               # raised before any stop: its own failure
        return exc is not None and (stop_time is None or exc[0] < stop_time)

    out = []
    seen = set()
    for r in watched.values():
        seen.add(r["rank"])
        code = r["status"] if r["status"] is not None else codes.get(r["rank"])
        exc = r.get("raised")
        stopped = (stop_time is not None and (r["exit_time"] is None or r["exit_time"] >= stop_time)
                   and not own(exc))
        if code == 0 or (code is None and not stopped and r["rank"] not in codes):
            continue
        out.append({"rank": r["rank"], "local_rank": r["local_rank"], "exitcode": code,
                    "exit_time": r["exit_time"], "stopped": stopped, "oom": r.get("oom", False),
                    "finished": r.get("finished", False), "raised": exc[1] if exc else ""})
    for f in reported:              # a rank torchrun reports that was never seen running (it
        if f["rank"] not in seen:   # ended before the watch looked): stopped only if a signal did it
            f = dict(f)
            pid = f.pop("pid", None)
            exc = raised(pid) if pid else None
            stopped = (stop_time is not None and f["exitcode"] in (-signal.SIGTERM, -signal.SIGKILL)
                       and not own(exc))
            out.append(dict(f, exit_time=None, stopped=stopped, oom=False, finished=bool(pid and finished(pid)),
                            raised=exc[1] if exc else ""))
    out.sort(key=lambda f: (f["exit_time"] is None, f["exit_time"] or 0))
    return out


_FAILURE_RE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)\s*\n\s*exitcode\s*:\s*(-?\d+)"
                         r"(?:\s*\(pid:\s*(\d+)\))?")


def parse_failures(text):
    """Per-rank failures from torchrun's ChildFailedError report, root cause first."""
    start = text.rfind("Failures:")
    if start < 0:
        return []
    block = text[start:]
    root_at = block.find("Root Cause")
    found = [(m.start() < root_at, m) for m in _FAILURE_RE.finditer(block)]
    ordered = [m for other, m in found if not other] + [m for other, m in found if other]
    return [{"rank": int(m.group(1)), "local_rank": int(m.group(2)), "exitcode": int(m.group(3)),
             "pid": int(m.group(4)) if m.group(4) else None}
            for m in ordered]


def job_argv(spec, job_dir):
    """The plan's torchrun argv with its own ~/... paths made real: the python that runs
    torchrun and the workers, and the --log-dir. The script's arguments after them are
    the user's, passed as they are, even one that equals one of those."""
    argv = list(spec["argv"])
    python = spec["python"]
    argv[0] = os.path.expanduser(argv[0])
    log_dir = "--log-dir=%s/torchrun" % spec["job_dir"]
    if log_dir in argv:
        argv[argv.index(log_dir)] = "--log-dir=%s/torchrun" % job_dir
    if "--no-python" in argv:       # the workers' interpreter: the first python after it
        rest = argv.index("--no-python") + 1
        if python in argv[rest:]:
            i = argv.index(python, rest)
            argv[i] = os.path.expanduser(argv[i])
    return argv


def interface_to(addr):
    """The interface this node uses to reach addr (on the master: the one holding it);
    IPv4 or IPv6, whichever the address resolves to first."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(addr, 9, 0, socket.SOCK_DGRAM)[0]
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            s.connect(sockaddr)     # UDP connect sends nothing; it only picks a route
            src = s.getsockname()[0].split("%")[0]
        finally:
            s.close()
    except (OSError, IndexError):
        return None
    try:
        out = subprocess.run(["ip", "-o", "addr", "show"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=5).stdout.decode()
        for line in out.splitlines():   # "2: eth0    inet 10.0.0.5/24 brd ..." (or inet6)
            parts = line.split()
            if len(parts) > 3 and parts[3].split("/")[0] == src:
                return parts[1].split("@")[0]
    except (OSError, subprocess.SubprocessError):
        pass
    if family == socket.AF_INET6:   # no `ip`: the kernel's table of IPv6 addresses
        try:
            packed = socket.inet_pton(socket.AF_INET6, src).hex()
            with open("/proc/net/if_inet6") as f:
                for line in f:          # "fd00...0011 02 40 00 80 eth0"
                    parts = line.split()
                    if len(parts) == 6 and parts[0] == packed:
                        return parts[5]
        except OSError:
            pass
        return None
    import fcntl                    # no `ip`: ask the kernel per interface (primary address)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == src:
                return name
    finally:
        s.close()
    return None


# --- stream ------------------------------------------------------------------

class Source(object):
    __slots__ = ("key", "path", "fd", "pending")

    def __init__(self, key, path, offset):
        self.key, self.path, self.pending = key, path, b""
        self.fd = os.open(path, os.O_RDONLY)
        if offset:
            os.lseek(self.fd, offset, os.SEEK_SET)


def discover(job_dir, sources, offsets, changes=None):
    """Open the output files that have appeared: torchrun's own (key "L"), then
    each local rank's, <job>/torchrun/<run>/attempt_0/<local rank>/stdout.log
    (--max-restarts=0 makes one attempt); how many are new. Every directory on
    the way is watched for new entries."""
    paths = [(LAUNCHER_KEY, os.path.join(job_dir, "launcher.log"))]
    entries(job_dir, changes)
    tdir = os.path.join(job_dir, "torchrun")
    for run in entries(tdir, changes):
        entries(os.path.join(tdir, run), changes)
        attempt = os.path.join(tdir, run, "attempt_0")
        for rank in entries(attempt, changes):
            entries(os.path.join(attempt, rank), changes)
            paths.append((rank, os.path.join(attempt, rank, "stdout.log")))
    found = 0
    for key, path in paths:
        if key not in sources and os.path.exists(path):
            sources[key] = Source(key, path, int(offsets.get(key, 0)))
            found += 1
    return found


def entries(path, changes):
    """A directory's names (none while it does not exist). It is watched before it
    is listed, so an entry made after the listing still wakes the stream."""
    if changes:
        changes.watch(path, IN_CREATE | IN_MOVED_TO)
    try:
        return os.listdir(path)
    except OSError:
        return ()


IN_MODIFY, IN_MOVED_TO, IN_CREATE, IN_Q_OVERFLOW, IN_ONESHOT = 0x2, 0x80, 0x100, 0x4000, 0x80000000


class Changes(object):
    """inotify, so that a quiet stream sleeps until a file grows or a directory
    gains an entry, instead of waking every POLL_IDLE to look. Where there is no
    inotify (not Linux, a libc without it), it is false and the stream polls.

    Directories are watched for good. Output files get one-shot watches, armed
    when the stream falls quiet: the first write wakes it, and the writes while
    output flows cost the workers nothing (a watched file costs every write)."""

    def __init__(self):
        self.fd = None
        self.watched = set()
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            self._add_watch = libc.inotify_add_watch
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (ImportError, OSError, AttributeError):
            return
        if fd >= 0:
            self.fd = fd

    def __bool__(self):
        return self.fd is not None

    def watch(self, path, mask):
        if path not in self.watched and self._add_watch(self.fd, os.fsencode(path), mask) >= 0:
            self.watched.add(path)      # (a path that does not exist yet is tried again later)

    def arm(self, paths):
        for path in paths:
            self._add_watch(self.fd, os.fsencode(path), IN_MODIFY | IN_ONESHOT)

    def drain(self):
        """Take every pending event; whether one of them was a new directory entry
        (or events were lost, which may have hidden one)."""
        assert self.fd is not None     # (the stream drains only where there is inotify)
        created = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return created
            at = 0
            while at < len(data):       # struct inotify_event: wd, mask, cookie, len, name
                _, mask, _, n = struct.unpack_from("iIII", data, at)
                created = created or bool(mask & (IN_CREATE | IN_MOVED_TO | IN_Q_OVERFLOW))
                at += 16 + n


def read_frames(sources, final=False):
    """Frames for whatever the sources grew by: whole lines, and the redraws of a line
    with carriage returns (a progress bar); everything once final."""
    frames = []
    for src in sources.values():
        data = os.read(src.fd, READ_MAX)
        while final and data:
            more = os.read(src.fd, READ_MAX)
            if not more:
                break
            data += more
        if not data and not (final and src.pending):
            continue
        buf = src.pending + data if src.pending else data
        cut = buf.rfind(b"\n") + 1
        if final:
            if cut < len(buf):
                buf += b"\n"
            cut = len(buf)
        elif buf.find(b"\r", cut) >= 0:
            # A progress bar's redraw goes at once; a last \r waits (it may be a \r\n's).
            cut = len(buf) - (buf[-1:] == b"\r")
        elif cut == 0 and len(buf) > LINE_MAX:
            cut = len(buf)          # runaway line with no newline: pass it on as-is
        if cut:
            frames.append(data_header(src.key, cut))
            frames.append(buf[:cut])
        src.pending = buf[cut:]
    return frames


class Commands(object):
    """Lines from the controller on stdin, read from fd 0 directly so that
    select() sees every byte that has not been taken yet."""

    def __init__(self):
        self.buf = self._buffered()
        self.eof = False

    @staticmethod
    def _buffered():
        """What sys.stdin's buffer read ahead of the spec (a command sent early)."""
        buffered = sys.stdin.buffer
        if not isinstance(buffered, io.BufferedReader):     # (a pipe's or a socket's always is)
            return b""
        os.set_blocking(0, False)
        try:
            return buffered.read1(1 << 16) or b""
        except (BlockingIOError, ValueError):
            return b""
        finally:
            os.set_blocking(0, True)

    def next(self, timeout=None, wake=None):
        """The next line, stripped; None if none came within timeout, or if the file
        descriptor `wake` became readable first; b"" at EOF (with a timeout, EOF just
        waits it out: the controller may have let go)."""
        others = [] if wake is None else [wake]
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line, self.buf = self.buf[:nl], self.buf[nl + 1:]
                return line.strip()
            if self.eof:
                if timeout is None:
                    line, self.buf = self.buf, b""
                    return line.strip()
                select.select(others, [], [], timeout)
                return None
            if timeout is not None and 0 not in select.select([0] + others, [], [], timeout)[0]:
                return None
            data = os.read(0, 4096)
            self.buf += data
            self.eof = not data
            if timeout is not None and b"\n" not in self.buf:
                return None


def stream(job_dir, offsets, commands, marker=None, follow=True):
    sources: dict = {}
    exit_path = os.path.join(job_dir, "exit.json")
    pgid = int(read_text(os.path.join(job_dir, "pgid")) or 0)
    changes = Changes()
    armed = False               # the output files' one-shot watches are set
    next_discover = next_alive_check = next_command = 0.0
    last_out = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= next_discover:
            if discover(job_dir, sources, offsets, changes):
                armed = False
            next_discover = now + DISCOVER_EVERY
        frames = read_frames(sources)
        if frames:
            write_out(b"".join(frames))
            last_out = now
            armed = False
            if now >= next_command:     # a kill must not wait for the output to pause
                next_command = now + COMMAND_EVERY
                obey(commands.next(0), job_dir, marker)
            continue
        if now - last_out >= HEARTBEAT_EVERY:
            write_out(HEARTBEAT)
            last_out = now
        done = os.path.exists(exit_path)
        # A cheap test (no /proc scan) and not on every poll: this loop runs for the
        # whole training run. A SIGKILLed group shows as gone once init reaps it.
        if not done and now >= next_alive_check:
            next_alive_check = now + ALIVE_EVERY
            if not group_exists(pgid):
                done = os.path.exists(exit_path)
                if not done:
                    finish(job_dir, sources, offsets, commands, Event.LOST,
                           reason="the job's processes are gone")
                    return
        if done:
            finish(job_dir, sources, offsets, commands, Event.EXIT, **json.loads(read_text(exit_path)))
            return
        if not follow:
            event(Event.RUNNING)
            return
        # The idle wait, cut short by a command. With inotify it lasts until a file
        # grows, an entry appears (a rank's log, exit.json) or a check is due:
        # a quiet job costs its agent a few wake-ups a second, not 1/POLL_IDLE.
        if not changes:
            obey(commands.next(POLL_IDLE), job_dir, marker)
        elif not armed:
            changes.arm(src.path for src in sources.values())
            armed = True                # then read once more: a write before the watch counts
        else:
            timeout = max(0.0, min(next_alive_check, last_out + HEARTBEAT_EVERY) - now)
            obey(commands.next(timeout, changes.fd), job_dir, marker)
            # A new entry somewhere: look for new files now; else not before
            # DISCOVER_EVERY (a wake for a write or a check needs no look).
            next_discover = 0.0 if changes.drain() else time.monotonic() + DISCOVER_EVERY
            armed = False
            # Output that trickles in goes out in batches, POLL_IDLE apart at most.
            rest = last_out + POLL_IDLE - time.monotonic()
            if rest > 0:
                obey(commands.next(rest), job_dir, marker)


def obey(command, job_dir, marker):
    """A command that came while streaming: "kill <grace>" (the stream then runs to its end)."""
    if command and command.startswith(Command.KILL + b" ") and marker:
        kill(job_dir, marker, float(command.split()[1]))


def finish(job_dir, sources, offsets, commands, name, **fields):
    discover(job_dir, sources, offsets)
    frames = read_frames(sources, final=True)
    if frames:
        write_out(b"".join(frames))
    event(name, **fields)
    answer = commands.next()
    while answer.startswith(Command.KILL + b" "):     # too late: the job has ended by itself
        answer = commands.next()
    if answer == Command.RM:
        remove_tree(job_dir)


def write_out(data):
    view = memoryview(data)
    while view:
        n = os.write(1, view)
        view = view[n:]


def event(name, **fields):
    write_out(event_frame(name, **fields))


# --- kill ----------------------------------------------------------------------

def end_setup(tag, grace):
    """TERM, then KILL after grace, every process of a `setup:` that still runs (those
    whose SETUP_VAR is tag); the event says how many there were and how many are left."""
    found = left = job_pids(tag, SETUP_VAR)
    signal_all(0, left, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = job_pids(tag, SETUP_VAR)
    deadline = time.monotonic() + 10
    while left and time.monotonic() < deadline:
        signal_all(0, left, signal.SIGKILL)
        time.sleep(0.05)
        left = job_pids(tag, SETUP_VAR)
    event(Event.KILLED, forced=False, found=len(found), left=len(left))


def job_pids(marker, var="CLUSTERRUN_JOB"):
    """Every process whose environment carries this job's CLUSTERRUN_JOB marker.

    torchrun puts each worker in a session of its own, so the process group
    alone misses workers; the marker is inherited by every descendant.
    """
    needle = b"\0" + var.encode() + b"=" + marker.encode() + b"\0"
    me = os.getpid()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open("/proc/%s/environ" % name, "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in b"\0" + env + b"\0":
            pids.append(int(name))
    return pids


def signal_all(pgid, pids, sig):
    if pgid:
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def kill(job_dir, marker, grace):
    stopped = os.path.join(job_dir, STOPPED)
    try:
        if not os.path.exists(stopped):     # the first stop's time: ranks that end later were stopped
            write_atomic(stopped, repr(time.time()))
    except OSError:
        pass
    pgid = int(read_text(os.path.join(job_dir, "pgid")) or 0)
    left = job_pids(marker)
    had_workers = any(pgrp_of(pid) != pgid for pid in left)
    signal_all(pgid, left, signal.SIGTERM)
    deadline = time.monotonic() + grace
    forced = False
    while True:
        left = job_pids(marker)
        if not left and not group_alive(pgid):
            break
        if time.monotonic() >= deadline:
            break
        # Once the workers (each in a session of its own) are gone, torchrun has
        # nothing left to shut down: do not wait for its slow exit. (Only once
        # there were workers: a job that is just its group gets its TERM's chance.)
        outside = [pid for pid in left if pgrp_of(pid) != pgid]
        had_workers = had_workers or bool(outside)
        if left and had_workers and not outside:
            signal_all(0, left, signal.SIGKILL)
            forced = True
        time.sleep(0.05)
    if left or group_alive(pgid):      # the grace period is over
        forced = True
        deadline = time.monotonic() + 10
        while (left or group_alive(pgid)) and time.monotonic() < deadline:
            signal_all(pgid, left, signal.SIGKILL)
            time.sleep(0.05)
            left = job_pids(marker)
    # Members of the group without the marker (the supervisor) count too.
    alive = group_alive(pgid)
    event(Event.KILLED, forced=forced, left=len(left) + (1 if alive else 0))


def pgrp_of(pid):
    """A process's group, or -1 if it is gone."""
    try:
        return proc_stat(pid)[1]
    except (OSError, ValueError, IndexError):
        return -1


def proc_stat(pid):
    """State and process group from /proc/PID/stat (the name may hold spaces or ')')."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        data = f.read()
    fields = data[data.rfind(b")") + 2:].split()
    return fields[0], int(fields[2])


def group_exists(pgid):
    """Whether the process group has any member, zombies included (one syscall)."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except OSError as e:
        return e.errno == errno.EPERM


def group_alive(pgid):
    """Whether any process of the group still runs; zombies waiting for init do not count."""
    if not group_exists(pgid):
        return False
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                state, pgrp = proc_stat(int(name))
            except (OSError, ValueError, IndexError):
                continue
            if pgrp == pgid and state != b"Z":
                return True
    return False


# --- files ---------------------------------------------------------------------

def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def remove_tree(path):
    import shutil
    shutil.rmtree(path, ignore_errors=True)
    parent = os.path.dirname(path)
    try:
        os.rmdir(parent)            # the run's directory, once its last node is gone
    except OSError:
        pass


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except BrokenPipeError:         # the controller went away; the job carries on
        sys.exit(0)
