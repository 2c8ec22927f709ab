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

__all__ = ["Collective", "collectives", "collectives_table", "replica_groups", "summary"]

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
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
# The three ways XLA prints replica_groups (after "replica_groups="):
# - a list of groups, {{0,1},{2,3}}; {} means one group of every device;
# - an iota, [2,4]<=[8], optionally transposed: [4,2]<=[2,4]T(1,0);
# - a mesh and the axes a group spans (MeshAxesReplicaGroupList, jaxlib 0.10 prints it for
#   collectives the SPMD partitioner makes):
#   mesh['x'=2,'y'=4] {'y'}, mesh['x'=4,'y'=2], device_ids=([2,2,2]T(0,2,1)) {'x':(2)2}
#   or device_ids=(0,2,1,3,...); 'x':(p)s is the sub-axis of size s whose major part has size p.
#   jaxlib 0.10.2 quotes names (its parser refuses bare ones); XLA's printer did not always
#   (openxla/xla mesh_and_axis.cc at 040b3849), so bare names are read too.
_LIST = re.compile(r"\{((?:\{[\d,]*\},?)*)\}")
_IOTA = re.compile(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_NAME = r"'[^']*'|[^\s'=,:(){}\[\]]+"
_MESH = re.compile(
    rf"mesh\[(?P<axes>(?:(?:{_NAME})=\d+,?)+)\]"
    r"(?:,\s*device_ids=\((?P<ids>\[[\d,]+\](?:T\([\d,]+\))?|[\d,]+)\))?"
    rf"\s*\{{(?P<refs>(?:(?:{_NAME})(?::\(\d+\)\d+)?,?)*)\}}"
)
_AXIS = re.compile(rf"({_NAME})=(\d+)")
_REF = re.compile(rf"({_NAME})(?::\((\d+)\)(\d+))?")


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


def _ints(text: str) -> list[int]:
    return [int(i) for i in text.split(",") if i]


def _iota(dims: list[int], reshape: list[int], perm: list[int]) -> np.ndarray:
    """XLA's iota device list: ``arange`` in ``reshape`` dims, transposed by ``perm``, as ``dims``."""
    ids = np.arange(int(np.prod(reshape))).reshape(reshape)
    return (ids.transpose(perm) if perm else ids).reshape(dims)


def _mesh_groups(m: re.Match[str]) -> list[list[int]]:
    """The groups of a ``mesh[...] {axes}`` replica group list (XLA's
    ``MeshAxesReplicaGroupList::flattened_replica_groups``): every device of the mesh, split
    into the groups along which only the named (sub-)axes vary."""
    axes = [(name.strip("'"), int(size)) for name, size in _AXIS.findall(m["axes"])]
    names, sizes = [a for a, _ in axes], [s for _, s in axes]
    if (ids := m["ids"]) is None:
        devices = np.arange(int(np.prod(sizes)))
    elif ids.startswith("["):
        dims, _, perm = ids[1:].partition("]")
        devices = _iota([-1], _ints(dims), _ints(perm.strip("T()")))
    else:
        devices = np.array(_ints(ids))
    if devices.size != np.prod(sizes):
        raise ValueError(f"device_ids has {devices.size} devices, the mesh {np.prod(sizes)}")
    refs = []
    for name, pre, size in _REF.findall(m["refs"]):
        if name.strip("'") not in names:
            raise ValueError(f"axis {name} is not in the mesh {names}")
        dim = names.index(name.strip("'"))
        refs.append((dim, int(pre or 1), int(size or sizes[dim])))
    # Split each mesh axis, major to minor, at the sub-axis bounds that refs name: 'x'=8 with
    # 'x':(2)2 becomes factors 2,2,2 with bounds 1,2,4,8; the ref spans the factor from 2 to 4.
    bounds = [
        sorted({1, n} | {b for d, p, s in refs if d == i for b in (p, p * s)})
        for i, n in enumerate(sizes)
    ]
    factors: list[int] = []
    first: list[int] = []
    for b in bounds:
        if any(hi % lo for lo, hi in zip(b, b[1:])):
            raise ValueError(f"sub-axis bounds {b} do not divide each other")
        first.append(len(factors))
        factors += [hi // lo for lo, hi in zip(b, b[1:])]
    grouped = [
        first[d] + k for d, p, s in refs for k in range(bounds[d].index(p), bounds[d].index(p * s))
    ]
    rest = [k for k in range(len(factors)) if k not in grouped]
    if len(set(grouped)) != len(grouped):
        raise ValueError("the axes overlap")
    size = int(np.prod([factors[k] for k in grouped]))
    return devices.reshape(factors).transpose(rest + grouped).reshape(-1, size).tolist()


def replica_groups(line: str, num_devices: int) -> list[list[int]]:
    """The device groups of one collective, from its HLO line.

    Device ids are the program's logical ids: positions in the flattened mesh.

    Args:
      line: one instruction of an HLO module's text.
      num_devices: the devices of the program; a line with no groups (``replica_groups={}``
        or none at all) means one group of all of them, as in XLA.

    Returns:
      The groups, each a list of device ids; the pairs of a ``collective-permute``.

    Raises:
      ValueError: ``replica_groups=`` is written in a way this function cannot read. It raises
        rather than guess, so that a new XLA syntax is never read as "all devices".

    Examples:
      >>> replica_groups("x = f32[8] all-reduce(p), replica_groups=[2,4]<=[8]", 8)
      [[0, 1, 2, 3], [4, 5, 6, 7]]
      >>> replica_groups("x = f32[8] all-reduce(p), replica_groups=mesh['a'=2,'b'=4] {'a'}", 8)
      [[0, 4], [1, 5], [2, 6], [3, 7]]
    """
    if m := _PAIRS.search(line):
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    at = line.find("replica_groups=")
    if at < 0:
        return [list(range(num_devices))]
    text = line[at + len("replica_groups=") :]
    try:
        if m := _LIST.match(text):
            groups = [_ints(g) for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
            return groups or [list(range(num_devices))]
        if m := _IOTA.match(text):
            ids = _iota(_ints(m.group(1)), _ints(m.group(2)), _ints(m.group(3) or ""))
            return ids.tolist()
        if m := _MESH.match(text):
            return _mesh_groups(m)
        why = "it is none of the list, iota or mesh forms"
    except ValueError as e:  # numpy's reshape and the mesh form's checks
        why = str(e)
    shown = text.split(", use_global_device_ids")[0].split(", to_apply")[0][:200]
    raise ValueError(
        f"hlo.collectives: cannot read replica_groups={shown}: {why}. Titanax reads lists "
        "{{0,1},{2,3}}, iotas [2,4]<=[8]T(1,0) and meshes mesh['x'=2,'y'=4] {'y'}; please "
        "report this line to Titanax with your jax version."
    ) from None


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

    Raises:
      ValueError: a collective's ``replica_groups`` is in a form `replica_groups` cannot read.
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
        groups = replica_groups(line, mesh.devices.size)
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
