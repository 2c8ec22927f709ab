"""A forgotten reduction is decided from the program, before anything runs or is donated.

Every case here is one the old value-comparing check missed: replicas that agree by
coincidence on the first call (zero-initialized heads, a learning rate that warms up from 0),
and a second call after the error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import titanax as tx


@pytest.fixture(scope="module")
def mesh():
    return tx.mesh(data=8)


def classifier_loss(params, batch):
    x, labels = batch
    logits = x @ params["head"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def classifier_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 3, size=n)


def zero_head():
    return tx.TrainState.create({"head": jnp.zeros((5, 3))}, optax.sgd(0.5))


def test_unreduced_metric_of_a_zero_initialized_head_is_an_error(mesh):
    # On step 0 every replica's loss is log(3) exactly: a value check passes, and from
    # step 1 the metric would be replica 0's. The program says the metric varies.
    @tx.data_parallel(mesh=mesh)
    def step(state, batch):
        loss, grads = jax.value_and_grad(classifier_loss)(state.params, batch)
        return state.apply_gradients(tx.pmean(grads, "data")), {"loss": loss}

    state = zero_head()
    with pytest.raises(
        tx.PlanError,
        match=r"(?s)1 output leaf differs between replicas along 'data'.*"
        r"output 1 \[loss\]  \(varies along 'data'\).*tx.pmean\(loss, 'data'\)",
    ):
        step(state, classifier_data())
    assert not state.params["head"].is_deleted()


def test_reduced_metric_is_the_global_mean(mesh):
    @tx.data_parallel(mesh=mesh)
    def step(state, batch):
        loss, grads = jax.value_and_grad(classifier_loss)(state.params, batch)
        return state.apply_gradients(tx.pmean(grads, "data")), {"loss": tx.pmean(loss, "data")}

    state, batches = zero_head(), [classifier_data(seed=s) for s in range(3)]
    ref = zero_head()
    for b in batches:
        state, metrics = step(state, b)
        want, grads = jax.value_and_grad(classifier_loss)(ref.params, b)
        ref = ref.apply_gradients(grads)
        np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-6)


def test_unreduced_gradients_under_a_warmup_from_zero_are_an_error(mesh):
    # With lr 0 on step 0, every replica's state stays equal: only the program tells.
    schedule = optax.linear_schedule(0.0, 0.1, transition_steps=10)

    @tx.data_parallel(mesh=mesh)
    def step(state, batch):
        loss, grads = jax.value_and_grad(classifier_loss)(state.params, batch)
        return state.apply_gradients(grads), {"loss": tx.pmean(loss, "data")}

    state = tx.TrainState.create({"head": jnp.zeros((5, 3))}, optax.sgd(schedule))
    with pytest.raises(tx.PlanError, match=r"output 0 \[params/head\]"):
        step(state, classifier_data())


def test_the_error_is_raised_again_and_nothing_is_donated(mesh):
    @tx.data_parallel(mesh=mesh)
    def step(state, batch):
        loss, grads = jax.value_and_grad(classifier_loss)(state.params, batch)
        return state.apply_gradients(grads), {"loss": tx.pmean(loss, "data")}

    state = tx.TrainState.create(
        {"head": jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)},
        optax.adam(0.1),
    )
    before = np.asarray(state.params["head"])
    for _ in range(3):
        with pytest.raises(tx.PlanError, match="differ between replicas"):
            step(state, classifier_data())
        assert not any(x.is_deleted() for x in jax.tree.leaves(state))
    np.testing.assert_array_equal(state.params["head"], before)


def test_reductions_inside_loops_conds_and_custom_rules_are_seen(mesh):
    @jax.custom_vjp
    def scaled(x):
        return 2.0 * x

    scaled.defvjp(lambda x: (2.0 * x, None), lambda _, g: (2.0 * g,))

    @tx.data_parallel(mesh=mesh)
    def step(w, batch):
        x, _ = batch

        def accumulate(g, xs):  # gradient accumulation over 2 microbatches
            return g + jax.grad(lambda w: jnp.sum(scaled(xs @ w)))(w), None

        g, _ = jax.lax.scan(accumulate, jnp.zeros_like(w), x.reshape(2, -1, x.shape[1]))
        g = jax.checkpoint(lambda g: tx.pmean(g, "data"))(g)
        norm = jax.lax.cond(jnp.sum(g) > 0, lambda: tx.pmax(jnp.abs(x).max(), "data"), lambda: 1.0)
        return w - 0.01 * g / norm, {"norm": norm}

    w, metrics = step(jnp.ones((5, 3)), classifier_data())
    assert w.shape == (5, 3) and metrics["norm"].shape == ()


@pytest.mark.parametrize(
    "case",
    ["swap_in_scan", "varying_predicate", "axis_index", "ppermute", "while_trip_count"],
)
def test_values_that_vary_only_through_control_flow_are_errors(mesh, case):
    @tx.data_parallel(mesh=mesh)
    def step(w, batch):
        x, _ = batch
        local = tx.pmean(x.sum(), "data")  # invariant
        mine = x.sum()  # varies
        if case == "swap_in_scan":  # after two swaps the invariant carry holds `mine`
            (a, _), _ = jax.lax.scan(lambda c, _: ((c[1], c[0]), None), (local, mine), None, 3)
            out = a
        elif case == "varying_predicate":
            out = jax.lax.cond(mine > 0, lambda: local, lambda: local + 1)
        elif case == "axis_index":
            out = local + tx.axis_index("data")
        elif case == "ppermute":
            out = tx.ppermute(local, "data", [(i, (i + 1) % 8) for i in range(8)])
        else:
            out = jax.lax.while_loop(
                lambda c: c[0] < mine, lambda c: (c[0] + 1, c[1] * 2), (0.0, local)
            )[1]
        return w, {"out": out}

    with pytest.raises(tx.PlanError, match=r"output 1 \[out\]  \(varies along 'data'\)"):
        step(jnp.ones(3), classifier_data())


def test_check_costs_one_trace(mesh):
    traces = []

    @tx.data_parallel(mesh=mesh)
    def step(w, batch):
        traces.append(1)
        x, _ = batch
        return w, tx.pmean(x.sum(), "data")

    w = jnp.ones(3)
    for _ in range(3):
        w, _ = step(w, classifier_data())
    assert len(traces) == 1


def test_host_callbacks_and_stateful_random_numbers_vary(mesh):
    # Their results differ per device whatever their inputs: never called replicated.
    @tx.data_parallel(mesh=mesh)
    def step(w, batch):
        x, _ = batch
        io = jax.experimental.io_callback(
            lambda: np.float32(np.random.rand()), jax.ShapeDtypeStruct((), jnp.float32)
        )
        pure = jax.pure_callback(
            lambda: np.float32(np.random.rand()), jax.ShapeDtypeStruct((), jnp.float32)
        )
        return w, {"io": io, "pure": pure, "ok": tx.pmean(x.sum(), "data")}

    with pytest.raises(tx.PlanError, match=r"(?s)2 output leaves.*\[io\].*\[pure\]"):
        step(jnp.ones(3), classifier_data())


def test_a_prng_key_argument_works(mesh):
    @tx.data_parallel(mesh=mesh)
    def step(w, key, batch):
        x, _ = batch
        key = jax.random.fold_in(key, tx.axis_index("data"))  # per-replica dropout key
        keep = jax.random.bernoulli(key, 0.5, x.shape)
        return w + tx.pmean(jnp.mean(x * keep), "data"), key

    with pytest.raises(tx.PlanError, match=r"output 1  \(varies along 'data'\)"):
        step(jnp.ones(3), jax.random.key(0), classifier_data())  # the folded key varies

    @tx.data_parallel(mesh=mesh)
    def step2(w, key, batch):
        x, _ = batch
        keep = jax.random.bernoulli(jax.random.fold_in(key, tx.axis_index("data")), 0.5, x.shape)
        return w + tx.pmean(jnp.mean(x * keep), "data"), jax.random.split(key)[0]

    w, key = step2(jnp.ones(3), jax.random.key(0), classifier_data())
    w, key = step2(w, key, classifier_data())
    assert w.shape == (3,) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
