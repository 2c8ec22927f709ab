"""``tx.tensor_parallel``: arguments laid out along a mesh axis by rules; the body sees
global arrays and XLA partitions the math from the declared layouts (Megatron-style TP)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from titanax._util import bullets, count, leaves_with_paths
from titanax.errors import PlanError, RuleError
from titanax.extend import ArgInfo, Layer, LayoutHook, ParallelFunction, apply_layer, replicate
from titanax.parallel.collectives import bound_axes
from titanax.parallel.rules import Rules, spec_axes

__all__ = ["tensor_parallel", "constrain"]


def _layout(rules: Rules, axis: str) -> LayoutHook:
    where = f"tensor_parallel(axis={axis!r})"

    def layout(arg: Any, info: ArgInfo) -> Any:
        if info.is_batch:
            return replicate(arg)
        specs = rules.specs(arg, info.mesh, where=where, what=info.name)
        flat = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
        other = [
            f"{path}: {spec} names {', '.join(repr(a) for a in spec_axes(spec) if a != axis)}"
            for (path, _), spec in zip(leaves_with_paths(arg), flat)
            if set(spec_axes(spec)) - {axis}
        ]
        if other:
            raise RuleError(
                f"{where}: the rules lay out {count(len(other), 'leaf', 'leaves')} of "
                f"{info.name} along axes other than {axis!r}:\n{bullets(other)}\n"
                f"A tensor_parallel layer owns axis {axis!r} only; shard other axes with "
                "their own transform (e.g. tx.data_parallel), or use P(...) naming "
                f"{axis!r}."
            )
        return specs

    return layout


def tensor_parallel(
    rules: Rules,
    /,
    *,
    axis: str = "model",
    mesh: Mesh | None = None,
    batch_argnums: int | Sequence[int] = (-1,),
) -> Callable[[Callable[..., Any]], ParallelFunction]:
    """Lays out every non-batch argument along ``axis`` by ``rules`` (Megatron-style TP).

    The body sees **global** shapes: write the model as for one device. Each
    parameter is stored sharded as its rule says, and XLA partitions the
    computation from these declared layouts (propagation, never a search),
    inserting the communication they imply: for a column-parallel matmul
    followed by a row-parallel one, one all-reduce of the activation forward
    and one of its gradient backward. Optimizer state follows its parameter,
    since its path ends with the parameter's path. Batch arguments are
    replicated along ``axis``. Pin an activation's layout with
    `tx.constrain`; collectives over ``axis`` are
    not written by hand (the body is not per-shard).

    Composes with `data_parallel` in either order: one program,
    manual over the data axis only.

    Args:
      rules: a `Rules` whose specs name only ``axis``.
      axis: the mesh axis to shard over.
      mesh: the mesh; defaults to one given to another transform of the stack,
        or set with ``jax.set_mesh``.
      batch_argnums: positions of the batch arguments (replicated along ``axis``).

    Returns:
      A decorator: ``tensor_parallel(rules)(step)`` is a `ParallelFunction`.

    Raises:
      RuleError: at call time, leaves no rule matches, specs that do not fit
        their leaf or the mesh, or specs naming another axis; every offending
        leaf is listed.
      PlanError: a bad ``axis``, ``mesh`` or ``batch_argnums``.

    Examples:
      >>> import jax, jax.numpy as jnp, titanax as tx
      >>> from jax.sharding import PartitionSpec as P
      >>> rules = tx.Rules((r"up$", P(None, "model")), (r"down$", P("model", None)))
      >>> @tx.tensor_parallel(rules, mesh=tx.mesh(model=8))
      ... def mlp(params, x):
      ...     return jax.nn.relu(x @ params["up"]) @ params["down"]
      >>> params = {"up": jnp.ones((4, 32)), "down": jnp.ones((32, 4)) / 32}
      >>> mlp(params, jnp.ones((2, 4)))
      Array([[4., 4., 4., 4.],
             [4., 4., 4., 4.]], dtype=float32)
      >>> mlp.specs(params, jnp.ones((2, 4)))[0][0]["up"]
      P(None, 'model')
    """
    if not isinstance(rules, Rules):
        raise PlanError(
            f"tensor_parallel: the first argument must be a tx.Rules, got {type(rules).__name__}."
            ' Write tx.tensor_parallel(tx.Rules((r"up/kernel$", P(None, "model")), ...)).'
        )
    layer = Layer(
        transform="tensor_parallel",
        axis=axis,
        manual=False,
        layout=_layout(rules, axis),
        mesh=mesh,
        batch_argnums=batch_argnums,
        notes=rules.notes,
    )
    return apply_layer(None, layer)


def constrain(x: Any, spec: PartitionSpec) -> Any:
    """Pins the layout of an activation inside a ``tensor_parallel`` body.

    ``spec`` may name only axes bound by an enclosing ``tensor_parallel``
    (the global-view axes). Use it where XLA's propagation would pick a
    layout other than the one you want, e.g. to keep a residual stream
    replicated, or sequence-sharded between blocks.

    Raises:
      PlanError: outside a ``tensor_parallel`` body, or a spec naming an
        axis that no enclosing ``tensor_parallel`` binds.

    Examples:
      >>> import jax.numpy as jnp, titanax as tx
      >>> from jax.sharding import PartitionSpec as P
      >>> @tx.tensor_parallel(tx.Rules((r".*", P("model"))), mesh=tx.mesh(model=8))
      ... def f(w, x):
      ...     h = tx.constrain(x * w, P(None, "model"))   # columns split over 'model'
      ...     return h.sum()
      >>> float(f(jnp.ones(16), jnp.ones((2, 16))))
      32.0
    """
    auto = {b.name for b in bound_axes() if not b.manual}
    if not auto:
        raise PlanError(
            f"tx.constrain(spec={spec}): no tensor_parallel transform is active, so no axis is "
            "laid out by rules here. Call it inside a step wrapped with tx.tensor_parallel(rules)."
        )
    wrong = [a for a in spec_axes(spec) if a not in auto]
    if wrong:
        raise PlanError(
            f"tx.constrain(spec={spec}): axis {wrong[0]!r} is not a global-view axis here "
            f"(those bound by tensor_parallel: {', '.join(map(repr, sorted(auto)))}). Name only "
            "those axes; manual axes (data_parallel) are already split, by the batch."
        )
    mesh = jax.sharding.get_abstract_mesh()
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
