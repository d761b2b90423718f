"""`clusterrun lint`: find the rank / local-rank mistakes in a torchrun training script.

A static check (the standard library's ``ast``; torch is never imported) for the
mistakes the PyTorch docs and forums keep warning about, each of which works on
one machine and breaks on several:

- CR000 error    the file cannot be read or parsed
- CR001 error    the global rank used as a CUDA device index
- CR002 error    the local rank (or the local world size) used where the global
                 one is needed: ``DistributedSampler(rank=...)``,
                 ``init_process_group(rank=...)``
- CR003 warning  a shuffling DistributedSampler, an epoch loop, and no
                 ``set_epoch()`` anywhere: every epoch sees the same order
- CR004 error    a literal ``rank=`` / ``world_size=`` in ``init_process_group``
                 (not with an explicit ``init_method=`` or ``store=``)
- CR005 warning  an NCCL object collective while ``torch.cuda.set_device()`` is
                 never called, so every process of a node uses cuda:0
- CR006 error    torch.distributed.launch's ``--local_rank`` argument used as the
                 device: torchrun does not pass it, so it keeps its default

Precision comes first: a value counts as "the global rank" only when its origin
is visible in the file (``dist.get_rank()``, ``os.environ["RANK"]``, a variable
assigned only from those in the same or an enclosing scope, or a parameter of a
function every call of which, in this file, passes such a value). A variable
merely *named* ``rank`` is not flagged. See docs/lint.md.
"""

from __future__ import annotations

import ast
import builtins
import copy
import os
import tokenize
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

from ..errors import UsageError

ERROR = "error"
WARNING = "warning"

# What a value is known to be (the "kind" of an _Origin).
_GLOBAL = "global rank"
_LOCAL = "local rank"
_LOCAL_WS = "local world size"
_INT = "int literal"

_ENV_KINDS = {"RANK": _GLOBAL, "LOCAL_RANK": _LOCAL, "LOCAL_WORLD_SIZE": _LOCAL_WS}
# The environment torchrun sets: an `if` testing one of these chooses between
# torchrun and a single-process fallback, so a literal rank there is deliberate.
_TORCHRUN_ENV = frozenset({
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
    "MASTER_PORT", "TORCHELASTIC_RUN_ID",
})

_DIST = "torch.distributed."
_GET_RANK = _DIST + "get_rank"
_INIT_PG = _DIST + "init_process_group"
_INIT_PG_PARAMS = ("backend", "init_method", "timeout", "world_size", "rank", "store",
                   "group_name", "pg_options", "device_id")
_SAMPLER_PARAMS = ("dataset", "num_replicas", "rank", "shuffle", "seed", "drop_last")
# Object collectives move their pickles to torch.cuda.current_device() under NCCL.
_OBJECT_COLLECTIVES = frozenset(_DIST + n for n in (
    "all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list"))
_LOCAL_RANK_EXPR = "int(os.environ['LOCAL_RANK'])"
_LOCAL_RANK_DEFAULT = "int(os.environ.get('LOCAL_RANK', 0))"
# Calls that choose the current device (CR001 sinks; any of them silences CR005).
_SET_DEVICE = frozenset({"torch.cuda.set_device", "torch.cuda.device",
                         "torch.accelerator.set_device_index", "torch.accelerator.set_device_idx",
                         "torch.accelerator.device_index"})
_SET_DEVICE_NAMES = frozenset({"set_device", "set_device_index", "set_device_idx"})
_SHOW_LIMIT = 72


@dataclass(frozen=True)
class Finding:
    """One problem in one file. ``line`` and ``col`` are 1-based."""

    path: str
    line: int
    col: int
    code: str        # short stable id, e.g. "CR001"
    severity: str    # "error" | "warning"
    message: str     # what is wrong, naming the expression
    fix: str         # what to write instead


@dataclass(frozen=True)
class _Origin:
    """Why a value is known to be a global rank, a local rank, ...: for the message."""

    kind: str
    source: str          # the variable's assignment or the expression itself
    line: int
    via_variable: bool   # True: reached through a variable (name the assignment)
    value: int | None = None   # for _INT
    argv: str | None = None    # read from a --local_rank argument: "args.local_rank"


@dataclass
class _Binding:
    value: ast.expr | None     # None: bound by something we do not follow (param, for, ...)
    scope: "_Scope"            # where `value` is evaluated
    line: int
    is_import: bool = False
    function: ast.AST | None = None    # the def this binding is
    param_of: ast.AST | None = None    # the def this binding is a parameter of


class _Scope:
    def __init__(self, kind: str, parent: "_Scope | None") -> None:
        self.kind = kind                      # module | function | class | comprehension
        self.parent = parent
        self.bindings: dict[str, list[_Binding]] = {}
        self.globals: set[str] = set()
        self.nonlocals: set[str] = set()

    def module(self) -> "_Scope":
        s = self
        while s.parent is not None:
            s = s.parent
        return s

    def chain(self) -> Iterator["_Scope"]:
        """The scopes a name used here resolves in, innermost first (Python's rule:
        class bodies are not visible from the functions nested in them)."""
        yield self
        s = self.parent
        while s is not None:
            if s.kind != "class":
                yield s
            s = s.parent


def _key(node: ast.AST) -> str | None:
    """``rank`` -> "rank", ``args.local_rank`` -> "args.local_rank", else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _key(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _show(node: ast.AST) -> str:
    return ast.unparse(node)


class _Module:
    """One parsed file: imports, scopes and bindings, and the checks over them."""

    def __init__(self, tree: ast.Module, path: str) -> None:
        self.tree = tree
        self.path = path
        self.imports: dict[str, str] = {}
        self.scope_of: dict[int, _Scope] = {}
        self.parent: dict[int, ast.AST] = {}
        self.findings: list[Finding] = []
        self._memo: dict[tuple[int, int], _Origin | None] = {}
        self._busy: set[tuple[int, int]] = set()
        self._bad_indexes: set[int] = set()
        self._calls: dict[int, list[ast.Call]] = {}
        self._busy_params: set[int] = set()
        self._defined: set[str] | None = None
        self.argparse_local_rank: ast.AST | None = None
        self.nodes: list[ast.AST] = []       # every node, once (ast.walk order)
        for node in ast.walk(tree):
            self.nodes.append(node)
            for child in ast.iter_child_nodes(node):
                self.parent[id(child)] = node
        self._collect_imports()
        self.module_scope = _Scope("module", None)
        self._visit(tree, self.module_scope)

    # -- names ---------------------------------------------------------------

    def _collect_imports(self) -> None:
        seen: dict[str, str | None] = {}
        for node in self.nodes:
            pairs: list[tuple[str, str]] = []
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        pairs.append((a.asname, a.name))
                    else:
                        first = a.name.split(".")[0]
                        pairs.append((first, first))
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    if a.name != "*":
                        pairs.append((a.asname or a.name, f"{node.module}.{a.name}"))
            for name, qual in pairs:
                # A name imported as two different things: we cannot tell which.
                seen[name] = qual if seen.get(name, qual) == qual else None
        self.imports = {k: v for k, v in seen.items() if v is not None}

    def qual(self, node: ast.AST) -> str | None:
        """The dotted name an expression refers to, import aliases resolved:
        ``dist.get_rank`` with ``import torch.distributed as dist`` is
        "torch.distributed.get_rank"."""
        if isinstance(node, ast.Name):
            bindings = self.lookup(node.id, self.scope_of.get(id(node), self.module_scope))
            # `except ImportError: dist = None` keeps the import meaningful.
            if not all(b.is_import or (isinstance(b.value, ast.Constant) and b.value.value is None)
                       for b in bindings):
                return None                     # a local `dist = ...` shadows the import
            q = self.imports.get(node.id, node.id)
        elif isinstance(node, ast.Attribute):
            base = self.qual(node.value)
            if base is None:
                return None
            q = f"{base}.{node.attr}"
        else:
            return None
        for long, short in (("torch.distributed.distributed_c10d.", _DIST),
                            ("torch.utils.data.distributed.", "torch.utils.data."),
                            ("torch.utils.data.sampler.", "torch.utils.data."),
                            ("torch.nn.parallel.distributed.", "torch.nn.parallel.")):
            if q.startswith(long):
                q = short + q[len(long):]
        return q

    def call_qual(self, call: ast.Call) -> str | None:
        return self.qual(call.func)

    # -- scopes and bindings ---------------------------------------------------

    def _bind(self, scope: _Scope, key: str, value: ast.expr | None, line: int,
              is_import: bool = False, function: ast.AST | None = None) -> None:
        base = key.split(".")[0]
        where = scope
        if base in scope.globals:
            where = scope.module()
        elif base in scope.nonlocals:
            s = scope.parent
            while s is not None and s.kind in ("class", "comprehension"):
                s = s.parent
            where = s or scope.module()
        where.bindings.setdefault(key, []).append(_Binding(value, scope, line, is_import, function))

    def _bind_target(self, target: ast.AST, value: ast.expr | None, scope: _Scope, line: int,
                     handled: set[int]) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            elementwise = (isinstance(value, (ast.Tuple, ast.List))
                           and len(value.elts) == len(target.elts)
                           and not any(isinstance(e, ast.Starred) for e in value.elts + target.elts))
            for i, elt in enumerate(target.elts):
                self._bind_target(elt, value.elts[i] if elementwise else None, scope, line, handled)
            return
        if isinstance(target, ast.Starred):
            self._bind_target(target.value, None, scope, line, handled)
            return
        key = _key(target)
        if key is not None:
            self._bind(scope, key, value, line)
            handled.add(id(target))

    def _visit(self, root: ast.AST, root_scope: _Scope) -> None:
        """Record every node's scope and every binding, with the value we can follow.
        (Iterative, in source order: a long `a + b + ...` must not hit the recursion limit.)"""
        handled: set[int] = set()       # Store nodes already bound with their value
        stack: list[tuple[ast.AST, _Scope]] = [(root, root_scope)]

        def push(children: list[ast.AST], where: _Scope) -> None:
            stack.extend((c, where) for c in reversed(children))

        while stack:
            node, scope = stack.pop()
            self.scope_of[id(node)] = scope
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                named = not isinstance(node, ast.Lambda)
                if named:
                    self._bind(scope, node.name, None, node.lineno, function=node)
                inner = _Scope("function", scope)
                a = node.args
                for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
                    inner.bindings.setdefault(arg.arg, []).append(
                        _Binding(None, inner, node.lineno, param_of=node if named else None))
                push([node.body] if isinstance(node, ast.Lambda) else node.body, inner)
                # Decorators and defaults are evaluated where the function is defined.
                push(getattr(node, "decorator_list", []) + a.defaults
                     + [d for d in a.kw_defaults if d is not None], scope)
                continue
            if isinstance(node, ast.ClassDef):
                self._bind(scope, node.name, None, node.lineno)
                push(node.body, _Scope("class", scope))
                push(node.decorator_list + node.bases + [k.value for k in node.keywords], scope)
                continue
            if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                push(list(ast.iter_child_nodes(node)), _Scope("comprehension", scope))
                continue
            if isinstance(node, ast.Global):
                scope.globals.update(node.names)
            elif isinstance(node, ast.Nonlocal):
                scope.nonlocals.update(node.names)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    self._bind_target(t, node.value, scope, node.lineno, handled)
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                self._bind_target(node.target, node.value, scope, node.lineno, handled)
            elif isinstance(node, ast.AnnAssign):
                handled.add(id(node.target))          # a bare annotation binds nothing
            elif isinstance(node, ast.NamedExpr):
                self._bind_target(node.target, node.value, scope, node.lineno, handled)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    if a.name != "*":
                        self._bind(scope, a.asname or a.name.split(".")[0], None, node.lineno,
                                   is_import=True)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                self._bind(scope, node.name, None, node.lineno)
            elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, (ast.Store, ast.Del)):
                # for-targets, with-targets, augmented assignments, del: not followed.
                key = _key(node)
                if key is not None and id(node) not in handled:
                    self._bind(scope, key, None, node.lineno)
                    handled.add(id(node))
            elif type(node).__name__ in ("MatchAs", "MatchStar") and getattr(node, "name", None):
                self._bind(scope, node.name, None, node.lineno)
            elif type(node).__name__ == "MatchMapping" and getattr(node, "rest", None):
                self._bind(scope, node.rest, None, node.lineno)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "add_argument" and self.argparse_local_rank is None:
                flags = [a.value for a in node.args if isinstance(a, ast.Constant)]
                dest = next((k.value for k in node.keywords if k.arg == "dest"), None)
                if any(f in ("--local_rank", "--local-rank") for f in flags) and (
                        dest is None or (isinstance(dest, ast.Constant) and dest.value == "local_rank")):
                    # torch.distributed.launch fills this with the local rank.
                    self.argparse_local_rank = node
            push(list(ast.iter_child_nodes(node)), scope)

    def lookup(self, key: str, scope: _Scope) -> list[_Binding]:
        for s in scope.chain():
            if key in s.bindings:
                return s.bindings[key]
        return []

    # -- what a value is -------------------------------------------------------

    def _env_name(self, node: ast.AST) -> str | None:
        """``os.environ["X"]``, ``os.environ.get("X", d)``, ``os.getenv("X")`` -> "X"
        (also from a copy of the environment, see _is_environ)."""
        if isinstance(node, ast.Subscript) and self._is_environ(node.value):
            s = node.slice
            if isinstance(s, ast.Constant) and isinstance(s.value, str):
                return s.value
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) \
                and (self.call_qual(node) == "os.getenv"
                     or (isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                         and self._is_environ(node.func.value))):
            return node.args[0].value
        return None

    def _is_environ(self, node: ast.AST, depth: int = 0) -> bool:
        """``os.environ``, or a variable assigned only a copy of it:
        ``{k: os.environ[k] for k in (...)}``, ``dict(os.environ)``, ``os.environ.copy()``."""
        if self.qual(node) == "os.environ":
            return True
        if isinstance(node, ast.DictComp) and len(node.generators) == 1:
            target, value = node.generators[0].target, node.value
            return isinstance(target, ast.Name) and isinstance(value, ast.Subscript) \
                and self.qual(value.value) == "os.environ" \
                and all(isinstance(n, ast.Name) and n.id == target.id for n in (node.key, value.slice))
        if isinstance(node, ast.Call) and not node.keywords:
            q = self.call_qual(node)
            return (q == "os.environ.copy" and not node.args) or (
                q == "dict" and len(node.args) == 1 and self.qual(node.args[0]) == "os.environ")
        if isinstance(node, ast.Name) and depth < 4:
            bindings = self.lookup(node.id, self.scope_of.get(id(node), self.module_scope))
            return bool(bindings) and all(b.value is not None and self._is_environ(b.value, depth + 1)
                                          for b in bindings)
        return False

    def origin(self, node: ast.AST | None, scope: _Scope) -> _Origin | None:
        """What `node` is known to hold (global rank, local rank, ...), or None."""
        if node is None:
            return None
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return _Origin(_INT, _show(node), line, False, node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
                and isinstance(node.operand, ast.Constant) and type(node.operand.value) is int:
            return _Origin(_INT, _show(node), line, False, -node.operand.value)
        env = self._env_name(node)
        if env in _ENV_KINDS:
            return _Origin(_ENV_KINDS[env], _show(node), line, False)
        if isinstance(node, ast.Call):
            q = self.call_qual(node)
            if q == _GET_RANK and not node.args and not node.keywords:
                return _Origin(_GLOBAL, _show(node), line, False)      # the default group
            if q == _DIST + "get_node_local_rank":
                return _Origin(_LOCAL, _show(node), line, False)
            if q == "torch.cuda.device_count" and not node.args:
                return _Origin(_LOCAL_WS, _show(node), line, False)
            if q == "int" and len(node.args) == 1 and not node.keywords \
                    and not self.lookup("int", self.scope_of.get(id(node), scope)):
                inner = self.origin(node.args[0], scope)
                if inner is not None and inner.kind != _INT:
                    return inner if inner.via_variable else _Origin(inner.kind, _show(node), line, False)
            return None
        key = _key(node)
        if key is None:
            return None
        memo = (id(node), id(scope))
        if memo in self._memo:
            return self._memo[memo]
        if memo in self._busy:
            return None
        self._busy.add(memo)
        try:
            result = self._variable_origin(key, node, scope)
        finally:
            self._busy.discard(memo)
        self._memo[memo] = result
        return result

    def _variable_origin(self, key: str, node: ast.AST | None, scope: _Scope) -> _Origin | None:
        bindings = self.lookup(key, scope)
        if not bindings:
            if isinstance(node, ast.Attribute) and node.attr == "local_rank" \
                    and self.argparse_local_rank is not None:
                a = self.argparse_local_rank
                return _Origin(_LOCAL, f"{_show(a)}, line {a.lineno}", a.lineno, True,
                               argv=_show(node))
            return None
        # `rank = None` is a placeholder until the real assignment: not a value.
        placeholders = [b for b in bindings if isinstance(b.value, ast.Constant) and b.value.value is None]
        if len(placeholders) < len(bindings):
            bindings = [b for b in bindings if b not in placeholders]
        kinds = []
        for b in bindings:
            if b.value is not None:
                o = self.origin(b.value, b.scope)
            else:
                o = self._param_origin(b, key) if b.param_of is not None else None
            if o is None:
                return None                     # one assignment we cannot follow: unknown
            kinds.append(o)
        if len({o.kind for o in kinds}) != 1 or len({o.value for o in kinds}) != 1:
            return None
        first = bindings[0]
        source = kinds[0].source if first.value is None else \
            f"{key} = {_show(first.value)}, line {first.line}"
        argv = kinds[0].argv if all(o.argv for o in kinds) else None
        return _Origin(kinds[0].kind, source, first.line, True, kinds[0].value, argv)

    def _param_origin(self, b: _Binding, name: str) -> _Origin | None:
        """A parameter's value, when every call of its function is in this file and
        passes the same kind of value (a plain function: not a method, not decorated)."""
        func = b.param_of
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) or func.decorator_list \
                or (b.scope.parent is not None and b.scope.parent.kind == "class") \
                or id(func) in self._busy_params:
            return None
        a = func.args
        positional = [x.arg for x in a.posonlyargs + a.args]
        calls = self._calls_of(func)
        origins: list[_Origin] = []
        self._busy_params.add(id(func))         # a recursive call: unknown, not a loop
        try:
            for call in calls:
                value = self._argument(call, positional, name)
                o = self.origin(value, self.scope_of.get(id(value), self.module_scope)) \
                    if value is not None else None
                if o is None:
                    return None
                origins.append(o)
        finally:
            self._busy_params.discard(id(func))
        if not origins or len({(o.kind, o.value) for o in origins}) != 1:
            return None
        o, call = origins[0], calls[0]
        source = f"{name} from {self._short(call)}, line {call.lineno}" \
            + (f"; {o.source}" if o.via_variable else "")
        argv = o.argv if all(x.argv for x in origins) else None
        return _Origin(o.kind, source, call.lineno, True, o.value, argv)

    def _calls_of(self, func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.Call]:
        """Every call of `func` in this file; none when its name is used any other
        way (handed to mp.spawn, stored, ...) or is bound to anything else too."""
        if id(func) not in self._calls:
            bindings = self.lookup(func.name, self.scope_of.get(id(func), self.module_scope))
            calls: list[ast.Call] = []
            if len(bindings) == 1 and bindings[0].function is func:
                for n in self.nodes:
                    if not (isinstance(n, ast.Name) and n.id == func.name
                            and self.lookup(n.id, self.scope_of.get(id(n), self.module_scope)) is bindings):
                        continue
                    call = self.parent.get(id(n))
                    if not (isinstance(call, ast.Call) and call.func is n):
                        calls = []
                        break
                    calls.append(call)
            self._calls[id(func)] = calls
        return self._calls[id(func)]

    @staticmethod
    def _argument(call: ast.Call, positional: list[str], name: str) -> ast.expr | None:
        """What `call` passes for the parameter `name`; None if it cannot be told."""
        for k in call.keywords:
            if k.arg == name:
                return k.value
        if name in positional:
            i = positional.index(name)
            if len(call.args) > i and not any(isinstance(a, ast.Starred) for a in call.args[:i + 1]):
                return call.args[i]
        return None

    @staticmethod
    def _short(call: ast.Call) -> str:
        shown = _show(call)
        return shown if len(shown) <= _SHOW_LIMIT else f"{_show(call.func)}(...)"

    def _local_rank_name(self, scope: _Scope, before: int) -> str:
        """A variable already holding the local rank, to suggest; else the env read."""
        for s in scope.chain():
            for key, bs in s.bindings.items():
                if "." in key or bs[0].line >= before:
                    continue
                o = self._variable_origin(key, None, s)
                if o is not None and o.kind == _LOCAL:
                    return key
        return _LOCAL_RANK_EXPR

    # -- findings ----------------------------------------------------------------

    def add(self, node: ast.AST, code: str, severity: str, message: str, fix: str) -> None:
        self.findings.append(Finding(self.path, getattr(node, "lineno", 1),
                                     getattr(node, "col_offset", 0) + 1, code, severity, message, fix))

    def run(self) -> list[Finding]:
        reported_strings: set[int] = set()
        device_sinks = []
        argv_devices: list[ast.AST] = []        # devices taken from a --local_rank argument
        for node in self.nodes:
            if isinstance(node, ast.Call):
                uses = self._device_sink(node, reported_strings)
                bad = [u for u in uses if u[2].kind == _GLOBAL]
                if bad:
                    device_sinks.append((node, bad))
                if any(o.argv for _, _, o in uses):
                    argv_devices.append(node)
                self._check_sampler(node)
                self._check_init(node)
        # Every global rank used as a device, so that a fix for DDP(m.to(rank),
        # device_ids=[rank]) replaces both, not only its own.
        self._bad_indexes = {id(index) for _, bad in device_sinks for index, _, _ in bad}
        for call, bad in device_sinks:
            self._report_device_sink(call, bad)
        self._check_device_strings(reported_strings, argv_devices)
        self._check_object_collectives()
        self._check_launch_argument(argv_devices)
        return sorted(set(self.findings), key=lambda f: (f.line, f.col, f.code, f.message))

    # CR001 ----------------------------------------------------------------------

    def _device_index(self, node: ast.AST) -> ast.AST | None:
        """The index X inside a CUDA device name built from it: ``f"cuda:{X}"``,
        ``"cuda:" + str(X)``, ``"cuda:%d" % X``, ``"cuda:{}".format(X)``, and
        ``f"{acc}:{X}"`` with ``acc`` from ``torch.accelerator.current_accelerator()``."""
        if isinstance(node, ast.JoinedStr) and len(node.values) == 2:
            head, fv = node.values
            if isinstance(head, ast.Constant) and head.value == "cuda:" \
                    and isinstance(fv, ast.FormattedValue) and fv.format_spec is None:
                return fv.value
        if isinstance(node, ast.JoinedStr) and len(node.values) == 3:
            acc, colon, fv = node.values
            if isinstance(acc, ast.FormattedValue) and self._is_accelerator(acc.value) \
                    and isinstance(colon, ast.Constant) and colon.value == ":" \
                    and isinstance(fv, ast.FormattedValue) and fv.format_spec is None:
                return fv.value
        if isinstance(node, ast.BinOp) and isinstance(node.left, ast.Constant):
            left = node.left.value
            if isinstance(node.op, ast.Add) and left == "cuda:" and isinstance(node.right, ast.Call) \
                    and self.call_qual(node.right) == "str" and len(node.right.args) == 1:
                return node.right.args[0]
            if isinstance(node.op, ast.Mod) and left in ("cuda:%d", "cuda:%s", "cuda:%i"):
                r = node.right
                if isinstance(r, ast.Tuple):
                    return r.elts[0] if len(r.elts) == 1 else None
                return r
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "format" and isinstance(node.func.value, ast.Constant) \
                and node.func.value.value in ("cuda:{}", "cuda:{0}") and len(node.args) == 1:
            return node.args[0]
        return None

    def _is_accelerator(self, node: ast.AST, depth: int = 0) -> bool:
        """``torch.accelerator.current_accelerator()`` or its ``.type``, directly or
        through variables assigned only that."""
        if isinstance(node, ast.Attribute) and node.attr == "type":
            node = node.value
        if isinstance(node, ast.Call):
            return self.call_qual(node) == "torch.accelerator.current_accelerator"
        if isinstance(node, ast.Name) and depth < 4:
            bindings = self.lookup(node.id, self.scope_of.get(id(node), self.module_scope))
            return bool(bindings) and all(b.value is not None and self._is_accelerator(b.value, depth + 1)
                                          for b in bindings)
        return False

    def _device_sink(self, call: ast.Call, reported_strings: set[int]
                     ) -> list[tuple[ast.AST, ast.keyword | None, _Origin]]:
        """The values of known origin `call` uses as a device index, with the keyword
        each was passed as (None: positional) and where it came from."""
        q = self.call_qual(call) or ""
        scope = self.scope_of.get(id(call), self.module_scope)
        kw = {k.arg: k for k in call.keywords if k.arg}
        # (the expression passed as a device, the keyword it was passed as or None)
        candidates: list[tuple[ast.AST, ast.keyword | None]] = []

        def pos_or_kw(i: int, name: str) -> None:
            if name in kw:
                candidates.append((kw[name].value, kw[name]))
            elif len(call.args) > i and not any(isinstance(a, ast.Starred) for a in call.args[:i + 1]):
                candidates.append((call.args[i], None))

        method = call.func.attr if isinstance(call.func, ast.Attribute) else None
        if q in _SET_DEVICE:
            pos_or_kw(0, "device")
        elif q == "torch.device":
            typ = kw["type"].value if "type" in kw else (call.args[0] if call.args else None)
            if (isinstance(typ, ast.Constant) and typ.value == "cuda") \
                    or (typ is not None and self._is_accelerator(typ)):
                pos_or_kw(1, "index")
            elif len(call.args) == 1 and not call.keywords:
                candidates.append((call.args[0], None))     # torch.device(3) is cuda:3
        elif q.startswith("torch.") and (q.endswith(".DistributedDataParallel")
                                         or q.endswith(".FullyShardedDataParallel")):
            for name in ("device_ids", "output_device", "device_id"):
                if name in kw:
                    v = kw[name].value
                    for e in (v.elts if isinstance(v, (ast.List, ast.Tuple)) else [v]):
                        candidates.append((e, kw[name]))
        elif q == _DIST + "barrier" and "device_ids" in kw:
            v = kw["device_ids"].value
            for e in (v.elts if isinstance(v, (ast.List, ast.Tuple)) else [v]):
                candidates.append((e, kw["device_ids"]))
        elif q == _INIT_PG and "device_id" in kw:
            candidates.append((kw["device_id"].value, kw["device_id"]))
        elif method in ("to", "cuda") and not q.startswith("torch.cuda"):
            pos_or_kw(0, "device")
        elif q.startswith("torch.") and "device" in kw:
            candidates.append((kw["device"].value, kw["device"]))

        uses: list[tuple[ast.AST, ast.keyword | None, _Origin]] = []
        for expr, keyword in candidates:
            index = self._device_index(expr)
            if index is not None:
                reported_strings.add(id(expr))
            else:
                index = expr
            o = self.origin(index, scope)
            if o is not None:
                uses.append((index, keyword, o))
        return uses

    def _report_device_sink(self, call: ast.Call,
                            bad: list[tuple[ast.AST, ast.keyword | None, _Origin]]) -> None:
        # One finding per call, even for device_ids=[rank], output_device=rank.
        scope = self.scope_of.get(id(call), self.module_scope)
        indexes = [n for n in ast.walk(call) if id(n) in self._bad_indexes]
        shown, fixed = self._show_replaced(call, indexes, bad[0][1], scope)
        self.add(bad[0][1] or call, "CR001", ERROR,
                 f"{shown} uses the global rank{self._via(bad[0][2])} as a CUDA device index; "
                 f"on every node but the first it names a GPU past the node's own",
                 f"use the local rank: {fixed}")

    def _check_device_strings(self, reported: set[int], argv_devices: list[ast.AST]) -> None:
        for node in self.nodes:
            if id(node) in reported or not isinstance(node, (ast.JoinedStr, ast.BinOp, ast.Call)):
                continue
            index = self._device_index(node)
            if index is None or self._is_printed(node):
                continue
            scope = self.scope_of.get(id(node), self.module_scope)
            o = self.origin(index, scope)
            if o is not None and o.argv:
                argv_devices.append(node)
            if o is None or o.kind != _GLOBAL:
                continue
            fixed = _show(self._replaced(node, [index], self._local_rank_name(scope, node.lineno)))
            self.add(node, "CR001", ERROR,
                     f"{_show(node)} names a CUDA device after the global rank{self._via(o)}; "
                     f"on every node but the first it names a GPU past the node's own",
                     f"use the local rank: {fixed}")

    def _is_printed(self, node: ast.AST) -> bool:
        """An argument of print() or a logging call: a message, not a device."""
        p = self.parent.get(id(node))
        if isinstance(p, ast.keyword):
            p = self.parent.get(id(p))
        if not isinstance(p, ast.Call) or node is p.func:
            return False
        name = p.func.attr if isinstance(p.func, ast.Attribute) else _key(p.func)
        return name in ("print", "debug", "info", "warning", "warn", "error", "critical",
                        "exception", "log", "write")

    @staticmethod
    def _via(o: _Origin) -> str:
        return f" ({o.source})" if o.via_variable else ""

    @staticmethod
    def _replaced(root: ast.AST, targets: list[ast.AST], replacement: str,
                  focus: ast.AST | None = None) -> ast.AST:
        """A copy of `root` with each of `targets` replaced by the expression
        `replacement` (and, if `focus` is given, returns the copy of `focus` instead)."""
        nodes = list(ast.walk(root))
        twin_nodes = list(ast.walk(twin := copy.deepcopy(root)))
        old = {id(twin_nodes[nodes.index(t)]) for t in targets}

        class Swap(ast.NodeTransformer):
            def generic_visit(self, node: ast.AST) -> ast.AST:
                if id(node) in old:
                    return ast.parse(replacement, mode="eval").body
                return super().generic_visit(node)

        twin = Swap().visit(twin)
        if focus is not None:
            return list(ast.walk(twin))[nodes.index(focus)]
        return twin

    def _show_replaced(self, call: ast.Call, indexes: list[ast.AST], keyword: ast.keyword | None,
                       scope: _Scope) -> tuple[str, str]:
        """The offending call as the message shows it, and the same with the local rank."""
        local = self._local_rank_name(scope, call.lineno)
        fixed_call = self._replaced(call, indexes, local)
        shown, fixed = _show(call), _show(fixed_call)
        if len(shown) <= _SHOW_LIMIT:
            return shown, fixed
        # Too long to read: keep the callee and the offending argument only.
        func = _show(call.func)
        if isinstance(call.func, ast.Attribute) and len(func) > 30:
            func = "(...)." + call.func.attr
        focus = keyword if keyword is not None else next(
            (a for a in call.args if indexes and indexes[0] in list(ast.walk(a))), None)
        if focus is None or not all(i in list(ast.walk(focus)) for i in indexes):
            return shown, fixed
        focus_fixed = self._replaced(call, indexes, local, focus=focus)
        more = "..., " if (len(call.args) + len(call.keywords)) > 1 else ""
        return f"{func}({more}{_show(focus)})", f"{func}({more}{_show(focus_fixed)})"

    # CR002, CR003 ----------------------------------------------------------------------

    def _sampler_var(self, call: ast.Call) -> str | None:
        parent = self.parent.get(id(call))
        if isinstance(parent, (ast.Assign, ast.AnnAssign)):
            targets = parent.targets if isinstance(parent, ast.Assign) else [parent.target]
            if len(targets) == 1 and _key(targets[0]):
                return _key(targets[0])
        return None

    @staticmethod
    def _rebuilt(call: ast.Call, params: tuple[str, ...], keep_positional: int,
                 drop: set[str]) -> str:
        """`call` with the arguments named in `drop` removed; positional arguments
        after the first `keep_positional` become keywords so nothing shifts."""
        new = copy.deepcopy(call)
        args: list[ast.expr] = []
        keywords: list[ast.keyword] = []
        for i, a in enumerate(call.args):
            if isinstance(a, ast.Starred) or i >= len(params):
                return _show(new)                   # cannot rename safely: show as is
            if i < keep_positional:
                args.append(a)
            elif params[i] not in drop:
                keywords.append(ast.keyword(arg=params[i], value=a))
        keywords += [k for k in call.keywords if k.arg not in drop]
        new.args, new.keywords = args, keywords
        return _show(new)

    def _check_sampler(self, call: ast.Call) -> None:
        q = self.call_qual(call) or ""
        if not (q.startswith("torch.") and q.endswith(".DistributedSampler")):
            return
        scope = self.scope_of.get(id(call), self.module_scope)
        kw = {k.arg: k.value for k in call.keywords if k.arg}

        def arg(i: int, name: str) -> ast.expr | None:
            if name in kw:
                return kw[name]
            if len(call.args) > i and not any(isinstance(a, ast.Starred) for a in call.args[:i + 1]):
                return call.args[i]
            return None

        fixed = self._rebuilt(call, _SAMPLER_PARAMS, 1, {"rank", "num_replicas"})
        shown = _show(call)
        rank, replicas = arg(2, "rank"), arg(1, "num_replicas")
        o = self.origin(rank, scope)
        if o is not None and o.kind == _LOCAL:
            self.add(rank, "CR002", ERROR,
                     f"{shown} passes the local rank{self._via(o)} as the sampler's rank; the "
                     f"processes with the same local rank on different nodes read the same shard "
                     f"and the other shards are never read",
                     f"{fixed} takes the rank and world size from the process group "
                     f"(or pass rank=dist.get_rank())")
        o = self.origin(replicas, scope)
        if o is not None and o.kind == _LOCAL_WS:
            self.add(replicas, "CR002", ERROR,
                     f"{shown} passes the number of processes on this node{self._via(o)} as "
                     f"num_replicas; it must be the world size across all nodes: the other "
                     f"nodes' ranks are out of range, or every node reads the same samples",
                     f"{fixed} takes the rank and world size from the process group "
                     f"(or pass num_replicas=dist.get_world_size())")
        shuffle = arg(3, "shuffle")
        if isinstance(shuffle, ast.Constant) and shuffle.value is False:
            return
        if self._has_loop() and not self._mentions_set_epoch() and not self._handed_off(call):
            var = self._sampler_var(call) or "sampler"
            self.add(call, "CR003", WARNING,
                     f"{shown} shuffles, but set_epoch() is never called in this file: every "
                     f"epoch sees the same order",
                     f"call {var}.set_epoch(epoch) at the top of each epoch, before iterating "
                     f"the DataLoader")

    def _handed_off(self, sampler: ast.Call) -> bool:
        """The sampler (or its variable) is an argument of a call into code this file
        does not show (an imported helper, another object's method): that code may
        well call set_epoch() on it."""
        var = self._sampler_var(sampler)
        uses = [sampler] + [n for n in self.nodes if var and isinstance(n, (ast.Name, ast.Attribute))
                            and isinstance(n.ctx, ast.Load) and _key(n) == var]
        for use in uses:
            p = self.parent.get(id(use))
            if isinstance(p, ast.keyword):
                p = self.parent.get(id(p))
            if isinstance(p, ast.Call) and p.func is not use and self._foreign(p):
                return True
        return False

    def _foreign(self, call: ast.Call) -> bool:
        """A call into code this file does not show: not torch's, not a builtin,
        not a function or class defined here."""
        q = self.call_qual(call) or ""
        if q.startswith("torch.") or q in dir(builtins):
            return False
        if self._defined is None:
            self._defined = {n.name for n in self.nodes if isinstance(
                n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        f = call.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        return name not in self._defined

    def _has_loop(self) -> bool:
        return any(isinstance(n, (ast.For, ast.AsyncFor, ast.While)) for n in self.nodes)

    def _mentions_set_epoch(self) -> bool:
        for n in self.nodes:
            if (isinstance(n, ast.Attribute) and n.attr == "set_epoch") \
                    or (isinstance(n, ast.Name) and n.id == "set_epoch") \
                    or (isinstance(n, ast.Constant) and n.value == "set_epoch"):
                return True
        return False

    # CR002, CR004 (init_process_group) ---------------------------------------------------

    def _env_guarded(self, node: ast.AST) -> bool:
        """Inside an `if` that tests torchrun's environment (a single-process fallback)."""
        child, p = node, self.parent.get(id(node))
        while p is not None:
            if isinstance(p, (ast.If, ast.IfExp)) and child is not p.test:
                for n in ast.walk(p.test):
                    if (isinstance(n, ast.Constant) and n.value in _TORCHRUN_ENV) \
                            or (isinstance(n, (ast.Attribute, ast.Name))
                                and self.qual(n) in ("os.environ", "os.getenv",
                                                     _DIST + "is_torchelastic_launched")):
                        return True
            child, p = p, self.parent.get(id(p))
        return False

    def _check_init(self, call: ast.Call) -> None:
        if self.call_qual(call) != _INIT_PG:
            return
        scope = self.scope_of.get(id(call), self.module_scope)
        kw = {k.arg: k.value for k in call.keywords if k.arg}
        starred = any(isinstance(a, ast.Starred) for a in call.args)

        def arg(i: int, name: str) -> ast.expr | None:
            if name in kw:
                return kw[name]
            return call.args[i] if len(call.args) > i and not starred else None

        method = arg(1, "init_method")
        if "store" in kw or not (method is None or (isinstance(method, ast.Constant) and (
                method.value is None or str(method.value).startswith("env://")))):
            return      # a rendezvous of its own (or a sub-group): rank and size are its to give
        shown = _show(call)
        fixed = self._rebuilt(call, _INIT_PG_PARAMS, 1, {"rank", "world_size"})
        fix = (f"under torchrun, RANK and WORLD_SIZE come from the environment; drop rank= and "
               f"world_size=: {fixed}")
        guarded = self._env_guarded(call)
        for name, i in (("rank", 4), ("world_size", 3)):
            value = arg(i, name)
            o = self.origin(value, scope)
            if o is None or value is None:
                continue
            if o.kind == _INT and o.value != -1 and not guarded:
                what = "rank" if name == "rank" else "world size"
                self.add(value, "CR004", ERROR,
                         f"{shown} hard-codes the {what} ({name}={o.value}{self._via_int(o)}); "
                         + (f"every process claims rank {o.value} and the rendezvous fails or "
                            f"hangs" if name == "rank" else
                            f"right only while the job has exactly {o.value} processes: with any "
                            f"other number of nodes or GPUs the rendezvous fails or hangs"),
                         fix)
            elif name == "rank" and o.kind == _LOCAL:
                self.add(value, "CR002", ERROR,
                         f"{shown} passes the local rank{self._via(o)} as the global rank; the "
                         f"processes with the same local rank on different nodes collide",
                         fix)
            elif name == "world_size" and o.kind == _LOCAL_WS:
                self.add(value, "CR002", ERROR,
                         f"{shown} passes the number of processes on this node{self._via(o)} as "
                         f"the world size; it must count the processes of all nodes",
                         fix)

    @staticmethod
    def _via_int(o: _Origin) -> str:
        return f", from {o.source}" if o.via_variable else ""

    # CR005 --------------------------------------------------------------------------------

    def _check_object_collectives(self) -> None:
        nccl = False
        for n in self.nodes:
            if isinstance(n, ast.Call) and self.call_qual(n) == _INIT_PG:
                backend = next((k.value for k in n.keywords if k.arg == "backend"),
                               n.args[0] if n.args else None)
                # "cpu:gloo,cuda:nccl" runs object collectives on the CPU: not affected.
                if isinstance(backend, ast.Constant) and isinstance(backend.value, str) \
                        and "nccl" in backend.value.lower() and "cpu:" not in backend.value.lower():
                    nccl = True
                if any(k.arg == "device_id" for k in n.keywords):
                    return                      # the process group is bound to a device
        if not nccl:
            return
        for n in self.nodes:
            # Any way the script picks its GPU (even one we cannot follow) silences this.
            if (isinstance(n, ast.Attribute) and n.attr in _SET_DEVICE_NAMES) \
                    or (isinstance(n, ast.Name) and n.id in _SET_DEVICE_NAMES) \
                    or (isinstance(n, ast.Call) and self.call_qual(n) in _SET_DEVICE) \
                    or (isinstance(n, ast.Constant) and n.value == "CUDA_VISIBLE_DEVICES"):
                return
        for n in self.nodes:
            if isinstance(n, ast.Call) and self.call_qual(n) in _OBJECT_COLLECTIVES \
                    and not any(k.arg == "device" for k in n.keywords):
                self.add(n, "CR005", WARNING,
                         f"{_show(n)} runs on torch.cuda.current_device(), which is cuda:0 in "
                         f"every process because torch.cuda.set_device() is never called: with "
                         f"NCCL the processes of a node share GPU 0 and fail or hang",
                         f"call torch.cuda.set_device({_LOCAL_RANK_EXPR}) right after "
                         f"init_process_group")

    # CR006 --------------------------------------------------------------------------------

    def _check_launch_argument(self, devices: list[ast.AST]) -> None:
        """A --local_rank argument used as the device, with a default that is the
        same in every process, in a file that never reads LOCAL_RANK itself."""
        a = self.argparse_local_rank
        if a is None or not devices or any(isinstance(n, ast.Constant) and n.value == "LOCAL_RANK"
                                           for n in self.nodes):
            return
        kw = {k.arg: k.value for k in a.keywords if k.arg}
        required, default = kw.get("required"), kw.get("default")
        literal = self.origin(default, self.module_scope) if default is not None else None
        if isinstance(required, ast.Constant) and required.value:
            return      # torchrun stops at once with argparse's usage error
        if default is not None and not (isinstance(default, ast.Constant) and default.value is None) \
                and not (literal is not None and literal.kind == _INT and not literal.via_variable):
            return      # a default the file computes may differ per process
        use = min(devices, key=lambda n: (n.lineno, n.col_offset))
        attr = self._argv_of(use)
        value = "None" if literal is None else str(literal.value)
        self.add(a, "CR006", ERROR,
                 f"{self._short(a)} declares torch.distributed.launch's --local_rank, but torchrun "
                 f"does not pass it (it sets LOCAL_RANK in the environment): {attr} is {value} in "
                 f"every process, so {self._short(use)} (line {use.lineno}) gives every process "
                 f"of a node the same device",
                 f"read LOCAL_RANK from the environment: {self._env_default(a)}")

    def _argv_of(self, node: ast.AST) -> str:
        """The --local_rank attribute (``args.local_rank``) a device use reads."""
        for n in ast.walk(node):
            o = self.origin(n, self.scope_of.get(id(n), self.module_scope)) \
                if isinstance(n, (ast.Name, ast.Attribute, ast.Call)) else None
            if o is not None and o.argv:
                return o.argv
        return "args.local_rank"

    @staticmethod
    def _env_default(a: ast.Call) -> str:
        """The add_argument call with ``default=`` reading LOCAL_RANK."""
        default = ast.parse(_LOCAL_RANK_DEFAULT, mode="eval").body
        new = copy.deepcopy(a)
        new.keywords = [k for k in new.keywords if k.arg != "default"] \
            + [ast.keyword(arg="default", value=default)]
        if len(_show(a)) <= _SHOW_LIMIT:
            return _show(new)
        flags = ", ".join(_show(x) for x in a.args)
        return f"{_show(a.func)}({flags}, ..., default={_LOCAL_RANK_DEFAULT})"


def lint_source(source: str, path: str = "<string>") -> list[Finding]:
    """Check one script's source; findings sorted by line. A syntax error is one
    CR000 finding, never an exception."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # SyntaxWarning: not ours to report
            tree = ast.parse(source, filename=path)
        return _Module(tree, path).run()
    except SyntaxError as e:
        return [Finding(path, e.lineno or 1, e.offset or 1, "CR000", ERROR,
                        f"syntax error: {e.msg}", "fix the syntax error; nothing else was checked")]
    except ValueError as e:              # e.g. a NUL byte in the source
        return [Finding(path, 1, 1, "CR000", ERROR, f"cannot parse: {e}",
                        "is this a Python source file?")]
    except RecursionError:
        return [Finding(path, 1, 1, "CR000", ERROR, "too deeply nested to check",
                        "nothing was checked in this file")]


def _expand(paths: Sequence[str]) -> list[str]:
    """Files as given; directories become the .py files under them (not hidden
    directories, __pycache__ or virtual environments)."""
    out: list[str] = []
    for p in paths:
        if not os.path.isdir(p):
            out.append(p)
            continue
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                             and not os.path.exists(os.path.join(root, d, "pyvenv.cfg")))
            out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    return out


def lint_paths(paths: Sequence[str]) -> list[Finding]:
    """Check files (directories: the .py files under them). A file that cannot be
    read or parsed is one CR000 finding, never an exception."""
    findings: list[Finding] = []
    for path in _expand(paths):
        try:
            with tokenize.open(path) as f:       # honours a PEP 263 coding line
                source = f.read()
        except (OSError, UnicodeDecodeError, SyntaxError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            findings.append(Finding(path, 1, 1, "CR000", ERROR, f"cannot read the file: {reason}",
                                    "check the path and that it is a readable Python file"))
            continue
        findings += lint_source(source, path)
    return findings


def format_finding(f: Finding) -> str:
    """``train.py:12:5: error CR001 <message>`` and an indented ``fix:`` line."""
    return f"{f.path}:{f.line}:{f.col}: {f.severity} {f.code} {f.message}\n    fix: {f.fix}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def lint_command(paths: Sequence[str]) -> int:
    """`clusterrun lint SCRIPT...`: print every finding and a summary; 1 if any
    error, else 0. A path that does not exist is bad usage (UsageError, exit 2)."""
    if not paths:
        raise UsageError("lint: name at least one script to check")
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise UsageError(f"lint: no such file: {', '.join(missing)}")
    files = _expand(paths)
    findings = lint_paths(files)
    for f in findings:
        print(format_finding(f))
    errors = sum(f.severity == ERROR for f in findings)
    n_warnings = len(findings) - errors
    checked = _plural(len(files), "file")
    if not findings:
        print(f"no problems found in {checked}")
    else:
        with_problems = len({f.path for f in findings})
        where = checked if with_problems == len(files) else f"{with_problems} of {checked}"
        counts = [_plural(errors, "error")] if errors else []
        counts += [_plural(n_warnings, "warning")] if n_warnings else []
        print(f"{', '.join(counts)} in {where}")
    return 1 if errors else 0
