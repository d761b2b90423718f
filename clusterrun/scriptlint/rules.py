"""The checks: each CR0xx rule over one script's names and values.

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
- CR007 warning  a rank, size or device taken from Slurm's task variables
                 (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, ...): under torchrun
                 they describe the srun task, the same for every process of a node

(CR000, a file that cannot be read or parsed, is the package's: see __init__.)
"""

from __future__ import annotations

import ast
import builtins
import copy
from functools import cached_property
from typing import NamedTuple

from .findings import ERROR, WARNING, Finding
from .scope import SHOW_LIMIT, Names, Scope, key, short, show
from .values import DIST, GLOBAL, INT, LOCAL, LOCAL_RANK_EXPR, LOCAL_WS, Origin, Values

# The environment torchrun sets: an `if` testing one of these chooses between
# torchrun and a single-process fallback, so a literal rank there is deliberate.
_TORCHRUN_ENV = frozenset({
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
    "MASTER_PORT", "TORCHELASTIC_RUN_ID",
})
_INIT_PG = DIST + "init_process_group"
_INIT_PG_PARAMS = ("backend", "init_method", "timeout", "world_size", "rank", "store",
                   "group_name", "pg_options", "device_id")
_SAMPLER_PARAMS = ("dataset", "num_replicas", "rank", "shuffle", "seed", "drop_last")
# Object collectives move their pickles to torch.cuda.current_device() under NCCL.
_OBJECT_COLLECTIVES = frozenset(DIST + n for n in (
    "all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list"))
_LOCAL_RANK_DEFAULT = "int(os.environ.get('LOCAL_RANK', 0))"
# Calls that choose the current device (CR001 sinks; any of them silences CR005).
_SET_DEVICE = frozenset({"torch.cuda.set_device", "torch.cuda.device",
                         "torch.accelerator.set_device_index", "torch.accelerator.set_device_idx",
                         "torch.accelerator.device_index"})
_SET_DEVICE_NAMES = frozenset({"set_device", "set_device_index", "set_device_idx"})


class Script:
    """One file under check: what its names mean, what its values hold, its findings."""

    def __init__(self, tree: ast.Module, path: str) -> None:
        self.path = path
        self.names = Names(tree)
        self.values = Values(self.names)
        self.findings: list[Finding] = []

    def add(self, node: ast.AST, code: str, severity: str, message: str, fix: str) -> None:
        self.findings.append(Finding(self.path, getattr(node, "lineno", 1),
                                     getattr(node, "col_offset", 0) + 1, code, severity, message, fix))

    def origin(self, node: ast.AST | None, scope: Scope | None = None) -> Origin | None:
        """What `node` holds, in `scope` (default: the scope it is written in)."""
        if scope is None:
            scope = self.names.scope_at(node) if node is not None else self.names.module_scope
        return self.values.origin(node, scope)

    @cached_property
    def defined(self) -> set[str]:
        """The functions and classes this file defines."""
        return {n.name for n in self.names.nodes
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def check(tree: ast.Module, path: str) -> list[Finding]:
    """Every rule over one parsed script; findings sorted by line."""
    s = Script(tree, path)
    reported_strings: set[int] = set()
    device_sinks: list[tuple[ast.Call, list[DeviceUse]]] = []
    argv_devices: list[ast.expr] = []        # devices taken from a --local_rank argument
    # The rules' order matters only for speed: origins are worked out once, when first asked.
    for node in s.names.nodes:
        if isinstance(node, ast.Call):
            uses = device_uses(s, node, reported_strings)
            bad = [u for u in uses if u.origin.kind == GLOBAL]
            if bad:
                device_sinks.append((node, bad))
            if any(u.origin.argv for u in uses):
                argv_devices.append(node)
            check_sampler_ranks(s, node)
            check_sampler_epochs(s, node)
            check_init(s, node)
    # Every global rank used as a device, so that a fix for DDP(m.to(rank),
    # device_ids=[rank]) replaces both, not only its own.
    bad_indexes = {id(u.value) for _, bad in device_sinks for u in bad}
    for call, bad in device_sinks:
        report_device_use(s, call, bad, bad_indexes)
    check_device_strings(s, reported_strings, argv_devices)
    check_object_collectives(s)
    check_launch_argument(s, argv_devices)
    check_slurm_ranks(s)
    return sorted(set(s.findings), key=lambda f: (f.line, f.col, f.code, f.message))


def _via(o: Origin) -> str:
    return f" ({o.source})" if o.via_variable else ""


def _via_int(o: Origin) -> str:
    return f", from {o.source}" if o.via_variable else ""


# CR001 ----------------------------------------------------------------------------------


class DeviceUse(NamedTuple):
    """A value of known origin that a call uses as a device index."""

    value: ast.expr                 # the index expression
    keyword: ast.keyword | None     # the keyword it was passed as; None: positional
    origin: Origin


def device_index(s: Script, node: ast.AST) -> ast.expr | None:
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
        if isinstance(acc, ast.FormattedValue) and is_accelerator(s, acc.value) \
                and isinstance(colon, ast.Constant) and colon.value == ":" \
                and isinstance(fv, ast.FormattedValue) and fv.format_spec is None:
            return fv.value
    if isinstance(node, ast.BinOp) and isinstance(node.left, ast.Constant):
        left = node.left.value
        if isinstance(node.op, ast.Add) and left == "cuda:" and isinstance(node.right, ast.Call) \
                and s.names.call_qual(node.right) == "str" and len(node.right.args) == 1:
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


def is_accelerator(s: Script, node: ast.AST, depth: int = 0) -> bool:
    """``torch.accelerator.current_accelerator()`` or its ``.type``, directly or
    through variables assigned only that."""
    if isinstance(node, ast.Attribute) and node.attr == "type":
        node = node.value
    if isinstance(node, ast.Call):
        return s.names.call_qual(node) == "torch.accelerator.current_accelerator"
    if isinstance(node, ast.Name) and depth < 4:
        bindings = s.names.lookup(node.id, s.names.scope_at(node))
        return bool(bindings) and all(b.value is not None and is_accelerator(s, b.value, depth + 1)
                                      for b in bindings)
    return False


def _device_arguments(s: Script, call: ast.Call) -> list[tuple[ast.expr, ast.keyword | None]]:
    """The expressions `call` passes as a device, each with the keyword it was passed
    as (None: positional)."""
    q = s.names.call_qual(call) or ""
    kw = {k.arg: k for k in call.keywords if k.arg}
    candidates: list[tuple[ast.expr, ast.keyword | None]] = []

    def pos_or_kw(i: int, name: str) -> None:
        if name in kw:
            candidates.append((kw[name].value, kw[name]))
        elif len(call.args) > i and not any(isinstance(a, ast.Starred) for a in call.args[:i + 1]):
            candidates.append((call.args[i], None))

    def each(keyword: ast.keyword) -> None:         # device_ids=[a, b] or device_ids=a
        v = keyword.value
        for e in (v.elts if isinstance(v, (ast.List, ast.Tuple)) else [v]):
            candidates.append((e, keyword))

    method = call.func.attr if isinstance(call.func, ast.Attribute) else None
    if q in _SET_DEVICE:
        pos_or_kw(0, "device")
    elif q == "torch.device":
        typ = kw["type"].value if "type" in kw else (call.args[0] if call.args else None)
        if (isinstance(typ, ast.Constant) and typ.value == "cuda") \
                or (typ is not None and is_accelerator(s, typ)):
            pos_or_kw(1, "index")
        elif len(call.args) == 1 and not call.keywords:
            candidates.append((call.args[0], None))     # torch.device(3) is cuda:3
    elif q.startswith("torch.") and (q.endswith(".DistributedDataParallel")
                                     or q.endswith(".FullyShardedDataParallel")):
        for name in ("device_ids", "output_device", "device_id"):
            if name in kw:
                each(kw[name])
    elif q == DIST + "barrier" and "device_ids" in kw:
        each(kw["device_ids"])
    elif q == _INIT_PG and "device_id" in kw:
        candidates.append((kw["device_id"].value, kw["device_id"]))
    elif method in ("to", "cuda") and not q.startswith("torch.cuda"):
        pos_or_kw(0, "device")
    elif q.startswith("torch.") and "device" in kw:
        candidates.append((kw["device"].value, kw["device"]))
    return candidates


def device_uses(s: Script, call: ast.Call, reported_strings: set[int]) -> list[DeviceUse]:
    """The values of known origin `call` uses as a device index. A device name built
    from one (``f"cuda:{rank}"``) is added to `reported_strings`: it is this call's."""
    scope = s.names.scope_at(call)
    uses: list[DeviceUse] = []
    for expr, keyword in _device_arguments(s, call):
        index = device_index(s, expr)
        if index is not None:
            reported_strings.add(id(expr))
        else:
            index = expr
        o = s.origin(index, scope)
        if o is not None:
            uses.append(DeviceUse(index, keyword, o))
    return uses


def report_device_use(s: Script, call: ast.Call, bad: list[DeviceUse], bad_indexes: set[int]) -> None:
    """CR001 for a call given the global rank as its device (one finding per call,
    even for ``device_ids=[rank], output_device=rank``)."""
    scope = s.names.scope_at(call)
    indexes = [n for n in ast.walk(call) if id(n) in bad_indexes]
    shown, fixed = _show_replaced(s, call, indexes, bad[0].keyword, scope, bad[0].origin)
    s.add(bad[0].keyword or call, "CR001", ERROR,
          f"{shown} uses the global rank{_via(bad[0].origin)} as a CUDA device index; "
          f"on every node but the first it names a GPU past the node's own",
          f"use the local rank: {fixed}")


def check_device_strings(s: Script, reported: set[int], argv_devices: list[ast.expr]) -> None:
    """CR001 for a device name built from the global rank outside a device call
    (``device = f"cuda:{rank}"``); records those built from a --local_rank argument."""
    for node in s.names.nodes:
        if id(node) in reported or not isinstance(node, (ast.JoinedStr, ast.BinOp, ast.Call)):
            continue
        index = device_index(s, node)
        if index is None or _is_printed(s, node):
            continue
        scope = s.names.scope_at(node)
        o = s.origin(index, scope)
        if o is not None and o.argv:
            argv_devices.append(node)
        if o is None or o.kind != GLOBAL:
            continue
        fixed = show(_replaced(node, [index], o.local or s.values.local_rank_name(scope, node.lineno)))
        s.add(node, "CR001", ERROR,
              f"{show(node)} names a CUDA device after the global rank{_via(o)}; "
              f"on every node but the first it names a GPU past the node's own",
              f"use the local rank: {fixed}")


def _is_printed(s: Script, node: ast.AST) -> bool:
    """An argument of print() or a logging call: a message, not a device."""
    p = s.names.parent.get(id(node))
    if isinstance(p, ast.keyword):
        p = s.names.parent.get(id(p))
    if not isinstance(p, ast.Call) or node is p.func:
        return False
    name = p.func.attr if isinstance(p.func, ast.Attribute) else key(p.func)
    return name in ("print", "debug", "info", "warning", "warn", "error", "critical",
                    "exception", "log", "write")


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


def _show_replaced(s: Script, call: ast.Call, indexes: list[ast.AST], keyword: ast.keyword | None,
                   scope: Scope, origin: Origin | None = None) -> tuple[str, str]:
    """The offending call as the message shows it, and the same with the local rank (the
    framework's own, where the global rank was the framework's)."""
    local = origin.local if origin is not None and origin.local else s.values.local_rank_name(scope, call.lineno)
    fixed_call = _replaced(call, indexes, local)
    shown, fixed = show(call), show(fixed_call)
    if len(shown) <= SHOW_LIMIT:
        return shown, fixed
    # Too long to read: keep the callee and the offending argument only.
    func = show(call.func)
    if isinstance(call.func, ast.Attribute) and len(func) > 30:
        func = "(...)." + call.func.attr
    focus = keyword if keyword is not None else next(
        (a for a in call.args if indexes and indexes[0] in list(ast.walk(a))), None)
    if focus is None or not all(i in list(ast.walk(focus)) for i in indexes):
        return shown, fixed
    focus_fixed = _replaced(call, indexes, local, focus=focus)
    more = "..., " if (len(call.args) + len(call.keywords)) > 1 else ""
    return f"{func}({more}{show(focus)})", f"{func}({more}{show(focus_fixed)})"


# CR002, CR003 (DistributedSampler) ------------------------------------------------------


def _sampler_qual(s: Script, call: ast.Call) -> bool:
    q = s.names.call_qual(call) or ""
    return q.startswith("torch.") and q.endswith(".DistributedSampler")


def _sampler_arg(call: ast.Call, i: int, name: str) -> ast.expr | None:
    """DistributedSampler's argument `name` (position `i`), or None."""
    kw = {k.arg: k.value for k in call.keywords if k.arg}
    if name in kw:
        return kw[name]
    if len(call.args) > i and not any(isinstance(a, ast.Starred) for a in call.args[:i + 1]):
        return call.args[i]
    return None


def check_sampler_ranks(s: Script, call: ast.Call) -> None:
    """CR002: a DistributedSampler given the local rank or the local world size."""
    if not _sampler_qual(s, call):
        return
    scope = s.names.scope_at(call)
    fixed = _rebuilt(call, _SAMPLER_PARAMS, 1, {"rank", "num_replicas"})
    shown = show(call)
    rank, replicas = _sampler_arg(call, 2, "rank"), _sampler_arg(call, 1, "num_replicas")
    o = s.origin(rank, scope)
    if rank is not None and o is not None and o.kind == LOCAL:
        s.add(rank, "CR002", ERROR,
              f"{shown} passes the local rank{_via(o)} as the sampler's rank; the "
              f"processes with the same local rank on different nodes read the same shard "
              f"and the other shards are never read",
              f"{fixed} takes the rank and world size from the process group "
              f"(or pass rank=dist.get_rank())")
    o = s.origin(replicas, scope)
    if replicas is not None and o is not None and o.kind == LOCAL_WS:
        s.add(replicas, "CR002", ERROR,
              f"{shown} passes the number of processes on this node{_via(o)} as "
              f"num_replicas; it must be the world size across all nodes: the other "
              f"nodes' ranks are out of range, or every node reads the same samples",
              f"{fixed} takes the rank and world size from the process group "
              f"(or pass num_replicas=dist.get_world_size())")


def check_sampler_epochs(s: Script, call: ast.Call) -> None:
    """CR003: a shuffling DistributedSampler, a loop, and set_epoch() nowhere."""
    if not _sampler_qual(s, call):
        return
    shuffle = _sampler_arg(call, 3, "shuffle")
    if isinstance(shuffle, ast.Constant) and shuffle.value is False:
        return
    if _has_loop(s) and not _mentions_set_epoch(s) and not _handed_off(s, call):
        var = _sampler_var(s, call) or "sampler"
        s.add(call, "CR003", WARNING,
              f"{show(call)} shuffles, but set_epoch() is never called in this file: every "
              f"epoch sees the same order",
              f"call {var}.set_epoch(epoch) at the top of each epoch, before iterating "
              f"the DataLoader")


def _sampler_var(s: Script, call: ast.Call) -> str | None:
    parent = s.names.parent.get(id(call))
    if isinstance(parent, (ast.Assign, ast.AnnAssign)):
        targets = parent.targets if isinstance(parent, ast.Assign) else [parent.target]
        if len(targets) == 1 and key(targets[0]):
            return key(targets[0])
    return None


def _handed_off(s: Script, sampler: ast.Call) -> bool:
    """The sampler (or its variable) is an argument of a call into code this file
    does not show (an imported helper, another object's method): that code may
    well call set_epoch() on it."""
    var = _sampler_var(s, sampler)
    uses = [sampler] + [n for n in s.names.nodes if var and isinstance(n, (ast.Name, ast.Attribute))
                        and isinstance(n.ctx, ast.Load) and key(n) == var]
    for use in uses:
        p = s.names.parent.get(id(use))
        if isinstance(p, ast.keyword):
            p = s.names.parent.get(id(p))
        if isinstance(p, ast.Call) and p.func is not use and _foreign(s, p):
            return True
    return False


def _foreign(s: Script, call: ast.Call) -> bool:
    """A call into code this file does not show: not torch's, not a builtin,
    not a function or class defined here."""
    q = s.names.call_qual(call) or ""
    if q.startswith("torch.") or q in dir(builtins):
        return False
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    return name not in s.defined


def _has_loop(s: Script) -> bool:
    return any(isinstance(n, (ast.For, ast.AsyncFor, ast.While)) for n in s.names.nodes)


def _mentions_set_epoch(s: Script) -> bool:
    for n in s.names.nodes:
        if (isinstance(n, ast.Attribute) and n.attr == "set_epoch") \
                or (isinstance(n, ast.Name) and n.id == "set_epoch") \
                or (isinstance(n, ast.Constant) and n.value == "set_epoch"):
            return True
    return False


def _rebuilt(call: ast.Call, params: tuple[str, ...], keep_positional: int, drop: set[str]) -> str:
    """`call` with the arguments named in `drop` removed; positional arguments
    after the first `keep_positional` become keywords so nothing shifts."""
    new = copy.deepcopy(call)
    args: list[ast.expr] = []
    keywords: list[ast.keyword] = []
    for i, a in enumerate(call.args):
        if isinstance(a, ast.Starred) or i >= len(params):
            return show(new)                    # cannot rename safely: show as is
        if i < keep_positional:
            args.append(a)
        elif params[i] not in drop:
            keywords.append(ast.keyword(arg=params[i], value=a))
    keywords += [k for k in call.keywords if k.arg not in drop]
    new.args, new.keywords = args, keywords
    return show(new)


# CR002, CR004 (init_process_group) ------------------------------------------------------


def _env_guarded(s: Script, node: ast.AST) -> bool:
    """Inside an `if` that tests torchrun's environment (a single-process fallback)."""
    child, p = node, s.names.parent.get(id(node))
    while p is not None:
        if isinstance(p, (ast.If, ast.IfExp)) and child is not p.test:
            for n in ast.walk(p.test):
                if (isinstance(n, ast.Constant) and n.value in _TORCHRUN_ENV) \
                        or (isinstance(n, (ast.Attribute, ast.Name))
                            and s.names.qual(n) in ("os.environ", "os.getenv",
                                                    DIST + "is_torchelastic_launched")):
                    return True
        child, p = p, s.names.parent.get(id(p))
    return False


def check_init(s: Script, call: ast.Call) -> None:
    """CR004: init_process_group given a literal rank or world size; CR002: given the
    local rank or the local world size. Not with a rendezvous of its own."""
    if s.names.call_qual(call) != _INIT_PG:
        return
    scope = s.names.scope_at(call)
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
    shown = show(call)
    fixed = _rebuilt(call, _INIT_PG_PARAMS, 1, {"rank", "world_size"})
    fix = (f"under torchrun, RANK and WORLD_SIZE come from the environment; drop rank= and "
           f"world_size=: {fixed}")
    guarded = _env_guarded(s, call)
    for name, i in (("rank", 4), ("world_size", 3)):
        value = arg(i, name)
        o = s.origin(value, scope)
        if o is None or value is None:
            continue
        if o.kind == INT and o.value != -1 and not guarded:
            what = "rank" if name == "rank" else "world size"
            s.add(value, "CR004", ERROR,
                  f"{shown} hard-codes the {what} ({name}={o.value}{_via_int(o)}); "
                  + (f"every process claims rank {o.value} and the rendezvous fails or "
                     f"hangs" if name == "rank" else
                     f"right only while the job has exactly {o.value} processes: with any "
                     f"other number of nodes or GPUs the rendezvous fails or hangs"),
                  fix)
        elif name == "rank" and o.kind == LOCAL:
            s.add(value, "CR002", ERROR,
                  f"{shown} passes the local rank{_via(o)} as the global rank; the "
                  f"processes with the same local rank on different nodes collide",
                  fix)
        elif name == "world_size" and o.kind == LOCAL_WS:
            s.add(value, "CR002", ERROR,
                  f"{shown} passes the number of processes on this node{_via(o)} as "
                  f"the world size; it must count the processes of all nodes",
                  fix)


# CR005 ----------------------------------------------------------------------------------


def _uses_nccl_unbound(s: Script) -> bool:
    """init_process_group with NCCL for the object collectives, and no device_id=
    binding the process group to a device."""
    nccl = False
    for n in s.names.nodes:
        if isinstance(n, ast.Call) and s.names.call_qual(n) == _INIT_PG:
            backend = next((k.value for k in n.keywords if k.arg == "backend"),
                           n.args[0] if n.args else None)
            # "cpu:gloo,cuda:nccl" runs object collectives on the CPU: not affected.
            if isinstance(backend, ast.Constant) and isinstance(backend.value, str) \
                    and "nccl" in backend.value.lower() and "cpu:" not in backend.value.lower():
                nccl = True
            if any(k.arg == "device_id" for k in n.keywords):
                return False                    # the process group is bound to a device
    return nccl


def _picks_a_device(s: Script) -> bool:
    """Any way the script picks its GPU, even one we cannot follow."""
    for n in s.names.nodes:
        if (isinstance(n, ast.Attribute) and n.attr in _SET_DEVICE_NAMES) \
                or (isinstance(n, ast.Name) and n.id in _SET_DEVICE_NAMES) \
                or (isinstance(n, ast.Call) and s.names.call_qual(n) in _SET_DEVICE) \
                or (isinstance(n, ast.Constant) and n.value == "CUDA_VISIBLE_DEVICES"):
            return True
    return False


def check_object_collectives(s: Script) -> None:
    """CR005: an NCCL object collective in a script that never sets its device."""
    if not _uses_nccl_unbound(s) or _picks_a_device(s):
        return
    for n in s.names.nodes:
        if isinstance(n, ast.Call) and s.names.call_qual(n) in _OBJECT_COLLECTIVES \
                and not any(k.arg == "device" for k in n.keywords):
            s.add(n, "CR005", WARNING,
                  f"{show(n)} runs on torch.cuda.current_device(), which is cuda:0 in "
                  f"every process because torch.cuda.set_device() is never called: with "
                  f"NCCL the processes of a node share GPU 0 and fail or hang",
                  f"call torch.cuda.set_device({LOCAL_RANK_EXPR}) right after "
                  f"init_process_group")


# CR006 ----------------------------------------------------------------------------------


def check_launch_argument(s: Script, devices: list[ast.expr]) -> None:
    """CR006: a --local_rank argument used as the device, with a default that is the
    same in every process, in a file that never reads LOCAL_RANK itself."""
    a = s.values.argparse_local_rank
    if a is None or not devices or any(isinstance(n, ast.Constant) and n.value == "LOCAL_RANK"
                                       for n in s.names.nodes):
        return
    kw = {k.arg: k.value for k in a.keywords if k.arg}
    required, default = kw.get("required"), kw.get("default")
    literal = s.origin(default, s.names.module_scope) if default is not None else None
    if isinstance(required, ast.Constant) and required.value:
        return      # torchrun stops at once with argparse's usage error
    if default is not None and not (isinstance(default, ast.Constant) and default.value is None) \
            and not (literal is not None and literal.kind == INT and not literal.via_variable):
        return      # a default the file computes may differ per process
    use = min(devices, key=lambda n: (n.lineno, n.col_offset))
    value = "None" if literal is None else str(literal.value)
    s.add(a, "CR006", ERROR,
          f"{short(a)} declares torch.distributed.launch's --local_rank, but torchrun "
          f"does not pass it (it sets LOCAL_RANK in the environment): {_argv_of(s, use)} is "
          f"{value} in every process, so {short(use)} (line {use.lineno}) gives every process "
          f"of a node the same device",
          f"read LOCAL_RANK from the environment: {_env_default(a)}")


def _argv_of(s: Script, node: ast.AST) -> str:
    """The --local_rank attribute (``args.local_rank``) a device use reads."""
    for n in ast.walk(node):
        o = s.origin(n) if isinstance(n, (ast.Name, ast.Attribute, ast.Call)) else None
        if o is not None and o.argv:
            return o.argv
    return "args.local_rank"


def _env_default(a: ast.Call) -> str:
    """The add_argument call with ``default=`` reading LOCAL_RANK."""
    default = ast.parse(_LOCAL_RANK_DEFAULT, mode="eval").body
    new = copy.deepcopy(a)
    new.keywords = [k for k in new.keywords if k.arg != "default"] \
        + [ast.keyword(arg="default", value=default)]
    if len(show(a)) <= SHOW_LIMIT:
        return show(new)
    flags = ", ".join(show(x) for x in a.args)
    return f"{show(a.func)}({flags}, ..., default={_LOCAL_RANK_DEFAULT})"


# CR007 ----------------------------------------------------------------------------------

# What each Slurm variable is in a process that torchrun started (clusterrun starts
# every node's torchrun as a one-task srun step of its own: transports/srun.py).
_SLURM_IS = {
    "SLURM_PROCID": "numbers srun's tasks, not torchrun's processes: every process "
                    "torchrun starts on a node reads the same value (0 on every node when "
                    "clusterrun runs on Slurm, unset over SSH)",
    "SLURM_NODEID": "is the node's index in its srun step, the same in every process of a "
                    "node (0 on every node when clusterrun runs on Slurm: each node is a "
                    "step of its own)",
    "SLURM_LOCALID": "numbers srun's tasks on a node, not torchrun's processes: every "
                     "process torchrun starts on a node reads the same value (0)",
    "SLURM_NTASKS": "counts srun's tasks, not torchrun's processes (1 when clusterrun "
                    "runs on Slurm)",
    "SLURM_NNODES": "counts the nodes of the srun step, not torchrun's processes (1 when "
                    "clusterrun runs on Slurm)",
    "SLURM_JOB_NUM_NODES": "counts the allocation's nodes, not torchrun's processes",
    "SLURM_NTASKS_PER_NODE": "counts srun's tasks per node, not torchrun's processes",
}
_SLURM_IS["SLURM_NPROCS"] = _SLURM_IS["SLURM_STEP_NUM_TASKS"] = _SLURM_IS["SLURM_NTASKS"]
_SLURM_IS["SLURM_STEP_NUM_NODES"] = _SLURM_IS["SLURM_NNODES"]

# The roles a value can be used in, and what torchrun sets for each.
_GLOBAL_RANK, _WORLD_SIZE, _LOCAL_RANK = "global rank", "world size", "local rank"
_NODE_RANK, _LOCAL_WS, _DEVICE = "node rank", "local world size", "CUDA device index"
_ROLE_FIX = {
    _GLOBAL_RANK: "use the global rank torchrun sets: int(os.environ['RANK']), or "
                  "dist.get_rank() once the process group is up",
    _WORLD_SIZE: "use the world size torchrun sets: int(os.environ['WORLD_SIZE']), or "
                 "dist.get_world_size() once the process group is up",
    _LOCAL_RANK: "use the local rank torchrun sets: int(os.environ['LOCAL_RANK'])",
    _DEVICE: "use the local rank torchrun sets: int(os.environ['LOCAL_RANK'])",
    _NODE_RANK: "use the node rank torchrun sets: int(os.environ['GROUP_RANK']) (or the "
                "global rank itself: int(os.environ['RANK']))",
    _LOCAL_WS: "use the number of processes torchrun starts per node: "
               "int(os.environ['LOCAL_WORLD_SIZE'])",
}
# A variable, attribute or keyword with one of these names holds that role.
_NAME_ROLES = {
    "rank": _GLOBAL_RANK, "global_rank": _GLOBAL_RANK, "world_rank": _GLOBAL_RANK,
    "world_size": _WORLD_SIZE, "local_rank": _LOCAL_RANK, "node_rank": _NODE_RANK,
    "group_rank": _NODE_RANK, "machine_rank": _NODE_RANK, "local_world_size": _LOCAL_WS,
}
# An environment variable a script sets for torch.distributed to read.
_ENV_ROLES = {"RANK": _GLOBAL_RANK, "WORLD_SIZE": _WORLD_SIZE, "LOCAL_RANK": _LOCAL_RANK,
              "GROUP_RANK": _NODE_RANK, "NODE_RANK": _NODE_RANK, "LOCAL_WORLD_SIZE": _LOCAL_WS}


class RankUse(NamedTuple):
    """A value a script uses as a rank or a size: where, and as what."""

    value: ast.expr
    role: str
    where: ast.stmt | ast.expr      # the call or assignment the message names


def _role_of_name(name: str | None) -> str | None:
    return _NAME_ROLES.get(name.rsplit(".", 1)[-1].lstrip("_").lower()) if name else None


def _unstr(node: ast.expr, s: Script) -> ast.expr:
    """``str(X)`` -> X: what a script writes into os.environ."""
    if isinstance(node, ast.Call) and s.names.call_qual(node) == "str" \
            and len(node.args) == 1 and not node.keywords:
        return node.args[0]
    return node


def rank_uses(s: Script) -> list[RankUse]:
    """Every place the script uses a value as a rank, a size or a device index."""
    uses: list[RankUse] = []
    for node in s.names.nodes:
        if isinstance(node, ast.Call):
            uses += _call_rank_uses(s, node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                role = _role_of_name(key(t))
                if role is None and isinstance(t, ast.Subscript) and s.values.is_environ(t.value) \
                        and isinstance(t.slice, ast.Constant):
                    role = _ENV_ROLES.get(str(t.slice.value))
                if role is not None:
                    uses.append(RankUse(_unstr(node.value, s), role, node))
        elif isinstance(node, (ast.JoinedStr, ast.BinOp)) and not _is_printed(s, node):
            index = device_index(s, node)           # device = f"cuda:{X}"
            if index is not None:
                uses.append(RankUse(index, _DEVICE, node))
    return uses


def _call_rank_uses(s: Script, call: ast.Call) -> list[RankUse]:
    uses: list[RankUse] = []
    q = s.names.call_qual(call)
    if q == _INIT_PG or _sampler_qual(s, call):
        params = _INIT_PG_PARAMS if q == _INIT_PG else _SAMPLER_PARAMS
        for name, role in (("rank", _GLOBAL_RANK), ("world_size", _WORLD_SIZE),
                           ("num_replicas", _WORLD_SIZE)):
            value = _sampler_arg(call, params.index(name), name) if name in params else None
            if value is not None:
                uses.append(RankUse(value, role, call))
    elif not _is_printed_call(call):
        uses += [RankUse(k.value, named, call) for k in call.keywords
                 if (named := _role_of_name(k.arg)) is not None]
    for expr, _ in _device_arguments(s, call):
        uses.append(RankUse(device_index(s, expr) or expr, _DEVICE, call))
    return uses


def _is_printed_call(call: ast.Call) -> bool:
    name = call.func.attr if isinstance(call.func, ast.Attribute) else key(call.func)
    return name in ("print", "debug", "info", "warning", "warn", "error", "critical",
                    "exception", "log", "write", "format")


def check_slurm_ranks(s: Script) -> None:
    """CR007: a rank, size or device taken from Slurm's task variables, which under
    torchrun describe the srun task, not the process. One finding per read."""
    first: dict[int, tuple[RankUse, Origin]] = {}
    for use in sorted(rank_uses(s), key=lambda u: (u.where.lineno, u.where.col_offset)):
        o = s.origin(use.value, s.names.scope_at(use.where))
        if o is None or o.read is None or id(o.read) in first:
            continue
        if _slurm_fallback(s, o.read) or _slurm_fallback(s, use.where):
            continue
        first[id(o.read)] = (use, o)
    for use, o in first.values():
        read, var = o.read, o.kind
        assert read is not None
        where = use.where
        shown = f"{show(where.targets[0])} = {show(where.value)}" \
            if isinstance(where, ast.Assign) and len(where.targets) == 1 else \
            f"{show(where.target)} = {show(where.value)}" \
            if isinstance(where, ast.AnnAssign) and where.value is not None else short(where)
        if len(shown) > SHOW_LIMIT and isinstance(where, (ast.Assign, ast.AnnAssign)):
            shown = f"{shown[:SHOW_LIMIT]}..."
        as_what = "a CUDA device index" if use.role == _DEVICE else f"the {use.role}"
        line = f" (line {where.lineno})" if where.lineno != getattr(read, "lineno", 0) else ""
        s.add(read, "CR007", WARNING,
              f"{show(read)} takes Slurm's {var} as {as_what} in {shown}{line}; under "
              f"torchrun {var} {_SLURM_IS[var]}",
              _ROLE_FIX[use.role])


def _mentions_torchrun(s: Script, test: ast.AST) -> bool:
    for n in ast.walk(test):
        if (isinstance(n, ast.Constant) and n.value in _TORCHRUN_ENV) \
                or (isinstance(n, (ast.Attribute, ast.Name))
                    and s.names.qual(n) == DIST + "is_torchelastic_launched"):
            return True
    return False


def _chooses_slurm(test: ast.AST) -> bool:
    """``launcher == "slurm"``: a branch the user picks for a Slurm launcher."""
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str)
               and n.value.lower() == "slurm" for n in ast.walk(test))


def _slurm_fallback(s: Script, node: ast.AST) -> bool:
    """Code that runs only without torchrun, or that is written for a Slurm launcher
    on purpose: inside an `if` on torchrun's environment (or on "slurm"), after an
    `if` on torchrun's environment that returns, in the `except` of a `try` reading
    it, or in a function or class whose name says slurm."""
    child, p = node, s.names.parent.get(id(node))
    while p is not None:
        if isinstance(p, (ast.If, ast.IfExp)) and child is not p.test \
                and (_mentions_torchrun(s, p.test) or _chooses_slurm(p.test)):
            return True
        if isinstance(p, ast.ExceptHandler):
            t = s.names.parent.get(id(p))
            if isinstance(t, ast.Try) and any(_mentions_torchrun(s, b) for b in t.body):
                return True
        if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and "slurm" in p.name.lower():
            return True
        for field in ("body", "orelse", "finalbody"):
            block = getattr(p, field, None)
            if isinstance(block, list) and child in block:
                for before in block[:block.index(child)]:
                    if isinstance(before, ast.If) and _mentions_torchrun(s, before.test) \
                            and before.body and isinstance(before.body[-1], (ast.Return, ast.Raise)):
                        return True
        child, p = p, s.names.parent.get(id(p))
    return False
