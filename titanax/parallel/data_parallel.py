"""``tx.data_parallel``: one replica of the step per member of a mesh axis."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

from jax.sharding import Mesh

from titanax.extend import ArgInfo, Layer, ParallelFunction, apply_layer, replicate, split_batch

__all__ = ["data_parallel"]

F = TypeVar("F", bound=Callable[..., Any])


def _layout(arg: Any, info: ArgInfo) -> Any:
    """Its batches split on their leading dimension along the axis; everything else whole."""
    return split_batch(arg, info) if info.is_own_batch else replicate(arg)


@overload
def data_parallel(
    step: None = None,
    /,
    *,
    axis: str = "data",
    mesh: Mesh | None = None,
    batch_argnums: int | Sequence[int] = (-1,),
    replicated_argnums: int | Sequence[int] = (),
    donate: bool = True,
) -> Callable[[Callable[..., Any]], ParallelFunction]: ...


@overload
def data_parallel(
    step: Callable[..., Any],
    /,
    *,
    axis: str = "data",
    mesh: Mesh | None = None,
    batch_argnums: int | Sequence[int] = (-1,),
    replicated_argnums: int | Sequence[int] = (),
    donate: bool = True,
) -> ParallelFunction: ...


def data_parallel(
    step: Callable[..., Any] | None = None,
    /,
    *,
    axis: str = "data",
    mesh: Mesh | None = None,
    batch_argnums: int | Sequence[int] = (-1,),
    replicated_argnums: int | Sequence[int] = (),
    donate: bool = True,
) -> ParallelFunction | Callable[[Callable[..., Any]], ParallelFunction]:
    """Runs ``step`` once per replica along the mesh axis ``axis``.

    Batch arguments are split on their leading dimension across the replicas;
    every other argument is replicated. The body sees per-replica values, like
    ``pmap``: gradients are per-replica, and **you** reduce them, with
    ``tx.pmean(grads, axis)``, as well as every metric you return. Titanax
    inserts no reduction of its own. (The gradient of a replicated argument
    is *not* silently summed across replicas, as it would be under
    ``jax.shard_map``'s default.)

    Outputs shaped like a non-batch argument (the new state) take its layout;
    every other output is replicated. Whether an output is reduced is decided
    from the traced program, before it runs (see DESIGN.md, "Checks by type,
    not by value"): a replicated output that may still differ between replicas
    (a gradient or a metric never passed through ``tx.pmean``) is a
    `PlanError` naming the leaves, raised before anything is donated, and
    never a silent pick of one replica.

    Donation: the state, that is each non-batch argument that an output
    replaces (same tree structure and shapes), is donated to that output, so
    the step updates it in place and the arrays passed in are deleted.
    Constants (``replicated_argnums``, arguments no output replaces) are never
    donated. Donated leaves that are one array (tied weights) are copied
    first.

    Args:
      step: the step function; omit it to use ``data_parallel(...)`` as a decorator.
      axis: the mesh axis to replicate over.
      mesh: the mesh; defaults to one given to another transform of the stack,
        or set with ``jax.set_mesh``.
      batch_argnums: positions of the batch arguments (negative counts from the end).
      replicated_argnums: positions of non-batch arguments that are not state
        (a constant table, a frozen base model, a mask): kept whole on every
        device and never donated, even when an output has their shape.
      donate: donate the state (the non-batch arguments an output replaces) to
        that output, so the step updates it in place.

    Returns:
      A `ParallelFunction`.

    Raises:
      PlanError: a bad ``axis``, ``mesh``, ``batch_argnums`` or
        ``replicated_argnums``; at call time, a batch leaf whose leading
        dimension does not divide by the axis size, replicated outputs that may
        differ between replicas, or an input array deleted by an earlier call
        (donated).

    Examples:
      >>> import jax, jax.numpy as jnp, titanax as tx
      >>> mesh = tx.mesh(data=8)
      >>> def loss_fn(w, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ w - y) ** 2)
      >>> @tx.data_parallel(axis="data", mesh=mesh)
      ... def sgd_step(w, batch):
      ...     loss, grad = jax.value_and_grad(loss_fn)(w, batch)
      ...     grad = tx.pmean(grad, "data")        # the one reduction, written by you
      ...     return w - 0.1 * grad, tx.pmean(loss, "data")
      >>> x = jnp.ones((16, 3)); y = jnp.ones((16,))
      >>> w, loss = sgd_step(jnp.zeros(3), (x, y))
      >>> w
      Array([0.2, 0.2, 0.2], dtype=float32)
      >>> float(loss)
      1.0
    """
    layer = Layer(
        transform="data_parallel",
        axis=axis,
        manual=True,
        layout=_layout,
        mesh=mesh,
        batch_argnums=batch_argnums,
        replicated_argnums=replicated_argnums,
        donate=bool(donate),
    )
    return apply_layer(step, layer)
