"""Optimizer transforms that are exact on shards: per-leaf and global norms summed over the axis.

Under ``fully_sharded`` the optimizer updates shards. Element-wise transforms (SGD, Adam) need
nothing; a transform that takes a norm of each leaf (LAMB's and LARS's trust ratio) or of all
leaves (normalizing by the update's norm) needs the norms of the whole leaves. Here each is the
square root of the sum, over ``axis``, of the shards' sums of squares: all the per-leaf sums of
one update go in one ``psum`` of a vector, and a replicated leaf is summed once, locally.
Outside a ``fully_sharded`` body nothing is split and each transform is exactly optax's, so one
optimizer serves ``data_parallel`` and ``fully_sharded`` steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from titanax._util import shape_of
from titanax.errors import PlanError
from titanax.parallel import collectives as c
from titanax.parallel.fully_sharded.body import global_norm
from titanax.parallel.fully_sharded.layouts import active_or_whole, layout_of

__all__ = ["leaf_norms", "scale_by_trust_ratio", "lamb", "lars", "normalize_by_update_norm"]


def _sq_norms(fn: str, trees: Sequence[Any], axis: str) -> list[list[jax.Array]]:
    """The squared L2 norm of the whole of each leaf of each tree (leaves may be shards
    along ``axis``), with one ``psum`` over ``axis`` for all the shards' partial sums."""
    leaves = [jax.tree.leaves(t) for t in trees]
    sums = [
        [
            jnp.sum(jnp.square(jnp.abs(x)).astype(jnp.promote_types(x.dtype, jnp.float32)))
            for x in xs
        ]
        for xs in leaves
    ]
    if active_or_whole(fn, axis) is None:  # nothing is split: optax's norms
        return sums
    shard = [
        [a.holds_shard(shape_of(x)) for x, a in zip(xs, layout_of(fn, t, axis))]
        for xs, t in zip(leaves, trees)
    ]
    where = [(i, j) for i, row in enumerate(shard) for j, s in enumerate(row) if s]
    if where:
        dtype = jnp.result_type(*(sums[i][j] for i, j in where))
        total = c.psum(jnp.stack([sums[i][j].astype(dtype) for i, j in where]), axis)
        for k, (i, j) in enumerate(where):
            sums[i][j] = total[k]
    return sums


def _norm(sq: jax.Array, min_norm: Any) -> jax.Array:
    """``optax``'s ``safe_norm``: ``max(sqrt(sq), min_norm)``, with a zero gradient at 0."""
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)
    return jnp.where(norm <= min_norm, min_norm, norm)


def leaf_norms(tree: Any, axis: str = "data") -> Any:
    """The L2 norm of the whole of each leaf of ``tree``, whose leaves may be shards along
    ``axis``: a tree of scalars.

    The shards' sums of squares are summed over ``axis`` with one ``psum`` (a vector, one
    element per split leaf); replicated leaves are summed once. Outside a ``fully_sharded``
    body nothing is split and each is ``jnp.linalg.norm`` of the leaf.

    Examples:
      >>> import jax.numpy as jnp, titanax as tx
      >>> tx.leaf_norms({"a": jnp.array([3.0, 4.0]), "b": jnp.ones((2, 2))})
      {'a': Array(5., dtype=float32), 'b': Array(2., dtype=float32)}
    """
    (sq,) = _sq_norms("leaf_norms", [tree], axis)
    return jax.tree.unflatten(jax.tree.structure(tree), [jnp.sqrt(s) for s in sq])


def scale_by_trust_ratio(
    min_norm: float = 0.0,
    trust_coefficient: float = 1.0,
    eps: float = 0.0,
    *,
    axis: str = "data",
) -> optax.GradientTransformation:
    """``optax.scale_by_trust_ratio`` for updates and parameters that may be shards along ``axis``.

    Each leaf's update is scaled by the trust ratio
    ``trust_coefficient * ||param|| / (||update|| + eps)`` (1 where either norm is 0; norms
    below ``min_norm`` are raised to it), the layer-wise scaling of LARS (You et al. 2017,
    "Large Batch Training of Convolutional Networks") and LAMB (You et al. 2019, "Large Batch
    Optimization for Deep Learning: Training BERT in 76 minutes"). The norms are those of the
    whole leaves (`leaf_norms`): under ``fully_sharded``, one all-reduce over ``axis`` of a
    vector with two elements per split leaf; elsewhere exactly optax's transform.

    Raises:
      PlanError: ``update`` is called without ``params``.

    Examples:
      >>> import jax.numpy as jnp, titanax as tx
      >>> t = tx.scale_by_trust_ratio()
      >>> p, g = {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([0.0, 0.5])}
      >>> t.update(g, t.init(p), p)[0]["w"]        # ||w|| / ||g|| = 5 / 0.5
      Array([0., 5.], dtype=float32)
    """

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise PlanError(
                "tx.scale_by_trust_ratio: the trust ratio needs the parameters: call "
                "optimizer.update(grads, opt_state, params)."
            )
        u_sq, p_sq = _sq_norms("scale_by_trust_ratio", [updates, params], axis)

        def one(u: jax.Array, p: jax.Array, u2: jax.Array, p2: jax.Array) -> jax.Array:
            p_norm, u_norm = _norm(p2, min_norm), _norm(u2, min_norm)
            ratio = trust_coefficient * p_norm / (u_norm + eps)
            ratio = jnp.where((p_norm == 0) | (u_norm == 0), 1.0, ratio)
            return u * ratio.astype(p.dtype)

        scaled = map(one, jax.tree.leaves(updates), jax.tree.leaves(params), u_sq, p_sq)
        return jax.tree.unflatten(jax.tree.structure(updates), list(scaled)), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def lamb(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    axis: str = "data",
) -> optax.GradientTransformationExtraArgs:
    """``optax.lamb`` for a ``fully_sharded`` step: the same update, with exact trust ratios.

    LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes") is Adam, plus decoupled weight decay, scaled per leaf by the trust ratio
    ``||param|| / ||update||``. optax's takes those norms of what it is given, which under
    ``fully_sharded`` is a shard; this one takes them of the whole leaves with
    `scale_by_trust_ratio` (one all-reduce over ``axis`` per update). Its state is optax's, and
    outside ``fully_sharded`` it is exactly ``optax.lamb``. The arguments are optax's.

    Examples:
      >>> import jax.numpy as jnp, optax, titanax as tx
      >>> p, g = {"w": jnp.arange(6.0).reshape(2, 3)}, {"w": jnp.ones((2, 3))}
      >>> ours, theirs = tx.lamb(1e-2, weight_decay=0.1), optax.lamb(1e-2, weight_decay=0.1)
      >>> u, _ = ours.update(g, ours.init(p), p)
      >>> v, _ = theirs.update(g, theirs.init(p), p)
      >>> bool(jnp.allclose(u["w"], v["w"], rtol=1e-6))
      True
    """
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
        optax.add_decayed_weights(weight_decay=weight_decay, mask=mask),
        scale_by_trust_ratio(axis=axis),
        optax.scale_by_learning_rate(learning_rate),
    )


def lars(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = True,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    trust_ratio_mask: Any = True,
    momentum: float = 0.9,
    nesterov: bool = False,
    *,
    axis: str = "data",
) -> optax.GradientTransformationExtraArgs:
    """``optax.lars`` for a ``fully_sharded`` step: the same update, with exact trust ratios.

    LARS (You et al. 2017, "Large Batch Training of Convolutional Networks") is SGD with
    momentum whose update of each leaf is scaled by ``trust_coefficient * ||param|| /
    (||update|| + eps)``, the norms of the whole leaves here (`scale_by_trust_ratio`, one
    all-reduce over ``axis`` per update). Its state is optax's, and outside ``fully_sharded``
    it is exactly ``optax.lars``. The arguments are optax's.

    Examples:
      >>> import jax.numpy as jnp, optax, titanax as tx
      >>> p, g = {"w": jnp.arange(6.0).reshape(2, 3)}, {"w": jnp.ones((2, 3))}
      >>> ours, theirs = tx.lars(0.1), optax.lars(0.1)
      >>> u, _ = ours.update(g, ours.init(p), p)
      >>> v, _ = theirs.update(g, theirs.init(p), p)
      >>> bool(jnp.allclose(u["w"], v["w"], rtol=1e-6))
      True
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.masked(
            scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps, axis=axis),
            mask=trust_ratio_mask,
        ),
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum, nesterov=nesterov),
    )


def normalize_by_update_norm(
    scale_factor: float = 1.0, eps: float = 1e-6, *, axis: str = "data"
) -> optax.GradientTransformation:
    """``optax.normalize_by_update_norm`` for updates that may be shards along ``axis``.

    Every update is divided by ``(||updates|| + eps) / scale_factor``, with the norm of all the
    whole updates from `global_norm`: under ``fully_sharded`` one scalar all-reduce over
    ``axis``; elsewhere exactly optax's.

    Examples:
      >>> import jax.numpy as jnp, titanax as tx
      >>> t = tx.normalize_by_update_norm(eps=0.0)
      >>> t.update({"w": jnp.array([3.0, 4.0])}, t.init(None))[0]["w"]
      Array([0.6, 0.8], dtype=float32)
    """

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        g_norm = (global_norm(updates, axis) + eps) / scale_factor
        return jax.tree.map(lambda g: g / g_norm.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)
