"""The controller of one run: drives every node's RemoteJob, fails fast, records, reports.

The attached `up`, the background collector of `up --detach`, and a `logs -f` or
`status` that finds no collector all run a run through this one class, holding
the run's collector lock while they do.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from typing import Any, Callable, Sequence

from .control import ControlServer
from ..errors import EXIT_INTERRUPTED
from ..options import WatchOptions
from ..plan import NodePlan, Plan
from ..parallel import each
from .remote import Detached, RemoteJob, confirm_kills
from .results import exit_code, summary
from ..model import FINAL_STATES, NodeResult, NodeState, RankFailure
from .hangwatch import Sample
from .records import HangRecord, NodeRecord, has_ended
from .runs import CollectorLock, RunDir
from .stream import NodeOutput, Terminal
from ..transports.connect import connect_node
from .live import connect_live
from ..transports.base import Transport


class RunController:
    def __init__(self, plan: Plan, run: RunDir, transports: Sequence[Transport | None], term: Terminal,
                 opts: WatchOptions) -> None:
        """`transports`: one per node, None for a node whose end is already recorded (a
        collector attaching to a run some of whose nodes have ended): it gets no job."""
        self.plan, self.run, self.term, self.opts = plan, run, term, opts
        self.states: dict[int, NodeRecord] = run.node_states()
        self._state_lock = threading.Lock()
        self._started = threading.Condition()
        self.jobs = [self._job(node, t) for node, t in zip(plan.nodes, transports) if t is not None]
        self.unconnected = [node for node, t in zip(plan.nodes, transports) if t is None]
        self.done: queue.Queue[NodeResult] = queue.Queue()
        self.interrupted = False
        self.gate: Any = None
        self.control: ControlServer | None = None
        self.finished = threading.Event()       # every node's end is recorded
        self.handed_over = False
        self.hung: str | None = None            # --on-hang kill ended the run: why

    def _job(self, node: NodePlan, transport: Transport) -> RemoteJob:
        show = None
        if self.opts.show is not None:
            show = (lambda key, node=node: self.opts.show(node, key))
        out = NodeOutput(node, self.run, self.term if self.opts.print_lines else None,
                         self.opts.color, show)
        reconnect = (lambda: connect_node(node.host, self.opts.connect_timeout,
                                          self.opts.accept_new_host_keys, scope=self.plan.run_id))
        return RemoteJob(node, transport, out, self.plan.master_addr, self._on_started, reconnect,
                         self.opts.reconnect_window)

    # --- state -------------------------------------------------------------------

    def set_state(self, node: NodePlan, state: NodeState, *, code: int | None = None, message: str = "",
                  stopped: bool = False, failures: Sequence[RankFailure] = (), pgid: int | None = None,
                  ifname: str | None = None) -> None:
        record = NodeRecord(node.name, state, time.time(), code, message, stopped, list(failures), pgid, ifname)
        with self._state_lock:
            self.states = self.run.set_node_state(node.node_rank, record)

    def _on_started(self, node: NodePlan, ev: dict) -> None:
        self.set_state(node, NodeState.RUNNING, pgid=ev.get("pgid"), ifname=ev.get("ifname"))
        with self._started:
            self._started.notify_all()
        self.term.progress(f"started {self.running_or_done()}/{len(self.plan.nodes)} nodes")

    def running_or_done(self) -> int:
        return sum(1 for s in self.states.values() if s.state != NodeState.STARTING)

    def transports(self) -> list[Transport | None]:
        """Each node's connection as it is now (a reconnect replaces one); None: it has none."""
        by_rank = {job.node.node_rank: job.transport for job in self.jobs}
        return [by_rank.get(n.node_rank) for n in self.plan.nodes]

    # --- running -----------------------------------------------------------------

    def launch(self, start: bool, follow: bool = True, gate: Any = None) -> None:
        """Start (or attach to) every node's job, each in a thread of its own.

        With a preflight.Gate, each node probes first and starts only if all can."""
        self.gate = gate
        self.control = ControlServer.start(self.run, self.kill)
        if start:
            for node in self.plan.nodes:
                self.set_state(node, NodeState.STARTING)
        for job in self.jobs:
            job.gate = gate
        if self.opts.hang_timeout is not None:
            threading.Thread(target=self._watch_hang, name="hang-watch", daemon=True).start()
        for node in self.unconnected:
            if has_ended(self.states.get(node.node_rank)):
                self.done.put(self._recorded_result(node))
            else:       # connect_live connects every node whose end is not recorded
                self.done.put(NodeResult(node, NodeState.LOST, message="no connection to the node"))
        for job in self.jobs:
            if not start and has_ended(self.states.get(job.node.node_rank)):
                job.output.close()
                self.done.put(self._recorded_result(job.node))
                continue
            threading.Thread(target=self._runner, args=(job, start, follow),
                             name=f"node-{job.node.name}", daemon=True).start()

    def _recorded_result(self, node: NodePlan) -> NodeResult:
        s = self.states[node.node_rank]
        return NodeResult(node, s.state, s.code, message=s.message, stopped=s.stopped)

    def _runner(self, job: RemoteJob, start: bool, follow: bool) -> None:
        try:
            result = job.run(start=start, follow=follow)
        except Detached:
            return
        except Exception as e:  # noqa: BLE001 - one node's failure must not stop the controller
            result = NodeResult(job.node, NodeState.LOST, message=f"{type(e).__name__}: {e}")
        finally:
            job.output.close()
        if self.gate is not None:       # it ended before its probe: that is its answer
            why = result.message or result.state
            self.gate.answer(job.node, why)
        killed = self.run.killed_reason()
        if killed is not None and not result.ok:
            result.state, result.stopped = NodeState.KILLED, True
            result.message = killed
        if result.state != NodeState.RUNNING:
            self.set_state(job.node, result.state, code=result.code, message=result.message,
                           stopped=result.stopped, failures=result.failures)
        self.done.put(result)
        with self._started:
            self._started.notify_all()

    # --- hangs ---------------------------------------------------------------------

    def _watch_hang(self) -> None:
        """The job silent for hang_timeout: is it hung? (hangwatch.py decides, from more than output.)"""
        from . import stacks
        from .hangwatch import HangWatch

        timeout = self.opts.hang_timeout
        assert timeout is not None
        watch = HangWatch(timeout, [job.output for job in self.jobs],
                          lambda: stacks.take(self.plan, self.transports(), full=False), self.term.message, self._on_hang)
        watch.run(self.finished.wait, lambda: not self.handed_over)

    def _on_hang(self, why: str, sample: Sample) -> None:
        from . import stacks

        text = stacks.render(stacks.group(list(sample.ranks.values())))
        path = stacks.save(self.run, text)
        self.run.record_hang(HangRecord(time.time(), why, path))
        self.term.message(f"clusterrun: {why}")
        self.term.message(text.rstrip("\n"))
        for p in sample.problems:
            self.term.message(f"clusterrun: stacks: {p}")
        if self.opts.on_hang == "kill":
            self.hung = why
            self.term.message(f"clusterrun: --on-hang kill: stopping every node (stacks: {path})")
            self.stop_all({rank for rank, st in self.states.items() if st.state in FINAL_STATES})
        else:
            self.term.message(f"clusterrun: stacks saved in {path}; still waiting")

    def wait_started(self) -> None:
        """Block until every node has started (or already ended)."""
        with self._started:
            self._started.wait_for(lambda: self.running_or_done() >= len(self.plan.nodes))

    def abandon(self) -> list[NodeResult]:
        """Ctrl-C while the nodes are checked: end every node's session (none started) and
        wait for each node's thread to be done."""
        for job in self.jobs:
            job.abandon()
        return self.wait()

    def detach(self) -> None:
        self.handed_over = True     # a background collector takes the connections over
        self._close_control()
        for job in self.jobs:
            job.detach()

    def kill(self, grace: float) -> list[str]:
        """`clusterrun kill` through this collector: every live node's agent kills its
        job, then the run's end is recorded. The problems: nodes not confirmed clean."""
        live = [j for j in self.jobs if not has_ended(self.states.get(j.node.node_rank))]
        problems = confirm_kills([(j.node.name, functools.partial(j.stop, grace)) for j in live])
        if not self.finished.wait(timeout=grace + 15):
            problems.append("the run's end was not recorded in time; see `clusterrun status`")
        return problems

    def wait(self) -> list[NodeResult]:
        """Collect every node's result; fail fast; Ctrl-C stops every node."""
        results: list[NodeResult] = []
        stoppers: list[threading.Thread] = []
        self.interrupted = False
        stopping = False
        while len(results) < len(self.plan.nodes):
            try:
                r = self.done.get(timeout=0.5)
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                if not self.opts.interrupt_stops_run:
                    self.interrupted = True     # stop watching; the run goes on
                    self.detach()
                    break
                if self.interrupted:
                    self.term.message("clusterrun: stopped waiting; the nodes are being torn down")
                    break
                self.interrupted = True
                self.term.message("clusterrun: interrupted: stopping every node (Ctrl-C again to stop waiting)")
                self.run.mark_killed("Ctrl-C")
                stoppers.append(self.stop_all({x.node.node_rank for x in results}))
                stopping = True
                continue
            results.append(r)
            if r.state in (NodeState.RUNNING, NodeState.NOT_STARTED):     # caught up; or held back by the preflight
                continue
            held_back = self.gate is not None and bool(self.gate.problems)    # nothing started anywhere
            if not r.ok and self.opts.fail_fast and not stopping and not r.stopped and not held_back:
                stopping = True
                ended = {x.node.node_rank for x in results}
                if len(ended) < len(self.plan.nodes):
                    self.term.message(f"clusterrun: node {r.node.name} failed: stopping the other nodes")
                    stoppers.append(self.stop_all(ended))
        for t in stoppers:      # return only once every stopped node has confirmed it
            t.join(self.opts.kill_grace + 15)
        self.term.clear_progress()
        return results

    def stop_all(self, ended: set[int]) -> threading.Thread:
        """Stop every job still running, in parallel (parallel.each: a node that cannot be
        stopped is reported lost by its stream), from a thread of its own: the caller goes
        on collecting results. The thread ends once every stop is confirmed."""
        jobs = [job for job in self.jobs if job.node.node_rank not in ended]
        grace = self.opts.kill_grace
        stopper = threading.Thread(target=each, args=(jobs, lambda job: job.stop(grace)),
                                   name="stop-all", daemon=True)
        stopper.start()
        return stopper

    def finish(self, results: list[NodeResult]) -> int:
        """Record the outcome, print the summary, and return the exit code."""
        if all(r.state != NodeState.RUNNING for r in results) and len(results) == len(self.plan.nodes):
            # Each node's end in the run's last attempt (numbered from 0, as CLUSTERRUN_ATTEMPT).
            self.run.write_json("result.json", [dataclasses.asdict(r) | {"node": r.node.name,
                                                                        "attempt": self.plan.attempt}
                                                for r in results])
        self.finished.set()
        if self.opts.report:
            if self.hung:
                self.term.message(f"clusterrun: the run hung ({self.hung}) and was stopped")
            for line in summary(results, self.run):
                self.term.message(line)
        return exit_code(results, self.interrupted)

    def _close_control(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None

    def end_attempt(self) -> list[Transport | None]:
        """This attempt is over and the run goes on in another: its connections, still open."""
        self.finished.set()
        self._close_control()
        return self.transports()

    def close(self) -> None:
        self.finished.set()
        self._close_control()
        for job in self.jobs:
            job.transport.close(linger=self.handed_over)


# After an attempt ends: the next attempt's controller and results (up --max-restarts).
Continue = Callable[["RunController", list[NodeResult]], "tuple[RunController, list[NodeResult]]"]


def collect(run: RunDir, term: Terminal, opts: WatchOptions, follow: bool = True,
            before: Callable[[], None] | None = None, held: CollectorLock | None = None,
            after: Continue | None = None) -> int | None:
    """Become the run's collector if nobody is: attach to every node and stream.

    Returns the exit code once the run ended (follow), or None when another
    process is already collecting it. `held`: the lock, already taken (handed
    over by `up -d`).
    """
    lock = held or run.lock()
    if lock is None:
        return None
    with lock:
        if before is not None:
            before()
        if run.ended():
            return exit_code([], False)
        plan = run.plan()
        return collect_with(run, plan, connect_live(run, plan, opts), term, opts, follow, after)


def collect_with(run: RunDir, plan: Plan, transports: Sequence[Transport | None], term: Terminal,
                 opts: WatchOptions, follow: bool = True, after: Continue | None = None) -> int:
    """Collect with these connections (None for nodes already ended); the caller holds the lock.
    `after`: what happens once the attempt has ended (the restarts of a detached run)."""
    ctl = RunController(plan, run, transports, term, opts)
    try:
        ctl.launch(start=False, follow=follow)
        results = ctl.wait()
        if ctl.interrupted and not opts.interrupt_stops_run:
            return EXIT_INTERRUPTED
        if not follow and any(r.state == NodeState.RUNNING for r in results):
            return 0
        if after is not None:
            ctl, results = after(ctl, results)
        return ctl.finish(results)
    finally:
        ctl.close()

