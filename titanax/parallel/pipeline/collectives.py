"""Which collectives may run inside a pipeline stage, checked on the stage's jaxpr.

The executor runs a stage (and the loss) inside a per-tick ``lax.switch`` that
only the devices of one stage take at a time. A collective there is correct when
every participant takes the same branch on the same tick:

* a grouped collective (``psum``, ``all_gather``, ``all_to_all``,
  ``psum_scatter``, ...) over axes other than the pipeline axis: its groups vary
  only along those axes, so they never span two stages. Measured correct on
  ``stage=2 x data=4`` for every schedule.
* ``tx.ppermute``, which runs there as an ``all_to_all``
  (`titanax.parallel.collectives._ppermute_in_stage`).

Two kinds are wrong there, and no error came from JAX or XLA (jaxlib 0.10.2):

* a plain ``jax.lax.ppermute`` (any axis): XLA:CPU meets every collective-permute
  of the program in one rendezvous of all devices keyed by its channel id, which
  is 1 for all of them, so a stage's permute met the pipeline's own permute run by
  the other stage on that tick (measured on ``stage=2 x data=4``: loss 12.0
  against 15.6), even with its pairs kept inside one stage;
* any collective over the pipeline axis itself: its members run different stages.

`check` finds them in the traced jaxprs, nested ones included, before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jax.extend import core as jex

from titanax.errors import CollectiveError

__all__ = ["check"]

# point-to-point primitives: their pairs are listed over the whole mesh, not grouped
_P2P = ("ppermute", "ppermute_start", "psend", "precv")
_COLLECTIVES = (
    *_P2P,
    "psum",
    "psum_start",
    "psum_invariant",
    "psum_invariant_start",
    "unreduced_psum",
    "unreduced_psum_start",
    "pmax",
    "pmin",
    "pbroadcast",
    "pbroadcast_start",
    "all_gather",
    "all_gather_start",
    "all_gather_invariant",
    "all_gather_reduced",
    "all_gather_reduced_start",
    "all_to_all",
    "all_to_all_start",
    "ragged_all_to_all",
    "reduce_scatter",
    "reduce_scatter_start",
    "unreduced_reduce_scatter",
    "unreduced_reduce_scatter_start",
)


def _eqns(jaxpr: Any) -> Iterator[Any]:
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (scan, cond, remat...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jex.jaxprs_in_params(eqn.params):
            yield from _eqns(sub.jaxpr if isinstance(sub, jex.ClosedJaxpr) else sub)


def _axes(eqn: Any) -> tuple[Any, ...]:
    names = eqn.params.get("axis_name", eqn.params.get("axes", ()))
    return tuple(names) if isinstance(names, (tuple, list)) else (names,)


def check(jaxpr: Any, stage: str, what: str) -> None:
    """Raises a `CollectiveError` for a collective that ``what`` cannot run inside a stage.

    Args:
      jaxpr: the traced stage (forward or VJP) or loss.
      stage: the pipeline axis.
      what: how the message names the traced function (``"the stage"``).
    """
    where = f"tx.pipeline(axis={stage!r}): {what}"
    for eqn in _eqns(jaxpr):
        name = eqn.primitive.name
        if name not in _COLLECTIVES:
            continue
        axes = [a for a in _axes(eqn) if isinstance(a, str)]
        if stage in axes:
            raise CollectiveError(
                f"{where} runs {name} over {tuple(axes)!r}, which includes the pipeline axis "
                f"{stage!r}: at each tick the devices along {stage!r} run different stages "
                "(or none), so it would pair values of unrelated stages. The pipeline "
                f"carries activations between stages itself; reduce over {stage!r} outside "
                "the pipe(...) call."
            )
        if name in _P2P:
            raise CollectiveError(
                f"{where} runs a plain {name} over {tuple(axes)!r} (jax.lax.{name}). Inside a "
                "pipeline stage its pairs span the devices of every stage while only one "
                "stage's devices run it, which gives wrong values (XLA:CPU, jaxlib 0.10.2) "
                "instead of an error. Call tx.ppermute, which runs as an all_to_all inside a "
                "stage (correct, for n - 1 times the bytes), or another grouped collective."
            )
