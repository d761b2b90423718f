"""`clusterrun up`: connect, plan, start every node, stream, report.

The same `build_plan` (plan.py) feeds `--dry-run` and the real run, whose attempts
run/attempts.py plans, starts again after a failure (--max-restarts) and watches.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..run.attempts import Restarts, plan_attempt, run_attempts
from ..run.controller import RunController
from ..errors import UsageError
from ..hostsfile import HostsFile, load_hosts, with_transport
from ..options import LaunchOptions, UpOptions, WatchOptions
from ..dryrun import PLACEHOLDER_RUN_ID, render_plan
from ..plan import Facts, asked_master_port, build_plan, needs_probe
from ..parallel import each
from ..run.preflight import Gate, preflight_error
from ..run.startlimit import start_timeout_error, waiting_text
from ..run.results import plural
from ..run.runs import CollectorLock, RunDir, clusterrun_home, new_run_id
from ..run.stream import Terminal
from ..run.submit import as_batch_step, batch_for, submit, to_submit
from ..transports.connect import connect_all


# A submission's nodes are known only once Slurm gives them: the per-node lines come then.
BY_HAND_ONCE_RUNNING = """\
# ---- the script ends here. Each node's part by hand: the nodes are known once the job
# runs. In a shell of the job (`srun --jobid=JOB --overlap --pty bash`), the same
# `clusterrun up --dry-run` with HOSTS `slurm` (or this hosts file) prints, per node,
# the srun line that runs its part."""


def dry_run(hosts_path: str, opts: LaunchOptions, transport: str | None = None,
            up_opts: UpOptions | None = None) -> str:
    """The rank table and, per node, a line that runs its part by hand; connects to nothing
    (on Slurm it asks scontrol for the allocation's nodes and their addresses, as `up` does;
    outside an allocation it is the sbatch script `up` would submit).
    A dry run has no run id: nothing of it exists afterwards."""
    if up_opts is not None and (to_slurm := to_submit(hosts_path)) is not None:
        script = batch_for(to_slurm, opts, up_opts, PLACEHOLDER_RUN_ID).script()  # what `up` submits
        return script + BY_HAND_ONCE_RUNNING
    hosts = with_transport(load_hosts(hosts_path), transport)
    first = hosts.hosts[0]
    # Without connecting, "where ssh reaches node 0" is its HostName as OpenSSH resolves it.
    # (A Slurm node has its NodeAddr.)
    addr = None
    if not first.is_local and not on_slurm(hosts):
        from ..transports.sshconfig import resolve
        addr = resolve(first.host, user=first.user, port=first.port, identity_file=first.identity_file,
                       node=first.name).hostname
    plan = build_plan(hosts, opts, Facts(node0_addr=addr), run_id=PLACEHOLDER_RUN_ID,
                      local_home=str(clusterrun_home()), provisional=True)
    # A localhost node runs where `up` is started: its pasted line goes there first.
    return render_plan(plan, port_auto=asked_master_port(hosts, opts) == "auto", start_dir=os.getcwd(),
                       spares=hosts.spares)


def up(hosts_path: str, opts: LaunchOptions, up_opts: UpOptions) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    if up_opts.run_id is not None:      # the batch step of a run `up` submitted (run/submit.py)
        return as_batch_step(up_opts.run_id, lambda run: _up(hosts_path, opts, up_opts, run))
    to_slurm = to_submit(hosts_path)
    if to_slurm is not None:            # Slurm nodes, outside an allocation: submit one
        lint_warnings(opts, Terminal())
        return submit(to_slurm, opts, up_opts)
    return _up(hosts_path, opts, up_opts, None)


def _up(hosts_path: str, opts: LaunchOptions, up_opts: UpOptions, submitted: RunDir | None) -> int:
    """Run it here, attached or detached; `submitted`: as the batch step of that run."""
    hosts = with_transport(load_hosts(hosts_path), up_opts.transport)
    if up_opts.detach and on_slurm(hosts):
        # Measured: a step dies within 3 s of its srun, and the node's job is the
        # start session's step: it cannot outlive this command. Detached runs on
        # Slurm are submitted ones (outside the allocation).
        raise UsageError("up --detach inside a Slurm allocation: the run's steps end with this command. "
                         "Run it attached here, or detached from outside the allocation, where "
                         "`clusterrun up -d slurm ...` submits a job with sbatch")
    if up_opts.start_timeout is not None:
        hosts = dataclasses.replace(hosts, start_timeout=up_opts.start_timeout)
    term = Terminal()
    if submitted is None:               # the submitting `up` showed them
        lint_warnings(opts, term)
    term.progress(f"connecting to {len(hosts.hosts)} nodes")
    run_id = new_run_id() if submitted is None else submitted.run_id
    transports = connect_all(hosts.hosts, hosts.connect_timeout, up_opts.accept_new_host_keys,
                             scope=run_id)
    try:
        plan = plan_attempt(hosts, opts, transports, term, run_id=run_id, checks=not up_opts.skip_check,
                            sync=Path.cwd() if up_opts.sync else None)
        run = RunDir.create(run_id) if submitted is None else submitted
        lock = run.lock()       # before the plan: commands see the run only once it has a collector
        assert lock is not None, "a new run has no collector yet"
        run.write_plan(plan)
    except BaseException:
        for t in transports:
            t.close()
        raise
    ctl_opts = WatchOptions(
        fail_fast=up_opts.fail_fast, kill_grace=up_opts.kill_grace, color=up_opts.color,
        print_lines=not up_opts.detach and submitted is None, connect_timeout=hosts.connect_timeout,
        accept_new_host_keys=up_opts.accept_new_host_keys,
        hang_timeout=up_opts.hang_timeout or hosts.hang_timeout, on_hang=up_opts.on_hang or hosts.on_hang,
        reconnect_window=up_opts.reconnect_window,
    )
    restarts = Restarts(
        hosts, opts, hosts.max_restarts if up_opts.max_restarts is None else up_opts.max_restarts,
        hosts.restart_delay if up_opts.restart_delay is None else up_opts.restart_delay,
        check=not up_opts.skip_check)
    run.start_attempt(plan, restarts.max_restarts, {})
    ctl = RunController(plan, run, transports, term, ctl_opts)
    try:
        checked_in_start = not up_opts.skip_check and not needs_probe(hosts, opts)  # else the probe checked
        gate = Gate(plan, opts, plan.master_port) if checked_in_start else None
        ctl.launch(start=True, gate=gate)
        if gate is not None and not _gate_passed(gate, ctl, run, term, hosts.start_timeout):
            ctl.wait()                  # every node has answered "stop" and ended
            run.discard()
            raise preflight_error(gate.problems or [])
        for warning in gate.warnings if gate is not None else ():
            term.message(f"clusterrun: warning: {warning}")
        term.message(f"clusterrun: run {run_id}: {plural(len(plan.nodes), 'node')}, "
                     f"{plural(plan.world_size, 'rank')} (logs: {run.path})")
        if up_opts.detach:
            return _detach(ctl, run, lock, term, restarts)
        ctl, results = run_attempts(ctl, ctl.wait(), restarts, term)
        return ctl.finish(results)
    finally:
        ctl.close()
        lock.release()


def on_slurm(hosts: HostsFile) -> bool:
    """Whether the nodes are a Slurm allocation's (reached by srun)."""
    return any(h.slurm_job for h in hosts.hosts)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a cancelled CI job, `timeout`, a scheduler) ends a run as Ctrl-C does,
    every node stopped, as torchrun itself does on SIGTERM."""
    raise KeyboardInterrupt


def _gate_passed(gate: Gate, ctl: RunController, run: RunDir, term: Terminal, limit: float) -> bool:
    """Whether every node passed the preflight inside the start. Ctrl-C meanwhile, or a
    node not done by the start limit: no node starts and the run is not kept. The
    sessions are ended, so that a node whose `setup:` still runs is not waited for
    (on a Ctrl-C that setup ends there by itself, its agent then finds no "go" and
    exits; at the start limit it is ended: StartTimeout names the nodes)."""
    began = time.monotonic()
    try:
        while True:
            passed = gate.wait(min(1.0, max(0.0, limit - (time.monotonic() - began))))
            if passed is not None:
                return passed
            waited = time.monotonic() - began
            late = gate.pending()
            if waited >= limit:
                break
            if waited >= 2:
                term.progress(waiting_text([n.name for n in late], waited))
    except KeyboardInterrupt:
        if gate.abort("interrupted"):
            ctl.abandon()       # every node's thread is done with the run's files
            run.discard()
            term.message("clusterrun: interrupted while the nodes were checked: nothing was started")
        raise
    if not gate.abort("the start limit was reached"):
        return gate.wait() or False     # every node answered just now
    ranks = {n.node_rank for n in late}
    late_jobs = [job for job in ctl.jobs if job.node.node_rank in ranks]
    for job in late_jobs:
        job.abandon(close=False)        # no reconnect once its session is ended here
    ended = each(late_jobs, lambda job: job.session.end() if job.session is not None else "logging in",
                 timeout=30)
    ctl.abandon()
    run.discard()
    term.clear_progress()
    raise start_timeout_error([(job.node.name, o.value or "logging in") for job, o in zip(late_jobs, ended)],
                              limit)


def lint_warnings(opts: LaunchOptions, term: Terminal) -> None:
    """`clusterrun lint` on the script, if it is a file here: findings are warnings."""
    if opts.module or not os.path.isfile(opts.script):
        return
    from ..scriptlint import format_finding, lint_paths  # only here: a large package, not needed otherwise

    for f in lint_paths([opts.script]):
        if f.code != "CR000":       # a file Python cannot parse here is the node's to report
            term.message("clusterrun: warning: " + format_finding(f).replace("\n", "\n  "))


def _detach(ctl: RunController, run: RunDir, lock: CollectorLock, term: Terminal, restarts: Restarts) -> int:
    """Wait until every node has started, then hand the run to a background collector."""
    ctl.wait_started()
    ctl.detach()
    # The collector inherits the locked file itself: the run is never without a
    # collector, not even for the moment a `status` could take the lock in between.
    spawn_collector(run, lock, ctl.opts, restarts if restarts.max_restarts else None)
    lock.release()
    term.clear_progress()
    print(run.run_id, flush=True)   # the last line on stdout, like `docker run -d`
    return 0


def spawn_collector(run: RunDir, lock: CollectorLock, opts: WatchOptions, restarts: Restarts | None) -> None:
    """`clusterrun _collect RUN` in its own session, outliving this shell, holding
    the run's collector lock (the same open file: flock belongs to it, not to a process)."""
    log = os.open(run.path / "collector.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    argv = [sys.executable, "-m", "clusterrun", "_collect", run.run_id, f"--lock-fd={lock.fd}"]
    if opts.connect_timeout is not None:
        argv.append(f"--connect-timeout={opts.connect_timeout:g}")
    if opts.hang_timeout is not None:
        argv += [f"--hang-timeout={opts.hang_timeout:g}", f"--on-hang={opts.on_hang}"]
    if restarts is not None:
        argv.append("--restarts-on-stdin")
    p = subprocess.Popen(
        argv, stdin=subprocess.PIPE if restarts else subprocess.DEVNULL, stdout=log, stderr=log,
        start_new_session=True, pass_fds=(lock.fd,),
        env={**os.environ, "CLUSTERRUN_HOME": str(clusterrun_home())},
    )
    if restarts is not None:
        assert p.stdin is not None
        p.stdin.write(restarts.to_json().encode())
        p.stdin.close()
    os.close(log)
