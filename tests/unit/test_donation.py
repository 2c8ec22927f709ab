"""Donation never loses data and never crashes the process: state is donated, constants are
not; a deleted input is a clear error; leaves that are one array are copied first."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import titanax as tx


@pytest.fixture(scope="module")
def mesh():
    return tx.mesh(data=8)


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.normal(size=(n,)).astype(np.float32)


def loss_fn(params, batch):
    x, y = batch
    return jnp.mean((x @ (params["enc"] + params["dec"]) - y) ** 2)


def reference_step(params, batch):
    grads = jax.grad(loss_fn)(params, batch)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)


def sgd_step(params, batch):
    grads = tx.pmean(jax.grad(loss_fn)(params, batch), "data")
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)


def test_constant_table_is_not_donated_even_with_an_output_of_its_shape(mesh):
    @tx.data_parallel(mesh=mesh, replicated_argnums=1)
    def step(w, table, batch):
        x, _ = batch
        return w + tx.pmean(x.sum(), "data"), table * 2.0  # an output shaped like the table

    table = jnp.arange(4.0)
    w = jnp.zeros(4)
    for _ in range(3):
        w, doubled = step(w, table, data())
    assert not table.is_deleted()
    np.testing.assert_array_equal(doubled, np.arange(4.0) * 2)
    assert step._recent and next(iter(step._recent.values())).donate == (0,)


def test_without_replicated_argnums_a_reused_donated_input_is_a_clear_error(mesh):
    @tx.data_parallel(mesh=mesh)
    def step(w, table, batch):
        x, _ = batch
        return w + tx.pmean(x.sum(), "data"), table * 2.0

    table, w = jnp.arange(4.0), jnp.zeros(3)
    w, _ = step(w, table, data())  # the output shaped like `table` replaces it: donated
    with pytest.raises(
        tx.PlanError,
        match=r"(?s)1 input array was deleted before this call:\n  \* argument 1 \(table\)\n"
        r".*replicated_argnums",
    ):
        step(w, table, data())


def test_deleted_leaf_is_named_by_its_path(mesh):
    step = tx.data_parallel(sgd_step, mesh=mesh)
    params = {"enc": jnp.ones(4), "dec": jnp.zeros(4)}
    step(params, data())
    with pytest.raises(tx.PlanError, match=r"argument 0 \(params\) \[dec\]"):
        step(params, data())


def test_a_donated_state_passed_again_after_warm_calls_is_an_error_not_a_crash(mesh):
    # Once the step's fast path is warm, a donated array used to reach the executable,
    # and jaxlib 0.10.2 crashed the process (SIGSEGV) after "Buffer has been deleted".
    step = tx.data_parallel(sgd_step, mesh=mesh)
    old = step({"enc": jnp.ones(4), "dec": jnp.zeros(4)}, data())
    new = step(old, data())  # the fast path, donating `old`
    new = step(new, data())
    with pytest.raises(tx.PlanError, match=r"argument 0 \(params\) \[dec\]"):
        step(old, data())


def test_arguments_no_output_replaces_are_never_donated(mesh):
    @tx.data_parallel(mesh=mesh)
    def step(params, frozen, batch):  # frozen has the same structure as params
        grads = tx.pmean(jax.grad(loss_fn)(jax.tree.map(jnp.add, params, frozen), batch), "data")
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    params = {"enc": jnp.ones(4), "dec": jnp.zeros(4)}
    frozen = {"enc": jnp.ones(4), "dec": jnp.ones(4)}
    step(params, frozen, data())
    # Two arguments could be the state the output replaces: neither is donated.
    assert not any(x.is_deleted() for x in jax.tree.leaves((params, frozen)))


@pytest.mark.parametrize("case", ["tied", "lookahead", "same_array_twice"])
def test_leaves_that_are_one_array_are_copied_not_crashed(mesh, case):
    emb = jnp.asarray(np.random.default_rng(3).normal(size=4), jnp.float32)
    if case == "tied":
        step = tx.data_parallel(sgd_step, mesh=mesh)
        args = ({"enc": emb, "dec": emb},)
        ref = reference_step({"enc": emb, "dec": emb}, data())
        out = step(*args, data())
        np.testing.assert_allclose(out["enc"], ref["enc"], rtol=1e-6)
        np.testing.assert_allclose(out["dec"], ref["dec"], rtol=1e-6)
    elif case == "lookahead":
        opt = optax.lookahead(optax.sgd(0.1), sync_period=2, slow_step_size=0.5)
        params = optax.LookaheadParams.init_synced({"enc": emb, "dec": emb * 2})

        @tx.data_parallel(mesh=mesh)
        def step(params, opt_state, batch):
            grads = tx.pmean(jax.grad(loss_fn)(params.fast, batch), "data")
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        opt_state = opt.init(params)
        for _ in range(3):
            params, opt_state = step(params, opt_state, data())
        assert np.isfinite(np.asarray(params.fast["enc"])).all()
    else:

        @tx.data_parallel(mesh=mesh)
        def step(a, b, batch):
            x, _ = batch
            s = tx.pmean(x.sum(), "data")
            return a + s, b - s

        a, b = step(emb, emb, data())
        np.testing.assert_allclose(np.asarray(a) + np.asarray(b), 2 * np.asarray(emb), rtol=1e-6)
    assert not emb.is_deleted() or case != "same_array_twice"


def test_an_array_the_step_closes_over_is_not_lost_through_donation(mesh):
    w0 = jnp.ones(4)

    @tx.data_parallel(mesh=mesh)
    def step(w, batch):
        x, _ = batch
        return w + 0.0 * w0 + tx.pmean(x.sum(), "data") * 0.0  # closes over w0

    w = step(w0, data())  # w0 is the donated state and a constant of the program
    for _ in range(2):
        w = step(w, data())
    assert not w0.is_deleted()
    np.testing.assert_array_equal(w, np.ones(4))


def test_a_fully_sharded_state_reset_keeps_its_split_layout(mesh):
    @tx.fully_sharded(mesh=mesh, min_size=16)
    def reset(acc, batch):  # zero a split gradient accumulator: equal on every device
        x, _ = batch
        return jax.tree.map(jnp.zeros_like, acc), tx.pmean(x.sum(), "data")

    out, _ = reset({"g": jnp.ones((512, 4))}, data(64))
    assert out["g"].shape == (512, 4) and out["g"].sharding.spec[0] == "data"

    @tx.fully_sharded(mesh=mesh, min_size=16)
    def reset_one(s, batch):
        x, _ = batch
        return {"w": s["w"] * 2, "m": jnp.zeros_like(s["m"])}, tx.pmean(x.sum(), "data")

    out, _ = reset_one({"w": jnp.ones((512, 4)), "m": jnp.ones((512, 4))}, data(64))
    np.testing.assert_array_equal(out["m"], np.zeros((512, 4)))
    np.testing.assert_array_equal(out["w"], np.full((512, 4), 2.0))
