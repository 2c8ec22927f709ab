"""Collectives in a compiled program: kind, mesh axes and bytes, read from the HLO text.

This is how Titanax makes communication a checked fact: ``ParallelFunction.explain``
lists what `collectives` finds, and the tests count it.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import NamedTuple

import numpy as np
from jax.sharding import Mesh

from titanax._util import format_bytes, table

__all__ = ["Collective", "collectives", "collectives_table", "summary"]

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s4": 1,
    "u4": 1,
}
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<result>\(.*?\)|\S+)\s+"
    r"(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


class Collective(NamedTuple):
    """One collective of a compiled program.

    Attributes:
      kind: ``"all-reduce"``, ``"all-gather"``, ``"reduce-scatter"``,
        ``"collective-permute"`` or ``"all-to-all"``.
      axes: the mesh axes it communicates over.
      bytes: bytes per device of the full buffer it works on (the result for
        all-reduce, all-gather, all-to-all and permutes; the operand for
        reduce-scatter, which is the result times the group size).
      shapes: result shapes, e.g. ``("f32[16,8]",)``.
    """

    kind: str
    axes: tuple[str, ...]
    bytes: int
    shapes: tuple[str, ...]


def _array_bytes(dtype: str, dims: str) -> int:
    n = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
    return n * _DTYPE_BYTES.get(dtype, 4)


def _groups(line: str, num_devices: int) -> list[list[int]]:
    if m := _GROUPS_IOTA.search(line):
        shape = [int(d) for d in m.group(1).split(",")]
        dims = [int(d) for d in m.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(d) for d in m.group(3).split(",")])
        return ids.reshape(shape).tolist()
    if m := _GROUPS_LIST.search(line):
        groups = re.findall(r"\{([\d,]*)\}", m.group(1))
        parsed = [[int(i) for i in g.split(",") if i] for g in groups]
        if parsed and any(parsed):
            return parsed
    if m := _PAIRS.search(line):
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    return [list(range(num_devices))]


def _axes(groups: list[list[int]], mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes along which device coordinates vary within a group."""
    shape = mesh.devices.shape
    varying: set[int] = set()
    for group in groups:
        coords = np.array([np.unravel_index(i, shape) for i in group if i < mesh.devices.size])
        if len(coords) > 1:
            varying |= {d for d in range(len(shape)) if len(set(coords[:, d])) > 1}
    return tuple(mesh.axis_names[d] for d in sorted(varying))


def collectives(hlo_text: str, mesh: Mesh) -> list[Collective]:
    """Every collective in an optimized HLO module (``compiled.as_text()``).

    Args:
      hlo_text: the text of a compiled program.
      mesh: the mesh it was compiled for, to name the axes of replica groups.
    """
    found = []
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        kind, result = m.group("kind"), m.group("result")
        arrays = _ARRAY.findall(result)
        if m.group("start") and kind in ("all-gather", "collective-permute") and len(arrays) > 1:
            arrays = arrays[len(arrays) // 2 :]  # async start results hold (operands, outputs)
        groups = _groups(line, mesh.devices.size)
        size = sum(_array_bytes(t, d) for t, d in arrays)
        if kind == "reduce-scatter":
            size *= max(len(groups[0]), 1)
        found.append(
            Collective(kind, _axes(groups, mesh), size, tuple(f"{t}[{d}]" for t, d in arrays))
        )
    return found


def summary(found: list[Collective]) -> Counter[tuple[str, tuple[str, ...]]]:
    """Counts of collectives by ``(kind, axes)``."""
    return Counter((c.kind, c.axes) for c in found)


def collectives_table(found: list[Collective]) -> str:
    """The collectives as a table (kind, axes, bytes per device, shapes)."""
    if not found:
        return "collectives: none"
    rows = [
        (c.kind, ",".join(c.axes) or "-", format_bytes(c.bytes), " ".join(c.shapes)) for c in found
    ]
    total = format_bytes(sum(c.bytes for c in found))
    return table(("collective", "axes", "bytes/device", "shapes"), rows) + f"\ntotal: {total}"
