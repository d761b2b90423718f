"""The hang watch of `up --hang-timeout`: the job is silent, but is it hung?

Silence alone is not a hang: Rich's progress bar draws nothing when stdout is not a
terminal, an evaluation pass may print nothing for minutes. So once no rank has printed
a line for the timeout, the watch looks at the ranks themselves, one sample a period
over the controller's own connections (stacks.take): each rank's Python stacks and,
from /proc, the CPU time of the rank's process and its children, that of its main
thread, and the bytes its main thread and children read and wrote. Between two
samples a rank is

- working: its main thread's stack changed, it read or wrote, or it used CPU time
  (while its main thread sits in a collective, only the CPU time of its other threads
  and children counts: the collective's own threads moving data are work, a main
  thread spinning while it waits is not);
- waiting: its main thread stayed in a collective (a torch.distributed frame innermost);
- idle: its main thread stayed at one place outside any collective and used no CPU time.

The job is hung when no rank is working and every rank has started. A rank has started
at its first line, or at the first sample that finds it in a collective, whichever
comes first; until then it is starting up (imports, loading a dataset, the
rendezvous), and a hang is called only once the start-up limit, STARTUP_FACTOR times
the hang timeout, has passed since the watch began.

None of this is on the stream's path: the stream stores each rank's last line time
(NodeOutput.line_at), the watch's own thread does the rest.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .results import describe_ranks
from .stacks import RankStacks, Thread, diagnosis, group
from .stream import NodeOutput

STARTUP_FACTOR = 10     # the start-up limit, in hang timeouts
MIN_BUSY = 0.03         # seconds of CPU time between two samples that always count as work
BUSY_SHARE = 0.02       # ... or this share of the time between them, if more. A progress bar's
                        # refresh thread (Rich's, tqdm's) or a collective's idle threads use far
                        # less; a rank that computes, even on a crowded machine, far more.
MAX_PERIOD = 5.0        # seconds between samples, at most (a quarter of the timeout if less)


def period_for(timeout: float) -> float:
    """How often the watch looks, and samples while the job is silent."""
    return min(MAX_PERIOD, timeout / 4)


class State(enum.Enum):
    WORKING = "working"
    WAITING = "waiting"     # in a collective
    IDLE = "idle"           # outside any collective, not moving, no CPU time


@dataclass(frozen=True)
class Seen:
    """One rank, judged between two samples."""
    rank: int
    node: str
    state: State
    place: str          # where its main thread is: "barrier", "wait_for_shard (hang.py:6)"
    cpu: float          # CPU seconds that counted (see State), over the window
    why: str = ""       # for WORKING: what moved ("main thread moved", "CPU time", "I/O")


@dataclass
class Sample:
    when: float                     # time.monotonic() once it was taken
    ranks: dict[int, RankStacks]    # the ranks read (a rank that ended, or a node that
    problems: list[str]             # could not be read, is not in it)


@dataclass(frozen=True)
class Verdict:
    kind: str                       # "hung", "working", "starting", or "unread" (no rank judged)
    seen: tuple[Seen, ...]
    window: float                   # seconds between the two samples
    starting: tuple[int, ...] = ()  # ranks with no line and no collective yet


# --- judging ---------------------------------------------------------------------

def collective(thread: Thread) -> str | None:
    """The collective a main thread waits in (its innermost frame is torch.distributed's),
    by name; None if it is elsewhere."""
    if thread and "/torch/distributed/" in thread[-1].file.replace("\\", "/"):
        return thread[-1].func
    return None


def place(thread: Thread) -> str:
    if not thread:
        return "an unknown place (no Python frames)"
    f = thread[-1]
    return collective(thread) or f"{f.func} ({f.file.rsplit('/', 1)[-1]}:{f.line})"


def busy_threshold(window: float) -> float:
    return max(MIN_BUSY, BUSY_SHARE * window)


def judge(before: RankStacks | None, after: RankStacks | None, window: float) -> Seen | None:
    """A rank between two samples; None if it was not read in both (a rank that ended, a
    node that did not answer) or its use of the machine is unknown."""
    if before is None or after is None or before.usage is None or after.usage is None:
        return None
    ub, ua = before.usage, after.usage
    main = after.main
    where, node = place(main), after.node.name

    def working(why: str, cpu: float = 0.0) -> Seen:
        return Seen(after.rank, node, State.WORKING, where, cpu, why)

    if ub.pid != ua.pid:
        return working("a new process")
    # from the end of one answer to the next question: the dumps' own cost left out
    cpu, main_cpu, io = (ua.before[0] - ub.after[0], ua.before[1] - ub.after[1],
                         ua.before[2] - ub.after[2])
    if before.main != main:
        return working("main thread moved", cpu)
    if io > 0:
        return working("I/O", cpu)
    busy = busy_threshold(window)
    waits_in = collective(main)
    if waits_in is not None:
        others = cpu - main_cpu
        if others >= busy:
            return working("CPU time", others)
        return Seen(after.rank, node, State.WAITING, where, max(others, 0.0))
    if cpu >= busy:
        return working("CPU time", cpu)
    return Seen(after.rank, node, State.IDLE, where, max(cpu, 0.0))


def decide(before: Sample, after: Sample, started: set[int], startup_over: bool) -> Verdict:
    """The job between two samples (see the module's doc)."""
    window = after.when - before.when
    seen = tuple(s for s in (judge(before.ranks.get(r), after.ranks.get(r), window)
                             for r in sorted(after.ranks)) if s is not None)
    if not seen:
        return Verdict("unread", seen, window)
    if any(s.state is State.WORKING for s in seen):
        return Verdict("working", seen, window)
    starting = tuple(s.rank for s in seen if s.rank not in started)
    if starting and not startup_over:
        return Verdict("starting", seen, window, starting)
    return Verdict("hung", seen, window, starting)


# --- saying what was seen ------------------------------------------------------------

def _by(seen: Iterable[Seen], key: Callable[[Seen], object]) -> list[list[Seen]]:
    """Seen grouped by key, smallest group first (the odd rank out), then by first rank."""
    out: dict[object, list[Seen]] = {}
    for s in seen:
        out.setdefault(key(s), []).append(s)
    return sorted(out.values(), key=lambda g: (len(g), g[0].rank))


def _who(g: Sequence[Seen]) -> str:
    return describe_ranks([s.rank for s in g])


def _cpu(seconds: float) -> str:
    return "no CPU time" if seconds < 0.01 else f"{seconds:.2f}s of CPU time"


def evidence(v: Verdict) -> str:
    """What the samples showed, for a hang: the idle ranks first, then the waiting ones."""
    parts = []
    for g in _by((s for s in v.seen if s.state is State.IDLE), lambda s: s.place):
        parts.append(f"{_who(g)} stayed in {g[0].place} with {_cpu(max(s.cpu for s in g))}, "
                     f"outside any collective")
    for g in _by((s for s in v.seen if s.state is State.WAITING), lambda s: s.place):
        parts.append(f"{_who(g)} stayed in {g[0].place}")
    return (f"over {seconds(v.window)} between two samples no rank worked (no main thread "
            f"moved or did I/O): " + "; ".join(parts))


def working(v: Verdict) -> str:
    """Who works, and how it shows, for a silent job that is not hung."""
    parts = []
    for g in _by((s for s in v.seen if s.state is State.WORKING), lambda s: s.why):
        how = g[0].why
        if how == "CPU time":
            how = f"CPU time moving, up to {max(s.cpu for s in g):.1f}s in {seconds(v.window)}"
        nodes = ", ".join(dict.fromkeys(s.node for s in g))
        parts.append(f"{_who(g)} ({nodes}) {'is' if len(g) == 1 else 'are'} working ({how})")
    return "; ".join(parts)


def seconds(s: float) -> str:
    """90 -> 1m30s, 300 -> 5m, 42 -> 42s, 1.25 -> 1.2s."""
    if s < 10:
        return f"{s:.1f}s".replace(".0s", "s")
    n = round(s)
    if n < 60:
        return f"{n}s"
    m, n = divmod(n, 60)
    return f"{m}m{n}s" if n else f"{m}m"


# --- the watch -------------------------------------------------------------------------

HangReport = Callable[[str, Sample], None]     # (why, the last sample): print, save, record, kill


class HangWatch:
    """The thread's body: look every period; sample while the job is silent; tell."""

    def __init__(self, timeout: float, outputs: Sequence[NodeOutput],
                 take: Callable[[], tuple[list[RankStacks], list[str]]],
                 say: Callable[[str], None], on_hang: HangReport) -> None:
        self.timeout, self.outputs, self.take, self.say, self.on_hang = timeout, outputs, take, say, on_hang
        self.period = period_for(timeout)
        self.startup = STARTUP_FACTOR * timeout
        self.origin = time.monotonic()
        self.started: set[int] = set()
        self._earlier = self._lines_before()

    def _lines_before(self) -> dict[int, float]:
        """Ranks that printed before this watch began (a collector attaching to a live
        run): started, their last line as old as their log."""
        out: dict[int, float] = {}
        now, wall = time.monotonic(), time.time()
        for o in self.outputs:
            for key, n in o.received.items():
                if key != "L" and n > 0:
                    rank = o.node.rank_start + int(key)
                    try:
                        age = wall - o.run.rank_log(rank).stat().st_mtime
                    except OSError:
                        age = 0.0
                    out[rank] = now - max(age, 0.0)
        return out

    def line_times(self) -> dict[int, float]:
        """Each rank's last line (time.monotonic()), for the ranks that printed one."""
        out = dict(self._earlier)
        for o in self.outputs:
            start = o.node.rank_start
            for key, t in list(o.line_at.items()):
                out[start + int(key)] = t
        return out

    def run(self, until: Callable[[float], bool], active: Callable[[], bool]) -> None:
        """Watch until `until(period)` (an Event's wait) says the run is over, or the
        run is handed to another collector (`active` false)."""
        spell: float | None = None      # the silent spell watched: its last line's time
        said: set[str] = set()          # what was said in this spell
        before: Sample | None = None
        while not until(self.period):
            if not active():
                return
            lines = self.line_times()
            self.started.update(lines)
            last = max(lines.values(), default=self.origin)
            if last != spell:
                spell, said, before = last, set(), None
            if time.monotonic() - last < self.timeout - self.period or "hung" in said:
                continue
            try:
                found, problems = self.take()
            except Exception as e:  # noqa: BLE001 - the watch must not end the run
                if "failed" not in said:
                    said.add("failed")
                    self.say(f"clusterrun: no output for {seconds(time.monotonic() - last)}; "
                             f"the stacks could not be taken: {type(e).__name__}: {e}")
                before = None
                continue
            now = time.monotonic()
            if max(self.line_times().values(), default=self.origin) != spell:
                continue                # a line came meanwhile: a new spell
            after = Sample(now, {rs.rank: rs for rs in found}, problems)
            self.started.update(r for r, rs in after.ranks.items() if collective(rs.main))
            if before is not None and now - last >= self.timeout:
                self._tell(decide(before, after, self.started, now - self.origin >= self.startup),
                           after, now - last, said)
            before = after

    def _tell(self, v: Verdict, sample: Sample, quiet: float, said: set[str]) -> None:
        if v.kind in said:
            return
        said.add(v.kind)
        head = f"no output for {seconds(quiet)}"
        if v.kind == "working":
            self.say(f"clusterrun: {head}, but the job is not hung: {working(v)}")
        elif v.kind == "starting":
            self.say(f"clusterrun: {head}: {describe_ranks(list(v.starting))} still starting (no line "
                     f"and no collective yet); a hang is called only after the start-up limit, "
                     f"{seconds(self.startup)} ({STARTUP_FACTOR}x --hang-timeout)")
        elif v.kind == "unread":       # no worker yet (torchrun still imports), or no node answered
            if sample.problems:
                self.say(f"clusterrun: {head}; no rank could be read twice: " + "; ".join(sample.problems))
        else:
            if v.starting:
                head += (f"; {describe_ranks(list(v.starting))} still starting after the start-up "
                         f"limit, {seconds(self.startup)} ({STARTUP_FACTOR}x --hang-timeout)")
            groups = group(list(sample.ranks.values()))
            self.on_hang(f"{head}: {diagnosis(groups)}; {evidence(v)}", sample)
