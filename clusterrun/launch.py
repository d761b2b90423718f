"""`clusterrun up`: connect, plan, start every node, stream, report.

The same `make_plan` feeds `--dry-run` and the real run.
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
from dataclasses import dataclass

from .errors import UsageError
from .hostsfile import HostsFile, load_hosts
from .plan import LaunchOptions, Plan, make_plan, master_addr_for, render_plan
from .remote import NodeResult, RemoteJob
from .results import exit_code, summary
from .runs import RunDir, clusterrun_home, new_run_id
from .stream import NodeOutput, Terminal
from .transport import Transport, connect_all, load_ssh_config, resolve_target


@dataclass(frozen=True)
class UpOptions:
    """How to run, as opposed to what (LaunchOptions)."""

    fail_fast: bool = True
    accept_new_host_keys: bool = False
    color: bool = False
    kill_grace: float = 5.0


def build_plan(hosts: HostsFile, opts: LaunchOptions, run_id: str, connected_addr: str | None) -> Plan:
    port = opts.master_port if opts.master_port is not None else hosts.master_port
    if port == "auto":
        raise UsageError("master_port: auto is not supported yet; give a port number")
    return make_plan(
        hosts, opts, run_id=run_id,
        master_addr=master_addr_for(hosts, connected_addr), master_port=int(port),
        controller_python=sys.executable, local_home=str(clusterrun_home()),
    )


def dry_run(hosts_path: str, opts: LaunchOptions) -> str:
    """The rank table and every node's exact command; connects to nothing."""
    hosts = load_hosts(hosts_path)
    first = hosts.hosts[0]
    # Without connecting, "where ssh reaches node 0" is its HostName from ~/.ssh/config.
    addr = None if first.is_local else resolve_target(first, load_ssh_config()).hostname
    return render_plan(build_plan(hosts, opts, new_run_id(), addr))


def up(hosts_path: str, opts: LaunchOptions, up_opts: UpOptions) -> int:
    hosts = load_hosts(hosts_path)
    term = Terminal()
    term.progress(f"connecting to {len(hosts.hosts)} nodes")
    transports = connect_all(hosts.hosts, hosts.connect_timeout, up_opts.accept_new_host_keys)
    try:
        run_id = new_run_id()
        plan = build_plan(hosts, opts, run_id, transports[0].peer_addr)
        run = RunDir.create(run_id)
        run.write_plan(plan)
        return _execute(plan, run, transports, term, up_opts)
    finally:
        for t in transports:
            t.close()


def _execute(plan: Plan, run: RunDir, transports: list[Transport], term: Terminal, up_opts: UpOptions) -> int:
    done: queue.Queue[NodeResult] = queue.Queue()
    started: list[str] = []
    lock = threading.Lock()

    def on_started(node, ev) -> None:
        with lock:
            started.append(node.name)
            term.progress(f"started {len(started)}/{len(plan.nodes)} nodes")

    jobs = [
        RemoteJob(node, t, NodeOutput(node, run, term, up_opts.color), plan.master_addr, on_started)
        for node, t in zip(plan.nodes, transports)
    ]

    def runner(job: RemoteJob) -> None:
        try:
            result = job.run()
        except Exception as e:  # noqa: BLE001 - a node's failure must not kill the controller
            result = NodeResult(job.node, "lost", message=f"{type(e).__name__}: {e}")
        finally:
            job.output.close()
        done.put(result)

    for job in jobs:
        threading.Thread(target=runner, args=(job,), name=f"node-{job.node.name}", daemon=True).start()

    term.message(f"clusterrun: run {plan.run_id}: {len(plan.nodes)} nodes, {plan.world_size} ranks "
                 f"(logs: {run.path})")
    results: list[NodeResult] = []
    stoppers: list[threading.Thread] = []
    interrupted = False
    stopping = False
    while len(results) < len(jobs):
        try:
            r = done.get(timeout=0.5)
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            if interrupted:
                term.message("clusterrun: stopped waiting; the nodes are being torn down")
                break
            interrupted = True
            term.message("clusterrun: interrupted: stopping every node (Ctrl-C again to stop waiting)")
            stoppers += _stop_all(jobs, {r.node.node_rank for r in results}, up_opts.kill_grace)
            stopping = True
            continue
        results.append(r)
        if not r.ok and up_opts.fail_fast and not stopping and not r.stopped:
            stopping = True
            ended = {x.node.node_rank for x in results}
            if len(ended) < len(jobs):
                term.message(f"clusterrun: node {r.node.name} failed: stopping the other nodes")
                stoppers += _stop_all(jobs, ended, up_opts.kill_grace)
    for t in stoppers:      # return only once every stopped node has confirmed it
        t.join(up_opts.kill_grace + 15)
    term.clear_progress()
    run.write_json("result.json", [dataclasses.asdict(r) | {"node": r.node.name} for r in results])
    for line in summary(results, run):
        term.message(line)
    return exit_code(results, interrupted)


def _stop_all(jobs: list[RemoteJob], ended: set[int], grace: float) -> list[threading.Thread]:
    """Stop every job still running, in parallel; the threads end when each is confirmed."""
    threads = [threading.Thread(target=_stop_quietly, args=(job, grace), daemon=True)
               for job in jobs if job.node.node_rank not in ended]
    for t in threads:
        t.start()
    return threads


def _stop_quietly(job: RemoteJob, grace: float) -> None:
    try:
        job.stop(grace)
    except Exception:  # noqa: BLE001 - its stream reports the node as lost
        pass
