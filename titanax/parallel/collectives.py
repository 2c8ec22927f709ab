"""Axis-guarded collectives.

``tx.psum`` and friends compute exactly what their ``jax.lax`` namesakes do,
but first check that the axis is bound by an enclosing Titanax transform, so
that a typo or a collective in the wrong place is a clear
`CollectiveError` rather than an ``unbound axis name``.

Axes bound by JAX itself (``jax.vmap(..., axis_name=...)``, a hand-written
``jax.shard_map``) are accepted as well.

Examples:
  >>> import jax, jax.numpy as jnp, titanax as tx
  >>> mesh = tx.mesh(data=8)
  >>> @tx.data_parallel(axis="data", mesh=mesh)
  ... def total(x):
  ...     return tx.psum(x.sum(), "data")
  >>> float(total(jnp.arange(16.0)))
  120.0
  >>> tx.psum(1.0, "data")
  Traceback (most recent call last):
  ...
  titanax.errors.CollectiveError: tx.psum: axis 'data' is not bound here (no Titanax transform is active). Call it inside a step wrapped with tx.data_parallel(axis='data').
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from titanax.errors import CollectiveError

__all__ = [
    "psum",
    "pmean",
    "pmax",
    "all_gather",
    "psum_scatter",
    "ppermute",
    "all_to_all",
    "axis_index",
    "axis_size",
]

AxisName = str | tuple[str, ...]


class BoundAxis(NamedTuple):
    """An axis bound while a transform traces its body."""

    name: str
    transform: str  # e.g. "data_parallel"
    manual: bool  # True: the body sees per-replica values and may use collectives
    size: int = 0  # the axis size, when known


_BOUND: contextvars.ContextVar[tuple[BoundAxis, ...]] = contextvars.ContextVar(
    "titanax_bound_axes", default=()
)


@contextlib.contextmanager
def bind_axes(axes: Sequence[BoundAxis]) -> Iterator[None]:
    """Marks ``axes`` as bound while a transform traces its body (internal)."""
    token = _BOUND.set(_BOUND.get() + tuple(axes))
    try:
        yield
    finally:
        _BOUND.reset(token)


def bound_axes() -> tuple[BoundAxis, ...]:
    """The axes bound at this point of a trace, innermost last."""
    return _BOUND.get()


_BINDER = {"stage": "tx.pipeline(..., axis='stage')"}


def _jax_binds(name: str) -> bool:
    try:
        jax.lax.axis_size(name)
    except NameError:
        return False
    return True


def _check(fn: str, axis_name: AxisName) -> bool:
    """Raises unless every axis of ``axis_name`` is bound; returns whether all are of size 1.

    Collectives over manual axes of size 1 are identities, computed without a
    collective: XLA rejects an all-reduce over a size-1 manual axis of a
    partly manual program (``Cross-partition allreduce must be in (partial)
    manual partitioning mode``, jax 0.10.2), e.g. ``data=1`` under DP x TP.
    """
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    bound = {b.name: b for b in _BOUND.get()}
    trivial = all(n in bound and bound[n].manual and bound[n].size == 1 for n in names)
    for name in names:
        b = bound.get(name)
        if b is not None and b.manual:
            continue
        if b is not None:
            raise CollectiveError(
                f"tx.{fn}: axis {name!r} is bound by tx.{b.transform}, whose body sees "
                "global arrays: XLA inserts the communication its layouts need, so no "
                f"collective over {name!r} is written by hand. Remove the call, or pin a "
                "layout with tx.constrain."
            )
        if _jax_binds(name):
            continue
        where = (
            "bound axes: " + ", ".join(f"{b.name!r} (tx.{b.transform})" for b in bound.values())
            if bound
            else "no Titanax transform is active"
        )
        close = difflib.get_close_matches(name, list(bound), n=1)
        if close:
            fix = f"Did you mean {close[0]!r}?"
        else:
            fix = f"Call it inside a step wrapped with {_BINDER.get(name, f'tx.data_parallel(axis={name!r})')}."
        raise CollectiveError(f"tx.{fn}: axis {name!r} is not bound here ({where}). {fix}")
    return trivial


def reduces_bf16_in_f32() -> bool:
    """Whether a bfloat16 reduction traced here must run in float32 (internal).

    XLA:CPU aborts the process (``F hlo_instruction.cc] Invalid binary instruction
    opcode copy``, in ``AllReducePromotion`` -> ``ChangeOpDataType`` ->
    ``CloneAllReduce``; jaxlib 0.10.2) when it compiles a bfloat16 all-reduce or
    reduce-scatter of a *partly* manual program: a ``shard_map`` whose mesh keeps
    some axes Auto, as DP x TP, ZeRO x TP or the pipeline on ``stage x data`` do.
    Fully manual programs and float16 are not affected. That pass exists to
    reduce bf16 in float32 on CPU anyway, so reducing in float32 ourselves there
    computes what XLA:CPU would, and other backends keep their bfloat16
    collectives (half the bytes).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.abstract_device is None or mesh.abstract_device.platform != "cpu":
        return False
    manual = jax.sharding.AxisType.Manual
    return any(t != manual for t in mesh.axis_types)


def _reduce(op: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """``op(x, ...)`` leaf by leaf; bfloat16 leaves in float32 where XLA:CPU needs it."""
    if not any(jnp.result_type(v) == jnp.bfloat16 for v in jax.tree.leaves(x)):
        return op(x, *args, **kwargs)
    if not reduces_bf16_in_f32():
        return op(x, *args, **kwargs)

    def one(v: Any) -> Any:
        if jnp.result_type(v) != jnp.bfloat16:
            return op(v, *args, **kwargs)
        return op(jnp.asarray(v, jnp.float32), *args, **kwargs).astype(jnp.bfloat16)

    return jax.tree.map(one, x)


def psum(x: Any, axis_name: AxisName) -> Any:
    """Sum of ``x`` over ``axis_name``; as `jax.lax.psum`.

    On CPU, bfloat16 leaves of a partly manual program are summed in float32
    and rounded back once (XLA:CPU aborts on bf16 there; see `reduces_bf16_in_f32`).
    """
    if _check("psum", axis_name):
        return x
    return _reduce(jax.lax.psum, x, axis_name)


def pmean(x: Any, axis_name: AxisName) -> Any:
    """Mean of ``x`` over ``axis_name``; as `jax.lax.pmean` (bfloat16 on CPU: as `psum`)."""
    if _check("pmean", axis_name):
        return x
    return _reduce(jax.lax.pmean, x, axis_name)


def pmax(x: Any, axis_name: AxisName) -> Any:
    """Maximum of ``x`` over ``axis_name``; as `jax.lax.pmax` (bfloat16 on CPU: as `psum`)."""
    if _check("pmax", axis_name):
        return x
    return _reduce(jax.lax.pmax, x, axis_name)


def all_gather(x: Any, axis_name: AxisName, *, axis: int = 0, tiled: bool = False) -> Any:
    """Gathers ``x`` from every member of ``axis_name``; as `jax.lax.all_gather`."""
    if _check("all_gather", axis_name):
        return x if tiled else jax.tree.map(lambda v: jnp.expand_dims(v, axis), x)
    return jax.lax.all_gather(x, axis_name, axis=axis, tiled=tiled)


def psum_scatter(
    x: Any, axis_name: AxisName, *, scatter_dimension: int = 0, tiled: bool = False
) -> Any:
    """Sums ``x`` over ``axis_name`` and keeps this member's slice; as `jax.lax.psum_scatter`.

    bfloat16 on CPU: as `psum`.
    """
    if _check("psum_scatter", axis_name):
        return x if tiled else jnp.squeeze(x, scatter_dimension)
    return _reduce(
        jax.lax.psum_scatter, x, axis_name, scatter_dimension=scatter_dimension, tiled=tiled
    )


def ppermute(x: Any, axis_name: AxisName, perm: Sequence[tuple[int, int]]) -> Any:
    """Sends ``x`` between members of ``axis_name`` by ``perm``; as `jax.lax.ppermute`."""
    if _check("ppermute", axis_name):
        return x if (0, 0) in [tuple(p) for p in perm] else jax.tree.map(jnp.zeros_like, x)
    return jax.lax.ppermute(x, axis_name, perm)


def all_to_all(
    x: Any, axis_name: AxisName, split_axis: int, concat_axis: int, *, tiled: bool = False
) -> Any:
    """Splits, exchanges and concatenates ``x`` over ``axis_name``; as `jax.lax.all_to_all`."""
    if _check("all_to_all", axis_name):
        return x if tiled else jnp.moveaxis(x, split_axis, concat_axis)
    return jax.lax.all_to_all(x, axis_name, split_axis, concat_axis, tiled=tiled)


def axis_index(axis_name: AxisName) -> jax.Array:
    """This member's index along ``axis_name``; as `jax.lax.axis_index`."""
    if _check("axis_index", axis_name):
        return jnp.zeros((), jnp.int32)
    return jax.lax.axis_index(axis_name)


def axis_size(axis_name: AxisName) -> int:
    """The number of members of ``axis_name``; as `jax.lax.axis_size`."""
    if _check("axis_size", axis_name):
        return 1
    return jax.lax.axis_size(axis_name)
