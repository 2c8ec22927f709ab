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
import numpy as np

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
    stage = pipeline_axis()
    if stage in names and fn not in ("axis_index", "axis_size"):
        raise CollectiveError(
            f"tx.{fn}: axis {stage!r} is the axis of the enclosing tx.pipeline, and this "
            "call is inside its stage or loss function: at each tick the devices along "
            f"{stage!r} run different stages (or none), so a collective over {stage!r} "
            "there would pair values of unrelated stages. The pipeline carries activations "
            "between stages itself; reduce over the axis outside the pipe(...) call."
        )
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
    """Sends ``x`` between members of ``axis_name`` by ``perm``; as `jax.lax.ppermute`.

    Inside a `tx.pipeline` stage or loss it runs as an ``all_to_all`` (same result and
    gradient; see `_ppermute_in_stage`), where a plain ``jax.lax.ppermute`` gives wrong
    values on XLA:CPU.
    """
    if _check("ppermute", axis_name):
        return x if (0, 0) in [tuple(p) for p in perm] else jax.tree.map(jnp.zeros_like, x)
    if pipeline_axis() is not None:  # inside a stage: see _ppermute_in_stage
        return _ppermute_in_stage(x, axis_name, perm)
    return jax.lax.ppermute(x, axis_name, perm)


def pipeline_axis() -> str | None:
    """The axis of the innermost `tx.pipeline` whose stages are being traced (internal)."""
    return next((b.name for b in reversed(_BOUND.get()) if b.transform == "pipeline"), None)


def _ppermute_in_stage(x: Any, axis_name: AxisName, perm: Sequence[tuple[int, int]]) -> Any:
    """``ppermute`` inside a pipeline stage, as an ``all_to_all`` (internal).

    The stage runs inside the executor's per-tick ``lax.switch``, which only the
    devices of one stage take. XLA:CPU meets every collective-permute of the
    program in one rendezvous of all devices keyed by its channel id (jaxlib
    0.10.2: every permute gets ``channel_id=1``), whatever its pairs: a stage's
    permute met the other stage's pipeline permute and both moved the wrong data,
    without an error (measured: loss 12.0 against 15.6), even with pairs kept
    inside one stage. Grouped collectives rendezvous per group, and a group over
    axes other than the pipeline axis never spans two stages. So the value goes
    to its target in slot ``target`` of an ``all_to_all`` (zeros elsewhere): the
    same result and gradient as ``ppermute``, for ``n - 1`` times its bytes and
    an ``n``-slot buffer (``n`` the axis size).
    """
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    n = int(np.prod([jax.lax.axis_size(a) for a in names]))
    target, source = np.full(n, -1, np.int32), np.full(n, -1, np.int32)
    srcs, dsts = [int(a) for a, _ in perm], [int(b) for _, b in perm]
    if (
        len(set(srcs)) < len(srcs)
        or len(set(dsts)) < len(dsts)
        or not all(0 <= i < n for i in srcs + dsts)
    ):
        raise CollectiveError(
            f"tx.ppermute over {axis_name!r}: perm={list(perm)!r} is not a permutation of "
            f"members 0..{n - 1} (each source and each target at most once)."
        )
    for a, b in perm:
        target[int(a)], source[int(b)] = int(b), int(a)
    me = jax.lax.axis_index(names)
    to, frm = jnp.asarray(target)[me], jnp.asarray(source)[me]
    slots = jnp.arange(n)

    def one(v: Any) -> Any:
        mask = (slots == to).reshape(n, *([1] * v.ndim))
        send = jnp.where(mask, v[None], jnp.zeros((), v.dtype))
        got = jax.lax.all_to_all(send, names, 0, 0)  # got[j]: what member j sent here
        picked = jax.lax.dynamic_index_in_dim(got, jnp.maximum(frm, 0), keepdims=False)
        return jnp.where(frm >= 0, picked, jnp.zeros((), v.dtype))

    return jax.tree.map(one, x)


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
