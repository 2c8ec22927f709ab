"""A collective that not every device of its axis reaches hangs the program: refused.

Measured on XLA:CPU (jax 0.10.2): a ``psum``, ``all_gather`` or ``ppermute`` over ``data``
inside a ``lax.cond`` whose predicate differs between the devices of ``data`` waits in its
rendezvous forever (the devices that took the other branch never arrive). The traced
program is checked instead (`titanax.parallel.varying`): such a step is a
`CollectiveError` before it runs, naming the collective and the user's line.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import titanax as tx

RING = [(j, (j + 1) % 8) for j in range(8)]
COLLECTIVES = {
    "psum": lambda v: tx.psum(v, "data"),
    "all_gather": lambda v: tx.all_gather(v, "data", tiled=True)[:1],
    "ppermute": lambda v: tx.ppermute(v, "data", RING),
    "all_to_all": lambda v: tx.all_to_all(jnp.tile(v, 8), "data", 0, 0, tiled=True)[:1],
}


@pytest.fixture(scope="module")
def mesh():
    return tx.mesh(data=8)


@pytest.mark.parametrize("name", sorted(COLLECTIVES))
def test_a_collective_under_a_per_device_cond_is_refused(mesh, name):
    @tx.data_parallel(axis="data", mesh=mesh)
    def step(x):
        y = jax.lax.cond(x[0] > 3, COLLECTIVES[name], lambda v: v, x)  # x: this device's
        return tx.all_gather(y, "data", tiled=True)

    with pytest.raises(tx.CollectiveError) as e:
        step(jnp.arange(8.0))
    text = str(e.value)
    assert f"{name} over 'data' inside a lax.cond/lax.switch" in text
    assert "test_divergence.py:" in text  # the user's line, not Titanax's or JAX's
    assert "hangs" in text and "tx.pmax" in text


def test_a_switch_on_the_device_index_is_refused(mesh):
    @tx.data_parallel(axis="data", mesh=mesh)
    def step(x):
        branches = [lambda v: tx.psum(v, "data"), lambda v: 2 * v]
        y = jax.lax.switch(tx.axis_index("data") % 2, branches, x)
        return tx.all_gather(y, "data", tiled=True)

    with pytest.raises(tx.CollectiveError, match=r"psum over 'data' inside a lax.cond"):
        step(jnp.arange(8.0))


def test_a_per_device_trip_count_around_a_collective_is_refused(mesh):
    @tx.data_parallel(axis="data", mesh=mesh)
    def step(x):
        def body(carry):
            i, v = carry
            return i + 1, tx.pmean(v, "data") + 1.0

        n = x[0].astype(jnp.int32)  # 0..7: a different number of iterations per device
        _, y = jax.lax.while_loop(lambda c: c[0] < n, body, (0, x))
        return tx.all_gather(y, "data", tiled=True)

    with pytest.raises(tx.CollectiveError, match=r"pmean|psum over 'data' inside a lax.while"):
        step(jnp.arange(8.0))


def test_nothing_is_donated_when_refused(mesh):
    @tx.data_parallel(axis="data", mesh=mesh)
    def step(w, x):
        g = jax.lax.cond(x[0] > 3, lambda v: tx.pmean(v, "data"), lambda v: v, x * w)
        return w - g.sum(), tx.pmean(g.sum(), "data")

    w = jnp.ones(())
    with pytest.raises(tx.CollectiveError):
        step(w, jnp.arange(8.0))
    assert not w.is_deleted()


# -- what stays allowed -------------------------------------------------------------------


def test_a_reduced_predicate_is_allowed(mesh):
    @tx.data_parallel(axis="data", mesh=mesh)
    def step(x):
        pred = tx.pmax((x[0] > 3).astype(jnp.int32), "data") > 0  # equal on every device
        y = jax.lax.cond(pred, lambda v: tx.psum(v, "data"), lambda v: v, x)
        return tx.all_gather(y, "data", tiled=True)

    np.testing.assert_allclose(step(jnp.arange(8.0)), np.full(8, 28.0))


def test_a_predicate_varying_along_another_axis_is_allowed():
    # The devices of one `data` group share their `model` index: they all take the same
    # branch, so a psum over `data` inside is reached by its whole group.
    mesh = tx.mesh(data=2, model=4)

    @tx.data_parallel(axis="data")
    @tx.data_parallel(axis="model", mesh=mesh)
    def step(x):
        y = jax.lax.cond(
            tx.axis_index("model") % 2 == 0, lambda v: tx.psum(v, "data"), lambda v: v, x
        )
        return tx.all_gather(y, ("data", "model"), tiled=True)

    out = np.asarray(step(jnp.arange(8.0)))  # device (d, m) holds element 4d + m
    want = np.arange(8.0)
    for m in (0, 2):
        want[m] = want[4 + m] = m + (4 + m)
    np.testing.assert_allclose(out, want)


def test_a_fixed_trip_count_and_local_work_under_a_cond_are_allowed(mesh):
    @tx.data_parallel(axis="data", mesh=mesh)
    def step(x):
        y = jax.lax.fori_loop(0, 3, lambda i, v: tx.pmean(v, "data") + 1.0, x)
        z = jax.lax.cond(x[0] > 3, lambda v: v * tx.axis_index("data"), lambda v: v, y)
        return tx.all_gather(z, "data", tiled=True)

    y = np.mean(np.arange(8.0)) + 3.0
    want = np.array([y if i <= 3 else y * i for i in range(8)])
    np.testing.assert_allclose(step(jnp.arange(8.0)), want, rtol=1e-6)
