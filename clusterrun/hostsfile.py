"""The hosts file: parsed and validated once into typed dataclasses.

Nothing downstream touches the raw YAML. Every error names the file, the entry
and the field (``hosts.yaml: hosts[2].nproc_per_node: must be a positive
integer, got 'four'``) and exits 2.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import HostsFileError
from .gpus import GPU, VISIBLE_VAR, describe, parse_devices

# How long `up` waits for every node to log in, run its `setup:` and answer the
# preflight before it gives up (start_timeout:, --start-timeout): generous, since a
# first `setup:` may install packages.
START_TIMEOUT = 600.0

LOCALHOST = "localhost"

# Keys valid at the top level (as defaults) and per host.
_SHARED_KEYS = (
    "nproc_per_node", "user", "port", "identity_file", "python", "workdir", "setup", "env", "transport",
    "gpus",
)
TOP_KEYS = frozenset(_SHARED_KEYS + ("master_port", "master_addr", "connect_timeout", "hang_timeout", "start_timeout",
                                     "on_hang", "max_restarts", "restart_delay", "spares", "hosts",
                                     "slurm"))
SLURM_KEYS = frozenset(("nodes", "partition", "time", "gpus_per_node", "account", "sbatch_args"))
SLURM = "slurm"     # HOSTS `slurm` (no file of that name): the allocation the command runs in
ON_HANG = ("report", "kill")
HOST_KEYS = frozenset(_SHARED_KEYS + ("host", "name", "addr"))

# What an ssh target may contain: user@, a DNS name or IPv4/IPv6 literal.
# Anything else (spaces, quotes, ;, $, backticks) is rejected here, so no host
# string can ever be mistaken for shell syntax further down.
# (All of these are used with fullmatch: `$` alone would accept a trailing newline.)
# A leading "-" is refused so that no host can read as an ssh option.
_HOST_RE = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.+-]*@)?[A-Za-z0-9_:][A-Za-z0-9_:.%-]*", re.ASCII)
_NAME_RE = re.compile(r"[A-Za-z0-9_.:@+-]+", re.ASCII)
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_RANGE_RE = re.compile(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)")
_SMALL_INT_RE = re.compile(r"[0-9]{1,6}", re.ASCII)

DEFAULT_CONNECT_TIMEOUT = 10.0
TRANSPORTS = ("paramiko", "openssh")
TRANSPORT_ENV = "CLUSTERRUN_TRANSPORT"      # the default transport where the hosts file names none


@dataclass(frozen=True)
class Host:
    """One node of the cluster, with the file's defaults already applied."""

    host: str                       # ssh target as written (alias, name or address)
    name: str                       # what tags show: `name`, else `host` as written
    nproc_per_node: int | str       # a count, or "gpu": one per GPU the node has (known at start)
    addr: str | None = None         # address other nodes reach this one at
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    python: str | None = None       # None: the controller's own interpreter path
    workdir: str | None = None
    setup: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    transport: str = "paramiko"     # paramiko | openssh (every session through the system ssh)
    gpus: tuple[int, ...] | None = None     # CUDA_VISIBLE_DEVICES on the node (`gpus:`)
    slurm_job: str | None = None    # transport srun: the Slurm job whose steps run this node's sessions

    @property
    def is_local(self) -> bool:
        """Hosts named localhost run without SSH."""
        return self.host == LOCALHOST


@dataclass(frozen=True)
class HostsFile:
    """The whole file: hosts in node_rank order plus cluster-wide settings."""

    path: str
    hosts: tuple[Host, ...]
    master_port: int | str = 29500   # an int, or "auto"
    master_addr: str | None = None
    connect_timeout: float | None = None   # None: the ssh config's ConnectTimeout, else the default
    hang_timeout: float | None = None      # seconds without a line from any rank: a hang
    on_hang: str = "report"                # report (take the stacks, go on waiting) or kill
    max_restarts: int = 0                  # whole-job restarts after a failure
    restart_delay: float = 5.0             # seconds between a failed attempt and the next
    spares: tuple[Host, ...] = ()          # take the place of a node that is lost or unreachable
    slurm: "SlurmSpec | None" = None       # `slurm:` instead of `hosts:`: the nodes come from Slurm
    start_timeout: float = START_TIMEOUT   # seconds every node gets to log in, run `setup:` and be checked


@dataclass(frozen=True)
class SlurmSpec:
    """A hosts file's `slurm:` section. Inside an allocation the nodes are the
    allocation's (clusterrun/slurm.py); outside one, nodes, partition, time,
    gpus_per_node, account and sbatch_args say what `up` submits (sbatch.py)."""

    template: Host                      # the file's defaults, applied to every node
    nodes: int | None = None            # nodes of the run; the allocation's others are spares
    partition: str | None = None
    time: str | None = None
    gpus_per_node: int | None = None
    sbatch_args: tuple[str, ...] = ()
    account: str | None = None


def load_hosts(path: str | Path) -> HostsFile:
    """Read and validate a hosts file; `slurm` (no such file) or a file's `slurm:`
    section: the nodes of the Slurm allocation the command runs in."""
    hosts = read_hosts(path)
    if hosts.slurm is not None:
        return allocation_hosts(hosts)
    return hosts


def read_hosts(path: str | Path) -> HostsFile:
    """The hosts file as written: for `slurm` (no such file) or a `slurm:` section, its
    SlurmSpec and no hosts yet (load_hosts takes them from the allocation)."""
    p = str(path)
    if p == SLURM and not os.path.exists(p):
        return parse_hosts({"slurm": {}}, "HOSTS slurm")
    try:
        raw = Path(p).read_bytes()
    except FileNotFoundError:
        raise HostsFileError(p, "", "no such file") from None
    except IsADirectoryError:
        raise HostsFileError(p, "", "is a directory, expected a YAML hosts file") from None
    except OSError as e:
        raise HostsFileError(p, "", f"cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HostsFileError(p, "", "is not UTF-8 text (is it a binary file?)") from None
    if "\x00" in text:
        raise HostsFileError(p, "", "is not a text file (contains NUL bytes)")
    import yaml     # here, not at the top: commands that read no hosts file skip its import

    try:
        data = yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except (ValueError, RecursionError, OverflowError) as e:
        # PyYAML's safe constructors raise these for things like `2001-02-30` or deep nesting.
        raise HostsFileError(p, "", f"not valid YAML: {str(e)[:200] or type(e).__name__}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise HostsFileError(p, where, f"not valid YAML: {problem}") from None
    return parse_hosts(data, p)


@functools.cache
def _strict_loader() -> type:
    """A SafeLoader that refuses a key given twice (the second would silently win)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # type: ignore[override]
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, str) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key `{key}` is given twice", key_node.start_mark)
                seen.add(key) if isinstance(key, str) else None
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def parse_hosts(data: Any, path: str = "<hosts>") -> HostsFile:
    """Validate already-loaded YAML data (a mapping, or a bare list of hosts)."""
    if data is None:
        raise HostsFileError(path, "", "is empty; it needs a `hosts:` list")
    if isinstance(data, list):
        data = {"hosts": data}
    if not isinstance(data, dict):
        raise HostsFileError(path, "", f"must be a mapping with a `hosts:` list, got {_kind(data)}")
    _check_keys(data, TOP_KEYS, path, "")
    if "slurm" in data:
        return _parse_slurm(data, path)
    if "hosts" not in data:
        raise HostsFileError(path, "hosts", "missing: list the machines under `hosts:`")
    entries = data["hosts"]
    if not isinstance(entries, list) or not entries:
        raise HostsFileError(path, "hosts", "must be a non-empty list of hosts")

    defaults = _shared_fields(data, path, "")      # nproc_per_node is settled per entry (_settle_nproc)
    if "transport" not in defaults:
        env_default = os.environ.get(TRANSPORT_ENV) or "paramiko"
        if env_default not in TRANSPORTS:
            raise HostsFileError(path, "", f"${TRANSPORT_ENV} must be one of {', '.join(TRANSPORTS)}, "
                                 f"got {env_default!r}")
        defaults["transport"] = env_default
    first_seen: dict[str, str] = {}
    hosts = _parse_list(entries, "hosts", defaults, path, first_seen)
    spare_entries = data.get("spares", [])
    if not isinstance(spare_entries, list):
        raise HostsFileError(path, "spares", "must be a list of hosts, like `hosts:`")
    spares = _parse_list(spare_entries, "spares", defaults, path, first_seen)

    master_port = _port(data.get("master_port", 29500), path, "master_port", allow_auto=True)
    master_addr = data.get("master_addr")
    if master_addr is not None:
        master_addr = _str(master_addr, path, "master_addr")
        if not _HOST_RE.fullmatch(master_addr):
            raise HostsFileError(path, "master_addr", f"not a host name or address: {master_addr!r}")
    timeout = data.get("connect_timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= 600):
        raise HostsFileError(path, "connect_timeout", f"must be seconds in (0, 600], got {timeout!r}")
    hang = data.get("hang_timeout")
    try:
        hang = None if hang is None else parse_duration(hang)
    except ValueError as e:
        raise HostsFileError(path, "hang_timeout", str(e)) from None
    start = data.get("start_timeout")
    try:
        start = START_TIMEOUT if start is None else parse_duration(start)
    except ValueError as e:
        raise HostsFileError(path, "start_timeout", str(e)) from None
    on_hang = data.get("on_hang", "report")
    if on_hang not in ON_HANG:
        raise HostsFileError(path, "on_hang", f"must be one of {', '.join(ON_HANG)}, got {on_hang!r}")
    restarts = data.get("max_restarts", 0)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or not 0 <= restarts <= 1000:
        raise HostsFileError(path, "max_restarts", f"must be a whole number 0-1000, got {restarts!r}")
    delay = data.get("restart_delay", 5)
    try:
        delay = 0.0 if delay == 0 and not isinstance(delay, bool) else parse_duration(delay)
    except ValueError as e:
        raise HostsFileError(path, "restart_delay", str(e)) from None
    return HostsFile(path, tuple(hosts), master_port, master_addr,
                     None if timeout is None else float(timeout), hang, on_hang, restarts, delay,
                     tuple(spares), start_timeout=start)


def allocation_hosts(hosts: HostsFile) -> HostsFile:
    """A `slurm:` file (no hosts yet) with the nodes of the allocation the command
    runs in: the first `slurm.nodes` are the run's, in scontrol's order, the rest spares."""
    from .slurm import current_allocation     # here: it runs scontrol
    spec = hosts.slurm
    assert spec is not None
    alloc = current_allocation(hosts.path)
    # As srun and sbatch do, a node works in the directory the command was started
    # in (a cluster's nodes share it), unless the file says `workdir:`.
    template = spec.template if spec.template.workdir else replace(spec.template, workdir=os.getcwd())
    nodes = [replace(template, host=n, name=n, addr=addr, slurm_job=alloc.job) for n, addr in alloc.nodes]
    wanted = spec.nodes or len(nodes)
    if wanted > len(nodes):
        raise HostsFileError(hosts.path, "slurm.nodes",
                             f"asks for {wanted} nodes, and the allocation (job {alloc.job}) has "
                             f"{len(nodes)}: {' '.join(n for n, _ in alloc.nodes)}")
    return replace(hosts, hosts=tuple(nodes[:wanted]), spares=tuple(nodes[wanted:]))


def _parse_slurm(data: dict[str, Any], path: str) -> HostsFile:
    """A file with `slurm:`: no hosts yet (load_hosts takes them from the allocation)."""
    for key in ("hosts", "spares", "transport", "master_addr"):
        if key in data:
            raise HostsFileError(path, key, "cannot be used with `slurm:` (the nodes, their transport "
                                 "and addresses come from the Slurm allocation)")
    section = data["slurm"]
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise HostsFileError(path, "slurm", f"must be a mapping (nodes, partition, ...), got {_kind(section)}")
    _check_keys(section, SLURM_KEYS, path, "slurm")
    fields = _shared_fields(data, path, "")
    fields.setdefault("env", {})
    _settle_nproc(fields, {}, fields, path, "")
    fields["transport"] = "srun"
    template = Host(host=SLURM, name=SLURM, **fields)
    nodes = None if section.get("nodes") is None else _positive_int(section["nodes"], path, "slurm.nodes")
    gpus = section.get("gpus_per_node")
    gpus = None if gpus is None else _positive_int(gpus, path, "slurm.gpus_per_node")
    partition = None if section.get("partition") is None else _str(section["partition"], path, "slurm.partition")
    limit = section.get("time")
    if limit is not None:
        limit = _str(limit, path, "slurm.time")
        if not re.fullmatch(r"(\d+-)?\d+(:\d\d){0,2}", limit):
            raise HostsFileError(path, "slurm.time", f"must be a Slurm time such as 30, 02:00:00 or "
                                 f"1-12:00:00, got {limit!r}")
    args = section.get("sbatch_args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) and a for a in args):
        raise HostsFileError(path, "slurm.sbatch_args", "must be a list of sbatch options, "
                             "like [\"--account=proj\", \"--exclusive\"]")
    account = None if section.get("account") is None else _str(section["account"], path, "slurm.account")
    spec = SlurmSpec(template, nodes, partition, limit, gpus, tuple(args), account)
    hosts = parse_hosts({k: v for k, v in data.items() if k != "slurm"} | {"hosts": ["slurm"]}, path)
    return replace(hosts, hosts=(), slurm=spec)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smh]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(value: Any) -> float:
    """Seconds from `300`, `90s`, `5m` or `1.5h` (more than 0)."""
    m = _DURATION_RE.fullmatch(str(value).strip()) if not isinstance(value, bool) else None
    if m is None or float(m[1]) <= 0:
        raise ValueError(f"must be a duration such as 300, 90s, 5m or 1h, got {value!r}")
    return float(m[1]) * _UNIT[m[2]]


def _parse_list(entries: list[Any], field_name: str, defaults: dict[str, Any], path: str,
                first_seen: dict[str, str]) -> list[Host]:
    out: list[Host] = []
    for i, entry in enumerate(entries):
        where = f"{field_name}[{i}]"
        for h in _parse_entry(entry, defaults, path, where):
            # Tags must say which machine a line came from: names are unique. (Several
            # localhost "nodes" are the laptop demo; their tags differ by rank.)
            if h.name in first_seen and not h.is_local:
                raise HostsFileError(path, where, f"`{h.name}` is already {first_seen[h.name]}; "
                                     "give each entry its own `name:` if this is intended")
            first_seen[h.name] = where
            out.append(h)
    return out


def with_transport(hosts: HostsFile, transport: str | None) -> HostsFile:
    """Every host on `transport` (--transport), or the file as it is."""
    if transport is None:
        return hosts
    # Slurm nodes keep srun: --transport names an SSH stack.
    return replace(hosts, hosts=tuple(h if h.slurm_job else replace(h, transport=transport)
                                      for h in hosts.hosts))


def _parse_entry(entry: Any, defaults: dict[str, Any], path: str, where: str) -> list[Host]:
    if isinstance(entry, (str, int)) and not isinstance(entry, bool):
        spec, nproc = _split_nproc(str(entry), path, where)
        fields = dict(defaults)
        _settle_nproc(fields, {} if nproc is None else {"nproc_per_node": nproc}, defaults, path, where)
        return [_host(h, h, None, fields, path, where) for h in expand_range(spec, path, where)]
    if not isinstance(entry, dict):
        raise HostsFileError(path, where, f"must be a host name or a mapping, got {_kind(entry)}")
    _check_keys(entry, HOST_KEYS, path, where)
    if "host" not in entry:
        raise HostsFileError(path, f"{where}.host", "missing: every entry needs `host:`")
    spec = _str(entry["host"], path, f"{where}.host")
    fields = dict(defaults)
    own = _shared_fields(entry, path, where)
    env = {**fields.get("env", {}), **own.pop("env", {})}
    fields.update(own)
    fields["env"] = env
    _settle_nproc(fields, own, defaults, path, where)
    names = expand_range(spec, path, f"{where}.host")
    name = entry.get("name")
    addr = entry.get("addr")
    if len(names) > 1 and (name is not None or addr is not None):
        raise HostsFileError(path, where, "`name` and `addr` cannot be used with a host range")
    if name is not None:
        name = _str(name, path, f"{where}.name")
        if not _NAME_RE.fullmatch(name):
            raise HostsFileError(path, f"{where}.name", f"use letters, digits and ._:@+- only, got {name!r}")
    if addr is not None:
        addr = _str(addr, path, f"{where}.addr")
        if not _HOST_RE.fullmatch(addr):
            raise HostsFileError(path, f"{where}.addr", f"not a host name or address: {addr!r}")
    return [_host(h, name or h, addr, fields, path, f"{where}.host") for h in names]


def _host(host: str, name: str, addr: str | None, fields: dict[str, Any], path: str, where: str) -> Host:
    if not _HOST_RE.fullmatch(host):
        raise HostsFileError(path, where, f"not a valid ssh host: {host!r}")
    return Host(host=host, name=name, addr=addr, **fields)


def _settle_nproc(fields: dict[str, Any], own: dict[str, Any], defaults: dict[str, Any],
                  path: str, where: str) -> None:
    """An entry's nproc_per_node, from the most specific level that says anything about
    it: the entry's own nproc_per_node, else one per GPU of its own `gpus:`, else the same
    at the top level, else 1. `gpu` with a `gpus:` list is that list's length."""
    nproc: int | str = 1
    for level in (own, defaults):
        if "nproc_per_node" in level:
            nproc = level["nproc_per_node"]
            break
        if "gpus" in level:
            nproc = len(level["gpus"])
            break
    devices = fields.get("gpus")
    if devices is not None:
        if nproc == GPU:
            nproc = len(devices)
        elif isinstance(nproc, int) and nproc > len(devices):
            raise HostsFileError(path, where, f"nproc_per_node {nproc} is more than the {len(devices)} "
                                 f"GPU{'s' if len(devices) != 1 else ''} of `gpus: {describe(devices)}` "
                                 "(NCCL refuses two ranks on one GPU)")
        if VISIBLE_VAR in fields.get("env", {}):
            raise HostsFileError(path, where, f"`gpus:` sets {VISIBLE_VAR}, and `env:` sets it too: "
                                 "keep one")
    fields["nproc_per_node"] = nproc


def _shared_fields(d: dict[str, Any], path: str, where: str) -> dict[str, Any]:
    """Validate the keys that may appear both at the top level and per host."""
    at = (lambda k: f"{where}.{k}") if where else (lambda k: k)
    out: dict[str, Any] = {}
    if "nproc_per_node" in d:
        if d["nproc_per_node"] == GPU:
            out["nproc_per_node"] = GPU
        else:
            out["nproc_per_node"] = _positive_int(d["nproc_per_node"], path, at("nproc_per_node"),
                                                  also=f" or `{GPU}`")
    if "gpus" in d:
        try:
            out["gpus"] = parse_devices(d["gpus"])
        except ValueError as e:
            raise HostsFileError(path, at("gpus"), str(e)) from None
    for key in ("user", "identity_file", "python", "workdir"):
        if key in d and d[key] is not None:
            out[key] = _str(d[key], path, at(key))
    if "port" in d:
        out["port"] = _port(d["port"], path, at("port"))
    if "transport" in d:
        if d["transport"] not in TRANSPORTS:
            raise HostsFileError(path, at("transport"), f"must be one of {', '.join(TRANSPORTS)}, "
                                 f"got {d['transport']!r}")
        out["transport"] = d["transport"]
    if "setup" in d and d["setup"] is not None:
        setup = d["setup"]
        if isinstance(setup, str):
            setup = [setup]
        if not isinstance(setup, list) or not all(isinstance(s, str) for s in setup):
            raise HostsFileError(path, at("setup"), "must be a string or a list of shell lines")
        out["setup"] = tuple(setup)
    if "env" in d and d["env"] is not None:
        out["env"] = parse_env_mapping(d["env"], path, at("env"))
    return out


def parse_env_mapping(env: Any, path: str, where: str) -> dict[str, str]:
    """An env mapping with string keys; values become strings (booleans 1/0)."""
    if not isinstance(env, dict):
        raise HostsFileError(path, where, f"must be a mapping of NAME: value, got {_kind(env)}")
    out: dict[str, str] = {}
    for k, v in env.items():
        at = f"{where}.{k}" if where else str(k)
        if not isinstance(k, str) or not _ENV_KEY_RE.fullmatch(k):
            raise HostsFileError(path, at, "not a valid environment variable name")
        if isinstance(v, bool):
            v = "1" if v else "0"
        elif isinstance(v, (int, float, str)):
            v = str(v)
        else:
            raise HostsFileError(path, at, f"must be a string or number, got {_kind(v)}")
        if "\x00" in v:
            raise HostsFileError(path, at, "must not contain NUL bytes")
        out[k] = v
    return out


def _split_nproc(s: str, path: str, where: str) -> tuple[str, int | str | None]:
    """`gpu-a:4` -> ("gpu-a", 4), `gpu-a:gpu` -> ("gpu-a", "gpu"). IPv6 literals need the
    mapping form."""
    host, sep, tail = s.rpartition(":")
    if sep and _SMALL_INT_RE.fullmatch(tail) and host and ":" not in host:
        return host, _positive_int(int(tail), path, where)
    if sep and tail == GPU and host and ":" not in host:
        return host, GPU
    if sep and host and ":" not in host:
        raise HostsFileError(path, where, f"expected host or host:nproc_per_node, got {s!r}")
    return s, None


def expand_range(spec: str, path: str = "<hosts>", where: str = "") -> list[str]:
    """Expand one bracket range: `gpu[01-03]` -> gpu01 gpu02 gpu03, `n[a-c,x]`."""
    m = _RANGE_RE.fullmatch(spec)
    if not m:
        if "[" in spec or "]" in spec:
            raise HostsFileError(path, where, f"bad host range {spec!r}: use name[01-16] or name[a-c]")
        return [spec]
    prefix, body, suffix = m.groups()
    out: list[str] = []
    for part in body.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo or (dash and not hi):
            raise HostsFileError(path, where, f"bad range {part!r} in {spec!r}: use 01-16 or a-c")
        if not dash:
            out.append(prefix + lo + suffix)
        elif _SMALL_INT_RE.fullmatch(lo) and _SMALL_INT_RE.fullmatch(hi) and int(lo) <= int(hi):
            if int(hi) - int(lo) >= 100_000:
                raise HostsFileError(path, where, f"host range {spec!r} is too large")
            width = len(lo) if lo.startswith("0") else 0
            out.extend(f"{prefix}{n:0{width}d}{suffix}" for n in range(int(lo), int(hi) + 1))
        elif len(lo) == len(hi) == 1 and lo.isascii() and lo.isalpha() and hi.isascii() and hi.isalpha() \
                and lo.islower() == hi.islower() and lo <= hi:
            out.extend(prefix + chr(c) + suffix for c in range(ord(lo), ord(hi) + 1))
        else:
            raise HostsFileError(path, where, f"bad range {part!r} in {spec!r}: use 01-16 or a-c")
    if not all(out):
        raise HostsFileError(path, where, f"bad host range {spec!r}")
    return out


def _check_keys(d: dict[Any, Any], allowed: frozenset[str], path: str, where: str) -> None:
    for key in d:
        if key in allowed:
            continue
        at = f"{where}.{key}" if where else str(key)
        near = difflib.get_close_matches(str(key), sorted(allowed), n=1)
        hint = f"; did you mean `{near[0]}`?" if near else f"; known keys: {', '.join(sorted(allowed))}"
        raise HostsFileError(path, at, "unknown key" + hint)


def _positive_int(v: Any, path: str, where: str, also: str = "") -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise HostsFileError(path, where, f"must be a positive integer{also}, got {v!r}")
    return v


def _port(v: Any, path: str, where: str, allow_auto: bool = False) -> int | str:
    if allow_auto and v == "auto":
        return "auto"
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        extra = " or `auto`" if allow_auto else ""
        raise HostsFileError(path, where, f"must be a port number 1-65535{extra}, got {v!r}")
    return v


def _str(v: Any, path: str, where: str) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise HostsFileError(path, where, f"must be a string, got {_kind(v)}")
    s = str(v)
    if not s or "\x00" in s or "\n" in s:
        raise HostsFileError(path, where, f"must be a non-empty single-line string, got {s!r}")
    return s


def _kind(v: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(type(v), f"{type(v).__name__} {v!r}")
