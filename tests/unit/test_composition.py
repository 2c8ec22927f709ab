"""A ParallelFunction composes with JAX and Python as a jitted function does."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import titanax as tx


@pytest.fixture(scope="module")
def mesh():
    return tx.mesh(data=8)


def loss_fn(w, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ w) - y) ** 2)


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.normal(size=(n,)).astype(np.float32)


W = jnp.asarray([0.3, -0.2, 0.1, 0.5], jnp.float32)


def dp_loss(mesh):
    @tx.data_parallel(mesh=mesh)
    def loss(w, batch):
        return tx.pmean(loss_fn(w, batch), "data")

    return loss


def test_inside_jit_and_grad_gives_the_same_numbers(mesh):
    loss, b = dp_loss(mesh), data()
    want, want_grad = jax.value_and_grad(loss_fn)(W, b)
    np.testing.assert_allclose(jax.jit(lambda w: loss(w, b))(W), want, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda w: loss(w, b))(W), want_grad, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(jax.grad(lambda w: loss(w, b)))(W), want_grad, rtol=1e-5)
    # A whole training step inside the user's jit, state donated by the user's jit.
    step = tx.data_parallel(
        lambda w, b: w - 0.1 * tx.pmean(jax.grad(loss_fn)(w, b), "data"), mesh=mesh
    )
    w2 = jax.jit(lambda w: step(step(w, b), b))(W)
    ref = W - 0.1 * jax.grad(loss_fn)(W, b)
    np.testing.assert_allclose(w2, ref - 0.1 * jax.grad(loss_fn)(ref, b), rtol=1e-5)


def test_keyword_arguments_are_bound_to_their_positions(mesh):
    loss, b = dp_loss(mesh), data()
    np.testing.assert_allclose(loss(W, batch=b), loss(W, b), rtol=0)
    np.testing.assert_allclose(loss(w=W, batch=b), loss(W, b), rtol=0)

    @tx.data_parallel(mesh=mesh)
    def keyword_only(w, batch, *, scale):
        return tx.pmean(loss_fn(w, batch), "data") * scale

    with pytest.raises(tx.PlanError, match=r"keyword-only or \*\*kwargs.*functools.partial"):
        keyword_only(W, b, scale=2.0)
    with pytest.raises(tx.PlanError, match="do not fit its signature"):
        loss(W, b, extra=1)


def test_a_method_binds_self_and_compiles_once(mesh):
    traces = []

    class Trainer:
        def __init__(self, scale):
            self.scale = scale

        @tx.data_parallel(mesh=mesh)
        def loss(self, w, batch):
            traces.append(1)
            return tx.pmean(loss_fn(w, batch), "data") * self.scale

    a, b = Trainer(1.0), Trainer(3.0)
    for _ in range(3):
        la, lb = a.loss(W, data()), b.loss(W, data())
    np.testing.assert_allclose(lb, 3 * la, rtol=1e-6)
    np.testing.assert_allclose(la, loss_fn(W, data()), rtol=1e-6)
    assert len(traces) == 2  # once per instance
    assert isinstance(Trainer.loss, tx.ParallelFunction)


def test_a_method_of_a_slotted_class_is_a_clear_error(mesh):
    class Slotted:
        __slots__ = ()

        @tx.data_parallel(mesh=mesh)
        def loss(self, w, batch):
            return tx.pmean(loss_fn(w, batch), "data")

    with pytest.raises(tx.PlanError, match="__slots__"):
        Slotted().loss(W, data())


def test_mesh_given_while_set_mesh_holds_another_is_a_plan_error(mesh):
    small = tx.mesh(jax.devices()[:4], data=4)
    loss = dp_loss(small)
    loss(W, data())  # compiled outside any set_mesh
    for other in (mesh, tx.mesh(a=2, data=4)):
        with jax.set_mesh(other):
            with pytest.raises(tx.PlanError, match=r"given mesh Mesh\(data=4\).*jax.set_mesh"):
                loss(W, data())
    with jax.set_mesh(small):  # the same mesh: fine
        np.testing.assert_allclose(loss(W, data()), loss_fn(W, data()), rtol=1e-6)


def test_arrays_a_step_returns_work_in_ordinary_jax_code(mesh):
    # Under an Explicit 'data' axis the split contracting dimension of `x @ w` would be
    # part of w's type, and plain jax.jit(loss)(params, x) raised ShardingTypeError.
    @tx.fully_sharded(mesh=mesh, min_size=8)
    def step(state, batch):
        x, y = batch
        w = tx.gather_params(state.params, "data")
        loss, g = jax.value_and_grad(lambda w: jnp.mean((jnp.tanh(x @ w["w"]) - y) ** 2))(w)
        return state.apply_gradients(tx.scatter_grads(g, "data")), tx.pmean(loss, "data")

    rng = np.random.default_rng(0)
    w0 = jnp.asarray(rng.normal(size=(16, 4)) * 0.3, jnp.float32)
    x = rng.normal(size=(32, 16)).astype(np.float32)
    y = rng.normal(size=(32, 4)).astype(np.float32)
    state = tx.TrainState.create({"w": w0}, optax.sgd(0.1))

    def plain_loss(params, x):
        return jnp.mean(jnp.tanh(x @ params["w"]) ** 2)

    state, _ = step(state, (x, y))
    assert state.params["w"].sharding.spec[0] == "data"  # stored split, on the contraction
    value = jax.jit(plain_loss)(state.params, x)
    np.testing.assert_allclose(value, plain_loss(jax.device_get(state.params), x), rtol=1e-6)
    np.testing.assert_allclose(plain_loss(state.params, x), value, rtol=1e-6)  # eager too
    np.testing.assert_allclose(state.params["w"][:2], np.asarray(state.params["w"])[:2])
    state, _ = step(state, (x, y))  # and back into the step


def test_tensor_parallel_rules_that_split_nothing_are_an_error():
    mesh = tx.mesh(data=2, model=4)
    rules = tx.Rules((r"mlp/upp/kernel$", P(None, "model")), (r".*", P()))  # typo: "upp"

    @tx.tensor_parallel(rules, mesh=mesh)
    def f(params, x):
        return x @ params["mlp"]["up"]["kernel"]

    params = {"mlp": {"up": {"kernel": jnp.ones((4, 8))}}}
    with pytest.raises(
        tx.RuleError, match=r"(?s)split no leaf along 'model'.*params/mlp/up/kernel  shape \(4, 8\)"
    ):
        f(params, jnp.ones((2, 4)))


def test_keywords_with_defaults_give_the_positional_call(mesh):
    @tx.data_parallel(mesh=mesh)
    def loss(w, batch, scale=2.0):
        return tx.pmean(loss_fn(w, batch), "data") * scale

    b = data()
    np.testing.assert_allclose(loss(W, batch=b), loss(W, b), rtol=0)
    np.testing.assert_allclose(loss(W, b), 2 * loss_fn(W, b), rtol=1e-6)


def test_a_copied_object_runs_with_its_own_self(mesh):
    import copy
    import dataclasses

    @dataclasses.dataclass
    class Trainer:
        lr: float

        @tx.data_parallel(mesh=mesh, donate=False)
        def step(self, w, batch):
            x, _ = batch
            return w - self.lr * tx.pmean(x.mean(0), "data")

    t = Trainer(1.0)
    x = np.ones((64, 4), np.float32)
    np.testing.assert_allclose(t.step(jnp.zeros(4), (x, x[:, 0])), -np.ones(4))
    t2 = copy.copy(t)
    t2.lr = 100.0
    np.testing.assert_allclose(t2.step(jnp.zeros(4), (x, x[:, 0])), -100 * np.ones(4))


def test_a_step_called_inside_a_step_on_the_same_axis_is_a_plan_error(mesh):
    inner = dp_loss(mesh)

    @tx.fully_sharded(mesh=mesh, donate=False)
    def outer(w, batch):
        return inner(w, batch)

    with pytest.raises(tx.PlanError, match=r"(?s)already binds axis 'data'.*by wrapping"):
        outer(W, data())
