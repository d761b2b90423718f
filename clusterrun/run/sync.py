"""`up --sync`: copy the current directory to every node's workdir before launch.

One exec per node: the node says what it has (size, mtime) for our file list,
we send a tar stream of the files that differ, the node unpacks it. Nodes are
synced in parallel. Version control, caches and virtualenvs are skipped, and
so is whatever the top-level .gitignore names (simple patterns; no `!`).
A link to a file is sent as a copy of that file (inside the project or not); a
link to a directory is not followed (it is often a data set on shared storage,
too big to copy, and may loop), and a dangling link is skipped.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import ClusterrunError, UsageError
from ..nodeagent import Event
from ..plan import NodePlan, Plan
from ..parallel import each
from .agentspec import sync_spec
from .frames import EventFrame, FrameReader, read_preamble
from .remote import login_failure, start_agent
from ..transports.base import Process, Transport

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".venv", "venv", "node_modules",
                       ".mypy_cache", ".pytest_cache", ".ruff_cache", ".tox", ".ipynb_checkpoints",
                       ".hypothesis", ".clusterrun"})
SKIP_FILES = ("*.pyc", "*.pyo", ".DS_Store")


class SyncError(ClusterrunError):
    """Copying the project to a node failed."""


@dataclass(frozen=True)
class LocalFile:
    rel: str
    size: int
    mtime: int


def project_files(root: Path) -> list[LocalFile]:
    """The files --sync copies, relative to root, in a stable order."""
    ignore = _gitignore(root)
    out: list[LocalFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in SKIP_DIRS and not d.endswith(".egg-info")
            and not (Path(dirpath, d, "pyvenv.cfg").exists())
            and not _ignored(rel_dir + d, d, True, ignore)
        )
        for name in sorted(filenames):
            rel = rel_dir + name
            if any(fnmatch.fnmatch(name, p) for p in SKIP_FILES) or _ignored(rel, name, False, ignore):
                continue
            try:
                # A link counts as the file it points to, which is what is sent (sync_node).
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue            # a dangling link: nothing to send
            if stat.S_ISREG(st.st_mode):
                out.append(LocalFile(rel, st.st_size, int(st.st_mtime)))
    return out


def _gitignore(root: Path) -> list[str]:
    try:
        lines = (root / ".gitignore").read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [l.strip() for l in lines if l.strip() and not l.startswith(("#", "!"))]


def _ignored(rel: str, name: str, is_dir: bool, patterns: Sequence[str]) -> bool:
    for p in patterns:
        dir_only = p.endswith("/")
        p = p.rstrip("/")
        if dir_only and not is_dir:
            continue
        if "/" in p:
            if fnmatch.fnmatch(rel, p.lstrip("/")):
                return True
        elif fnmatch.fnmatch(name, p):
            return True
    return False


def sync_node(node: NodePlan, transport: Transport, root: Path, files: list[LocalFile]) -> int:
    """Bring one node's workdir up to date; returns how many files were sent."""
    # The workdir is made first (a first sync creates it); the python the hosts file
    # names is then found as in the run itself.
    assert node.workdir
    proc, mark = start_agent(node, transport, sync_spec(node), make_workdir=True)
    try:
        proc.send(json.dumps([f.rel for f in files]).encode() + b"\n")
        spoke, login = read_preamble(proc, mark)
        if not spoke:
            why = login_failure(node, proc.wait(timeout=30), proc.stderr_text(), login)
            raise SyncError(f"{node.name}: cannot sync into {node.workdir}: {why}")
        line = proc.stdout.readline()
        try:
            have = json.loads(line)
        except ValueError:
            err = proc.stderr_text().strip() or line.decode("utf-8", "replace").strip()
            raise SyncError(f"{node.name}: cannot sync into {node.workdir}: {err}") from None
        changed = [f for f in files if have.get(f.rel) != [f.size, f.mtime]]
        # dereference: a link goes as a regular file with its target's content; the node
        # agent unpacks only regular files and directories, never links.
        with tarfile.open(fileobj=_Sender(proc), mode="w|", dereference=True) as tar:
            for f in changed:
                tar.add(root / f.rel, arcname=f.rel, recursive=False)
        proc.close_stdin()
        done = FrameReader(proc).next()
        if not (isinstance(done, EventFrame) and done.name == Event.SYNCED):
            raise SyncError(f"{node.name}: sync failed: {proc.stderr_text().strip() or 'no answer'}")
        return len(changed)
    finally:
        proc.close()


class _Sender(io.RawIOBase):
    """A write-only file object over a Process's stdin, for tarfile's stream mode."""

    def __init__(self, proc: Process) -> None:
        super().__init__()
        self.proc = proc

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        chunk = bytes(data)
        self.proc.send(chunk)
        return len(chunk)


def sync_all(plan: Plan, transports: Sequence[Transport], root: Path) -> dict[str, int]:
    """Sync every node that needs it, in parallel; {node name: files sent}."""
    todo = []
    for node, t in zip(plan.nodes, transports):
        if node.host.is_local and (not node.workdir or Path(node.workdir).expanduser().resolve() == root.resolve()):
            continue                # already there
        if not node.workdir:
            raise UsageError(f"--sync needs a `workdir:` for {node.name} in {plan.hosts_path}")
        todo.append((node, t))
    if not todo:
        return {}
    files = project_files(root)
    # Nodes sharing one workdir (a shared home) would race: sync each path once.
    once: dict[tuple[str, str], tuple[NodePlan, Transport]] = {}
    for node, t in todo:
        once.setdefault((node.host.host, node.workdir or ""), (node, t))
    pairs = list(once.values())
    outcomes = each(pairs, lambda nt: sync_node(nt[0], nt[1], root, files), window=32)
    sent: dict[str, int] = {}
    for (node, _), o in zip(pairs, outcomes):
        if o.error is not None:
            raise o.error
        sent[node.name] = o.value or 0
    return sent
