"""Every rank's Python stacks: taken through the node agents, parsed, grouped by main-thread stack.

Each node's agent asks its workers for their stacks (nodeagent.stacks: each worker
dumps its own through faulthandler, and in full through a Python-level handler where
faulthandler stopped at its 100 frames; py-spy, where present and asked with
--native, reads native frames too). Here the dumps are parsed, ranks whose main
threads have the same stack are grouped (their other threads, a progress bar's
monitor say, are shown under the group and do not split it), and the smallest groups
come first: in a hung job the odd rank out is usually the one everybody else waits for.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from ..errors import UsageError
from ..parallel import TimedOut, each
from ..plan import NodePlan, Plan
from .agentspec import stacks_spec
from .remote import AgentError, Session, run_agent
from .startlimit import STACKS_TIMEOUT, duration
from .results import describe_ranks
from .runs import RunDir
from ..transports.base import Transport


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    func: str

    def __str__(self) -> str:
        if self == CUT:
            return "... outer frames not shown: faulthandler stops at 100 frames ..."
        return f"{self.file}:{self.line} in {self.func}"


# The outermost "frame" of a thread faulthandler cut at its 100 frames: what it stands
# for (the frames it did not write, the script's own among them) is not known.
CUT = Frame("", 0, "...")

Thread = tuple[Frame, ...]          # outermost first, innermost last


@dataclass(frozen=True)
class Usage:
    """What a rank had used when its stacks were asked for (`before`) and once it had
    answered (`after`): the hang watch compares one answer with the next question."""
    pid: int
    before: tuple[float, float, int]    # (CPU s of the rank and its children, of its main thread,
    after: tuple[float, float, int]     #  bytes read and written: main thread and children)


@dataclass
class RankStacks:
    node: NodePlan
    rank: int
    local_rank: int
    how: str                                    # faulthandler, py-spy, Python (...), unavailable
    threads: tuple[Thread, ...] = ()            # the main thread first
    note: str = ""                              # why there are no frames
    children: list[RankStacks] = field(default_factory=list)
    usage: Usage | None = None                  # None: the node could not read it

    @property
    def main(self) -> Thread:
        """The main thread's frames (the one running the script); () if none were read."""
        return self.threads[0] if self.threads else ()


@dataclass
class Group:
    """Ranks whose main threads have the same stack (their other threads may differ)."""
    members: list[RankStacks]

    @property
    def main(self) -> Thread:
        return self.members[0].main

    @property
    def threads(self) -> tuple[Thread, ...]:
        """The first member's threads (main first)."""
        return self.members[0].threads

    @property
    def ranks(self) -> list[int]:
        return [m.rank for m in self.members]

    def who(self) -> str:
        nodes = list(dict.fromkeys(m.node.name for m in self.members))
        return f"{describe_ranks(self.ranks)} ({', '.join(nodes)})"


# --- reading the dumps ----------------------------------------------------------

_FH_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-fA-F]+)")
_FH_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')
_FH_CUT = "  ..."                   # faulthandler's last line of a thread it stopped at 100 frames
_SPY_THREAD = re.compile(r'^Thread \S+ \([^)]*\): "(.*)"')
_SPY_FRAME = re.compile(r"^\s+(.*) \((.*):(\d+)\)$")


def parse(how: str, text: str, main: int | None = None) -> tuple[Thread, ...]:
    """The threads of a faulthandler or py-spy dump, each outermost frame first, the
    main thread first: the one with id `main` (as faulthandler writes thread ids), or
    py-spy's MainThread, else the first that threading did not start. A thread
    faulthandler cut at its 100 frames starts with CUT."""
    threads: list[tuple[str, list[Frame]]] = []
    cut: set[int] = set()
    spy = how.startswith("py-spy")
    for line in text.splitlines():
        if line.startswith(("Thread ", "Current thread ")):
            m = (_SPY_THREAD if spy else _FH_THREAD).match(line)
            name = m[1] if m else ""
            if name and not spy and any(name == seen for seen, _ in threads):
                threads, cut = [], set()    # a second dump in the file: the last one counts
            threads.append((name, []))
            continue
        if not threads:
            continue
        if line == _FH_CUT and not spy:
            cut.add(len(threads) - 1)
            continue
        m = (_SPY_FRAME if spy else _FH_FRAME).match(line)
        if m:
            file, num, func = (m[2], m[3], m[1]) if spy else (m[1], m[2], m[3])
            threads[-1][1].append(Frame(file, int(num), func))
    # Both list the most recent call first.
    found = [(name, ((CUT,) if k in cut else ()) + tuple(reversed(frames)))
             for k, (name, frames) in enumerate(threads) if frames]
    if not found:
        return ()
    if spy:
        first = next((k for k, (name, _) in enumerate(found) if name == "MainThread"), None)
    else:
        first = next((k for k, (ident, _) in enumerate(found)
                      if main is not None and int(ident or "-1", 0) == main), None)
    if first is None:
        first = next((k for k, (_, t) in enumerate(found) if not _started_by_threading(t)), 0)
    rest = [t for k, (_, t) in enumerate(found) if k != first]
    return (found[first][1], *sorted(rest, key=lambda t: [str(f) for f in t]))


def _started_by_threading(t: Thread) -> bool:
    return t[0].func in ("_bootstrap", "_bootstrap_inner") and t[0].file.endswith("threading.py")


def from_agent(node: NodePlan, event: dict) -> list[RankStacks]:
    out = []
    for r in event.get("ranks", []):
        rs = _one(node, r["rank"], r["local_rank"], r["how"], r["text"], r.get("main"))
        rs.children = [_one(node, r["rank"], r["local_rank"], c["how"], c["text"], c.get("main"))
                       for c in r["children"]]
        used = r.get("usage")
        if used:
            rs.usage = Usage(r["pid"], tuple(used["before"]), tuple(used["after"]))  # type: ignore[arg-type]
        out.append(rs)
    return out


def _one(node: NodePlan, rank: int, local: int, how: str, text: str, main: int | None) -> RankStacks:
    threads = parse(how, text, main) if not how.startswith("unavailable") else ()
    note = "" if threads else (text.strip() or "no Python frames")
    return RankStacks(node, rank, local, how, threads, note)


# --- grouping and showing ---------------------------------------------------------

def group(stacks: Sequence[RankStacks]) -> list[Group]:
    """Ranks whose main threads have identical stacks together; smallest groups first,
    then by first rank. Other threads (a progress bar's monitor, a logger's) do not
    split a group: the odd rank out is told by what its script is doing."""
    by_key: dict[tuple, Group] = {}
    for s in sorted(stacks, key=lambda s: s.rank):
        key = (s.main, s.note) if s.threads else ("no frames", s.rank)
        by_key.setdefault(key, Group([])).members.append(s)
    return sorted(by_key.values(), key=lambda g: (len(g.members), g.ranks[0]))


def short_path(path: str) -> str:
    """An installed package's file from site-packages on: .../site-packages/torch/..."""
    for d in ("/site-packages/", "/dist-packages/"):
        at = path.rfind(d)
        if at > 0:
            return "..." + path[at:]
    return path


def _is_importlib(f: Frame) -> bool:
    return f.file.startswith("<frozen importlib.")


def show(thread: Thread) -> Iterator[str]:
    """A thread's lines, outermost first: each run of importlib's own frames (an import
    in progress) folded to one line, installed packages' paths shortened."""
    run = 0
    for f in (*thread, None):
        if f is not None and _is_importlib(f):
            run += 1
            continue
        if run:
            yield f"... {run} importlib frame{'s' if run > 1 else ''} ..."
            run = 0
        if f is not None:
            yield str(f) if f == CUT else f"{short_path(f.file)}:{f.line} in {f.func}"


def render(groups: Sequence[Group]) -> str:
    lines: list[str] = []
    for g in groups:
        hows = sorted({m.how for m in g.members})
        lines.append(f"{g.who()}: read by {', '.join(hows)}")
        if not g.main:
            lines.append(f"    ({g.members[0].note})")
        # The members' other threads, each distinct set with the ranks that have it.
        others: dict[tuple[Thread, ...], list[int]] = {}
        for m in g.members:
            if len(m.threads) > 1:
                others.setdefault(m.threads[1:], []).append(m.rank)
        if others:
            lines.append("  main thread")
        lines += [f"    {s}" for s in show(g.main)]
        for rest, ranks in others.items():
            only = "" if len(ranks) == len(g.members) else f" ({describe_ranks(ranks)} only)"
            for k, thread in enumerate(rest):
                lines.append(f"  thread {k + 2} of {len(rest) + 1}{only}")
                lines += [f"    {s}" for s in show(thread)]
        for m in g.members:
            for c in m.children:
                lines.append(f"  child of rank {m.rank}: read by {c.how}")
                lines += [f"    {s}" for t in c.threads for s in show(t)] or [f"    ({c.note})"]
        lines.append("")
    return "\n".join(lines)


def _where(g: Group) -> tuple[str, str]:
    """The innermost frame of a group's main thread, past importlib's own (an import in
    progress is where its module's code is): (function, file:line)."""
    if not g.main:
        return "an unknown place", "no stacks"
    f = next((f for f in reversed(g.main) if not _is_importlib(f)), g.main[-1])
    return f.func, f"{f.file.rsplit('/', 1)[-1]}:{f.line}"


def diagnosis(groups: Sequence[Group], shown: int = 4) -> str:
    """One line: where the odd ranks are, and where the rest wait."""
    if not groups:
        return "no rank could be read"
    if len(groups) == 1:
        func, at = _where(groups[0])
        return f"every rank is in {func} ({at})"
    most = groups[-1]
    waiting = len(most.members) > len(groups[-2].members)   # a clear majority waits somewhere
    odd = groups[:-1] if waiting else groups
    parts = []
    for g in odd[:shown]:
        func, at = _where(g)
        parts.append(f"{g.who()} {'is' if len(g.members) == 1 else 'are'} in {func} ({at})")
    if len(odd) > shown:
        parts.append(f"{len(odd) - shown} more groups")
    if waiting:
        parts.append(f"{describe_ranks(most.ranks)} wait in {_where(most)[0]}")
    return "; ".join(parts)


# --- taking them ------------------------------------------------------------------

def take(plan: Plan, transports: Sequence[Transport | None], ranks: Sequence[int] = (),
         node: str | None = None, native: bool = False, children: bool = False, full: bool = True
         ) -> tuple[list[RankStacks], list[str]]:
    """Every selected rank's stacks, all nodes in parallel; and the nodes that failed.
    full=False leaves a dump faulthandler cut at 100 frames as it is (no second signal,
    no wait: for taking samples)."""
    chosen = [n for n in plan.nodes if node is None or node in (n.name, n.host.host, str(n.node_rank))]
    if not chosen:
        raise UsageError(f"run {plan.run_id} has no node {node!r} (nodes: "
                         f"{', '.join(n.name for n in plan.nodes)})")
    wanted = {n.node_rank: [g - n.rank_start for g in n.ranks if not ranks or g in ranks] for n in chosen}
    asked = [n for n in chosen if wanted[n.node_rank] and transports[n.node_rank] is not None]

    sessions: dict[int, Session] = {}

    def one(n: NodePlan) -> dict:
        spec = stacks_spec(n, wanted[n.node_rank], native=native, children=children, full=full)
        t = transports[n.node_rank]
        assert t is not None
        sessions[n.node_rank] = Session(n, t)
        return run_agent(n, t, spec, sessions[n.node_rank])

    found: list[RankStacks] = []
    problems: list[str] = []
    outcomes = each(asked, one, timeout=STACKS_TIMEOUT)
    late = [n for n, o in zip(asked, outcomes) if isinstance(o.error, TimedOut)]
    ended = {n.node_rank: e.value for n, e in zip(late, each(late, lambda n: sessions[n.node_rank].end()
                                                             if n.node_rank in sessions else None, timeout=30))}
    for n, o in zip(asked, outcomes):
        if isinstance(o.error, TimedOut):
            doing = ended.get(n.node_rank) or "logging in"
            why = "its node agent did not answer" if doing == "being checked" else f"still {doing}"
            problems.append(f"{n.name}: no stacks within {duration(STACKS_TIMEOUT)} ({why})")
        elif o.error is not None:
            why = str(o.error) if isinstance(o.error, AgentError) else f"{type(o.error).__name__}: {o.error}"
            problems.append(f"{n.name}: {why}")
        else:
            found += from_agent(n, o.value or {})
    return found, problems


def save(run: RunDir, text: str) -> str:
    """Keep a copy under the run's directory: stacks/<time>.txt."""
    d = run.path / "stacks"
    d.mkdir(mode=0o700, exist_ok=True)
    path = d / time.strftime("%Y%m%d-%H%M%S.txt")
    path.write_text(text)
    path.chmod(0o600)
    return str(path)
