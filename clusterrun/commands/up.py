"""`clusterrun up`: connect, plan, start every node, stream, report.

The same `make_plan` feeds `--dry-run` and the real run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..run.controller import RunController
from ..errors import UnreachableError, UsageError
from ..hostsfile import Host, HostsFile, load_hosts, with_transport
from ..options import LaunchOptions, UpOptions, WatchOptions
from ..dryrun import PLACEHOLDER_RUN_ID, render_plan
from ..plan import Plan, make_plan, master_addr_for, needs_gpu_count
from ..run.preflight import Gate, PreflightError, auto_port, judge, preflight, preflight_error, probe_all, probe_spec
from ..run.restart import Roster, Vet, first_failure, next_roster, should_restart, wait_delay
from ..run.results import plural
from ..run.runs import CollectorLock, RunDir, clusterrun_home, new_run_id
from ..run.stream import Terminal
from ..run.sync import sync_all
from ..transports.connect import connect_all
from ..transports.base import Transport


def master_port(hosts: HostsFile, opts: LaunchOptions) -> int | str:
    """The port asked for: --master-port, else the hosts file; an int or "auto"."""
    return opts.master_port if opts.master_port is not None else hosts.master_port


def build_plan(hosts: HostsFile, opts: LaunchOptions, run_id: str, connected_addr: str | None,
               port: int | None = None, attempt: int = 0, gpu_counts: dict[int, int] | None = None) -> Plan:
    """The plan for these hosts; `port` stands in for an "auto" master port; gpu_counts
    are the counts the preflight found for `nproc_per_node: gpu` (else those are pending)."""
    if port is None:
        asked = master_port(hosts, opts)
        if asked == "auto":
            raise UsageError("master_port is auto: it is picked on node 0 when the run starts")
        port = int(asked)
    return make_plan(
        hosts, opts, run_id=run_id,
        master_addr=master_addr_for(hosts, connected_addr), master_port=port,
        controller_python=sys.executable, local_home=str(clusterrun_home()), attempt=attempt,
        gpu_counts=gpu_counts,
    )


def dry_run(hosts_path: str, opts: LaunchOptions, transport: str | None = None) -> str:
    """The rank table and, per node, a line that runs its part by hand; connects to nothing.
    A dry run has no run id: nothing of it exists afterwards."""
    hosts = with_transport(load_hosts(hosts_path), transport)
    first = hosts.hosts[0]
    # Without connecting, "where ssh reaches node 0" is its HostName as OpenSSH resolves it.
    addr = None
    if not first.is_local:
        from ..transports.sshconfig import resolve
        addr = resolve(first.host, user=first.user, port=first.port, identity_file=first.identity_file,
                       node=first.name).hostname
    auto = master_port(hosts, opts) == "auto"
    plan = build_plan(hosts, opts, PLACEHOLDER_RUN_ID, addr, port=0 if auto else None)
    # A localhost node runs where `up` is started: its pasted line goes there first.
    return render_plan(plan, port_auto=auto, start_dir=os.getcwd())


def up(hosts_path: str, opts: LaunchOptions, up_opts: UpOptions) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    hosts = with_transport(load_hosts(hosts_path), up_opts.transport)
    term = Terminal()
    lint_warnings(opts, term)
    term.progress(f"connecting to {len(hosts.hosts)} nodes")
    run_id = new_run_id()
    transports = connect_all(hosts.hosts, hosts.connect_timeout, up_opts.accept_new_host_keys,
                             scope=run_id)
    try:
        plan = prepare(hosts, opts, up_opts, run_id, transports, term)
        run = RunDir.create(run_id)
        lock = run.lock()       # before the plan: commands see the run only once it has a collector
        assert lock is not None, "a new run has no collector yet"
        run.write_plan(plan)
    except BaseException:
        for t in transports:
            t.close()
        raise
    ctl_opts = WatchOptions(
        fail_fast=up_opts.fail_fast, kill_grace=up_opts.kill_grace, color=up_opts.color,
        print_lines=not up_opts.detach, connect_timeout=hosts.connect_timeout,
        accept_new_host_keys=up_opts.accept_new_host_keys,
        hang_timeout=up_opts.hang_timeout or hosts.hang_timeout, on_hang=up_opts.on_hang or hosts.on_hang,
    )
    restarts = Restarts(
        hosts, opts, hosts.max_restarts if up_opts.max_restarts is None else up_opts.max_restarts,
        hosts.restart_delay if up_opts.restart_delay is None else up_opts.restart_delay,
        check=not up_opts.skip_check)
    run.start_attempt(plan, restarts.max_restarts, {})
    ctl = RunController(plan, run, transports, term, ctl_opts)
    try:
        checked_in_start = (not up_opts.skip_check and master_port(hosts, opts) != "auto"
                            and not needs_gpu_count(hosts, opts))     # else prepare() checked already
        gate = Gate(plan, opts, plan.master_port) if checked_in_start else None
        ctl.launch(start=True, gate=gate)
        if gate is not None and not _gate_passed(gate, ctl, run, term):
            ctl.wait()                  # every node has answered "stop" and ended
            shutil.rmtree(run.path, ignore_errors=True)
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


@dataclass(frozen=True)
class Restarts:
    """What a run needs to start itself again (`--max-restarts`): the hosts file with its
    spares, and what to run. The attached `up` keeps it; `up -d` hands it to the
    collector over a pipe, so the env's secrets are never written down."""

    hosts: HostsFile
    launch: LaunchOptions
    max_restarts: int = 0
    delay: float = 5.0
    check: bool = True      # a spare must pass the preflight (not with --skip-check)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Restarts:
        d = json.loads(text)
        host = lambda h: Host(**{k: tuple(v) if isinstance(v, list) else v for k, v in h.items()})  # noqa: E731
        hosts = d["hosts"]
        hosts = HostsFile(**{**hosts, "hosts": tuple(map(host, hosts["hosts"])),
                             "spares": tuple(map(host, hosts["spares"]))})
        launch = LaunchOptions(**{**d["launch"], "script_args": tuple(d["launch"]["script_args"])})
        return cls(hosts, launch, d["max_restarts"], d["delay"], d["check"])


def run_attempts(ctl: RunController, results: list, restarts: Restarts, term: Terminal
                 ) -> tuple[RunController, list]:
    """While an attempt failed and restarts are left: the next attempt. The controller
    and the results of the last attempt."""
    plan, most = ctl.plan, restarts.max_restarts
    roster = Roster(restarts.hosts, [], list(restarts.hosts.spares))
    while should_restart(results, ctl.run, ctl.interrupted, plan.attempt, most):
        nxt = _next_attempt(ctl, results, roster, restarts, plan, term)
        if nxt is None:
            return ctl, results
        ctl, plan, roster = nxt
        results = ctl.wait()
    if most and not all(r.ok for r in results) and plan.attempt == most:
        term.message(f"clusterrun: attempt {plan.attempt + 1} of {most + 1} failed too: no restart left")
    return ctl, results


def _next_attempt(ctl: RunController, results: list, roster: Roster, restarts: Restarts,
                  plan: Plan, term: Terminal) -> tuple[RunController, Plan, Roster] | None:
    """After a failed attempt: wait the delay, bring every node back (or a spare in its
    place), and start the next attempt. None: the run ends here (killed, or a node missing)."""
    run, opts, delay = ctl.run, restarts.launch, restarts.delay
    term.message(f"clusterrun: attempt {plan.attempt + 1} of {restarts.max_restarts + 1} failed: "
                 f"{first_failure(results, run)}; restarting in {delay:g}s")
    roster.transports = ctl.end_attempt()
    try:
        if not wait_delay(run, delay):
            term.message(f"clusterrun: {run.killed_reason()} during the restart delay: no further attempt")
            return None
        vet = _spare_vet(opts, run.run_id, plan.attempt + 1) if restarts.check else None
        roster = next_roster(roster, results, term, vet)
    except UnreachableError as e:
        term.message(f"clusterrun: no further attempt: {e}")
        return None
    except KeyboardInterrupt:
        run.mark_killed("Ctrl-C")
        term.message("clusterrun: interrupted during the restart delay: no further attempt")
        ctl.interrupted = True
        return None
    try:
        plan = _attempt_plan(roster, opts, run.run_id, plan.attempt + 1)
    except PreflightError as e:
        term.message(f"clusterrun: no further attempt: {e}")
        return None
    run.write_plan(plan)
    run.start_attempt(plan, restarts.max_restarts, roster.replaced)
    nxt = RunController(plan, run, roster.transports, term, ctl.opts)
    nxt.launch(start=True)
    return nxt, plan, roster


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a cancelled CI job, `timeout`, a scheduler) ends a run as Ctrl-C does,
    every node stopped, as torchrun itself does on SIGTERM."""
    raise KeyboardInterrupt


def _gate_passed(gate: Gate, ctl: RunController, run: RunDir, term: Terminal) -> bool:
    """Whether every node passed the preflight inside the start. Ctrl-C meanwhile: no node
    starts and the run is not kept. The sessions are ended, so that a node whose
    `setup:` still runs is not waited for (that setup ends there by itself; its agent
    then finds no "go" and exits)."""
    try:
        return gate.wait()
    except KeyboardInterrupt:
        if gate.abort("interrupted"):
            ctl.abandon()       # every node's thread is done with the run's files
            shutil.rmtree(run.path, ignore_errors=True)
            term.message("clusterrun: interrupted while the nodes were checked: nothing was started")
        raise


def _spare_vet(opts: LaunchOptions, run_id: str, attempt: int) -> Vet:
    """The preflight a spare passes before it stands in: the nodes already there are
    probed with it, so that a version differing from theirs is its problem too."""
    def vet(hosts: HostsFile, transports: Sequence[Transport | None], i: int) -> list[str]:
        addr = transports[0].peer_addr      # type: ignore[union-attr]  (nodes before i are connected)
        plan = build_plan(hosts, opts, run_id, addr, port=0, attempt=attempt)
        specs = [probe_spec(plan, n, opts.script, opts.module, None, torch=False) for n in plan.nodes]
        mine = plan.nodes[i].name + ": "
        return [p.removeprefix(mine) for p in judge(plan, probe_all(plan, transports, specs), opts, 0).problems
                if p.startswith(mine)]
    return vet


def _attempt_plan(roster: Roster, opts: LaunchOptions, run_id: str, attempt: int) -> Plan:
    """The next attempt's plan. What only the nodes can say (an auto port, the GPU counts
    of `nproc_per_node: gpu`: a spare may stand in) is asked with a provisional plan first."""
    hosts, transports, addr = roster.hosts, roster.transports, roster.transports[0].peer_addr
    auto = master_port(hosts, opts) == "auto"
    plan = build_plan(hosts, opts, run_id, addr, port=0 if auto else None, attempt=attempt)
    if not auto and plan.complete:
        return plan
    port = auto_port(plan, transports) if auto else plan.master_port
    counts = None if plan.complete else preflight(plan, transports, opts, port, checks=False).gpu_counts
    return build_plan(hosts, opts, run_id, addr, port=port, attempt=attempt, gpu_counts=counts)


def prepare(hosts: HostsFile, opts: LaunchOptions, up_opts: UpOptions, run_id: str,
            transports: list[Transport], term: Terminal) -> Plan:
    """Before anything starts: the plan, --sync, and an automatic port or the GPU counts
    of `nproc_per_node: gpu` (which need the preflight first, in a session of its own)."""
    asked = master_port(hosts, opts)
    plan = build_plan(hosts, opts, run_id, transports[0].peer_addr, port=0 if asked == "auto" else None)
    if up_opts.sync:
        term.progress(f"syncing {Path.cwd()} to {len(hosts.hosts)} nodes")
        sent = sync_all(plan, transports, Path.cwd())
        if sent:
            term.message("clusterrun: synced " + ", ".join(f"{n} ({k} files)" for n, k in sent.items()))
    if asked != "auto" and plan.complete:
        return plan     # the preflight, unless skipped, happens inside the start (Gate)
    term.progress(f"checking {len(hosts.hosts)} nodes")
    if up_opts.skip_check and plan.complete:
        return build_plan(hosts, opts, run_id, transports[0].peer_addr, port=auto_port(plan, transports))
    verdict = preflight(plan, transports, opts, asked, checks=not up_opts.skip_check)
    for warning in verdict.warnings:
        term.message(f"clusterrun: warning: {warning}")
    return build_plan(hosts, opts, run_id, transports[0].peer_addr,
                      port=verdict.free_port if asked == "auto" else None, gpu_counts=verdict.gpu_counts)


def lint_warnings(opts: LaunchOptions, term: Terminal) -> None:
    """`clusterrun lint` on the script, if it is a file here: findings are warnings."""
    if opts.module or not os.path.isfile(opts.script):
        return
    from .lint import format_finding, lint_paths  # only here: a large module, not needed otherwise

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
