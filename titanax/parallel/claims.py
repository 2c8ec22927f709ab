"""Layouts a transform called *inside* a step asks of the step's arguments.

`tx.pipeline` runs under its own ``shard_map`` over the stage axis, inside whatever
step calls it. When that step is a Titanax step whose plan leaves the stage axis
``Auto``, nothing else says how the stage parameters are stored: replicated along the
axis, every device would hold every stage and the step would all-gather the updated
stage parameters (and their optimizer moments) every step. So while the step's body
is traced, the pipeline *claims* the axis for the leaves it received as
``stage_params``; the step lays those arguments out along it (dimension 0, one block
of rows per device) before it compiles. See `titanax.parallel.entry`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

__all__ = ["Claim", "collecting", "claim"]


class Claim(NamedTuple):
    """``axis`` for dimension 0 of the traced values ``leaves``, asked by ``by``."""

    axis: str
    leaves: tuple[Any, ...]
    by: str


_CLAIMS: contextvars.ContextVar[list[Claim] | None] = contextvars.ContextVar(
    "titanax_claims", default=None
)


@contextlib.contextmanager
def collecting() -> Iterator[list[Claim]]:
    """Collects the claims made while a step's body is traced."""
    claims: list[Claim] = []
    token = _CLAIMS.set(claims)
    try:
        yield claims
    finally:
        _CLAIMS.reset(token)


def claim(axis: str, leaves: Sequence[Any], by: str) -> bool:
    """Claims ``axis`` for dimension 0 of ``leaves``; ``False`` outside a step's trace."""
    claims = _CLAIMS.get()
    if claims is None:
        return False
    claims.append(Claim(axis, tuple(leaves), by))
    return True
