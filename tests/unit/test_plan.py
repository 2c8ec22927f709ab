import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import titanax as tx


@pytest.fixture(scope="module")
def mesh():
    return tx.mesh(data=8)


def sgd(w, batch):
    x, y = batch
    loss, g = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
    return w - 0.1 * tx.pmean(g, "data"), tx.pmean(loss, "data")


def data(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)).astype(np.float32), rng.normal(size=(n,)).astype(np.float32)


def test_steady_state_does_not_retrace(mesh):
    traces = []

    def step(w, batch):
        traces.append(1)
        return sgd(w, batch)

    f = tx.data_parallel(step, mesh=mesh)
    w = jnp.zeros(3)
    for _ in range(20):
        w, _ = f(w, data())
    assert len(traces) == 1
    w, _ = f(w, data(32))  # a new batch shape traces once more
    w, _ = f(w, data(32))
    assert len(traces) == 2


def test_place_keeps_planned_arrays_and_places_the_rest(mesh):
    f = tx.data_parallel(sgd, mesh=mesh)
    w, batch = f.place(np.zeros(3, np.float32), data())
    assert w.sharding.is_equivalent_to(NamedSharding(mesh, P()), 1)
    assert batch[0].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
    w2, batch2 = f.place(w, batch)
    assert w2 is w and batch2[0] is batch[0]  # already laid out: no copy
    # laid out otherwise (sharded where the plan replicates): moved, values kept
    odd = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("data")))
    placed, _ = f.place(odd, data())
    assert placed.sharding.is_equivalent_to(NamedSharding(mesh, P()), 1)
    np.testing.assert_array_equal(placed, np.arange(8.0))


def test_call_accepts_arrays_laid_out_otherwise(mesh):
    f = tx.data_parallel(sgd, mesh=mesh, donate=False)
    w = jnp.zeros(3)
    f(w, data())
    sharded_batch = jax.device_put(data(), NamedSharding(mesh, P()))  # replicated, not split
    w1, loss1 = f(w, sharded_batch)
    w2, loss2 = f(w, data())
    np.testing.assert_array_equal(w1, w2)
    assert float(loss1) == float(loss2)


def test_lower_specs_and_explain(mesh):
    f = tx.data_parallel(sgd, mesh=mesh)
    assert isinstance(f.lower(jnp.zeros(3), data()), jax.stages.Lowered)
    in_specs, out_specs = f.specs(jnp.zeros(3), data())
    assert in_specs == (P(), (P("data"), P("data")))
    assert out_specs == (P(), P())
    text = str(f.explain(jnp.zeros(3), data()))
    assert "data_parallel(axis='data') on mesh (data=8); manual axes: data" in text
    assert "batch/0" in text and "P('data',)" in text
    # one all-reduce over 'data' carries the gradient (3 floats) and the loss (1 float)
    rows = [line.split() for line in text.splitlines() if line.startswith("all-reduce")]
    assert rows == [["all-reduce", "data", "16", "B", "f32[3]", "f32[]"]]


def test_plan_attributes(mesh):
    f = tx.data_parallel(sgd, mesh=mesh)
    assert f.plan.mesh is mesh
    assert f.plan.manual_axes == frozenset({"data"})
    assert f.plan.axes == {"data": "data_parallel"}
    assert f.__name__ == "sgd" and "data_parallel(axis='data')" in repr(f)


def test_axis_claimed_twice():
    with pytest.raises(
        tx.PlanError,
        match="data_parallel\\(axis='data'\\) and "
        "data_parallel\\(axis='data'\\) both claim mesh axis 'data'",
    ):
        tx.data_parallel(tx.data_parallel(sgd, axis="data"), axis="data")


def test_two_meshes_in_one_stack():
    a = tx.mesh(data=8)
    b = tx.mesh(devices=jax.devices()[:4], x=4)
    with pytest.raises(tx.PlanError, match="different meshes"):
        tx.data_parallel(tx.data_parallel(sgd, axis="data", mesh=a), axis="x", mesh=b)


def test_axis_not_in_mesh(mesh):
    with pytest.raises(tx.PlanError, match=r"the mesh has no axis 'batch' \(axes: data\)"):
        tx.data_parallel(sgd, axis="batch", mesh=mesh)


def test_mesh_from_set_mesh(mesh):
    f = tx.data_parallel(sgd, donate=False)
    with pytest.raises(tx.PlanError, match="no mesh. Pass mesh=tx.mesh"):
        f(jnp.zeros(3), data())
    with jax.set_mesh(mesh):
        w, loss = f(jnp.zeros(3), data())
    ref = tx.data_parallel(sgd, mesh=mesh, donate=False)(jnp.zeros(3), data())
    np.testing.assert_array_equal(w, ref[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(axis=3), "axis must be a mesh axis name"),
        (dict(axis=""), "axis must be a mesh axis name"),
        (dict(mesh="data"), "mesh must be a jax.sharding.Mesh"),
        (dict(batch_argnums="x"), "batch_argnums must be an int or a tuple of ints"),
    ],
)
def test_static_argument_errors(kwargs, match):
    with pytest.raises(tx.PlanError, match=match):
        tx.data_parallel(sgd, **kwargs)


def test_batch_argnums_out_of_range(mesh):
    f = tx.data_parallel(sgd, mesh=mesh, batch_argnums=(5,))
    with pytest.raises(tx.PlanError, match="names argument 5, but the function was called with 2"):
        f(jnp.zeros(3), data())


def test_not_a_function():
    with pytest.raises(tx.PlanError, match="expected a function to wrap"):
        tx.data_parallel(3)
