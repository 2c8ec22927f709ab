"""Small helpers shared by the modules: leaf paths, byte sizes, text tables."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

_VALUE_KEY = jax.tree_util.GetAttrKey("value")


def path_str(keypath: Sequence[Any]) -> str:
    """``(DictKey('params'), DictKey('w'))`` -> ``'params/w'``."""
    return jax.tree_util.keystr(tuple(keypath), simple=True, separator="/")


def _nnx_variable_types() -> tuple[type, ...]:
    """Flax NNX's ``Variable`` classes, if ``flax.nnx`` is loaded (no Variable exists otherwise).

    Looked up in ``sys.modules`` so that Titanax never imports flax. ``VariableState`` is the
    separate class of an ``nnx.State``'s leaves before flax 0.11 (an alias of ``Variable`` since).
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return ()
    # vars(), not getattr(): flax 0.12 answers nnx.VariableState with a DeprecationWarning.
    found = (vars(nnx).get(name) for name in ("Variable", "VariableState"))
    return tuple({t for t in found if isinstance(t, type)})


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """The leaves of ``tree`` with their ``/``-joined paths, in flatten order.

    An NNX ``Variable`` (a ``Param`` in an ``nnx.State``, an optimizer's moment) flattens to one
    child under the key ``GetAttrKey('value')``; its path is the module path, without that key
    (``'up/kernel'``, not ``'up/kernel/value'``), so that rules match as for Linen's parameters.
    A dict key or a dataclass field named ``value`` stays in the path.
    """
    variables = _nnx_variable_types()
    if not variables:
        return [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
    out = []
    is_var = lambda x: isinstance(x, variables)  # noqa: E731
    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0]:
        if not is_var(node):
            out.append((path_str(path), node))
            continue
        # Measured on flax 0.12.8: _variable_flatten_with_keys gives the one key GetAttrKey("value").
        for inner, x in jax.tree_util.tree_flatten_with_path(node)[0]:
            keep = inner[1:] if inner[:1] == (_VALUE_KEY,) else inner
            out.append((path_str((*path, *keep)), x))
    return out


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def nbytes(shape: Sequence[int], dtype: Any) -> int:
    # A typed PRNG key's dtype (key<fry>) is no numpy dtype, but has an itemsize (8 B).
    itemsize = getattr(dtype, "itemsize", None) or np.dtype(dtype).itemsize
    return int(np.prod(shape, dtype=np.int64)) * int(itemsize)


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``count(1, "leaf", "leaves")`` -> ``'1 leaf'``; ``count(2, ...)`` -> ``'2 leaves'``."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


class Report(str):
    """Text that shows itself unquoted at the prompt (tables, explanations)."""

    def __repr__(self) -> str:
        return str(self)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A left-aligned plain-text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), *map(line, rows)])


def bullets(items: Sequence[str], limit: int = 20) -> str:
    """``  * item`` lines; long lists are cut with a count of the rest."""
    shown = [f"  * {s}" for s in items[:limit]]
    if len(items) > limit:
        shown.append(f"  ... and {len(items) - limit} more")
    return "\n".join(shown)
