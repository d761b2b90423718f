"""Every rank's Python stacks: taken through the node agents, parsed, grouped by identical stack.

Each node's agent asks its workers for their stacks (nodeagent.stacks: each worker
dumps its own through faulthandler; py-spy, where present and asked with
--native, reads native frames too). Here the dumps are parsed, ranks with the same
stacks are grouped, and the smallest groups come first: in a hung job the odd rank
out is usually the one everybody else waits for.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Sequence

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
        return f"{self.file}:{self.line} in {self.func}"


Thread = tuple[Frame, ...]          # outermost first, innermost last


@dataclass
class RankStacks:
    node: NodePlan
    rank: int
    local_rank: int
    how: str                                    # faulthandler, py-spy, unavailable
    threads: tuple[Thread, ...] = ()
    note: str = ""                              # why there are no frames
    children: list[RankStacks] = field(default_factory=list)


@dataclass
class Group:
    members: list[RankStacks]

    @property
    def threads(self) -> tuple[Thread, ...]:
        return self.members[0].threads

    @property
    def ranks(self) -> list[int]:
        return [m.rank for m in self.members]

    def who(self) -> str:
        nodes = list(dict.fromkeys(m.node.name for m in self.members))
        return f"{describe_ranks(self.ranks)} ({', '.join(nodes)})"


# --- reading the dumps ----------------------------------------------------------

_FH_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')
_SPY_FRAME = re.compile(r"^\s+(.*) \((.*):(\d+)\)$")


def parse(how: str, text: str) -> tuple[Thread, ...]:
    """The threads of a faulthandler or py-spy dump, each outermost frame first."""
    threads: list[list[Frame]] = []
    spy = how.startswith("py-spy")
    for line in text.splitlines():
        if line.startswith(("Thread ", "Current thread ")):
            threads.append([])
            continue
        m = (_SPY_FRAME if spy else _FH_FRAME).match(line)
        if m and threads:
            file, num, func = (m[2], m[3], m[1]) if spy else (m[1], m[2], m[3])
            threads[-1].append(Frame(file, int(num), func))
    # Both list the most recent call first; the main thread (the one running the
    # script's <module>) first, the others in a stable order.
    out = [tuple(reversed(t)) for t in threads if t]
    return tuple(sorted(out, key=lambda t: (t[0].func != "<module>", [str(f) for f in t])))


def from_agent(node: NodePlan, event: dict) -> list[RankStacks]:
    out = []
    for r in event.get("ranks", []):
        rs = _one(node, r["rank"], r["local_rank"], r["how"], r["text"])
        rs.children = [_one(node, r["rank"], r["local_rank"], c["how"], c["text"]) for c in r["children"]]
        out.append(rs)
    return out


def _one(node: NodePlan, rank: int, local: int, how: str, text: str) -> RankStacks:
    threads = parse(how, text) if not how.startswith("unavailable") else ()
    note = "" if threads else (text.strip() or "no Python frames")
    return RankStacks(node, rank, local, how, threads, note)


# --- grouping and showing ---------------------------------------------------------

def group(stacks: Sequence[RankStacks]) -> list[Group]:
    """Ranks with identical stacks together; smallest groups first, then by first rank."""
    by_key: dict[tuple, Group] = {}
    for s in sorted(stacks, key=lambda s: s.rank):
        key = (s.threads, s.note) if s.threads else ("no frames", s.rank)
        by_key.setdefault(key, Group([])).members.append(s)
    return sorted(by_key.values(), key=lambda g: (len(g.members), g.ranks[0]))


def render(groups: Sequence[Group]) -> str:
    lines: list[str] = []
    for g in groups:
        hows = sorted({m.how for m in g.members})
        lines.append(f"{g.who()}: read by {', '.join(hows)}")
        if not g.threads:
            lines.append(f"    ({g.members[0].note})")
        for k, thread in enumerate(g.threads):
            if len(g.threads) > 1:
                lines.append(f"  thread {k + 1} of {len(g.threads)}")
            lines += [f"    {f}" for f in thread]
        for m in g.members:
            for c in m.children:
                lines.append(f"  child of rank {m.rank}: read by {c.how}")
                lines += [f"    {f}" for t in c.threads for f in t] or [f"    ({c.note})"]
        lines.append("")
    return "\n".join(lines)


def _where(g: Group) -> tuple[str, str]:
    """The innermost frame of a group's main thread: (function, file:line)."""
    if not g.threads:
        return "an unknown place", "no stacks"
    f = g.threads[0][-1]
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
         node: str | None = None, native: bool = False, children: bool = False
         ) -> tuple[list[RankStacks], list[str]]:
    """Every selected rank's stacks, all nodes in parallel; and the nodes that failed."""
    chosen = [n for n in plan.nodes if node is None or node in (n.name, n.host.host, str(n.node_rank))]
    if not chosen:
        raise UsageError(f"run {plan.run_id} has no node {node!r} (nodes: "
                         f"{', '.join(n.name for n in plan.nodes)})")
    wanted = {n.node_rank: [g - n.rank_start for g in n.ranks if not ranks or g in ranks] for n in chosen}
    asked = [n for n in chosen if wanted[n.node_rank] and transports[n.node_rank] is not None]

    sessions: dict[int, Session] = {}

    def one(n: NodePlan) -> dict:
        spec = stacks_spec(n, wanted[n.node_rank], native=native, children=children)
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
