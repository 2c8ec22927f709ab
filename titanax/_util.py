"""Small helpers shared by the modules: leaf paths, byte sizes, text tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def path_str(keypath: Sequence[Any]) -> str:
    """``(DictKey('params'), DictKey('w'))`` -> ``'params/w'``."""
    return jax.tree_util.keystr(tuple(keypath), simple=True, separator="/")


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """The leaves of ``tree`` with their ``/``-joined paths, in flatten order."""
    return [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def nbytes(shape: Sequence[int], dtype: Any) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


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
