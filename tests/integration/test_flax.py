"""Flax models (Linen and NNX, parameters as pytrees) work unchanged under DP x TP."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import titanax as tx
from titanax._util import leaves_with_paths

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


class NNXPair(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 32, rngs=rngs)
        self.down = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


PAIR_RULES = tx.Rules(
    (r"up/kernel$", P(None, "model")), (r"down/kernel$", P("model", None)), (r".*", P())
)


def test_nnx_state_is_laid_out_by_module_paths():
    # An nnx.State flattens each Variable to a child under GetAttrKey('value'); rules see the
    # module path ('up/kernel'), not 'up/kernel/value'.
    graphdef, state = nnx.split(NNXPair(nnx.Rngs(0)))
    assert [p for p, _ in leaves_with_paths(state)] == [
        "down/bias",
        "down/kernel",
        "up/bias",
        "up/kernel",
    ]

    def step(state, x, lr=0.1):
        def loss_fn(state):
            return jnp.mean(nnx.merge(graphdef, state)(x) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state)
        return jax.tree.map(lambda p, g: p - lr * g, state, grads), loss

    parallel = tx.tensor_parallel(PAIR_RULES, mesh=tx.mesh(model=8))(step)
    specs = nnx.to_pure_dict(parallel.specs(state, X)[0][0])  # State of Variables of specs
    assert specs["up"]["kernel"] == P(None, "model")
    assert specs["down"]["kernel"] == P("model")  # trailing None dropped
    assert specs["up"]["bias"] == P()
    got_state, got_loss = parallel(state, X)
    ref_state, ref_loss = jax.jit(step)(state, X)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    got, ref = nnx.to_pure_dict(got_state), nnx.to_pure_dict(ref_state)
    chex.assert_trees_all_close(got, ref, rtol=1e-6, atol=1e-7)
    assert got["up"]["kernel"].addressable_shards[0].data.shape == (8, 32 // 8)
    assert got["down"]["kernel"].addressable_shards[0].data.shape == (32 // 8, 8)


def test_nnx_optimizer_state_and_params_in_dicts_have_module_paths():
    model = NNXPair(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    specs = nnx.to_pure_dict(PAIR_RULES.specs(nnx.state(optimizer), tx.mesh(model=8)))
    assert specs["opt_state"][0]["mu"]["up"]["kernel"] == P(None, "model")
    assert specs["opt_state"][0]["nu"]["down"]["kernel"] == P("model", None)
    params = {"up": {"kernel": nnx.Param(jnp.zeros((8, 32)))}}
    assert [p for p, _ in leaves_with_paths(params)] == ["up/kernel"]
    specs = jax.tree.leaves(PAIR_RULES.specs(params), is_leaf=lambda s: isinstance(s, P))
    assert specs == [P(None, "model")]


@dataclasses.dataclass
class Box:
    value: jax.Array


jax.tree_util.register_dataclass(Box, data_fields=["value"], meta_fields=[])


def test_a_key_named_value_is_kept_unless_an_nnx_variable_holds_it():
    tree = {"value": jnp.zeros(2), "w": {"value": jnp.zeros(2)}, "box": Box(jnp.zeros(2))}
    assert [p for p, _ in leaves_with_paths(tree)] == ["box/value", "value", "w/value"]
