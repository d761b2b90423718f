"""What names mean where in one script: imports and their aliases, scopes, and every
assignment with the value it binds (when there is one to follow).

Python's own rules, statically: a function sees its enclosing functions' names but
not its class body's; ``global`` and ``nonlocal`` move a binding; a comprehension is a
scope of its own. Nothing is executed and nothing is imported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Iterator, Sequence

# A message shows a call in full up to this many characters, else its callee only.
SHOW_LIMIT = 72


def key(node: ast.AST) -> str | None:
    """``rank`` -> "rank", ``args.local_rank`` -> "args.local_rank", else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = key(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def show(node: ast.AST) -> str:
    return ast.unparse(node)


def short(node: ast.AST) -> str:
    """A call as a message names it: in full, or ``callee(...)`` when too long to read."""
    shown = show(node)
    if len(shown) <= SHOW_LIMIT or not isinstance(node, ast.Call):
        return shown
    return f"{show(node.func)}(...)"


@dataclass
class Binding:
    value: ast.expr | None     # None: bound by something we do not follow (param, for, ...)
    scope: "Scope"             # where `value` is evaluated
    line: int
    is_import: bool = False
    function: ast.AST | None = None    # the def this binding is
    param_of: ast.AST | None = None    # the def this binding is a parameter of


class Scope:
    def __init__(self, kind: str, parent: "Scope | None") -> None:
        self.kind = kind                      # module | function | class | comprehension
        self.parent = parent
        self.bindings: dict[str, list[Binding]] = {}
        self.globals: set[str] = set()
        self.nonlocals: set[str] = set()

    def module(self) -> "Scope":
        s = self
        while s.parent is not None:
            s = s.parent
        return s

    def chain(self) -> Iterator["Scope"]:
        """The scopes a name used here resolves in, innermost first (Python's rule:
        class bodies are not visible from the functions nested in them)."""
        yield self
        s = self.parent
        while s is not None:
            if s.kind != "class":
                yield s
            s = s.parent


# Where torch defines a name and where scripts import it from: one spelling for each.
_CANONICAL = (("torch.distributed.distributed_c10d.", "torch.distributed."),
              ("torch.utils.data.distributed.", "torch.utils.data."),
              ("torch.utils.data.sampler.", "torch.utils.data."),
              ("torch.nn.parallel.distributed.", "torch.nn.parallel."))


class Names:
    """One parsed file: every node's scope and parent, its imports, and its bindings."""

    def __init__(self, tree: ast.Module) -> None:
        self.tree = tree
        self.imports: dict[str, str] = {}
        self.scope_of: dict[int, Scope] = {}
        self.parent: dict[int, ast.AST] = {}
        self.nodes: list[ast.AST] = []          # every node, once (ast.walk order)
        self.in_source_order: list[ast.AST] = []    # every node, once, as the file reads
        for node in ast.walk(tree):
            self.nodes.append(node)
            for child in ast.iter_child_nodes(node):
                self.parent[id(child)] = node
        self._collect_imports()
        self.module_scope = Scope("module", None)
        self._visit(tree, self.module_scope)

    def scope_at(self, node: ast.AST) -> Scope:
        """The scope `node` is evaluated in."""
        return self.scope_of.get(id(node), self.module_scope)

    def lookup(self, name: str, scope: Scope) -> list[Binding]:
        for s in scope.chain():
            if name in s.bindings:
                return s.bindings[name]
        return []

    def qual(self, node: ast.AST) -> str | None:
        """The dotted name an expression refers to, import aliases resolved:
        ``dist.get_rank`` with ``import torch.distributed as dist`` is
        "torch.distributed.get_rank"."""
        if isinstance(node, ast.Name):
            bindings = self.lookup(node.id, self.scope_at(node))
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
        for long, canonical in _CANONICAL:
            if q.startswith(long):
                q = canonical + q[len(long):]
        return q

    def call_qual(self, call: ast.Call) -> str | None:
        return self.qual(call.func)

    # -- building -------------------------------------------------------------

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

    def _bind(self, scope: Scope, name: str, value: ast.expr | None, line: int,
              is_import: bool = False, function: ast.AST | None = None) -> None:
        base = name.split(".")[0]
        where = scope
        if base in scope.globals:
            where = scope.module()
        elif base in scope.nonlocals:
            s = scope.parent
            while s is not None and s.kind in ("class", "comprehension"):
                s = s.parent
            where = s or scope.module()
        where.bindings.setdefault(name, []).append(Binding(value, scope, line, is_import, function))

    def _bind_target(self, target: ast.AST, value: ast.expr | None, scope: Scope, line: int,
                     handled: set[int]) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            # `a, b = x, y` binds each to its own; any other value: each unknown.
            values = value.elts if isinstance(value, (ast.Tuple, ast.List)) \
                and len(value.elts) == len(target.elts) \
                and not any(isinstance(e, ast.Starred) for e in value.elts + target.elts) else None
            for i, elt in enumerate(target.elts):
                self._bind_target(elt, values[i] if values is not None else None, scope, line, handled)
            return
        if isinstance(target, ast.Starred):
            self._bind_target(target.value, None, scope, line, handled)
            return
        name = key(target)
        if name is not None:
            self._bind(scope, name, value, line)
            handled.add(id(target))

    def _visit(self, root: ast.AST, root_scope: Scope) -> None:
        """Record every node's scope and every binding, with the value we can follow.
        (Iterative, in source order: a long `a + b + ...` must not hit the recursion limit.)"""
        handled: set[int] = set()       # Store nodes already bound with their value
        stack: list[tuple[ast.AST, Scope]] = [(root, root_scope)]

        def push(children: Sequence[ast.AST], where: Scope) -> None:
            stack.extend((c, where) for c in reversed(children))

        while stack:
            node, scope = stack.pop()
            self.scope_of[id(node)] = scope
            self.in_source_order.append(node)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                named = None if isinstance(node, ast.Lambda) else node
                if named is not None:
                    self._bind(scope, named.name, None, node.lineno, function=node)
                inner = Scope("function", scope)
                a = node.args
                for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
                    inner.bindings.setdefault(arg.arg, []).append(
                        Binding(None, inner, node.lineno, param_of=named))
                push([node.body] if isinstance(node, ast.Lambda) else node.body, inner)
                # Decorators and defaults are evaluated where the function is defined.
                decorators: list[ast.expr] = getattr(node, "decorator_list", [])
                push(decorators + a.defaults + [d for d in a.kw_defaults if d is not None], scope)
                continue
            if isinstance(node, ast.ClassDef):
                self._bind(scope, node.name, None, node.lineno)
                push(node.body, Scope("class", scope))
                push(node.decorator_list + node.bases + [k.value for k in node.keywords], scope)
                continue
            if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                push(list(ast.iter_child_nodes(node)), Scope("comprehension", scope))
                continue
            self._bind_node(node, scope, handled)
            push(list(ast.iter_child_nodes(node)), scope)

    def _bind_node(self, node: ast.AST, scope: Scope, handled: set[int]) -> None:
        """The bindings one statement or expression makes in `scope` (not its children's)."""
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
            for alias in node.names:
                if alias.name != "*":
                    self._bind(scope, alias.asname or alias.name.split(".")[0], None, node.lineno,
                               is_import=True)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            self._bind(scope, node.name, None, node.lineno)
        elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, (ast.Store, ast.Del)):
            # for-targets, with-targets, augmented assignments, del: not followed.
            name = key(node)
            if name is not None and id(node) not in handled:
                self._bind(scope, name, None, node.lineno)
                handled.add(id(node))
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            self._bind(scope, node.name, None, node.lineno)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            self._bind(scope, node.rest, None, node.lineno)
