import dataclasses

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from jax.sharding import PartitionSpec as P

import titanax as tx
from titanax.parallel import hlo
from titanax.parallel.fully_sharded import split_dim
from titanax.parallel.rules import spec_axes

D, H = 16, 64


def params(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.2, jnp.float32)  # noqa: E731
    return {
        "embed": f(32, D),  # 512 elements: replicated under min_size=1024
        "mlp": {
            "up": {"kernel": f(D, H), "bias": f(H)},
            "down": {"kernel": f(H, D), "bias": f(D)},
        },
        "head": f(D, 8),
    }


def loss_fn(p, batch):
    x, y = batch
    h = jnp.tanh(x @ p["embed"])
    h = (
        h
        + jnp.tanh(h @ p["mlp"]["up"]["kernel"] + p["mlp"]["up"]["bias"])
        @ p["mlp"]["down"]["kernel"]
    )
    return jnp.mean((h @ p["head"] + p["mlp"]["down"]["bias"][:8] - y) ** 2)


def batch(n=32, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 32)).astype(np.float32), rng.normal(size=(n, 8)).astype(np.float32)


def dp_step(state, b):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, b)
    return state.apply_gradients(tx.pmean(grads, "data")), tx.pmean(loss, "data")


def zero3_step(state, b):
    p = tx.gather_params(state.params, "data")
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    return state.apply_gradients(tx.scatter_grads(grads, "data")), tx.pmean(loss, "data")


def zero1_step(state, b):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, b)
    grads = tx.scatter_grads(grads, "data")
    shard = tx.shard_params(state.params, "data")
    updates, opt_state = state.optimizer.update(grads, state.opt_state, shard)
    new = tx.gather_params(optax.apply_updates(shard, updates), "data")
    state = dataclasses.replace(state, params=new, opt_state=opt_state, step=state.step + 1)
    return state, tx.pmean(loss, "data")


OPT = optax.chain(tx.clip_by_global_norm(0.5), optax.adamw(1e-2, weight_decay=0.1))


def run(step, steps=3, opt=OPT, state=None, first_seed=0):
    """``steps`` steps from ``state`` (default: a new state with ``opt``); the state and losses."""
    state = tx.TrainState.create(params(), opt) if state is None else state
    losses = []
    for i in range(steps):
        state, loss = step(state, batch(seed=first_seed + i))
        losses.append(float(loss))
    return state, losses


def assert_close(a, b, rtol, atol):
    """Trees equal to tolerance, compared on the host (any layout)."""
    chex.assert_trees_all_close(
        jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b), rtol=rtol, atol=atol
    )


def test_split_dim_rule():
    assert split_dim((64, 256), P(), 8, 1024) == 1  # the largest dimension
    assert split_dim((256, 64), P(), 8, 1024) == 0
    assert split_dim((64, 256), P(None, "model"), 8, 1024) == 0  # a dimension TP leaves free
    assert split_dim((64, 64), P(), 8, 1024) == 0  # ties: the first
    assert split_dim((4, 3, 64), P(None, None, "model"), 8, 0) is None  # nothing divides
    assert split_dim((512,), P(), 8, 1024) is None  # small
    assert split_dim((512,), P(), 8, 0) == 0
    assert split_dim((), P(), 8, 0) is None  # scalars


def test_layout_splits_params_and_optimizer_state():
    mesh = tx.mesh(data=8)
    step = tx.fully_sharded(zero3_step, mesh=mesh)
    state = tx.TrainState.create(params(), optax.adam(1e-3))
    (specs, _), _ = step.specs(state, batch())
    assert specs.params["mlp"]["up"]["kernel"] == P(None, "data")  # (16, 64): dim 1
    assert specs.params["mlp"]["down"]["kernel"] == P("data")  # (64, 16): dim 0
    assert specs.params["head"] == P()  # 128 elements: small
    assert specs.params["embed"] == P()
    mu = specs.opt_state[0].mu
    assert mu["mlp"]["up"]["kernel"] == P(None, "data")
    assert specs.opt_state[0].count == P()


def test_per_device_bytes_are_total_over_8_plus_small_leaves():
    mesh = tx.mesh(data=8)
    step = tx.fully_sharded(zero3_step, mesh=mesh, min_size=256)
    state, _ = run(step, steps=1)
    split = replicated = 0
    for leaf in jax.tree.leaves(state):
        if leaf.sharding.spec == P() or all(e is None for e in leaf.sharding.spec):
            replicated += leaf.nbytes
        else:
            split += leaf.nbytes
    per_device = {d: 0 for d in mesh.devices.flat}
    for leaf in jax.tree.leaves(state):
        for shard in leaf.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    assert split > 4 * replicated  # most of the state is split
    assert set(per_device.values()) == {split // 8 + replicated}


def test_memory_analysis_argument_bytes_shrink():
    mesh = tx.mesh(data=8)
    state = tx.TrainState.create(params(), optax.adam(1e-3))
    b = batch()
    dp = tx.data_parallel(dp_step, mesh=mesh).lower(state, b).compile().memory_analysis()
    fs = tx.fully_sharded(zero3_step, mesh=mesh, min_size=0).lower(state, b).compile()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    batch_bytes = sum(x.nbytes for x in b) // 8
    assert dp.argument_size_in_bytes == state_bytes + batch_bytes
    # everything splits on data=8 with min_size=0 but Adam's count (4 bytes) and the
    # 8-element head bias slice: the state is stored at exactly 1/8
    assert fs.memory_analysis().argument_size_in_bytes <= state_bytes // 8 + batch_bytes + 8


@pytest.mark.parametrize("zero", [3, 1])
def test_matches_data_parallel_bit_for_bit_over_steps(zero):
    mesh = tx.mesh(data=8)
    ref_state, ref_losses = run(tx.data_parallel(dp_step, mesh=mesh), steps=5)
    if zero == 3:
        step = tx.fully_sharded(zero3_step, mesh=mesh, min_size=256)
    else:
        step = tx.fully_sharded(zero1_step, mesh=mesh, shard="optimizer", min_size=256)
    state, losses = run(step, steps=5)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    assert_close(state.params, ref_state.params, rtol=1e-5, atol=1e-6)
    if zero == 1:  # ZeRO-1: parameters replicated, Adam's moments split
        assert not spec_axes(state.params["mlp"]["up"]["kernel"].sharding.spec)
        assert state.opt_state[1][0].mu["mlp"]["up"]["kernel"].sharding.spec == P(None, "data")


@settings(max_examples=6, deadline=None)
@given(
    data=st.sampled_from([1, 2, 4, 8]),
    min_size=st.sampled_from([0, 64, 1024]),
    seed=st.integers(0, 3),
)
def test_property_one_step_matches_data_parallel(data, min_size, seed):
    devices = jax.devices()[:data]
    mesh = tx.mesh(devices=devices, data=data)
    state = tx.TrainState.create(params(seed), optax.sgd(0.1))
    ref, ref_loss = tx.data_parallel(dp_step, mesh=mesh, donate=False)(state, batch(seed=seed))
    got, loss = tx.fully_sharded(zero3_step, mesh=mesh, min_size=min_size, donate=False)(
        state, batch(seed=seed)
    )
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    assert_close(got.params, ref.params, rtol=1e-6, atol=1e-7)


def test_hlo_one_all_gather_and_one_reduce_scatter_per_split_parameter():
    mesh = tx.mesh(data=8)
    state = tx.TrainState.create(params(), optax.adam(1e-3))
    step = tx.fully_sharded(zero3_step, mesh=mesh, min_size=256)
    (specs, _), _ = step.specs(state, batch())
    n_split = sum(
        1 for s in jax.tree.leaves(specs.params, is_leaf=lambda x: isinstance(x, P)) if s != P()
    )
    assert n_split == 3  # up/down kernels and embed (512); up's bias (64) is small
    found = hlo.collectives(step.lower(state, batch()).compile().as_text(), mesh)
    kinds = hlo.summary(found)
    assert kinds[("all-gather", ("data",))] == n_split
    assert kinds[("reduce-scatter", ("data",))] == n_split
    # the all-reduces carry only the replicated leaves' gradients and the loss, never a split
    # parameter's whole gradient
    small = sum(
        x.nbytes
        for x, s in zip(
            jax.tree.leaves(state.params),
            jax.tree.leaves(specs.params, is_leaf=lambda x: isinstance(x, P)),
        )
        if s == P()
    )
    assert sum(c.bytes for c in found if c.kind == "all-reduce") <= small + 16
    gathered = sum(c.bytes for c in found if c.kind == "all-gather")
    assert gathered == sum(
        x.nbytes
        for x, s in zip(
            jax.tree.leaves(state.params),
            jax.tree.leaves(specs.params, is_leaf=lambda x: isinstance(x, P)),
        )
        if s != P()
    )
    assert "reduce-scatter" in str(step.explain(state, batch()))


def test_composes_with_tensor_parallel_without_gathering_over_model():
    mesh = tx.mesh(data=2, model=4)
    rules = tx.rules.megatron_mlp() + tx.Rules((r".*", P()))
    fs = tx.fully_sharded(tx.tensor_parallel(rules)(zero3_step), mesh=mesh, min_size=256)
    dp = tx.data_parallel(tx.tensor_parallel(rules)(dp_step), mesh=mesh)
    state = tx.TrainState.create(params(), optax.adam(1e-3))
    (specs, _), _ = fs.specs(state, batch())
    assert specs.params["mlp"]["up"]["kernel"] == P("data", "model")  # TP takes dim 1
    assert specs.params["mlp"]["down"]["kernel"] == P("model", "data")
    found = hlo.summary(hlo.collectives(fs.lower(state, batch()).compile().as_text(), mesh))
    assert found[("all-gather", ("model",))] == 0  # each device gathers its model block only
    assert found[("all-gather", ("data",))] == 3
    _, ref_losses = run(dp, steps=3)
    _, losses = run(fs, steps=3)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)


def test_global_norm_sees_the_whole_gradient():
    mesh = tx.mesh(data=8)
    p, b = params(), batch()
    want = float(optax.tree.norm(jax.grad(loss_fn)(p, b)))

    @tx.fully_sharded(mesh=mesh, donate=False, min_size=0)
    def norms(params, b):
        whole = tx.gather_params(params, "data")
        shards = tx.scatter_grads(jax.grad(loss_fn)(whole, b), "data")
        return tx.global_norm(shards, "data"), tx.global_norm(tx.gather_params(shards, "data"))

    of_shards, of_whole = norms(p, b)
    assert float(of_shards) == pytest.approx(want, rel=1e-6)
    assert float(of_whole) == pytest.approx(want, rel=1e-6)  # whole leaves: counted once
    g = jax.grad(loss_fn)(p, b)
    assert float(tx.global_norm(g, "data")) == pytest.approx(want, rel=1e-7)  # no transform


def test_clip_by_global_norm_is_optax_s_update():
    g = jax.grad(loss_fn)(params(), batch())
    ours, theirs = tx.clip_by_global_norm(0.1), optax.clip_by_global_norm(0.1)
    a, _ = ours.update(g, ours.init(params()))
    b, _ = theirs.update(g, theirs.init(params()))
    chex.assert_trees_all_equal(a, b)


def test_shard_params_slices_this_devices_block():
    mesh = tx.mesh(data=8)
    p = params()

    @tx.fully_sharded(mesh=mesh, donate=False, batch_argnums=())
    def whole_again(params):
        return tx.gather_params(tx.shard_params(tx.gather_params(params, "data"), "data"), "data")

    chex.assert_trees_all_equal(
        jax.tree.map(np.asarray, whole_again(p)), jax.tree.map(np.asarray, p)
    )


def test_checkpoint_round_trips_between_fully_sharded_and_data_parallel(tmp_path):
    mesh = tx.mesh(data=8)
    fs = tx.fully_sharded(zero3_step, mesh=mesh, min_size=256)
    dp = tx.data_parallel(dp_step, mesh=mesh)
    state, _ = run(fs, steps=2)
    with tx.checkpoint.Manager(tmp_path / "ckpt") as mngr:
        mngr.save(2, state)
        mngr.wait()
        fresh = tx.TrainState.create(params(seed=5), OPT)
        like_dp = dp.place(fresh, batch())[0]
        as_dp = mngr.restore(2, like=like_dp)
        single = jax.tree.map(
            lambda x: jax.device_put(np.zeros(x.shape, x.dtype), jax.devices()[0]), fresh
        )
        as_one = mngr.restore(2, like=single)
    whole = jax.tree.map(np.asarray, state)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, as_dp), whole)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, as_one), whole)
    assert not spec_axes(as_dp.params["mlp"]["up"]["kernel"].sharding.spec)
    # and back: the DP state saved, restored split
    with tx.checkpoint.Manager(tmp_path / "back") as mngr:
        mngr.save(2, as_dp)
        mngr.wait()
        like_fs = fs.place(tx.TrainState.create(params(seed=5), OPT), batch())[0]
        as_fs = mngr.restore(2, like=like_fs)
    assert as_fs.params["mlp"]["up"]["kernel"].sharding.spec == P(None, "data")
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, as_fs), whole)
    # training continues identically from either layout
    _, a = run(fs, 2, state=as_fs, first_seed=10)
    _, b = run(dp, 2, state=as_dp, first_seed=10)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_inside_a_pipeline_step_each_stage_is_split_over_data():
    from tests.unit.test_pipeline import loss, problem, stage

    mesh = tx.mesh(data=2, stage=4)
    sp, x, t, lp = problem(4, 8, rows=2)
    pipe = tx.pipeline(stage, schedule="1f1b", microbatches=4, loss=loss)
    stage_rules = tx.Rules((r"^(w|b|w2)$", P("stage")), (r".*", P()))

    def zero3(sp, lp, x, t):
        whole, head = tx.gather_params(sp, "data"), tx.gather_params(lp, "data")
        value, (g_sp, _, g_lp) = pipe(whole, x, t, head)
        g_sp, g_lp = tx.scatter_grads(g_sp, "data"), tx.scatter_grads(g_lp, "data")
        return tx.pmean(value, "data"), g_sp, g_lp

    def dp(sp, lp, x, t):
        value, (g_sp, _, g_lp) = pipe(sp, x, t, lp)
        return tx.pmean(value, "data"), tx.pmean(g_sp, "data"), tx.pmean(g_lp, "data")

    def wrap(f, outer):
        return outer(
            tx.tensor_parallel(stage_rules, axis="stage")(f),
            mesh=mesh,
            batch_argnums=(2, 3),
            donate=False,
        )

    fs = tx.fully_sharded(
        tx.tensor_parallel(stage_rules, axis="stage")(zero3),
        mesh=mesh,
        batch_argnums=(2, 3),
        donate=False,
        min_size=0,
    )
    ref = wrap(dp, tx.data_parallel)
    (specs, *_), _ = fs.specs(sp, lp, x, t)
    assert specs["w"] == P("stage", None, "data")  # (4, D, 2D): stage rows; 2D over data
    assert specs["w2"] == P("stage", "data")  # (4, 2D, D)
    value, g_sp, g_lp = fs(sp, lp, x, t)
    assert g_sp["w"].sharding.spec == P("stage", None, "data")  # the gradient comes back split
    r_value, r_sp, r_lp = ref(sp, lp, x, t)
    np.testing.assert_allclose(float(value), float(r_value), rtol=1e-6)
    assert_close((g_sp, g_lp), (r_sp, r_lp), rtol=1e-5, atol=1e-7)
    found = hlo.summary(hlo.collectives(fs.lower(sp, lp, x, t).compile().as_text(), mesh))
    assert found[("all-gather", ("stage",))] == 0


def test_errors_name_the_fault():
    mesh = tx.mesh(data=8)
    with pytest.raises(tx.PlanError, match="shard must be 'params'"):
        tx.fully_sharded(zero3_step, mesh=mesh, shard="grads")
    with pytest.raises(tx.PlanError, match="min_size"):
        tx.fully_sharded(zero3_step, mesh=mesh, min_size=-1)
    with pytest.raises(tx.CollectiveError, match="not bound"):
        tx.gather_params(params(), "data")

    @tx.data_parallel(mesh=mesh, donate=False)
    def under_dp(p, b):
        return tx.gather_params(p, "data")

    with pytest.raises(tx.CollectiveError, match="not bound by tx.fully_sharded"):
        under_dp(params(), batch())

    @tx.fully_sharded(mesh=mesh, donate=False)
    def received(p, b):  # leaves as the body received them: known whatever the tree
        return tx.gather_params({"w": p["mlp"]["up"]["kernel"], "v": p["embed"]}, "data")

    got = received(params(), batch())
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(params()["mlp"]["up"]["kernel"]))

    @tx.fully_sharded(mesh=mesh, donate=False)
    def stranger(p, b):  # computed leaves in a tree that is no part of the state
        return tx.gather_params({"w": p["head"] * 2, "v": p["embed"]}, "data")

    with pytest.raises(tx.CollectiveError, match="not laid out by fully_sharded"):
        stranger(params(), batch())

    @tx.fully_sharded(mesh=mesh, donate=False)
    def twice(p, b):
        return tx.scatter_grads(tx.scatter_grads(tx.gather_params(p, "data"), "data"), "data")

    with pytest.raises(tx.CollectiveError, match="shard's shape"):
        twice(params(), batch())

    @tx.fully_sharded(mesh=mesh, shard="optimizer", donate=False)
    def whole_already(state, b):
        return tx.gather_params(state.params, "data")

    with pytest.raises(tx.CollectiveError, match="already whole"):
        whole_already(tx.TrainState.create(params(), optax.adam(1e-3)), batch())

    @tx.fully_sharded(mesh=mesh)
    def forgot_scatter(state, b):
        p = tx.gather_params(state.params, "data")
        grads = tx.pmean(jax.grad(loss_fn)(p, b), "data")
        return state.apply_gradients(grads)

    with pytest.raises(tx.PlanError, match="(?s)mlp/down/kernel.*scatter_grads"):
        forgot_scatter(tx.TrainState.create(params(), optax.adam(1e-3)), batch())


def test_hybrid_split_within_data_and_replicated_across_replica():
    # HSDP: state split over 'data' (4), replicated over 'replica' (2); batch over both
    mesh = tx.mesh(replica=2, data=4)

    def hybrid(state, b):
        p = tx.gather_params(state.params, "data")
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
        grads = tx.pmean(tx.scatter_grads(grads, "data"), "replica")
        return state.apply_gradients(grads), tx.pmean(loss, ("replica", "data"))

    def dp_both(state, b):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, b)
        grads = tx.pmean(grads, ("replica", "data"))
        return state.apply_gradients(grads), tx.pmean(loss, ("replica", "data"))

    step = tx.data_parallel(tx.fully_sharded(hybrid, min_size=256), axis="replica", mesh=mesh)
    ref = tx.data_parallel(tx.data_parallel(dp_both, axis="data"), axis="replica", mesh=mesh)
    (specs, batch_spec), _ = step.specs(tx.TrainState.create(params(), OPT), batch())
    assert specs.params["mlp"]["up"]["kernel"] == P(None, "data")
    assert batch_spec == (P(("replica", "data")), P(("replica", "data")))
    state, losses = run(step, steps=3)
    _, ref_losses = run(ref, steps=3)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    assert state.params["mlp"]["up"]["kernel"].addressable_shards[0].data.shape == (D, H // 4)


def layered_params(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.2, jnp.float32)  # noqa: E731
    return {"layers": [{"w": f(32, 32), "b": f(32)} for _ in range(3)], "head": f(32, 8)}


def block(p, h):
    return h + jnp.tanh(h @ p["w"] + p["b"])


def layered_loss(p, b):
    h = b[0]
    for layer in p["layers"]:
        h = block(layer, h)
    return jnp.mean((h @ p["head"] - b[1]) ** 2)


def per_layer_loss(shards, b):
    """ZeRO-3 a layer at a time: each layer gathered inside jax.checkpoint (again in the
    backward pass), its gradient reduce-scattered by the gather's vjp."""
    h = b[0]
    for layer in shards["layers"]:
        gathered = lambda s, h: block(tx.gather_params(s, "data", vjp="mean"), h)  # noqa: E731
        h = jax.checkpoint(gathered)(layer, h)
    head = tx.gather_params(shards["head"], "data", vjp="mean")
    return jnp.mean((h @ head - b[1]) ** 2)


def test_gathering_a_layer_at_a_time_under_remat():
    mesh = tx.mesh(data=8)

    @tx.fully_sharded(mesh=mesh, min_size=256)
    def per_layer(state, b):
        loss, grads = jax.value_and_grad(per_layer_loss)(state.params, b)  # reduced shards
        return state.apply_gradients(grads), tx.pmean(loss, "data")

    @tx.data_parallel(mesh=mesh)
    def dp(state, b):
        loss, grads = jax.value_and_grad(layered_loss)(state.params, b)
        return state.apply_gradients(tx.pmean(grads, "data")), tx.pmean(loss, "data")

    def go(step):
        return run(step, 3, state=tx.TrainState.create(layered_params(), optax.adam(1e-2)))

    state, losses = go(per_layer)
    ref_state, ref_losses = go(dp)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    assert_close(state.params, ref_state.params, rtol=1e-5, atol=1e-6)
    assert state.params["layers"][0]["w"].sharding.spec[0] == "data"
    lowered = per_layer.lower(state, batch())
    found = hlo.summary(hlo.collectives(lowered.compile().as_text(), mesh))
    # The program holds the 3 layer kernels gathered in the forward pass and again by remat,
    # and the head once. XLA's CPU compiler then merges each recomputed gather with the
    # forward's (it does not trade compute for memory), leaving 4.
    assert lowered.as_text().count('"stablehlo.all_gather"') == 3 * 2 + 1
    assert found[("all-gather", ("data",))] == 4
    # one reduce-scatter per split gradient, in the gathers' backward passes
    assert found[("reduce-scatter", ("data",))] == 4


def test_differentiating_through_a_gather_needs_a_vjp():
    mesh = tx.mesh(data=8)

    @tx.fully_sharded(mesh=mesh, min_size=256, donate=False)
    def hidden(state, b):
        loss = lambda p: layered_loss(tx.gather_params(p, "data"), b)  # noqa: E731
        return jax.grad(loss)(state.params)

    with pytest.raises(tx.CollectiveError, match="(?s)gradient was taken through.*vjp='mean'"):
        hidden(tx.TrainState.create(layered_params(), optax.sgd(0.1)), batch())


def test_a_reduced_metric_with_a_shards_shape_stays_replicated():
    mesh = tx.mesh(data=8)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 8)), jnp.float32)  # shard: (8, 8)

    @tx.fully_sharded(mesh=mesh, min_size=8, donate=False)
    def step(w, b):
        x, _ = b
        whole = tx.gather_params(w, "data")
        gram = tx.pmean(x[:, :8].T @ x[:, :8], "data")  # (8, 8): a shard's shape, reduced
        return w * 1.0, gram, whole[:8] * 1.0  # the last: varying? no, gathered

    new_w, gram, top = step(w, batch(64))
    assert new_w.shape == (64, 8) and "data" in new_w.sharding.spec
    x = batch(64)[0]
    np.testing.assert_allclose(
        np.asarray(gram),
        x[:, :8].T @ x[:, :8] / 8,
        rtol=1e-5,  # mean of 8 replicas' sums
    )
    assert gram.shape == (8, 8) and top.shape == (8, 8)
    np.testing.assert_array_equal(np.asarray(top), np.asarray(w[:8]))


def test_state_returned_where_no_layout_follows_is_an_error():
    mesh = tx.mesh(data=8)

    @tx.fully_sharded(mesh=mesh, min_size=256, donate=False)
    def nested(state, b):
        p = tx.gather_params(state.params, "data")
        grads = tx.scatter_grads(jax.grad(loss_fn)(p, b), "data")
        return {"state": state.apply_gradients(grads)}

    state = tx.TrainState.create(jax.tree.map(jnp.zeros_like, params()), optax.sgd(0.1))
    with pytest.raises(tx.PlanError, match="(?s)shard.*of split state.*top-level output"):
        nested(state, batch())


def test_zero1_finds_an_argument_named_opt_state_and_needs_one():
    mesh = tx.mesh(data=8)
    opt = optax.adam(1e-3)

    @tx.fully_sharded(mesh=mesh, shard="optimizer", min_size=256, batch_argnums=2, donate=False)
    def step(params, opt_state, b):
        grads = tx.scatter_grads(jax.grad(loss_fn)(params, b), "data")
        shard = tx.shard_params(params, "data")
        updates, opt_state = opt.update(grads, opt_state, shard)
        return tx.gather_params(optax.apply_updates(shard, updates), "data"), opt_state

    p = params()
    new_p, new_opt = step(p, opt.init(p), batch())
    assert new_opt[0].mu["mlp"]["up"]["kernel"].sharding.spec == P(None, "data")
    assert not spec_axes(new_p["mlp"]["up"]["kernel"].sharding.spec)

    evaluate = tx.fully_sharded(
        lambda p, b: tx.pmean(loss_fn(p, b), "data"), mesh=mesh, shard="optimizer"
    )
    with pytest.raises(tx.PlanError, match="shard='optimizer'.*has none"):
        evaluate(p, batch())


def test_gathering_a_layer_inside_a_scan_over_stacked_layers():
    mesh = tx.mesh(data=8)
    layers = layered_params()["layers"]
    stacked = {
        "layers": jax.tree.map(lambda *a: jnp.stack(a), *layers),  # w: (3, 32, 32)
        "head": layered_params()["head"],
    }

    def scanned_loss(shards, b):
        def one(h, layer):  # layer: this layer's shards, a slice of the stacked leaves
            return block(tx.gather_params(layer, "data", vjp="mean"), h), None

        h, _ = jax.lax.scan(jax.checkpoint(one), b[0], shards["layers"])
        head = tx.gather_params(shards["head"], "data", vjp="mean")
        return jnp.mean((h @ head - b[1]) ** 2)

    @tx.fully_sharded(mesh=mesh, min_size=256)
    def step(state, b):
        loss, grads = jax.value_and_grad(scanned_loss)(state.params, b)
        return state.apply_gradients(grads), tx.pmean(loss, "data")

    state = tx.TrainState.create(stacked, optax.adam(1e-2))
    (specs, _), _ = step.specs(state, batch())
    assert specs.params["layers"]["w"] == P(None, "data")  # (3, 32, 32): the layer dims
    ref = tx.TrainState.create(layered_params(), optax.adam(1e-2))
    dp = tx.data_parallel(
        lambda s, b: (
            s.apply_gradients(tx.pmean(jax.grad(layered_loss)(s.params, b), "data")),
            tx.pmean(layered_loss(s.params, b), "data"),
        ),
        mesh=mesh,
    )
    for i in range(3):
        state, loss = step(state, batch(seed=i))
        ref, ref_loss = dp(ref, batch(seed=i))
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    np.testing.assert_allclose(
        np.asarray(state.params["layers"]["w"][1]),
        np.asarray(ref.params["layers"][1]["w"]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_like_names_the_layout_of_one_ambiguous_leaf():
    mesh = tx.mesh(data=2, model=4)
    rules = tx.rules.megatron_mlp() + tx.Rules((r".*", P()))
    p = {"mlp": {"up": {"kernel": jnp.ones((64, 64))}, "down": {"kernel": jnp.ones((64, 64))}}}

    def up_grad(p, x):
        w = tx.gather_params(p, "data")["mlp"]["up"]["kernel"]
        g = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)
        with pytest.raises(tx.CollectiveError, match="like="):
            tx.scatter_grads(g, "data")  # (64, 64): up's layout or down's?
        up = tx.scatter_grads(g, "data", like=p["mlp"]["up"]["kernel"])
        down = tx.scatter_grads(g.T, "data", like=p["mlp"]["down"]["kernel"])
        return {"mlp": {"up": {"kernel": up}, "down": {"kernel": down}}}  # shaped like p

    f = tx.fully_sharded(tx.tensor_parallel(rules)(up_grad), mesh=mesh, donate=False)
    x = np.ones((16, 64), np.float32)
    assert f.specs(p, x)[0][0]["mlp"]["up"]["kernel"] == P("data", "model")
    g = f(p, x)
    assert g["mlp"]["up"]["kernel"].sharding.spec == P("data", "model")
    assert g["mlp"]["down"]["kernel"].sharding.spec == P("model", "data")
    np.testing.assert_allclose(
        np.asarray(g["mlp"]["down"]["kernel"]), np.asarray(g["mlp"]["up"]["kernel"]).T
    )


def test_masked_clipping_sees_the_whole_norm():
    mesh = tx.mesh(data=8)
    mask = jax.tree.map(lambda x: x.ndim == 2, params())
    opt = optax.chain(optax.masked(tx.clip_by_global_norm(0.05), mask), optax.sgd(0.1))
    ref_opt = optax.chain(optax.masked(optax.clip_by_global_norm(0.05), mask), optax.sgd(0.1))
    state, _ = run(tx.fully_sharded(zero3_step, mesh=mesh, min_size=256), steps=2, opt=opt)
    ref, _ = run(tx.data_parallel(dp_step, mesh=mesh), steps=2, opt=ref_opt)
    assert_close(state.params, ref.params, rtol=1e-5, atol=1e-7)


def test_replicated_argnums_keep_a_constant_whole_and_undonated():
    mesh = tx.mesh(data=8)
    table = jnp.asarray(np.random.default_rng(2).normal(size=(32, 32)), jnp.float32)

    def with_table(p, table, b):
        return loss_fn(p, (b[0] @ table, b[1]))

    @tx.fully_sharded(mesh=mesh, min_size=256, replicated_argnums=1)
    def step(state, table, b):
        p = tx.gather_params(state.params, "data")
        loss, grads = jax.value_and_grad(with_table)(p, table, b)
        return state.apply_gradients(tx.scatter_grads(grads, "data")), tx.pmean(loss, "data")

    @tx.data_parallel(mesh=mesh, donate=False)
    def ref_step(state, table, b):
        loss, grads = jax.value_and_grad(with_table)(state.params, table, b)
        return state.apply_gradients(tx.pmean(grads, "data")), tx.pmean(loss, "data")

    assert step.specs(tx.TrainState.create(params(), OPT), table, batch())[0][1] == P()
    state, ref = tx.TrainState.create(params(), OPT), tx.TrainState.create(params(), OPT)
    for i in range(2):  # the same table every step: kept whole, not donated
        state, loss = step(state, table, batch(seed=i))
        ref, ref_loss = ref_step(ref, table, batch(seed=i))
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert not table.is_deleted()
    with pytest.raises(tx.PlanError, match="replicated_argnums must be an int"):
        tx.fully_sharded(step, replicated_argnums="table")


def test_gather_params_in_bf16_reduces_gradients_in_float32():
    # Mixed precision (docs/mixed_precision.md): the all-gather moves bfloat16, the
    # reduce-scatter of its backward pass float32, and the gradient shards are float32.
    mesh = tx.mesh(data=8)
    w = np.arange(64 * 16, dtype=np.float32).reshape(64, 16) / 1000

    @tx.fully_sharded(mesh=mesh, min_size=16, donate=False)
    def grads(w, x):
        def loss(shard):
            whole = tx.gather_params(shard, "data", vjp="mean", dtype=jnp.bfloat16)
            assert whole.dtype == jnp.bfloat16 and whole.shape == (64, 16)
            return jnp.sum(x.astype(jnp.bfloat16) @ whole).astype(jnp.float32)

        value, g = jax.value_and_grad(loss)(w)
        return g, tx.pmean(value, "data")

    x = np.ones((8, 64), np.float32)
    g, _ = grads(w, x)
    assert g.dtype == jnp.float32 and g.sharding.spec == P("data")
    np.testing.assert_allclose(g, np.ones((64, 16)), rtol=1e-6)  # mean over replicas of 1 * 1
    written = hlo.collectives(grads.lower(w, x).as_text(dialect="hlo"), mesh)
    kinds = {(c.kind, c.shapes[0][:4]) for c in written}
    assert ("all-gather", "bf16") in kinds and ("reduce-scatter", "f32[") in kinds, kinds
    with pytest.raises(tx.CollectiveError, match="dtype must be a floating dtype"):
        tx.fully_sharded(
            lambda w: tx.gather_params(w, "data", dtype=jnp.int8), mesh=mesh, min_size=16
        )(w)
