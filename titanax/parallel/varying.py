"""Which values of a traced body vary along manual mesh axes.

The bodies of manual transforms run with ``check_vma=False`` (per-replica gradients, the
user reduces), so JAX does not track which values differ between replicas. When the
layout of an output depends on it (``fully_sharded``: is this output a shard of the new
state, or a reduced metric that happens to have a shard's shape?), this dataflow pass over
the body's jaxpr answers: a value varies along an axis when it depends on an input that is
split along it, and a reduction over the axis (``psum``, ``pmax``, ``all_gather``...) makes
it invariant again.

The pass is conservative where it cannot see: an equation with no inner jaxpr it can
follow (loops, conditionals) varies along every axis any of its inputs varies along.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.extend import core

__all__ = ["varying_axes"]

Axes = frozenset[str]
_NONE: Axes = frozenset()
_REDUCE = {"psum", "pmax", "pmin", "all_gather", "psum_invariant", "all_gather_invariant"}
_SPREAD = {"reduce_scatter", "ppermute", "all_to_all", "axis_index", "pbroadcast"}


def _names(eqn: core.JaxprEqn) -> Axes:
    axes = eqn.params.get("axes", eqn.params.get("axis_name", ()))
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return frozenset(a for a in axes if isinstance(a, str))


def _inner(eqn: core.JaxprEqn) -> core.Jaxpr | None:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, core.ClosedJaxpr):
            sub = sub.jaxpr
        if isinstance(sub, core.Jaxpr) and len(sub.invars) == len(eqn.invars):
            return sub
    return None


def varying_axes(jaxpr: core.Jaxpr, inputs: Sequence[Axes]) -> list[Axes]:
    """The manual axes each output of ``jaxpr`` varies along, given those of its inputs."""
    env: dict[Any, Axes] = dict(zip(jaxpr.invars, inputs))

    def read(v: Any) -> Axes:
        return _NONE if isinstance(v, core.Literal) else env.get(v, _NONE)

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        union = _NONE.union(*ins)
        n = len(eqn.outvars)
        name = eqn.primitive.name
        if name in _REDUCE:
            names = _names(eqn)
            outs = [v - names for v in ins] if len(ins) == n else [union - names] * n
        elif name in _SPREAD:
            outs = [union | _names(eqn)] * n
        elif (inner := _inner(eqn)) is not None:
            outs = varying_axes(inner, ins)
        else:
            outs = [union] * n
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]
