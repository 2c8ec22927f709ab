"""``tx.expert_parallel``: the experts of a mixture-of-experts model split along a mesh axis.

Expert weights are stacked on a leading expert dimension (``(experts, d, hidden)``); the
rules name them, and each device of ``axis`` holds ``experts / N`` of them. Everything
else is replicated along ``axis`` and the batch is split along it, as in
`data_parallel`: the dense part of the model is data parallel over ``axis``, and the
tokens travel to the devices of their experts with `titanax.moe.dispatch` and back
with `titanax.moe.combine` (one ``all_to_all`` each way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

from titanax._util import bullets, count, leaves_with_paths, shape_of
from titanax.errors import PlanError, RuleError
from titanax.extend import (
    ArgInfo,
    Layer,
    LayoutHook,
    ParallelFunction,
    apply_layer,
    replicate,
    split_batch,
)
from titanax.parallel.rules import Rules, spec_axes, spec_problem

__all__ = ["expert_parallel"]

TRANSFORM = "expert_parallel"


def _layout(rules: Rules, axis: str) -> LayoutHook:
    where = f"expert_parallel(axis={axis!r})"

    def layout(arg: Any, info: ArgInfo) -> Any:
        if info.is_batch:
            return split_batch(arg, info) if info.is_own_batch else replicate(arg)
        specs, other, misfit = [], [], []
        for path, leaf in leaves_with_paths(arg):
            shape = shape_of(leaf)
            spec = (rules.spec_for(path) if shape else None) or PartitionSpec()
            if set(spec_axes(spec)) - {axis}:
                names = ", ".join(repr(a) for a in spec_axes(spec) if a != axis)
                other.append(f"{path}: {spec} names {names}")
            elif (problem := spec_problem(shape, spec, info.mesh)) is not None:
                misfit.append(f"{path}  shape {shape}: {problem}")
            specs.append(spec)
        if other:
            raise RuleError(
                f"{where}: the rules lay out {count(len(other), 'leaf', 'leaves')} of "
                f"{info.name} along axes other than {axis!r}:\n{bullets(other)}\n"
                f"An expert_parallel layer owns axis {axis!r} only: split the experts' "
                "hidden dimension with tx.tensor_parallel and its own rules."
            )
        if misfit:
            raise RuleError(
                f"{where}: {count(len(misfit), 'leaf', 'leaves')} of {info.name} cannot be "
                f"split along {axis!r} (size {info.mesh.shape[axis]}):\n{bullets(misfit)}\n"
                f"The number of experts must be a multiple of the size of {axis!r}: change "
                "the mesh or the number of experts."
            )
        return jax.tree.unflatten(jax.tree.structure(arg), specs)

    return layout


def expert_parallel(
    rules: Rules,
    /,
    *,
    axis: str = "expert",
    mesh: Mesh | None = None,
    batch_argnums: int | Sequence[int] = (-1,),
) -> Callable[[Callable[..., Any]], ParallelFunction]:
    """Splits the experts of an MoE model along ``axis``; the rest is data parallel over it.

    Non-batch leaves matched by ``rules`` (expert weights stacked on a leading expert
    dimension: ``(experts, d, hidden)`` with ``P("expert")``) are split along ``axis``,
    so each device holds ``experts / N`` of them; every other non-batch leaf (the router,
    attention, embeddings) is replicated along ``axis``, a leaf no rule matches
    included. Batch arguments are split on their leading dimension along ``axis`` as in
    `data_parallel`. The body sees per-device values (``axis`` is manual):

    * `titanax.moe.route` picks each token's experts, `titanax.moe.dispatch` sends the
      tokens to the devices holding them (one ``all_to_all`` over ``axis``), the body
      applies its local experts, and `titanax.moe.combine` brings the results back
      (one ``all_to_all``) weighted by the gates.
    * **You** reduce the gradients. A replicated leaf's gradient is per replica and
      needs ``tx.pmean`` over ``axis`` (and over ``data`` under `data_parallel`). An
      expert leaf's gradient must **not** be averaged over ``axis`` (each device holds
      different experts): the backward ``all_to_all`` already brought every device's
      contribution to it, summed; it needs ``1/N`` and the mean over the other data
      axes. `titanax.moe.reduce_gradients` does both from the same rules.
      A replicated output that may still differ along ``axis`` is a `PlanError`, as
      for any manual axis; the new expert weights keep their split layout.

    Composes with `data_parallel` (mesh ``data x expert``), `fully_sharded` (expert
    weights also split along ``data`` on another dimension) and `tensor_parallel`
    (the experts' hidden dimension split along ``model`` by its own rules).

    Args:
      rules: a `Rules` naming the expert leaves, with specs naming only ``axis``
        (usually ``(r"experts/", P("expert"))``); leaves no rule matches are replicated.
      axis: the mesh axis the experts are split along.
      mesh: the mesh; defaults to one given to another transform of the stack, or set
        with ``jax.set_mesh``.
      batch_argnums: positions of the batch arguments (negative counts from the end).

    Returns:
      A decorator: ``expert_parallel(rules)(step)`` is a `ParallelFunction`.

    Raises:
      PlanError: a bad ``rules``, ``axis``, ``mesh`` or ``batch_argnums``; at call time,
        a batch that does not split, or replicated outputs that may differ along ``axis``.
      RuleError: at call time, specs naming another axis, or an expert dimension that
        does not divide by the size of ``axis`` (every such leaf is listed).

    Examples:
      >>> import jax.numpy as jnp, titanax as tx
      >>> from jax.sharding import PartitionSpec as P
      >>> rules = tx.Rules((r"experts", P("expert")),)
      >>> @tx.data_parallel(axis="data", mesh=tx.mesh(data=2, expert=4))
      ... @tx.expert_parallel(rules, axis="expert")
      ... def moe(params, x):                                  # x: this device's tokens
      ...     routing = tx.moe.route(x @ params["router"], k=2, capacity_factor=None)
      ...     xs = tx.moe.dispatch(x, routing, axis="expert")  # (2 experts, 4 x 2 slots, 4)
      ...     ys = jnp.einsum("esd,edf->esf", xs, params["experts"])
      ...     y = tx.moe.combine(ys, routing, axis="expert")
      ...     return tx.all_gather(y, ("data", "expert"), tiled=True)
      >>> params = {"router": jnp.eye(4, 8), "experts": jnp.stack([2 * jnp.eye(4)] * 8)}
      >>> x = jnp.arange(64.0).reshape(16, 4)
      >>> bool(jnp.allclose(moe(params, x), 2 * x))     # every expert doubles; gates sum to 1
      True
    """
    if not isinstance(rules, Rules):
        raise PlanError(
            f"expert_parallel: the first argument must be a tx.Rules, got "
            f'{type(rules).__name__}. Write tx.expert_parallel(tx.Rules((r"experts/", '
            'P("expert")),)).'
        )
    layer = Layer(
        transform=TRANSFORM,
        axis=axis,
        manual=True,
        layout=_layout(rules, axis),
        mesh=mesh,
        batch_argnums=batch_argnums,
        donate=True,
        notes=rules.notes,
    )
    return apply_layer(None, layer)
