"""What a ``fully_sharded`` body writes: the gathers, reductions and norms of split state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from titanax._util import shape_of
from titanax.errors import CollectiveError
from titanax.parallel import collectives as c
from titanax.parallel.fully_sharded.layouts import Leaf, active_or_whole, layout_of
from titanax.parallel.plan import _restrict
from titanax.parallel.rules import spec_axes

__all__ = [
    "gather_params",
    "scatter_grads",
    "shard_params",
    "global_norm",
    "clip_by_global_norm",
]


def _blockwise(fn: Callable[[Any], Any], x: Any, leaf: Leaf) -> Any:
    """``fn(x)`` on each device's block of the global-view (``tensor_parallel``,
    ``pipeline`` stage) dimensions of ``x``.

    XLA replicates those dimensions around a collective over a manual axis
    (an all-gather over ``model`` before and after each all-gather over
    ``data``, measured with jax 0.10.2); running the collective inside a
    ``shard_map`` over those axes keeps it to the data shards.
    """
    auto = frozenset(b.name for b in c.bound_axes() if not b.manual)
    spec = _restrict(leaf.spec, auto)
    if not spec_axes(spec):
        return fn(x)
    return jax.shard_map(
        fn, in_specs=spec, out_specs=spec, axis_names=set(spec_axes(spec)), check_vma=False
    )(x)


def _gather(x: Any, leaf: Leaf, axis: str) -> Any:
    if leaf.dim is None:
        return x
    dim = leaf.dim
    return _blockwise(lambda a: c.all_gather(a, axis, axis=dim, tiled=True), x, leaf)


def _scatter(x: Any, leaf: Leaf, axis: str, mean: bool) -> Any:
    if leaf.dim is None:
        return (c.pmean if mean else c.psum)(x, axis)
    dim = leaf.dim
    out = _blockwise(lambda a: c.psum_scatter(a, axis, scatter_dimension=dim, tiled=True), x, leaf)
    return out / leaf.size if mean else out


def gather_params(
    tree: Any,
    axis: str = "data",
    *,
    vjp: Literal["mean", "sum"] | None = None,
    like: Any = None,
    dtype: Any = None,
) -> Any:
    """The whole of each leaf of ``tree`` that is stored split along ``axis``: one
    all-gather per split leaf (replicated leaves pass as they are).

    ``tree`` is part of a ``fully_sharded`` state as the body received it
    (``state.params``), or shards shaped like it (ZeRO-1's updated shard).

    Gather before ``jax.value_and_grad`` and reduce the whole gradients with
    `scatter_grads`; or gather *inside* the differentiated function (a layer
    at a time, under ``jax.checkpoint`` so that the backward pass gathers
    again instead of keeping whole parameters) and say how its gradient is
    reduced: ``vjp="mean"`` (or ``"sum"``) makes the backward pass of this
    gather a reduce-scatter over ``axis`` (an all-reduce for replicated
    leaves), so the gradients come back as reduced shards. With ``vjp=None``
    differentiating through the gather is an error: its transpose is a
    reduction, and Titanax inserts none that the step does not name.

    The layout of each leaf is known when ``tree`` holds leaves as the body
    received them; any other tree is matched by structure and shapes to part
    of the state (or to one slice of it along leading stacked dimensions, a
    layer inside a ``lax.scan``). ``like=`` names the received leaves whose
    layout ``tree`` has, where the shapes alone are ambiguous.

    ``dtype=jnp.bfloat16`` is mixed precision (as PyTorch FSDP's
    ``param_dtype`` with ``reduce_dtype=float32``): each floating shard is cast
    to ``dtype`` *before* the all-gather, so the gather moves half the bytes of
    float32 and the model computes in bfloat16, while the gradient flowing
    back through the gather (``vjp=``) is cast to the shard's own dtype
    (float32 master parameters) *before* its reduce-scatter, so gradients are
    reduced and returned in float32.

    Raises:
      CollectiveError: outside a ``fully_sharded`` body over ``axis``, a tree
        that matches no part of the state, a leaf that is already whole, or
        a gradient taken through the gather with ``vjp=None``.
    """
    if vjp not in (None, "mean", "sum"):
        raise CollectiveError(f"tx.gather_params: vjp must be None, 'mean' or 'sum', got {vjp!r}.")
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise CollectiveError(
            f"tx.gather_params: dtype must be a floating dtype (e.g. jnp.bfloat16), got {dtype!r}."
        )
    infos = layout_of("gather_params", tree, axis, like)

    def one(x: Any, leaf: Leaf) -> Any:
        if leaf.dim is not None and shape_of(x) != leaf.shard_shape:
            raise CollectiveError(
                f"tx.gather_params: {leaf.path} is already whole {leaf.shape} (stored "
                f"replicated{', shard=' + repr('optimizer') if not leaf.stored_split else ''}); "
                "gather shards only."
            )

        wide = jnp.result_type(x)
        narrow = dtype if dtype is not None and jnp.issubdtype(wide, jnp.floating) else wide

        @jax.custom_vjp
        def gather(a: Any) -> Any:
            return _gather(a.astype(narrow), leaf, axis)

        def backward(_: None, ct: Any) -> tuple[Any]:
            if vjp is None:
                raise CollectiveError(
                    f"tx.gather_params: a gradient was taken through the gather of {leaf.path}; "
                    "its transpose is a reduction over "
                    f"{axis!r}, which Titanax does not insert unasked. Gather before "
                    "jax.value_and_grad and reduce with tx.scatter_grads, or pass "
                    f"vjp='mean' to reduce-scatter the gradient in the backward pass."
                )
            return (_scatter(ct.astype(wide), leaf, axis, vjp == "mean"),)

        gather.defvjp(lambda a: (gather(a), None), backward)
        return gather(x)

    return jax.tree.unflatten(jax.tree.structure(tree), map(one, jax.tree.leaves(tree), infos))


def scatter_grads(tree: Any, axis: str = "data", *, mean: bool = True, like: Any = None) -> Any:
    """Each device's shard of the mean (or sum) over ``axis`` of whole gradients:
    one reduce-scatter per leaf split by the layout, one all-reduce per replicated leaf.

    The result is laid out like the state's shards, ready for
    ``state.apply_gradients``. This is the reduction of ``fully_sharded``,
    as ``tx.pmean(grads, axis)`` is that of ``data_parallel``. ``like=``: the
    parameters as the body received them, where shapes alone are ambiguous
    (see `gather_params`).

    Raises:
      CollectiveError: outside a ``fully_sharded`` body over ``axis``, a tree
        that matches no part of the state, or a leaf that is already a shard.
    """
    infos = layout_of("scatter_grads", tree, axis, like)

    def one(x: Any, leaf: Leaf) -> Any:
        if shape_of(x) != leaf.shape:
            raise CollectiveError(
                f"tx.scatter_grads: {leaf.path} has the shard's shape {shape_of(x)}, not "
                f"the whole {leaf.shape}: take gradients with respect to gathered parameters."
            )
        return _scatter(x, leaf, axis, mean)

    return jax.tree.unflatten(jax.tree.structure(tree), map(one, jax.tree.leaves(tree), infos))


def shard_params(tree: Any, axis: str = "data", *, like: Any = None) -> Any:
    """This device's shard of each whole leaf of ``tree`` (no communication): under
    ZeRO-1, the slice of the replicated parameters that this device updates."""
    infos = layout_of("shard_params", tree, axis, like)
    index = c.axis_index(axis)

    def one(x: Any, leaf: Leaf) -> Any:
        if leaf.dim is None:
            return x
        if shape_of(x) != leaf.shape:
            raise CollectiveError(f"tx.shard_params: {leaf.path} is already a shard.")
        n = leaf.shard_shape[leaf.dim]
        return jax.lax.dynamic_slice_in_dim(x, index * n, n, axis=leaf.dim)

    return jax.tree.unflatten(jax.tree.structure(tree), map(one, jax.tree.leaves(tree), infos))


def global_norm(tree: Any, axis: str = "data") -> jax.Array:
    """The L2 norm of the whole of ``tree``, whose leaves may be shards along ``axis``.

    Shards' squares are summed with one scalar ``psum`` over ``axis``;
    replicated leaves are counted once. Outside a ``fully_sharded`` body
    nothing is split and this is ``optax.tree.norm(tree)``.
    """
    if active_or_whole("global_norm", axis) is None:
        return optax.tree.norm(tree)
    split_leaf = [
        leaf.holds_shard(shape_of(x))
        for x, leaf in zip(jax.tree.leaves(tree), layout_of("global_norm", tree, axis))
    ]
    split = jnp.zeros((), jnp.float32)
    whole = jnp.zeros((), jnp.float32)
    for x, is_split in zip(jax.tree.leaves(tree), split_leaf):
        sq = jnp.sum(jnp.square(jnp.abs(x))).astype(jnp.float32)
        if is_split:
            split = split + sq
        else:
            whole = whole + sq
    return jnp.sqrt(c.psum(split, axis) + whole)


def clip_by_global_norm(max_norm: float, axis: str = "data") -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` for gradients that may be shards along ``axis``.

    The same update (and the same empty state) as optax's, with the norm from
    `global_norm`: under ``fully_sharded`` one scalar all-reduce over ``axis``;
    elsewhere exactly optax's norm, so one optimizer serves both.

    Examples:
      >>> import jax.numpy as jnp, optax, titanax as tx
      >>> opt = optax.chain(tx.clip_by_global_norm(1.0), optax.sgd(1.0))
      >>> updates, _ = opt.update({"w": jnp.array([3.0, 4.0])}, opt.init({"w": jnp.zeros(2)}))
      >>> updates["w"]
      Array([-0.6, -0.8], dtype=float32)
    """

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        norm = global_norm(updates, axis)
        trigger = jnp.squeeze(norm < max_norm)
        clip = lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm)  # noqa: E731
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)
