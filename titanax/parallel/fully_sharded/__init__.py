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
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, overload

import jax
from jax.sharding import Mesh, PartitionSpec

from titanax._util import leaves_with_paths, shape_of
from titanax.errors import PlanError
from titanax.extend import (
    ArgInfo,
    EnterHook,
    Layer,
    LayoutHook,
    ParallelFunction,
    TraceInfo,
    apply_layer,
    replicate,
    split_batch,
)
from titanax.parallel.fully_sharded.body import (
    clip_by_global_norm,
    gather_params,
    global_norm,
    scatter_grads,
    shard_params,
)
from titanax.parallel.fully_sharded.layouts import Leaf, Registry, registered, split_dim
from titanax.parallel.fully_sharded.optim import (
    lamb,
    lars,
    leaf_norms,
    normalize_by_update_norm,
    scale_by_trust_ratio,
)
from titanax.parallel.fully_sharded.whole_leaves import (
    refuse_whole_leaf_transforms,
    register_whole_leaf_transform,
)
from titanax.parallel.plan import _restrict, _spec_leaves

__all__ = [
    "fully_sharded",
    "split_dim",
    "gather_params",
    "scatter_grads",
    "shard_params",
    "global_norm",
    "clip_by_global_norm",
    "leaf_norms",
    "scale_by_trust_ratio",
    "lamb",
    "lars",
    "normalize_by_update_norm",
    "register_whole_leaf_transform",
]

P = PartitionSpec
Shard = Literal["params", "optimizer"]


def _is_optimizer_state(path: str, name: str) -> bool:
    """A leaf under an ``opt_state`` key, or of an argument named ``opt_state``."""
    return "opt_state" in path.split("/") or name.endswith("(opt_state)")


def _layout(axis: str, shard: Shard, min_size: int) -> LayoutHook:
    def layout(arg: Any, info: ArgInfo) -> Any:
        if info.is_batch:
            return split_batch(arg, info) if info.is_own_batch else replicate(arg)
        if info.is_replicated:
            return replicate(arg)
        size = info.mesh.shape[axis]
        specs = []
        for (path, leaf), taken in zip(leaves_with_paths(arg), _spec_leaves(info.others)):
            dim = split_dim(shape_of(leaf), taken, size, min_size)
            split = dim is not None and (shard == "params" or _is_optimizer_state(path, info.name))
            specs.append(P(*[None] * dim, axis) if split and dim is not None else P())
        return jax.tree.unflatten(jax.tree.structure(arg), specs)

    return layout


def _enter(axis: str, shard: Shard, min_size: int) -> EnterHook:
    where = f"fully_sharded(axis={axis!r})"

    @contextlib.contextmanager
    def enter(trace: TraceInfo) -> Iterator[None]:
        avals, specs, mesh, local_args = trace.args, trace.specs, trace.mesh, trace.local_args
        size = mesh.shape[axis]
        others = frozenset(mesh.axis_names) - {axis}
        states = []
        state_args = []
        received: dict[int, tuple[Any, Leaf]] = {}
        for i, (tree, spec_tree, local) in enumerate(zip(avals, specs, local_args)):
            if i in trace.batch or i in trace.replicated:
                continue
            leaves = []
            for (path, aval), spec, seen in zip(
                leaves_with_paths(tree), _spec_leaves(spec_tree), jax.tree.leaves(local)
            ):
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
                # The shape as the body sees it along the other manual axes (experts split
                # along `expert` arrive as (experts / N, ...)), whole along this one.
                shape = list(shape_of(seen))
                if stored:
                    shape[stored[0]] *= size
                leaves.append(Leaf(path, tuple(shape), dim, bool(stored), size, spec))
            states.append(jax.tree.unflatten(jax.tree.structure(tree), leaves))
            state_args.append((i, tree))
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
        split = [leaf.path for s in states for leaf in jax.tree.leaves(s) if leaf.stored_split]
        refuse_whole_leaf_transforms(where, axis, state_args, split)
        with registered(Registry(where, axis, size, tuple(states), received)):
            yield

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
      optimizers (SGD, Adam, AdamW) need nothing more, global-norm
      clipping is `clip_by_global_norm` (one scalar all-reduce), and LAMB and
      LARS are `lamb` and `lars` (one all-reduce of the per-leaf norms). Optax
      transforms that need whole leaves (optax's trust ratio, Adafactor's
      factored moments, global norms; see `register_whole_leaf_transform`) are
      a `PlanError` when the step is traced with a split leaf.

    Outputs shaped like a state argument's shards take its layout, so the new
    state is stored split; other outputs are replicated, and one that may
    still vary along ``axis`` is a `PlanError` when the step is traced, as
    under `data_parallel`. Composes with `tensor_parallel`
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
        ``batch_argnums``; at call time, a batch that does not split, an
        optimizer transform that needs whole leaves while a leaf is split, or
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
      >>> state.params.sharding.spec[0], state.params.addressable_shards[0].data.shape
      ('data', (2, 2))
      >>> w = np.asarray(state.params)                            # one whole array again
      >>> w.shape, round(float(w[0, 0]), 6), float(loss)          # what data_parallel gives
      ((16, 2), 0.1, 1.0)
    """
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
    layer = Layer(
        transform="fully_sharded",
        axis=axis,
        manual=True,
        layout=_layout(axis, shard, min_size),
        mesh=mesh,
        batch_argnums=batch_argnums,
        replicated_argnums=replicated_argnums,
        donate=bool(donate),
        sees_others=True,
        enter=_enter(axis, shard, min_size),
    )
    return apply_layer(step, layer)
