"""GPUs in the hosts file: `gpus:` device lists and `nproc_per_node: gpu`.

A device list is what CUDA_VISIBLE_DEVICES becomes on a node: GPU indices as
nvidia-smi numbers them, in the order written (local rank 0 gets the first).
`nproc_per_node: gpu` is one process per GPU the node has (or per GPU listed in
`gpus:`), a count that only the node can tell: `up` learns it in the preflight.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

GPU = "gpu"                             # nproc_per_node: gpu
VISIBLE_VAR = "CUDA_VISIBLE_DEVICES"
ORDER_VAR = "CUDA_DEVICE_ORDER"
MAX_INDEX = 1023                        # no machine has more; catches a typo like 00-77

_PART_RE = re.compile(r"\s*([0-9]{1,4})\s*(?:-\s*([0-9]{1,4})\s*)?", re.ASCII)


def parse_devices(value: Any) -> tuple[int, ...]:
    """`[0, 1]`, `"4-7"`, `"0,2,4-5"`, `3` or `["0-3", 6]` -> the indices, in order.

    Raises ValueError saying what is wrong (no index, a duplicate, a bad part)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"must be GPU indices such as [0, 1] or \"4-7\", got {value!r}")
    items = value if isinstance(value, list) else [value]
    out: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ValueError(f"must be GPU indices such as [0, 1] or \"4-7\", got {item!r}")
        if isinstance(item, int):
            if not 0 <= item <= MAX_INDEX:
                raise ValueError(f"GPU index {item} is not in 0-{MAX_INDEX}")
            out.append(item)
            continue
        for part in item.split(","):
            m = _PART_RE.fullmatch(part)
            if m is None:
                raise ValueError(f"bad GPU index or range {part.strip()!r}: use 0, 4-7 or 0,2,4-5")
            lo = int(m[1])
            hi = int(m[2]) if m[2] is not None else lo
            if hi < lo or hi > MAX_INDEX:
                raise ValueError(f"bad GPU range {part.strip()!r}: use low-high, within 0-{MAX_INDEX}")
            out.extend(range(lo, hi + 1))
    if not out:
        raise ValueError("lists no GPU")
    twice = sorted({i for i in out if out.count(i) > 1})
    if twice:
        many = len(twice) > 1
        raise ValueError(f"GPU{'s' if many else ''} {', '.join(map(str, twice))} "
                         f"{'are' if many else 'is'} listed twice")
    return tuple(out)


def visible_devices(devices: Sequence[int]) -> str:
    """The CUDA_VISIBLE_DEVICES value: `0,1`."""
    return ",".join(str(i) for i in devices)


def describe(devices: Sequence[int]) -> str:
    """`0-3`, `0,2,5-7`: runs of consecutive indices shortened, in the given order."""
    parts: list[str] = []
    i = 0
    while i < len(devices):
        j = i
        while j + 1 < len(devices) and devices[j + 1] == devices[j] + 1:
            j += 1
        parts.append(str(devices[i]) if j == i else f"{devices[i]}-{devices[j]}")
        i = j + 1
    return ",".join(parts)


def missing_devices(devices: Sequence[int], count: int) -> str | None:
    """Why `devices` cannot be used on a node with `count` GPUs, or None if they can."""
    lacking = [i for i in devices if i >= count]
    if not lacking:
        return None
    has = "no GPU" if count == 0 else f"{count} GPU{'s' if count != 1 else ''} ({describe(range(count))})"
    return (f"gpus: {describe(devices)}: the node has {has}, so "
            f"GPU{'s' if len(lacking) > 1 else ''} {describe(lacking)} "
            f"{'are' if len(lacking) > 1 else 'is'} not there")


def parse_visible(value: str) -> tuple[int, ...] | None:
    """A CUDA_VISIBLE_DEVICES value the user set, as indices; None when it is not a
    plain list of indices (GPU UUIDs, MIG names): then it is left to CUDA."""
    if not value.strip():
        return ()
    try:
        return parse_devices(value)
    except ValueError:
        return None
