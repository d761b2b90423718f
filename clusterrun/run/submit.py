"""A run submitted to Slurm: `clusterrun up` on Slurm outside an allocation.

`up` writes the sbatch script (sbatch.py), records the run (submission.json: its
Slurm job), submits it, and follows it: `pending (Reason)` and the time waited on
the progress line, then the run's lines from its logs, which the job's batch step,
the run's controller (`clusterrun up --run-id=RUN ...`), writes under the shared
CLUSTERRUN_HOME, and the controller's own words (batch.log) on stderr. It exits with
the controller's exit code (batch.json, which `as_batch_step` records).

Ctrl-C while pending cancels the job (`scancel --state=PENDING`: never a job that
has started meanwhile); once it runs, the controller gets SIGTERM in the batch step
alone (`scancel --batch --signal=TERM`: never srun, which would SIGKILL its tasks at
once) and stops every node the clusterrun way, as an attached `up` does on Ctrl-C.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Callable

from ..errors import EXIT_INTERRUPTED, EXIT_JOB_FAILED, ClusterrunError, UsageError
from ..hostsfile import HostsFile, read_hosts
from ..options import LaunchOptions, UpOptions
from ..model import RunState
from ..sbatch import BatchJob, batch_job
from ..slurm import JobState, in_allocation, job_states
from .logfiles import Follower, select
from .records import BatchEnd, Submission
from .runs import RunDir, clusterrun_home, new_run_id, runs_root
from .stream import Terminal

POLL = 0.5
STARTED = frozenset(("RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED"))
_CLIENT_TIMEOUT = 60.0


def to_submit(hosts_path: str) -> HostsFile | None:
    """The hosts file, when `up` is to submit it: Slurm nodes asked for outside an allocation."""
    if in_allocation():
        return None
    hosts = read_hosts(hosts_path)
    return hosts if hosts.slurm is not None else None


def batch_for(hosts: HostsFile, opts: LaunchOptions, up_opts: UpOptions, run_id: str) -> BatchJob:
    """The job that runs this `up` as the batch step of a new allocation."""
    spec = hosts.slurm
    assert spec is not None
    return batch_job(spec, hosts.path, up_opts.sbatch_args, run_id=run_id,
                     nproc=opts.nproc_per_node or spec.template.nproc_per_node, up_args=up_opts.batch_args,
                     python=sys.executable, workdir=os.getcwd(),
                     output=str(runs_root().absolute() / run_id / "batch.log"),
                     env={**os.environ, "CLUSTERRUN_HOME": str(clusterrun_home().absolute())})


def submit(hosts: HostsFile, opts: LaunchOptions, up_opts: UpOptions) -> int:
    """Submit the run; with --detach print its id and return, else follow it to its end."""
    sbatch = _client("sbatch")
    run_id = new_run_id()
    job = batch_for(hosts, opts, up_opts, run_id)
    script = job.script()
    run = RunDir.create(run_id)
    # Recorded before sbatch: the batch step may start before sbatch has answered here.
    record = Submission("", time.time(), hosts.path, [opts.script, *opts.script_args])
    run.record_submission(record)
    (run.path / "sbatch.sh").write_text(script)
    try:
        out = subprocess.run([sbatch, "--parsable"], input=script, capture_output=True, text=True,
                             timeout=_CLIENT_TIMEOUT)
    except (subprocess.TimeoutExpired, OSError) as e:
        shutil.rmtree(run.path, ignore_errors=True)
        raise UsageError(f"sbatch did not submit the job: {e}") from None
    jobid = out.stdout.strip().split(";")[0]
    if out.returncode != 0 or not jobid.isdigit():
        shutil.rmtree(run.path, ignore_errors=True)
        words = out.stderr.strip() or out.stdout.strip() or f"exit code {out.returncode}"
        raise UsageError("sbatch refused the job:\n  " + words.replace("\n", "\n  "))
    run.record_submission(Submission(jobid, record.time, record.hosts, record.script))
    term = Terminal()
    if up_opts.detach:
        term.message(f"clusterrun: run {run_id} submitted as Slurm job {jobid}")
        print(run_id, flush=True)       # the last line on stdout, like `docker run -d`
        return 0
    term.message(f"clusterrun: run {run_id} submitted as Slurm job {jobid} (logs: {run.path})")
    return follow(run, jobid, term)


def follow(run: RunDir, jobid: str, term: Terminal) -> int:
    """Follow a submitted run to its end, as an attached `up`: its exit code. Ctrl-C
    cancels a pending job, and stops a running one's run (twice: stops waiting)."""
    batch = _BatchLog(run, term)
    waited = _Waiter(run, jobid, term, batch)
    stopping = False
    follower: Follower | None = None
    while True:
        try:
            if follower is None:
                code = waited.until_started(stopping)
                if code is not None:
                    return code
                follower = Follower(run, select(run, run.plan(), (), None), term, None)
            follower.follow(waited.over, batch.pump)
            return waited.exit_code()
        except KeyboardInterrupt:
            if stopping:
                term.message(f"clusterrun: stopped waiting; Slurm job {jobid} is stopping the run")
                return EXIT_INTERRUPTED
            if cancel_pending(jobid):
                run.mark_killed("cancelled while pending (Ctrl-C)")
                term.message(f"clusterrun: interrupted: Slurm job {jobid} was cancelled before it started")
                return EXIT_INTERRUPTED
            stopping = waited.interrupted = True
            term.message(f"clusterrun: interrupted: the run's controller (Slurm job {jobid}) stops every node "
                         "(Ctrl-C again to stop waiting)")
            signal_controller(jobid)


class _Waiter:
    """The state of a submitted run's job, asked of Slurm every few looks."""

    def __init__(self, run: RunDir, jobid: str, term: Terminal, batch: "_BatchLog") -> None:
        self.run, self.jobid, self.term, self.batch = run, jobid, term, batch
        self.since = time.monotonic()
        self.asked = 0.0
        self.state: JobState | None = None
        self.interrupted = False        # the controller was told to stop the run

    def job(self) -> JobState:
        if self.state is None or time.monotonic() - self.asked >= 2.0:
            self.state = job_states([self.jobid])[self.jobid]
            self.asked = time.monotonic()
        return self.state

    def until_started(self, stopping: bool) -> int | None:
        """Wait until the controller has planned the run (None), or its exit code if the
        run ends before that."""
        while not self.run.has_plan():
            self.batch.pump()
            end = self.run.batch_end()
            if end is not None:
                self.batch.pump()
                return end.code
            st = self.job()
            if st.ended:
                return self._ended_without_end(st)
            waited = _clock(time.monotonic() - self.since)
            if st.state == "PENDING":
                self.term.progress(f"pending ({st.reason or 'waiting'}) {waited}: Slurm job {self.jobid}")
            elif not stopping:
                self.term.progress(f"starting in Slurm job {self.jobid} {waited}")
            time.sleep(POLL)
        self.term.clear_progress()
        return None

    def over(self) -> bool:
        """The run has ended (its result is recorded), or its controller has, or its job."""
        return self.run.ended() or self.run.batch_end() is not None or self.job().ended

    def exit_code(self) -> int:
        """The controller's exit code, once it has recorded it (it ends right after the run)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            end = self.run.batch_end()
            if end is not None:
                self.batch.pump()
                return end.code
            st = self.job()
            if st.ended:
                return self._ended_without_end(st)
            time.sleep(POLL)
        self.term.message(f"clusterrun: the run ended, and its controller (Slurm job {self.jobid}) "
                          "recorded no exit code")
        return EXIT_JOB_FAILED

    def _ended_without_end(self, st: JobState) -> int:
        self.batch.pump()
        end = self.run.batch_end()      # it may have been written just before the job ended
        if end is not None:
            return end.code
        if self.interrupted:            # signalled before its controller had started
            return EXIT_INTERRUPTED
        self.term.message(f"clusterrun: Slurm job {self.jobid} ended ({st.state or st.why}) before its "
                          f"controller recorded the run's end; see {self.run.batch_log}")
        return EXIT_JOB_FAILED


class _BatchLog:
    """The batch step's own words (the controller's stderr, Slurm's messages), relayed
    line by line to stderr as they land."""

    def __init__(self, run: RunDir, term: Terminal) -> None:
        self.path, self.term, self.offset = run.batch_log, term, 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].decode("utf-8", "replace").splitlines():
            self.term.message(line)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s // 60 % 60:02d}m"


# --- Slurm's side: cancelling what clusterrun submitted ---------------------------

def cancel_pending(jobid: str) -> bool:
    """Cancel the job if it still waits to start; whether it is gone (it never started).
    A job that started meanwhile is left running: its run is stopped the clusterrun way."""
    _scancel("--state=PENDING", jobid)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        st = job_states([jobid])[jobid]
        if st.ended:
            return True
        if st.state in STARTED:
            return False
        time.sleep(0.2)
    return False


def signal_controller(jobid: str) -> None:
    """SIGTERM to the batch step alone: the run's controller, which stops every node as on Ctrl-C."""
    _scancel("--batch", "--signal=TERM", jobid)


def cancel(jobid: str) -> None:
    """scancel the job clusterrun submitted (its run has ended, or never started)."""
    _scancel(jobid)


def _scancel(*args: str) -> None:
    argv = [_client("scancel"), *args]
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=_CLIENT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise UsageError(f"`{shlex.join(argv)}` did not answer within {_CLIENT_TIMEOUT:.0f}s") from None
    # scancel of a job that has just ended says so and fails: nothing is left to cancel.
    if out.returncode != 0 and "already completed" not in out.stderr and "Invalid job id" not in out.stderr:
        raise UsageError(f"`{shlex.join(argv)}` failed: {out.stderr.strip()}")


def _client(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise UsageError(f"outside a Slurm allocation `up` on Slurm submits a job, and the Slurm client "
                         f"`{tool}` is not on PATH (load your site's Slurm module, or run inside an "
                         "allocation)")
    return path


# --- the batch step's side ----------------------------------------------------------

def as_batch_step(run_id: str, up: Callable[[RunDir], int]) -> int:
    """Run the submitted run's controller (`up`, given the run's directory) and record
    how it ended, whatever the way, for the `up` that follows it and for `status`."""
    run = RunDir.submitted(run_id)
    try:
        code = up(run)
    except ClusterrunError as e:
        run.record_batch_end(BatchEnd(e.exit_code, str(e)))
        raise
    except KeyboardInterrupt:
        run.record_batch_end(BatchEnd(EXIT_INTERRUPTED, "interrupted"))
        raise
    except BaseException as e:
        run.record_batch_end(BatchEnd(EXIT_JOB_FAILED, f"{type(e).__name__}: {e}"))
        raise
    run.record_batch_end(BatchEnd(code))
    return code


# --- what `status`, `ps`, `logs` and `kill` say of a run that has no plan yet ---------

def unplanned(run: RunDir) -> Submission | None:
    """The submission of a run that has no plan yet (its controller has not planned it)."""
    sub = run.submission()
    return sub if sub is not None and not run.has_plan() else None


def unplanned_state(run: RunDir, sub: Submission, st: JobState | None = None) -> tuple[RunState, str]:
    """A submitted run whose controller has not planned it yet: its state and why
    (`st`: its job's state, if already asked)."""
    killed = run.killed_reason()
    end = run.batch_end()
    if end is not None:
        why = end.message or f"its controller exited with code {end.code}"
        return (RunState.KILLED if killed or end.code == EXIT_INTERRUPTED else RunState.FAILED), \
            f"ended before it started: {why}"
    if killed:
        return RunState.KILLED, f"Slurm job {sub.job} {killed}"
    if not sub.job:
        return RunState.PENDING, "being submitted"
    st = st or job_states([sub.job])[sub.job]
    if st.state == "PENDING":
        return RunState.PENDING, f"Slurm job {sub.job} is pending ({st.reason or 'waiting'}), " \
            f"submitted {_clock(time.time() - sub.time)} ago"
    if st.ended:
        return RunState.FAILED, f"Slurm job {sub.job} ended ({st.state or st.why}) before the run started"
    return RunState.STARTING, f"Slurm job {sub.job} is {st.state or st.why}: the run's controller is starting"


def wait_planned(run: RunDir, sub: Submission) -> bool:
    """Wait until the controller has planned the run (True), or it ended before (False)."""
    while not run.has_plan():
        if run.batch_end() is not None or run.killed_reason() is not None:
            return run.has_plan()
        if sub.job and job_states([sub.job])[sub.job].ended:
            return run.has_plan()
        time.sleep(POLL * 2)
    return True


def stop_submitted(run: RunDir, sub: Submission, why: str) -> str:
    """`kill` of a submitted run that has no plan yet: cancel its job if it is pending;
    else (the controller is starting it) have the controller stop, then cancel the job.
    What was done, in words."""
    if cancel_pending(sub.job):
        run.mark_killed(f"cancelled while pending ({why})")
        return f"its Slurm job {sub.job} was pending, and is cancelled"
    signal_controller(sub.job)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and run.batch_end() is None and not job_states([sub.job])[sub.job].ended:
        time.sleep(POLL)
    if run.has_plan():
        return ""           # it had started: the caller kills the run the clusterrun way
    run.mark_killed(why)
    end_job(sub.job)
    return f"its controller was stopped before it started the run, and Slurm job {sub.job} is over"


def end_job(jobid: str) -> None:
    """The run is over: its job ends by itself as its controller exits; what is left of
    it (only this job, which clusterrun submitted) is cancelled."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if job_states([jobid])[jobid].ended:
            return
        time.sleep(POLL)
    cancel(jobid)
