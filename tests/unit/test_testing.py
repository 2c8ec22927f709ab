import importlib
import math
import sys

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import find, given, settings
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import titanax as tx
import titanax.testing
from titanax.parallel.rules import spec_problem
from titanax.testing import assert_matches_reference, meshes, partition_specs, schedules


def loss_fn(params, batch):
    x, y = batch
    pred = jnp.tanh(x @ params["w1"]) @ params["w2"]
    return jnp.mean((pred[:, 0] - y) ** 2)


def reference(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    return state.apply_gradients(grads), {"loss": loss}


def dp_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    grads = tx.pmean(grads, "data")
    return state.apply_gradients(grads), {"loss": tx.pmean(loss, "data")}


def summed_step(state, batch):  # the bug: psum where pmean belongs; the replicas still agree
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    grads = tx.psum(grads, "data")
    return state.apply_gradients(grads), {"loss": tx.pmean(loss, "data")}


def unreduced_step(state, batch):  # the bug: no reduction at all; the replicas disagree
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    return state.apply_gradients(grads), {"loss": tx.pmean(loss, "data")}


def make_state(optimizer, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(8, 1)) * 0.5, jnp.float32),
    }
    return tx.TrainState.create(params, optimizer)


def make_batch(n=32, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.normal(size=(n,)).astype(np.float32)


# --- assert_matches_reference ------------------------------------------------------------------


def test_correct_data_parallel_step_matches_over_several_steps():
    mesh = tx.mesh(data=4, model=2)
    step = tx.data_parallel(dp_step, mesh=mesh)
    state = make_state(optax.adam(1e-2))
    assert_matches_reference(step, jax.jit(reference), state, make_batch(), steps=4)
    # Both functions got copies: the donating step consumed none of the caller's arrays,
    # not even arrays already laid out as the plan wants (which the step would use as they are).
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))
    placed = step.place(state, make_batch())[0]
    assert_matches_reference(step, reference, placed, make_batch(), steps=2)  # plain reference
    assert not any(x.is_deleted() for x in jax.tree.leaves(placed))


def test_psum_instead_of_pmean_fails_and_names_the_worst_leaf():
    step = tx.data_parallel(summed_step, mesh=tx.mesh(data=8))
    with pytest.raises(AssertionError) as info:
        assert_matches_reference(
            step, jax.jit(reference), make_state(optax.sgd(0.1)), make_batch(), steps=3
        )
    message = str(info.value)
    # Step 1 already differs: the gradients are 8x too large. The loss of step 1 is computed
    # before the update, so it (and the step count) still agree.
    assert message.startswith(
        "parallel_fn 'summed_step' does not match reference_fn 'reference' at step 1 of 3 "
        "(rtol=1e-06, atol=1e-06): 2 of 4 output leaves differ. Worst: output 0 [params/w"
    )
    worst, second = (line for line in message.splitlines() if line.startswith("  * "))
    assert "max abs error" in worst and "max rel error" in worst and "worst at index" in worst
    assert {worst.split()[3], second.split()[3]} == {"[params/w1]", "[params/w2]"}
    assert "loss" not in message and "[step]" not in message


def test_missing_reduction_is_already_a_plan_error():
    # Without any reduction the replicas disagree, and Titanax itself raises on the first call,
    # before there is anything to compare.
    step = tx.data_parallel(unreduced_step, mesh=tx.mesh(data=8))
    with pytest.raises(
        tx.PlanError, match=r"differ between replicas.*\n  \* output 0 \[params/w1\]"
    ):
        assert_matches_reference(step, jax.jit(reference), make_state(optax.sgd(0.1)), make_batch())


def test_state_is_fed_back_and_the_failing_step_is_reported():
    par = lambda s, x: (s + x, {"n": jnp.sum(s)})
    ref = lambda s, x: (s + x * (1 + (s >= 2)), {"n": jnp.sum(s)})  # diverges once s reaches 2
    assert_matches_reference(par, ref, np.zeros(2, np.float32), np.ones(2, np.float32), steps=2)
    with pytest.raises(
        AssertionError,
        match=r"at step 3 of 3 .*: 1 of 2 output leaves differs\. Worst: output 0, max abs error 1, "
        r"max rel error 0\.25\.\n  \* output 0  shape \(2,\): 2 of 2 elements differ; .* worst at "
        r"index \(0,\): 3 vs reference 4",
    ):
        assert_matches_reference(par, ref, np.zeros(2, np.float32), np.ones(2, np.float32), steps=3)


def test_leaf_comparison_details():
    same = lambda *a: a
    # NaN where both are NaN, equal infinities, ints, bools, PRNG keys, scalars and None leaves
    x = {
        "f": np.array([np.nan, np.inf, 1.0]),
        "i": np.arange(3),
        "b": np.array([True, False]),
        "k": jax.random.key(0),
        "s": 2.0,
        "none": None,
    }
    assert_matches_reference(same, same, x, steps=3)
    for bad in (np.nan, np.inf, -np.inf):  # a non-finite value on one side only
        with pytest.raises(AssertionError, match=r"Worst: output 0 \[f\], max abs error inf"):
            assert_matches_reference(
                lambda v: {"f": v}, lambda v, b=bad: {"f": v.at[0].set(b)}, jnp.zeros(2)
            )
        with pytest.raises(AssertionError, match=r"Worst: output 0 \[f\], max abs error inf"):
            assert_matches_reference(
                lambda v, b=bad: {"f": v.at[0].set(b)}, lambda v: {"f": v}, jnp.zeros(2)
            )
    with pytest.raises(
        AssertionError,
        match=r"output 0 \[k\]  shape \(\): 1 of 1 element differs \(compared exactly: PRNG keys\)",
    ):
        assert_matches_reference(
            lambda k: {"k": k}, lambda k: {"k": jax.random.fold_in(k, 1)}, x["k"]
        )
    with pytest.raises(
        AssertionError,
        match=r"output 0  shape \(\): 1 of 1 element differs; .* value 1 vs reference 0",
    ):
        assert_matches_reference(lambda: jnp.ones(()), lambda: jnp.zeros(()))
    with pytest.raises(AssertionError, match=r"shape \(3,\), but the reference has shape \(2,\)"):
        assert_matches_reference(lambda: jnp.ones(3), lambda: jnp.ones(2))
    with pytest.raises(
        AssertionError,
        match=r"different tree structures:\n  \* output 1 \[b\]  only in the parallel output\n"
        r"  \* output 1 \[c\]  only in the reference output",
    ):
        assert_matches_reference(lambda: (1.0, {"b": 1.0}), lambda: (1.0, {"c": 1.0}))
    with pytest.raises(AssertionError, match="returns 2 outputs and the reference 1"):
        assert_matches_reference(lambda: (1.0, 2.0), lambda: (1.0,))
    # tolerances are numpy's: |a - b| <= atol + rtol * |b|
    assert_matches_reference(lambda: jnp.float32(1.5), lambda: jnp.float32(1.0), rtol=0.5, atol=0)
    with pytest.raises(AssertionError, match=r"rtol=0.4, atol=0\)"):
        assert_matches_reference(
            lambda: jnp.float32(1.5), lambda: jnp.float32(1.0), rtol=0.4, atol=0
        )
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        assert_matches_reference(same, same, 1.0, steps=0)
    with pytest.raises(ValueError, match="no arguments were given"):
        assert_matches_reference(same, same, steps=2)


def test_reference_runs_on_one_device():
    mesh = tx.mesh(data=8)
    x = jax.device_put(np.arange(16.0, dtype=np.float32), NamedSharding(mesh, P("data")))
    seen = []

    def ref(v):
        seen.append(len(v.sharding.device_set))
        return v * 2

    assert_matches_reference(lambda v: v * 2, ref, x)
    assert seen == [1] and len(x.sharding.device_set) == 8


# --- strategies --------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(data=st.data(), num_devices=st.sampled_from([None, 1, 2, 4, 6, 8]))
def test_meshes_fit_the_devices(data, num_devices):
    names = ("data", "model", "stage")
    mesh = data.draw(meshes(num_devices, axis_names=names))
    n = num_devices or len(jax.devices())
    size = math.prod(mesh.devices.shape)
    assert size == mesh.devices.size and n % size == 0
    assert mesh.axis_names == names[: len(mesh.axis_names)]
    assert list(mesh.devices.flat) == jax.devices()[:size] or size == len(jax.devices())
    assert set(mesh.axis_types) == {AxisType.Auto}


def test_meshes_reach_the_extremes():
    assert math.prod(find(meshes(), lambda m: m.devices.size == 8).devices.shape) == 8
    assert find(meshes(), lambda m: True).shape == {"data": 1}  # the minimal example
    three = find(meshes(max_axes=3), lambda m: len(m.axis_names) == 3 and m.devices.size == 8)
    assert three.axis_names == ("data", "model", "stage")


shapes = st.lists(st.sampled_from([0, 1, 2, 3, 4, 6, 8, 12]), max_size=4).map(tuple)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), mesh=meshes(), shape=shapes)
def test_partition_specs_are_valid(data, mesh, shape):
    spec = data.draw(partition_specs(shape, mesh))
    assert spec_problem(shape, spec, mesh) is None
    assert not spec or spec[-1] is not None  # trailing Nones dropped
    rules = tx.Rules((r".*", spec))
    assert rules.specs({"x": np.zeros(shape, np.float32)}, mesh)["x"] == spec


def test_partition_specs_reach_every_kind_of_spec():
    mesh = tx.mesh(data=2, model=2, stage=2)
    strategy = partition_specs((8, 4), mesh)
    assert find(strategy, lambda s: True) == P()
    both = find(strategy, lambda s: any(isinstance(e, tuple) for e in s))
    assert spec_problem((8, 4), both, mesh) is None
    assert len(find(strategy, lambda s: len(s) == 2 and len(jax.tree.leaves(tuple(s))) == 3)) == 2
    only = find(partition_specs((8,), mesh, axis_names=["model"]), lambda s: s != P())
    assert only == P("model")
    # a placed array with a drawn spec really has that layout
    x = jax.device_put(np.zeros((8, 4), np.float32), NamedSharding(mesh, both))
    assert x.sharding.spec == both


@settings(max_examples=60, deadline=None)
@given(s=schedules(max_stages=4, max_microbatches=8))
def test_schedules_are_valid(s):
    assert s.validate() is s and s.name in tx.schedules.NAMES
    assert 1 <= s.stages <= 4 and 1 <= s.microbatches <= 8
    if s.name == "interleaved_1f1b":
        assert s.virtual_stages >= 2 and s.microbatches % s.stages == 0
    elif s.name == "zero_bubble_v":
        assert s.virtual_stages == 2 and s.placement == "v"
    else:
        assert s.virtual_stages == 1


def test_schedules_draw_every_name_and_a_fixed_stage_count():
    for name in tx.schedules.NAMES:
        assert find(schedules(), lambda s, n=name: s.name == n).name == name
    s = find(schedules(stages=3, names=["interleaved_1f1b"]), lambda s: s.microbatches > 3)
    assert (s.stages, s.microbatches, s.virtual_stages) == (3, 6, 2)


def test_strategy_argument_errors():
    with pytest.raises(tx.MeshError, match="axis_names must be distinct strings"):
        meshes(axis_names=("data", "data"))
    assert find(meshes(axis_names="model"), lambda m: True).axis_names == ("model",)
    with pytest.raises(tx.MeshError, match="max_axes must be a positive int, got 0"):
        meshes(max_axes=0)
    with pytest.raises(tx.MeshError, match="num_devices=16, but there are only 8 devices"):
        find(meshes(16), lambda m: True)
    mesh = tx.mesh(data=8)
    with pytest.raises(tx.RuleError, match="axis 'model' is not in the mesh"):
        partition_specs((8,), mesh, axis_names=["model"])
    with pytest.raises(tx.RuleError, match="shape must be a sequence of non-negative ints"):
        partition_specs((8, -1), mesh)
    with pytest.raises(tx.ScheduleError, match=r"names must be some of .*; got '1F1B'"):
        schedules(names=["1F1B"])
    with pytest.raises(tx.ScheduleError, match="needs max_virtual_stages >= 2, got 1"):
        schedules(max_virtual_stages=1)
    with pytest.raises(tx.ScheduleError, match="needs at least stages=4 microbatches"):
        schedules(stages=4, max_microbatches=2)


def test_imports_without_hypothesis(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    monkeypatch.setitem(sys.modules, "hypothesis.strategies", None)
    module = importlib.reload(titanax.testing)
    assert module is tx.testing and callable(module.assert_matches_reference)
    with pytest.raises(ImportError, match="pip install hypothesis"):
        module.meshes()
