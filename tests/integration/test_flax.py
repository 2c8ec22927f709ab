"""Flax models (Linen and NNX, parameters as pytrees) work unchanged under DP x TP."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import titanax as tx

nn = pytest.importorskip("flax.linen", reason="flax is in the dev extra")
nnx = pytest.importorskip("flax.nnx", reason="flax is in the dev extra")

RULES = tx.rules.megatron_mlp() + tx.Rules((r".*", P()))
X = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
Y = np.random.default_rng(1).normal(size=(16, 1)).astype(np.float32)


def train(step, state, steps=5):
    losses = []
    for _ in range(steps):
        state, loss = step(state, (X, Y))
        losses.append(float(loss))
    return state, losses


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32, name="up")(x))
        return nn.Dense(8, name="down")(h)


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, name="head")(LinenMLP(name="mlp")(x))


def test_linen_model_trains_the_same_under_dp_x_tp():
    model = LinenModel()
    variables = model.init(jax.random.key(0), X)

    def loss_fn(params, batch):
        x, y = batch
        return jnp.mean((model.apply(params, x) - y) ** 2)

    def step(state, batch, reduce=True):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        if reduce:
            grads, loss = tx.pmean(grads, "data"), tx.pmean(loss, "data")
        return state.apply_gradients(grads), loss

    make = lambda: tx.TrainState.create(jax.tree.map(jnp.copy, variables), optax.adam(1e-2))  # noqa: E731
    parallel = tx.data_parallel(tx.tensor_parallel(RULES)(step), mesh=tx.mesh(data=2, model=4))
    assert parallel.specs(make(), (X, Y))[0][0].params["params"]["mlp"]["up"]["kernel"] == P(
        None, "model"
    )
    state, losses = train(parallel, make())
    ref_state, ref_losses = train(jax.jit(lambda s, b: step(s, b, reduce=False)), make())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    chex.assert_trees_all_close(state.params, ref_state.params, rtol=1e-5, atol=1e-6)
    kernel = state.params["params"]["mlp"]["up"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (8, 32 // 4)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 32, rngs=rngs)
        self.down = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.mlp = NNXMLP(rngs)
        self.head = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(self.mlp(x))


def test_nnx_model_trains_the_same_under_dp_x_tp():
    graphdef, abstract_state = nnx.split(NNXModel(nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(abstract_state)  # a plain pytree: mlp/up/kernel, ...

    def loss_fn(params, batch):
        x, y = batch
        state = jax.tree.map(lambda v: v, abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return jnp.mean((nnx.merge(graphdef, state)(x) - y) ** 2)

    def step(state, batch, reduce=True):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        if reduce:
            grads, loss = tx.pmean(grads, "data"), tx.pmean(loss, "data")
        return state.apply_gradients(grads), loss

    make = lambda: tx.TrainState.create(jax.tree.map(jnp.copy, params), optax.adam(1e-2))  # noqa: E731
    parallel = tx.data_parallel(tx.tensor_parallel(RULES)(step), mesh=tx.mesh(data=2, model=4))
    state, losses = train(parallel, make())
    ref_state, ref_losses = train(jax.jit(lambda s, b: step(s, b, reduce=False)), make())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    chex.assert_trees_all_close(state.params, ref_state.params, rtol=1e-5, atol=1e-6)
    assert state.params["mlp"]["down"]["kernel"].sharding.spec == P("model")
