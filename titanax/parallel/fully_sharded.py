"""``tx.fully_sharded``: data parallelism whose state is stored split along the data axis.

ZeRO-3 (``shard="params"``): parameters and optimizer state are split; the body
gathers the parameters with `gather_params` (one all-gather per split leaf) and
reduces the gradients with `scatter_grads` (one reduce-scatter per split leaf),
so each device keeps, updates and stores only its shard. ZeRO-1
(``shard="optimizer"``): parameters stay replicated, the optimizer state and the
update are split. Every collective is written in the step, as with
``data_parallel``'s ``tx.pmean``.

Which dimension of a leaf is split is a rule, not a search: the largest
dimension that divides by the axis size and that no other transform of the
stack (a ``tensor_parallel`` rule, a pipeline's stage rows) already splits.
Leaves with fewer than ``min_size`` elements, or with no such dimension, stay
replicated. The body's helpers know the layout of every leaf the body received,
and find that of other trees (gradients, updated shards, a layer sliced out of
stacked layers) by structure and shapes; see `gather_params`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from titanax._util import bullets, count, leaves_with_paths, shape_of
from titanax.errors import CollectiveError, PlanError
from titanax.parallel import collectives as c
from titanax.parallel.data_parallel import _layout as _batch_layout
from titanax.parallel.function import ParallelFunction, apply_layer
from titanax.parallel.plan import (
    ArgInfo,
    Layer,
    _restrict,
    _spec_leaves,
    check_axis,
    normalize_argnums,
    resolve_argnums,
)
from titanax.parallel.rules import spec_axes

__all__ = [
    "fully_sharded",
    "split_dim",
    "gather_params",
    "scatter_grads",
    "shard_params",
    "global_norm",
    "clip_by_global_norm",
]

P = PartitionSpec
Shard = Literal["params", "optimizer"]


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """What the body's helpers know of one state leaf (a pytree leaf, on purpose)."""

    path: str
    shape: tuple[int, ...]  # the whole leaf
    dim: int | None  # the dimension the rule splits; None: never split
    stored_split: bool  # whether the body receives a shard of it
    size: int  # the axis size
    spec: PartitionSpec  # its layout over the whole mesh

    @property
    def shard_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        return tuple(s // self.size if d == self.dim else s for d, s in enumerate(self.shape))

    def inner(self, k: int) -> _Leaf | None:
        """The layout of one slice ``x[i_0, ..., i_{k-1}]`` (a layer of stacked layers), or
        ``None`` when the slice would cut the split dimension."""
        if k == 0:
            return self
        if self.dim is not None and self.dim < k:
            return None
        dim = None if self.dim is None else self.dim - k
        spec = P(*tuple(self.spec)[k:])
        return dataclasses.replace(self, shape=self.shape[k:], dim=dim, spec=spec)


class _Registry(NamedTuple):
    where: str  # "fully_sharded(axis='data')"
    axis: str
    size: int
    states: tuple[Any, ...]  # one tree of _Leaf per non-batch argument
    received: dict[int, tuple[Any, _Leaf]]  # id(leaf the body received) -> (the leaf, layout)


_ACTIVE: contextvars.ContextVar[tuple[_Registry, ...]] = contextvars.ContextVar(
    "titanax_fully_sharded", default=()
)


def _active(axis: str) -> _Registry | None:
    return next((r for r in reversed(_ACTIVE.get()) if r.axis == axis), None)


def split_dim(shape: Sequence[int], taken: PartitionSpec, size: int, min_size: int) -> int | None:
    """The dimension ``fully_sharded`` splits: the largest one that ``size`` divides and
    ``taken`` (the other transforms' spec) leaves free; ``None`` for a leaf with fewer
    than ``min_size`` elements or no such dimension.

    >>> split_dim((512, 2048), P(), 8, 1024), split_dim((512, 2048), P(None, "model"), 8, 1024)
    (1, 0)
    >>> split_dim((30,), P(), 8, 1024) is None      # too small, and 8 does not divide 30
    True
    """
    if not shape or math.prod(shape) < max(min_size, 1):
        return None
    used = {d for d, entry in enumerate(taken) if entry is not None}
    free = [d for d, n in enumerate(shape) if d not in used and n >= size and n % size == 0]
    return max(free, key=lambda d: (shape[d], -d)) if free else None


def _is_optimizer_state(path: str, name: str) -> bool:
    """A leaf under an ``opt_state`` key, or of an argument named ``opt_state``."""
    return "opt_state" in path.split("/") or name.endswith("(opt_state)")


def _layout(
    axis: str, shard: Shard, min_size: int, whole: tuple[int, ...]
) -> Callable[[Any, ArgInfo], Any]:
    batch_layout = _batch_layout(axis, f"fully_sharded(axis={axis!r})")

    def layout(arg: Any, info: ArgInfo) -> Any:
        if info.is_batch:
            return batch_layout(arg, info)
        if info.position in resolve_argnums(whole, info.nargs):
            return jax.tree.map(lambda _: P(), arg)
        size = info.mesh.shape[axis]
        specs = []
        for (path, leaf), taken in zip(leaves_with_paths(arg), _spec_leaves(info.others)):
            dim = split_dim(shape_of(leaf), taken, size, min_size)
            split = dim is not None and (shard == "params" or _is_optimizer_state(path, info.name))
            specs.append(P(*[None] * dim, axis) if split and dim is not None else P())
        return jax.tree.unflatten(jax.tree.structure(arg), specs)

    return layout


def _enter(axis: str, shard: Shard, min_size: int, whole: tuple[int, ...]) -> Callable[..., Any]:
    where = f"fully_sharded(axis={axis!r})"

    @contextlib.contextmanager
    def enter(
        avals: Sequence[Any],
        specs: Sequence[Any],
        mesh: Mesh,
        batch: frozenset[int],
        local_args: Sequence[Any],
    ) -> Iterator[None]:
        size = mesh.shape[axis]
        others = frozenset(mesh.axis_names) - {axis}
        states = []
        received: dict[int, tuple[Any, _Leaf]] = {}
        for i, (tree, spec_tree, local) in enumerate(zip(avals, specs, local_args)):
            if i in batch or i in resolve_argnums(whole, len(avals)):
                continue
            leaves = []
            for (path, aval), spec in zip(leaves_with_paths(tree), _spec_leaves(spec_tree)):
                stored = [
                    d
                    for d, e in enumerate(spec)
                    if axis in ((e,) if isinstance(e, str) else e or ())
                ]
                dim = (
                    stored[0]
                    if stored
                    else split_dim(aval.shape, _restrict(spec, others), size, min_size)
                )
                leaves.append(_Leaf(path, aval.shape, dim, bool(stored), size, spec))
            states.append(jax.tree.unflatten(jax.tree.structure(tree), leaves))
            for x, leaf in zip(jax.tree.leaves(local), leaves):
                received[id(x)] = (x, leaf)  # the leaf itself is kept, so its id stays its own
        if (
            shard == "optimizer"
            and not any(leaf.stored_split for s in states for leaf in jax.tree.leaves(s))
            and any(leaf.dim is not None for s in states for leaf in jax.tree.leaves(s))
        ):
            raise PlanError(
                f"{where}: shard='optimizer' splits the optimizer state, the leaves under an "
                "'opt_state' key or of an argument named opt_state, but this step has none. "
                "Pass a tx.TrainState (or name the argument opt_state); a step without "
                "optimizer state (evaluation) needs no fully_sharded: use tx.data_parallel."
            )
        registry = _Registry(where, axis, size, tuple(states), received)
        token = _ACTIVE.set((*_ACTIVE.get(), registry))
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    return enter


@overload
def fully_sharded(
    step: None = None,
    /,
    *,
    axis: str = "data",
    mesh: Mesh | None = None,
    shard: Shard = "params",
    min_size: int = 1024,
    batch_argnums: int | Sequence[int] = (-1,),
    replicated_argnums: int | Sequence[int] = (),
    donate: bool = True,
) -> Callable[[Callable[..., Any]], ParallelFunction]: ...


@overload
def fully_sharded(
    step: Callable[..., Any],
    /,
    *,
    axis: str = "data",
    mesh: Mesh | None = None,
    shard: Shard = "params",
    min_size: int = 1024,
    batch_argnums: int | Sequence[int] = (-1,),
    replicated_argnums: int | Sequence[int] = (),
    donate: bool = True,
) -> ParallelFunction: ...


def fully_sharded(
    step: Callable[..., Any] | None = None,
    /,
    *,
    axis: str = "data",
    mesh: Mesh | None = None,
    shard: Shard = "params",
    min_size: int = 1024,
    batch_argnums: int | Sequence[int] = (-1,),
    replicated_argnums: int | Sequence[int] = (),
    donate: bool = True,
) -> ParallelFunction | Callable[[Callable[..., Any]], ParallelFunction]:
    """Data parallelism with the state stored split along ``axis`` (ZeRO-3, or ZeRO-1).

    Batches are split along ``axis`` as in `data_parallel`, and the body sees
    per-replica values. Every leaf with at least ``min_size`` elements of
    the other arguments (the state; not those in ``replicated_argnums``) is stored split along ``axis`` on one dimension (the largest
    that the axis size divides and no other transform of the stack splits;
    see `split_dim`): with ``shard="params"`` (ZeRO-3) the parameters and the
    optimizer state, with ``shard="optimizer"`` (ZeRO-1) only the leaves under
    an ``opt_state`` key. The body therefore receives shards, and writes the
    communication itself:

    * `gather_params` (an all-gather per split leaf) before the parameters are used,
    * `scatter_grads` (a reduce-scatter per split leaf, a mean over ``axis``)
      so that each device keeps its shard of the mean gradient,
    * ``state.apply_gradients`` then updates shards with shards; element-wise
      optimizers (SGD, Adam, AdamW) need nothing more, and global-norm
      clipping is `clip_by_global_norm` (one scalar all-reduce).

    Outputs shaped like a state argument's shards take its layout, so the new
    state is stored split; other outputs are replicated and checked on the
    first call, as under `data_parallel`. Composes with `tensor_parallel`
    (mesh ``data x model``: a leaf split over ``model`` by a rule is split
    over ``data`` on another dimension) and with `pipeline` (stage rows stay
    on ``stage``, each stage's parameters are split over ``data``).

    Args:
      step: the step function; omit it to use ``fully_sharded(...)`` as a decorator.
      axis: the data axis: batches and state are split along it.
      mesh: the mesh; defaults to one given to another transform of the stack,
        or set with ``jax.set_mesh``.
      shard: ``"params"`` (ZeRO-3) or ``"optimizer"`` (ZeRO-1).
      min_size: leaves with fewer elements stay replicated (biases, norms,
        scalars), so that they cost no collective of their own.
      batch_argnums: positions of the batch arguments (negative counts from the end).
      replicated_argnums: positions of non-batch arguments that are not state
        (a constant table, a mask): kept whole on every device, never split
        and never donated.
      donate: donate the non-batch arguments (the state) to the output.

    Returns:
      A `ParallelFunction`, or a decorator when ``step`` is omitted.

    Raises:
      PlanError: a bad ``axis``, ``mesh``, ``shard``, ``min_size`` or
        ``batch_argnums``; at call time, a batch that does not split, or
        outputs that differ between replicas.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, optax, titanax as tx
      >>> mesh = tx.mesh(data=8)
      >>> def loss_fn(w, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ w - y) ** 2)
      >>> @tx.fully_sharded(axis="data", mesh=mesh, min_size=8)
      ... def step(state, batch):
      ...     w = tx.gather_params(state.params, "data")      # all-gather: whole w
      ...     loss, g = jax.value_and_grad(loss_fn)(w, batch)
      ...     g = tx.scatter_grads(g, "data")                   # reduce-scatter: this shard
      ...     return state.apply_gradients(g), tx.pmean(loss, "data")
      >>> state = tx.TrainState.create(jnp.zeros((16, 2)), optax.sgd(0.1))
      >>> x, y = jnp.ones((32, 16)), jnp.ones((32, 2))
      >>> state, loss = step(state, (x, y))
      >>> state.params.sharding.spec, state.params.addressable_shards[0].data.shape
      (P('data', None), (2, 2))
      >>> w = np.asarray(state.params)                            # one whole array again
      >>> w.shape, round(float(w[0, 0]), 6), float(loss)          # what data_parallel gives
      ((16, 2), 0.1, 1.0)
    """
    check_axis("fully_sharded", axis, mesh)
    if shard not in ("params", "optimizer"):
        raise PlanError(
            f"fully_sharded(axis={axis!r}): shard must be 'params' (ZeRO-3: parameters and "
            f"optimizer state split) or 'optimizer' (ZeRO-1), got {shard!r}."
        )
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise PlanError(
            f"fully_sharded(axis={axis!r}): min_size must be a number of elements (an int >= 0), "
            f"got {min_size!r}."
        )
    nums = normalize_argnums("fully_sharded", batch_argnums)
    whole = normalize_argnums("fully_sharded", replicated_argnums, "replicated_argnums")
    layer = Layer(
        "fully_sharded",
        axis,
        True,
        mesh,
        nums,
        _layout(axis, shard, min_size, whole),
        bool(donate),
        sees_others=True,
        enter=_enter(axis, shard, min_size, whole),
        keep_argnums=whole,
    )
    return apply_layer(step, layer)


def _registry(fn: str, axis: str) -> _Registry:
    reg = _active(axis)
    if reg is None:
        c._check(fn, axis)  # an unbound axis: the guarded collectives' error
        raise CollectiveError(
            f"tx.{fn}: axis {axis!r} is not bound by tx.fully_sharded here, so nothing is "
            f"stored split along it. Wrap the step with tx.fully_sharded(axis={axis!r}), or "
            f"use tx.pmean(grads, {axis!r}) under data_parallel."
        )
    return reg


def _layout_of(fn: str, tree: Any, axis: str, like: Any = None) -> list[_Leaf]:
    """The `_Leaf` of every leaf of ``tree``.

    Leaves the body received as they are are known exactly. Any other tree is matched,
    by structure and shapes, to part of a state argument (``state.params``, its
    gradients, ZeRO-1's updated shards), or to one slice of it along leading stacked
    dimensions (a layer inside a ``lax.scan`` over stacked layers). ``like``: a tree the
    body received, whose layout ``tree`` has.
    """
    reg = _registry(fn, axis)
    ref = tree if like is None else like
    leaves = jax.tree.leaves(ref)
    same: bool = jax.tree.structure(like) == jax.tree.structure(tree)  # type: ignore[operator]
    if like is not None and not same:
        raise CollectiveError(
            f"tx.{fn}: like= must have the structure of the tree given "
            f"({jax.tree.structure(like)} vs {jax.tree.structure(tree)})."
        )
    known = [reg.received.get(id(x)) for x in leaves]
    if all(k is not None and k[0] is x for k, x in zip(known, leaves)):
        return [k[1] for k in known if k is not None]
    if like is not None:
        raise CollectiveError(
            f"tx.{fn}: like= must be leaves the step received as they are (e.g. "
            "state.params['mlp']['kernel']), not values computed from them."
        )
    treedef: Any = jax.tree.structure(tree)
    shapes = [shape_of(x) for x in leaves]
    found: list[list[_Leaf]] = []
    near: list[str] = []
    for state in reg.states:
        parts = jax.tree.leaves(state, is_leaf=lambda n: jax.tree.structure(n) == treedef)
        for part in parts:
            if jax.tree.structure(part) != treedef:
                continue
            match = _match(jax.tree.leaves(part), shapes, near)
            key = _key(match or [], axis)
            if match is not None and all(key != _key(f, axis) for f in found):
                found.append(match)
    if not found and (by_path := _by_path(tree, reg, axis)) is not None:
        return by_path
    if not found:
        detail = f" Closest parts of the state differ in shape:\n{bullets(near)}" if near else ""
        raise CollectiveError(
            f"tx.{fn}: the tree given ({count(len(shapes), 'leaf', 'leaves')}) is not laid out "
            f"by {reg.where}: it must have the structure and shapes of part of a state "
            "argument, e.g. state.params, or the gradients of state.params." + detail
        )
    if len(found) > 1:
        raise CollectiveError(
            f"tx.{fn}: the tree given matches several parts of the state that are laid out "
            f"differently ({', '.join(f[0].path for f in found)}...). Pass like= the leaves "
            "the step received for it (e.g. like=state.params['mlp']['up']['kernel'])."
        )
    return found[0]


def _by_path(tree: Any, reg: _Registry, axis: str) -> list[_Leaf] | None:
    """Layouts found leaf by leaf: a state leaf whose path ends with the leaf's path and whose
    whole or shard shape it has (a tree of some of the gradients, e.g. under ``optax.masked``).
    ``None`` unless every leaf finds layouts and they agree."""
    state_leaves = [a for state in reg.states for a in jax.tree.leaves(state)]
    out = []
    for path, x in leaves_with_paths(tree):
        if not path:
            return None
        shape = shape_of(x)
        hits = [
            a
            for a in state_leaves
            if (a.path == path or a.path.endswith("/" + path)) and shape in (a.shape, a.shard_shape)
        ]
        if not hits or len({tuple(_key([a], axis)) for a in hits}) > 1:
            return None
        out.append(hits[0])
    return out


def _key(leaves: list[_Leaf], axis: str) -> list[tuple[Any, ...]]:
    """What a helper does with each leaf: the split dimension and the other axes' layout."""

    def others(a: _Leaf) -> tuple[Any, ...]:
        entries = list(_restrict(a.spec, frozenset(spec_axes(a.spec)) - {axis}))
        while entries and entries[-1] is None:
            entries.pop()
        return tuple(entries)

    return [(a.dim, others(a)) for a in leaves]


def _match(part: list[_Leaf], shapes: list[tuple[int, ...]], near: list[str]) -> list[_Leaf] | None:
    """``part``'s layouts if ``shapes`` are its whole or shard shapes, or those of one slice
    along the same number of leading dimensions of every leaf."""
    for k in range(1 + min((len(a.shape) for a in part), default=0)):
        inner = [a.inner(k) for a in part]
        if all(
            a is not None and shape in (a.shape, a.shard_shape) for a, shape in zip(inner, shapes)
        ):
            return [a for a in inner if a is not None]
    bad = [
        f"{a.path}: {shape} is neither {a.shape} nor the shard {a.shard_shape}"
        for a, shape in zip(part, shapes)
        if shape not in (a.shape, a.shard_shape)
    ]
    near.extend(bad[:1])
    return None


def _blockwise(fn: Callable[[Any], Any], x: Any, leaf: _Leaf) -> Any:
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


def _gather(x: Any, leaf: _Leaf, axis: str) -> Any:
    if leaf.dim is None:
        return x
    dim = leaf.dim
    return _blockwise(lambda a: c.all_gather(a, axis, axis=dim, tiled=True), x, leaf)


def _scatter(x: Any, leaf: _Leaf, axis: str, mean: bool) -> Any:
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

    Raises:
      CollectiveError: outside a ``fully_sharded`` body over ``axis``, a tree
        that matches no part of the state, a leaf that is already whole, or
        a gradient taken through the gather with ``vjp=None``.
    """
    if vjp not in (None, "mean", "sum"):
        raise CollectiveError(f"tx.gather_params: vjp must be None, 'mean' or 'sum', got {vjp!r}.")
    infos = _layout_of("gather_params", tree, axis, like)

    def one(x: Any, leaf: _Leaf) -> Any:
        if leaf.dim is not None and shape_of(x) != leaf.shard_shape:
            raise CollectiveError(
                f"tx.gather_params: {leaf.path} is already whole {leaf.shape} (stored "
                f"replicated{', shard=' + repr('optimizer') if not leaf.stored_split else ''}); "
                "gather shards only."
            )

        @jax.custom_vjp
        def gather(a: Any) -> Any:
            return _gather(a, leaf, axis)

        def backward(_: None, ct: Any) -> tuple[Any]:
            if vjp is None:
                raise CollectiveError(
                    f"tx.gather_params: a gradient was taken through the gather of {leaf.path}; "
                    "its transpose is a reduction over "
                    f"{axis!r}, which Titanax does not insert unasked. Gather before "
                    "jax.value_and_grad and reduce with tx.scatter_grads, or pass "
                    f"vjp='mean' to reduce-scatter the gradient in the backward pass."
                )
            return (_scatter(ct, leaf, axis, vjp == "mean"),)

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
    infos = _layout_of("scatter_grads", tree, axis, like)

    def one(x: Any, leaf: _Leaf) -> Any:
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
    infos = _layout_of("shard_params", tree, axis, like)
    index = c.axis_index(axis)

    def one(x: Any, leaf: _Leaf) -> Any:
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
    if _active(axis) is None:
        return optax.tree.norm(tree)
    split_leaf = [
        leaf.dim is not None and leaf.size > 1 and shape_of(x) == leaf.shard_shape
        for x, leaf in zip(jax.tree.leaves(tree), _layout_of("global_norm", tree, axis))
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
