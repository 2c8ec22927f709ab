"""``tx.TrainState``: parameters, optimizer state and step count, as one pytree."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from titanax._util import bullets, leaves_with_paths, shape_of
from titanax.errors import PlanError

__all__ = ["TrainState"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Parameters, Optax state and step count of a training run.

    A frozen dataclass and a pytree: ``params``, ``opt_state`` and ``step``
    are its leaves, ``optimizer`` (the Optax transformation) is static. Leaf
    paths are ``params/...``, ``opt_state/...`` and ``step``, so sharding
    rules anchored at the end of a parameter's path (``r"up/kernel$"``) lay
    out its optimizer moments alike.

    Attributes:
      params: the model parameters, any pytree of arrays.
      opt_state: the optimizer's state for ``params``.
      step: the number of updates applied (an int32 scalar).
      optimizer: the ``optax.GradientTransformation`` (static).

    Examples:
      >>> import jax.numpy as jnp, optax, titanax as tx
      >>> state = tx.TrainState.create({"w": jnp.ones(2)}, optax.sgd(0.5))
      >>> state = state.apply_gradients({"w": jnp.ones(2)})
      >>> state.params["w"], int(state.step)
      (Array([0.5, 0.5], dtype=float32), 1)
    """

    params: Any
    opt_state: Any
    step: jax.Array
    optimizer: optax.GradientTransformation = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation) -> TrainState:
        """A state at step 0, with ``optimizer.init(params)`` as the optimizer state."""
        return cls(params, optimizer.init(params), jnp.zeros((), jnp.int32), optimizer)

    def apply_gradients(self, grads: Any, **extra_args: Any) -> TrainState:
        """One optimizer update with ``grads``; ``extra_args`` go to ``optimizer.update``.

        Reduce ``grads`` across replicas first (``tx.pmean(grads, "data")``):
        this applies them as they are.
        """
        _check_shapes(grads, self.params)
        updates, opt_state = self.optimizer.update(grads, self.opt_state, self.params, **extra_args)
        params = optax.apply_updates(self.params, updates)
        return dataclasses.replace(self, params=params, opt_state=opt_state, step=self.step + 1)


def _check_shapes(grads: Any, params: Any) -> None:
    """Gradients must have the parameters' shapes (under ``fully_sharded``: the shards')."""
    same: bool = jax.tree.structure(grads) == jax.tree.structure(params)  # type: ignore[operator]
    if not same:
        return  # optax reports a structure mismatch itself
    bad = [
        f"{path}: gradient {shape_of(g)}, parameter {shape_of(p)}"
        for (path, g), p in zip(leaves_with_paths(grads), jax.tree.leaves(params))
        if shape_of(g) != shape_of(p)
    ]
    if bad:
        raise PlanError(
            "TrainState.apply_gradients: gradients and parameters differ in shape:\n"
            + bullets(bad)
            + "\nUnder tx.fully_sharded the parameters are shards: reduce whole gradients with "
            "grads = tx.scatter_grads(grads, axis), not tx.pmean."
        )
