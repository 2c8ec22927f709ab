import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import titanax as tx
from titanax.testing import assert_matches_reference, meshes


def loss_fn(params, batch):
    x, y = batch
    leaves = jax.tree.leaves(params)
    s = sum(jnp.sum(jnp.tanh(w)) * (k + 1) for k, w in enumerate(leaves))
    pred = jnp.tanh(x @ jnp.arange(1.0, x.shape[1] + 1) * s)
    return jnp.mean((pred - y) ** 2)


def step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    grads = tx.pmean(grads, "data")
    return state.apply_gradients(grads), {"loss": tx.pmean(loss, "data")}


def reference(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    return state.apply_gradients(grads), {"loss": loss}


def make(shapes, optimizer, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        f"p{i}": jnp.asarray(rng.normal(size=s), jnp.float32) * 0.3 for i, s in enumerate(shapes)
    }
    return tx.TrainState.create(params, optimizer)


def batch(n, features=4, seed=1):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, features)).astype(np.float32),
        rng.normal(size=(n,)).astype(np.float32),
    )


def test_one_step_gradient_parity_1e6():
    mesh = tx.mesh(data=8)
    b = batch(64)
    params = make([(4, 3), (5,)], optax.sgd(1.0)).params
    _, g_ref = jax.value_and_grad(loss_fn)(params, b)

    @tx.data_parallel(mesh=mesh)
    def grads(p, b):
        return tx.pmean(jax.grad(loss_fn)(p, b), "data")

    g = grads(params, b)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-6, atol=1e-7)


@settings(max_examples=12, deadline=None)
@given(
    mesh=meshes(axis_names=("data", "other"), max_axes=2),  # 1 to 8 devices, data of any size
    shapes=st.lists(
        st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
    ),
    rows_per_replica=st.integers(1, 3),
    adam=st.booleans(),
)
def test_data_parallel_equals_single_device(mesh, shapes, rows_per_replica, adam):
    optimizer = optax.adam(0.05) if adam else optax.sgd(0.1)
    b = batch(mesh.shape["data"] * rows_per_replica * 2)
    f, ref = tx.data_parallel(step, mesh=mesh), jax.jit(reference)
    # every leaf of the state (params, optimizer state, step) and the loss: one step to 1e-6,
    # two steps to 1e-5 (Adam divides by the root of tiny second moments, so rounding
    # differences of the summed gradients grow to ~1e-6 absolute by its second update)
    assert_matches_reference(f, ref, make(shapes, optimizer), b, steps=1, rtol=1e-6, atol=1e-6)
    assert_matches_reference(f, ref, make(shapes, optimizer), b, steps=2, rtol=1e-5, atol=1e-5)
    # the loss also without an absolute tolerance, and the step count (both programs are cached)
    (state, metrics), (_, ref_metrics) = (
        f(make(shapes, optimizer), b),
        ref(make(shapes, optimizer), b),
    )
    chex.assert_trees_all_close(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    assert int(state.step) == 1


def test_gradient_is_not_multiplied_by_the_replica_count():
    # The pitfall of shard_map's default: the gradient of a replicated argument comes back
    # already summed, so pmean(grads) would be 8x the mean gradient. Not here.
    mesh = tx.mesh(data=8)
    w = jnp.ones(3)
    x = jnp.ones((8, 3))

    @tx.data_parallel(mesh=mesh, donate=False)
    def g(w, x):
        return tx.pmean(jax.grad(lambda w: jnp.sum(x @ w))(w), "data")

    np.testing.assert_allclose(g(w, x), jnp.ones(3))  # d/dw of one row's sum: x_row = 1


def test_forgotten_gradient_reduction_is_an_error():
    mesh = tx.mesh(data=8)

    @tx.data_parallel(mesh=mesh)
    def no_reduction(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        return state.apply_gradients(grads), {"loss": tx.pmean(loss, "data")}

    with pytest.raises(
        tx.PlanError,
        match=r"(?s)2 output leaves differ between replicas along "
        r"'data'.*output 0 \[params/p0\].*grads = tx.pmean\(grads, 'data'\)",
    ):
        no_reduction(make([(3,), (2, 2)], optax.sgd(0.1)), batch(16))


def test_unreduced_metric_is_an_error_not_a_silent_pick():
    mesh = tx.mesh(data=8)

    @tx.data_parallel(mesh=mesh)
    def raw_metric(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        return state.apply_gradients(tx.pmean(grads, "data")), {"loss": loss}

    with pytest.raises(tx.PlanError, match=r"1 output leaf differs.*\n  \* output 1 \[loss\]"):
        raw_metric(make([(3,)], optax.sgd(0.1)), batch(16))


def test_batch_not_divisible():
    mesh = tx.mesh(data=8)
    f = tx.data_parallel(step, mesh=mesh)
    with pytest.raises(
        tx.PlanError,
        match=r"(?s)2 leaves of argument 1 \(batch\) cannot be split "
        r"into 8 replicas along 'data'.*0  shape \(12, 4\): leading dimension 12 "
        r"is not divisible by 'data'=8.*multiple of 8",
    ):
        f(make([(3,)], optax.sgd(0.1)), batch(12))
    # also when the function already ran with a good batch (the steady-state path)
    f(make([(3,)], optax.sgd(0.1)), batch(16))
    with pytest.raises(tx.PlanError, match="leading dimension 12 is not divisible"):
        f(make([(3,)], optax.sgd(0.1)), batch(12))


def test_scalar_batch_leaf():
    f = tx.data_parallel(lambda w, b: w, mesh=tx.mesh(data=8), donate=False)
    with pytest.raises(tx.PlanError, match="is a scalar: a batch leaf needs a leading batch"):
        f(jnp.ones(2), 3.0)


def test_donation_reuses_the_state():
    mesh = tx.mesh(data=8)
    f = tx.data_parallel(step, mesh=mesh)
    state = f.place(make([(64, 64)], optax.sgd(0.1)), batch(16))[0]
    new, _ = f(state, batch(16))
    assert state.params["p0"].is_deleted() and not new.params["p0"].is_deleted()
    kept = tx.data_parallel(step, mesh=mesh, donate=False)
    state = kept.place(make([(64, 64)], optax.sgd(0.1)), batch(16))[0]
    kept(state, batch(16))
    assert not state.params["p0"].is_deleted()


def test_several_batch_arguments_and_a_plain_scalar():
    mesh = tx.mesh(data=4, other=2)

    @tx.data_parallel(mesh=mesh, batch_argnums=(1, 2), donate=False)
    def f(scale, x, y):
        return tx.psum(scale * jnp.sum(x * y), "data")

    x, y = np.arange(8.0), np.arange(8.0)[::-1].copy()
    assert float(f(2.0, x, y)) == pytest.approx(2 * float(np.dot(x, y)))


@pytest.mark.parametrize("batch_kind", ["numpy", "jnp"])
@pytest.mark.parametrize("zero", [False, True])
def test_a_training_loop_compiles_its_step_once(caplog, zero, batch_kind):
    # The first call placed the batch itself (typed with the mesh) and every later call
    # let jit place it (untyped): the second call compiled the whole step again.
    mesh = tx.mesh(data=8)
    wrap = tx.fully_sharded(mesh=mesh, min_size=8) if zero else tx.data_parallel(mesh=mesh)

    @wrap
    def step(state, batch):
        x, y = batch
        params = tx.gather_params(state.params, "data") if zero else state.params
        loss, g = jax.value_and_grad(lambda p: jnp.mean((x @ p["w"] - y) ** 2))(params)
        g = tx.scatter_grads(g, "data") if zero else tx.pmean(g, "data")
        return state.apply_gradients(g), tx.pmean(loss, "data")

    state = tx.TrainState.create({"w": np.ones((8, 2), np.float32)}, optax.adam(1e-2))
    rng = np.random.default_rng(0)
    to = np.asarray if batch_kind == "numpy" else jnp.asarray
    with jax.log_compiles(), caplog.at_level("WARNING"):
        for _ in range(3):
            x = rng.normal(size=(16, 8)).astype(np.float32)
            state, _ = step(state, (to(x), to(np.ones((16, 2), np.float32))))
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert len([m for m in compiled if "outer" in m]) == 1, compiled
