import chex
import jax
import jax.numpy as jnp
import optax

import titanax as tx
from titanax._util import leaves_with_paths


def test_paths_and_static_optimizer():
    opt = optax.adamw(1e-3)
    state = tx.TrainState.create({"w": jnp.ones((2, 3))}, opt)
    paths = [p for p, _ in leaves_with_paths(state)]
    assert paths == [
        "params/w",
        "opt_state/0/count",
        "opt_state/0/mu/w",
        "opt_state/0/nu/w",
        "step",
    ]
    leaves, treedef = jax.tree.flatten(state)
    assert jax.tree.unflatten(treedef, leaves).optimizer is opt  # static, not a leaf
    assert state.step.dtype == jnp.int32 and int(state.step) == 0


def test_apply_gradients_is_optax_update():
    opt = optax.adam(0.1)
    params = {"w": jnp.arange(3.0)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    state = tx.TrainState.create(params, opt).apply_gradients(grads)
    updates, opt_state = opt.update(grads, opt.init(params), params)
    chex.assert_trees_all_close(state.params, optax.apply_updates(params, updates))
    chex.assert_trees_all_close(state.opt_state, opt_state)
    assert int(state.step) == 1


def test_is_frozen_and_jittable():
    state = tx.TrainState.create({"w": jnp.ones(2)}, optax.sgd(1.0))
    try:
        state.step = 3
    except AttributeError:
        pass
    else:
        raise AssertionError("TrainState should be frozen")
    new = jax.jit(lambda s: s.apply_gradients({"w": jnp.ones(2)}))(state)
    chex.assert_trees_all_close(new.params["w"], jnp.zeros(2))
