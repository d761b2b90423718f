"""What a value in a script is known to hold: the global rank, the local rank, the
local world size, an int literal, or one of Slurm's task variables (SLURM_PROCID, ...),
and where that was seen (for the message).

Precision comes first: a value counts only when its origin is visible in the file
(``dist.get_rank()``, ``os.environ["RANK"]``, a variable assigned only from those in
the same or an enclosing scope, a parameter of a function every call of which passes
such a value). A variable merely *named* ``rank`` is unknown.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from .scope import Binding, Names, Scope, key, short, show

# What a value is known to be (the `kind` of an Origin).
GLOBAL = "global rank"
LOCAL = "local rank"
LOCAL_WS = "local world size"
INT = "int literal"

_ENV_KINDS = {"RANK": GLOBAL, "LOCAL_RANK": LOCAL, "LOCAL_WORLD_SIZE": LOCAL_WS}
# Slurm's numbers of an srun task (CR007): each read is a kind of its own, the
# variable's name, and remembers where it was read (CR007 reports it there).
SLURM_TASK_VARS = frozenset({
    "SLURM_PROCID", "SLURM_NODEID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NPROCS",
    "SLURM_STEP_NUM_TASKS", "SLURM_NNODES", "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES",
    "SLURM_NTASKS_PER_NODE",
})
DIST = "torch.distributed."
LOCAL_RANK_EXPR = "int(os.environ['LOCAL_RANK'])"

# The frameworks' own ranks: attributes of their objects, known by what the object is.
# (package roots, class names) -> what an instance of one is, for _framework_kind.
_FRAMEWORK_CLASSES = (
    (("lightning", "pytorch_lightning"), ("LightningModule",), "lightning module"),
    (("lightning", "pytorch_lightning"), ("Trainer",), "lightning"),
    (("lightning", "pytorch_lightning"), ("Callback",), "lightning callback"),
    (("transformers",), ("TrainingArguments", "Seq2SeqTrainingArguments"), "transformers"),
    (("transformers",), ("Trainer", "Seq2SeqTrainer"), "transformers trainer"),
    (("accelerate",), ("Accelerator", "PartialState", "AcceleratorState"), "accelerate"),
)
# What each framework object's attributes hold, and the local rank to suggest instead.
_FRAMEWORK_RANKS = {
    "lightning": ({"global_rank": GLOBAL, "local_rank": LOCAL}, "local_rank"),
    "lightning module": ({"global_rank": GLOBAL, "local_rank": LOCAL}, "local_rank"),
    "transformers": ({"process_index": GLOBAL, "local_process_index": LOCAL}, "local_process_index"),
    "accelerate": ({"process_index": GLOBAL, "local_process_index": LOCAL}, "local_process_index"),
}
# An attribute of a framework object that is another one: a LightningModule's trainer,
# a Hugging Face Trainer's args.
_FRAMEWORK_MEMBERS = {("lightning module", "trainer"): "lightning", ("transformers trainer", "args"): "transformers"}


@dataclass(frozen=True)
class Origin:
    """Why a value is known to be a global rank, a local rank, ...: for the message."""

    kind: str
    source: str          # the variable's assignment or the expression itself
    line: int
    via_variable: bool   # True: reached through a variable (name the assignment)
    value: int | None = None   # for INT
    argv: str | None = None    # read from a --local_rank argument: "args.local_rank"
    read: ast.AST | None = None    # a Slurm variable's read (SLURM_TASK_VARS kinds)
    local: str | None = None       # a framework's own local rank, to suggest: "self.local_rank"


def launch_local_rank(names: Names) -> ast.Call | None:
    """The first ``add_argument("--local_rank")``: torch.distributed.launch fills that
    argument with the local rank (torchrun does not)."""
    for node in names.in_source_order:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "add_argument":
            flags = [a.value for a in node.args if isinstance(a, ast.Constant)]
            dest = next((k.value for k in node.keywords if k.arg == "dest"), None)
            if any(f in ("--local_rank", "--local-rank") for f in flags) and (
                    dest is None or (isinstance(dest, ast.Constant) and dest.value == "local_rank")):
                return node
    return None


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


class Values:
    """The origins of one script's values, each worked out once."""

    def __init__(self, names: Names) -> None:
        self.names = names
        self.argparse_local_rank = launch_local_rank(names)
        self._memo: dict[tuple[int, int], Origin | None] = {}
        self._busy: set[tuple[int, int]] = set()
        self._calls: dict[int, list[ast.Call]] = {}
        self._busy_params: set[int] = set()

    def env_name(self, node: ast.AST) -> str | None:
        """``os.environ["X"]``, ``os.environ.get("X", d)``, ``os.getenv("X")`` -> "X"
        (also from a copy of the environment, see is_environ)."""
        if isinstance(node, ast.Subscript) and self.is_environ(node.value):
            s = node.slice
            if isinstance(s, ast.Constant) and isinstance(s.value, str):
                return s.value
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) \
                and (self.names.call_qual(node) == "os.getenv"
                     or (isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                         and self.is_environ(node.func.value))):
            return node.args[0].value
        return None

    def is_environ(self, node: ast.AST, depth: int = 0) -> bool:
        """``os.environ``, or a variable assigned only a copy of it:
        ``{k: os.environ[k] for k in (...)}``, ``dict(os.environ)``, ``os.environ.copy()``."""
        qual = self.names.qual
        if qual(node) == "os.environ":
            return True
        if isinstance(node, ast.DictComp) and len(node.generators) == 1:
            target, value = node.generators[0].target, node.value
            return isinstance(target, ast.Name) and isinstance(value, ast.Subscript) \
                and qual(value.value) == "os.environ" \
                and all(isinstance(n, ast.Name) and n.id == target.id for n in (node.key, value.slice))
        if isinstance(node, ast.Call) and not node.keywords:
            q = self.names.call_qual(node)
            return (q == "os.environ.copy" and not node.args) or (
                q == "dict" and len(node.args) == 1 and qual(node.args[0]) == "os.environ")
        if isinstance(node, ast.Name) and depth < 4:
            bindings = self.names.lookup(node.id, self.names.scope_at(node))
            return bool(bindings) and all(b.value is not None and self.is_environ(b.value, depth + 1)
                                          for b in bindings)
        return False

    def origin(self, node: ast.AST | None, scope: Scope) -> Origin | None:
        """What `node` is known to hold (global rank, local rank, ...), or None."""
        if node is None:
            return None
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Origin(INT, show(node), line, False, node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
                and isinstance(node.operand, ast.Constant) and type(node.operand.value) is int:
            return Origin(INT, show(node), line, False, -node.operand.value)
        env = self.env_name(node)
        if env in _ENV_KINDS:
            return Origin(_ENV_KINDS[env], show(node), line, False)
        if env in SLURM_TASK_VARS:
            return Origin(env, show(node), line, False, read=node)
        if isinstance(node, ast.Call):
            return self._call_origin(node, scope, line)
        name = key(node)
        if name is None:
            return None
        memo = (id(node), id(scope))
        if memo in self._memo:
            return self._memo[memo]
        if memo in self._busy:
            return None
        self._busy.add(memo)
        try:
            result = self.variable_origin(name, node, scope)
        finally:
            self._busy.discard(memo)
        self._memo[memo] = result
        return result

    def _call_origin(self, node: ast.Call, scope: Scope, line: int) -> Origin | None:
        q = self.names.call_qual(node)
        if q == DIST + "get_rank" and not node.args and not node.keywords:
            return Origin(GLOBAL, show(node), line, False)      # the default group
        if q == DIST + "get_node_local_rank":
            return Origin(LOCAL, show(node), line, False)
        if q == "torch.cuda.device_count" and not node.args:
            return Origin(LOCAL_WS, show(node), line, False)
        if q == "int" and len(node.args) == 1 and not node.keywords \
                and not self.names.lookup("int", self.names.scope_of.get(id(node), scope)):
            inner = self.origin(node.args[0], scope)
            if inner is not None and inner.kind != INT:
                return inner if inner.via_variable \
                    else Origin(inner.kind, show(node), line, False, read=inner.read)
        return None

    def variable_origin(self, name: str, node: ast.AST | None, scope: Scope) -> Origin | None:
        """What the variable `name` holds in `scope`: the one kind all its bindings agree on."""
        bindings = self.names.lookup(name, scope)
        if not bindings:
            if isinstance(node, ast.Attribute) and node.attr == "local_rank" \
                    and self.argparse_local_rank is not None:
                a = self.argparse_local_rank
                return Origin(LOCAL, f"{show(a)}, line {a.lineno}", a.lineno, True, argv=show(node))
            if isinstance(node, ast.Attribute):
                return self._framework_rank(node, scope)
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
                o = self._param_origin(b, name) if b.param_of is not None else None
            if o is None:
                return None                     # one assignment we cannot follow: unknown
            kinds.append(o)
        if len({o.kind for o in kinds}) != 1 or len({o.value for o in kinds}) != 1:
            return None
        first = bindings[0]
        source = kinds[0].source if first.value is None else \
            f"{name} = {show(first.value)}, line {first.line}"
        argv = kinds[0].argv if all(o.argv for o in kinds) else None
        return Origin(kinds[0].kind, source, first.line, True, kinds[0].value, argv, kinds[0].read)

    def _framework_rank(self, node: ast.Attribute, scope: Scope) -> Origin | None:
        """A framework's rank: ``self.global_rank`` in a LightningModule,
        ``self.trainer.global_rank``, ``trainer.local_rank`` of a Lightning Trainer,
        ``args.process_index`` of TrainingArguments, ``accelerator.local_process_index``."""
        kind = self._framework_kind(node.value, scope, 0)
        if kind not in _FRAMEWORK_RANKS:
            return None
        attrs, local = _FRAMEWORK_RANKS[kind]
        if node.attr not in attrs:
            return None
        return Origin(attrs[node.attr], show(node), getattr(node, "lineno", 0), False,
                      local=f"{show(node.value)}.{local}")

    def _framework_kind(self, node: ast.AST, scope: Scope, depth: int) -> str | None:
        """What framework object `node` is (a _FRAMEWORK_CLASSES kind), or None: an
        instance made here (``Trainer(...)``), a method's first parameter in a subclass
        (``self``), a Lightning callback hook's ``trainer``, or a member of one of those."""
        if depth > 4:
            return None
        if isinstance(node, ast.Attribute):
            return _FRAMEWORK_MEMBERS.get((self._framework_kind(node.value, scope, depth + 1) or "", node.attr))
        if not isinstance(node, ast.Name):
            return None
        bindings = self.names.lookup(node.id, self.names.scope_at(node))
        kinds = {self._binding_kind(b, node.id, depth) for b in bindings}
        return kinds.pop() if len(kinds) == 1 else None

    def _binding_kind(self, b: Binding, name: str, depth: int) -> str | None:
        if b.value is not None:
            if isinstance(b.value, ast.Call):
                return self._class_kind(b.value.func)
            return self._framework_kind(b.value, b.scope, depth + 1)
        func = b.param_of
        cls = self.names.parent.get(id(func)) if func is not None else None
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) or not isinstance(cls, ast.ClassDef):
            return None
        if any(self.names.qual(d) in ("staticmethod", "classmethod") for d in func.decorator_list):
            return None
        bases = {self._class_kind(base) for base in cls.bases}
        params = [a.arg for a in func.args.posonlyargs + func.args.args]
        if params and params[0] == name:
            return next((k for k in bases if k in ("lightning module", "transformers trainer")), None)
        if name == "trainer" and "lightning callback" in bases:
            return "lightning"                  # Callback hooks: on_fit_start(self, trainer, pl_module)
        return None

    def _class_kind(self, node: ast.AST) -> str | None:
        q = self.names.qual(node) or ""
        root, last = q.partition(".")[0], q.rpartition(".")[2]
        for roots, classes, kind in _FRAMEWORK_CLASSES:
            if "." in q and root in roots and last in classes:
                return kind
        return None

    def _param_origin(self, b: Binding, name: str) -> Origin | None:
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
        origins: list[Origin] = []
        self._busy_params.add(id(func))         # a recursive call: unknown, not a loop
        try:
            for call in calls:
                value = _argument(call, positional, name)
                o = self.origin(value, self.names.scope_at(value)) if value is not None else None
                if o is None:
                    return None
                origins.append(o)
        finally:
            self._busy_params.discard(id(func))
        if not origins or len({(o.kind, o.value) for o in origins}) != 1:
            return None
        o, call = origins[0], calls[0]
        source = f"{name} from {short(call)}, line {call.lineno}" \
            + (f"; {o.source}" if o.via_variable else "")
        argv = o.argv if all(x.argv for x in origins) else None
        return Origin(o.kind, source, call.lineno, True, o.value, argv, o.read)

    def _calls_of(self, func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.Call]:
        """Every call of `func` in this file; none when its name is used any other
        way (handed to mp.spawn, stored, ...) or is bound to anything else too."""
        names = self.names
        if id(func) not in self._calls:
            bindings = names.lookup(func.name, names.scope_at(func))
            calls: list[ast.Call] = []
            if len(bindings) == 1 and bindings[0].function is func:
                for n in names.nodes:
                    if not (isinstance(n, ast.Name) and n.id == func.name
                            and names.lookup(n.id, names.scope_at(n)) is bindings):
                        continue
                    call = names.parent.get(id(n))
                    if not (isinstance(call, ast.Call) and call.func is n):
                        calls = []
                        break
                    calls.append(call)
            self._calls[id(func)] = calls
        return self._calls[id(func)]

    def local_rank_name(self, scope: Scope, before: int) -> str:
        """A variable already holding the local rank, to suggest; else the env read."""
        for s in scope.chain():
            for name, bs in s.bindings.items():
                if "." in name or bs[0].line >= before:
                    continue
                o = self.variable_origin(name, None, s)
                if o is not None and o.kind == LOCAL:
                    return name
        return LOCAL_RANK_EXPR
