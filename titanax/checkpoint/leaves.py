"""What a checkpoint records about each leaf, and the leaves Orbax does not store.

Arrays (``jax.Array``, numpy) go to Orbax. Python ``int``, ``float``, ``bool`` and
``str`` leaves and numpy scalars (an epoch counter, a run name) are written exactly into
Titanax's JSON metadata instead, and come back with their type: Orbax's standard
handler refuses strings and numpy scalars, and turns a numpy scalar into a 0-d array.
Every leaf gets a checksum of its value (`titanax.checkpoint.checksum` for arrays, CRC-32
of the JSON text for the others).
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from titanax._util import bullets, count, leaves_with_paths, shape_of
from titanax.checkpoint import checksum as _checksum
from titanax.errors import CheckpointError

__all__ = ["abstract"]

# Python types stored in the metadata, by the name the metadata gives them. bool before
# int: a bool is an int.
VALUE_KINDS: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}


def abstract(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with their shardings) for a tree of arrays.

    A restore target that allocates nothing: ``mngr.restore(like=tx.checkpoint.abstract(state))``.
    Python scalars and strings stay as they are: they are restored from the metadata.
    """

    def one(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct) or value_kind(x) is not None:
            return x
        if not hasattr(x, "dtype"):
            return x  # not an array: the restore's check names it
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


def value_kind(x: Any) -> str | None:
    """``'int'``, ``'float'``, ``'bool'``, ``'str'`` or ``'numpy'`` (a numpy scalar) for a
    leaf kept in the metadata; ``None`` for an array or anything else."""
    if isinstance(x, np.generic):
        return "numpy"
    for kind, t in VALUE_KINDS.items():
        if isinstance(x, t):
            return kind
    return None


def is_array(x: Any) -> bool:
    """A ``jax.Array``, or a numpy array of numbers or bools (not objects, strings, dates)."""
    if isinstance(x, np.ndarray):
        return x.dtype.kind not in "OSUMm" and x.dtype.fields is None
    return isinstance(x, jax.Array)


def encode(x: Any) -> Any:
    """A JSON value that `decode` turns back into exactly ``x``: floats as ``float.hex`` (NaN,
    infinities and the last bit survive), numpy scalars as their bytes in hex."""
    kind = value_kind(x)
    if kind == "float":
        return float(x).hex()
    if kind == "numpy":
        return x.tobytes().hex()
    return x


def decode(entry: dict[str, Any]) -> Any:
    kind, value = entry["kind"], entry["value"]
    if kind == "float":
        return float.fromhex(value)
    if kind == "numpy":
        return np.frombuffer(bytes.fromhex(value), dtype=np.dtype(entry["dtype"]))[0]
    return VALUE_KINDS[kind](value)


def text_checksum(entry: dict[str, Any]) -> int:
    """CRC-32 of a value leaf's kind, dtype and JSON value."""
    text = json.dumps([entry["kind"], entry["dtype"], entry["value"]], separators=(",", ":"))
    return zlib.crc32(text.encode())


def json_checksum(obj: Any) -> int:
    """CRC-32 of ``obj`` as canonical JSON (sorted keys): the same after a JSON round trip."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return zlib.crc32(text.encode())


def mesh_info(tree: Any) -> dict[str, Any] | None:
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            m = sharding.mesh
            return {
                "axis_names": list(m.axis_names),
                "axis_sizes": [int(m.shape[a]) for a in m.axis_names],
                "axis_types": [str(t).split(".")[-1] for t in m.axis_types],
            }
    return None


def describe(tree: Any, where: str) -> dict[str, dict[str, Any]]:
    """Path -> kind, shape, dtype, spec, checksum (and value, for values) of every leaf.

    Raises:
      CheckpointError: leaves that are neither arrays nor values, all listed.
    """
    out: dict[str, dict[str, Any]] = {}
    arrays: list[tuple[str, Any]] = []
    bad = []
    for path, leaf in leaves_with_paths(tree):
        kind = value_kind(leaf)
        if kind is not None:
            entry = {
                "kind": kind,
                "shape": [],
                "dtype": str(leaf.dtype) if kind == "numpy" else kind,
                "spec": None,
                "value": encode(leaf),
            }
            entry["checksum"] = text_checksum(entry)
            out[path] = entry
        elif is_array(leaf):
            sharding = getattr(leaf, "sharding", None)
            spec = sharding.spec if isinstance(sharding, NamedSharding) else None
            out[path] = {
                "kind": "array",
                "shape": list(shape_of(leaf)),
                "dtype": str(np.dtype(leaf.dtype)),
                "spec": None if spec is None else repr(spec),
            }
            arrays.append((path, leaf))
        elif isinstance(leaf, np.ndarray):
            bad.append(f"{path}: numpy array of {leaf.dtype}")
        else:
            bad.append(f"{path}: {type(leaf).__module__}.{type(leaf).__qualname__}")
    if bad:
        raise CheckpointError(
            f"tx.checkpoint: {where}: {count(len(bad), 'leaf', 'leaves')} of the state cannot "
            f"be saved:\n{bullets(bad)}\nLeaves must be arrays (jax or numpy), numpy scalars, "
            "or Python int, float, bool or str; convert the others, or keep them out of the "
            "state (e.g. in extra=, as JSON)."
        )
    for (path, _), value in zip(arrays, _checksum.checksums([x for _, x in arrays])):
        out[path]["checksum"] = value
    return out


def signature(entry: dict[str, Any]) -> str:
    """``float32(8, 16)``, ``int``, ``numpy float32``: how a message shows a leaf."""
    kind = entry.get("kind", "array")  # Titanax 1 recorded arrays only, without a kind
    if kind == "array":
        return f"{entry['dtype']}{tuple(entry['shape'])}"
    return f"numpy {entry['dtype']}" if kind == "numpy" else kind


def target_entry(x: Any) -> dict[str, Any]:
    """What `signature` needs of a ``like`` leaf, plus its sharding (arrays)."""
    kind = value_kind(x)
    if kind is not None:
        dtype = str(x.dtype) if kind == "numpy" else kind
        return {"kind": kind, "shape": [], "dtype": dtype, "sharding": None}
    if not hasattr(x, "dtype"):
        name = f"{type(x).__module__}.{type(x).__qualname__}"
        return {"kind": name, "shape": [], "dtype": name, "sharding": None}
    return {
        "kind": "array",
        "shape": list(shape_of(x)),
        "dtype": str(np.dtype(x.dtype)),
        "sharding": getattr(x, "sharding", None),
    }
