import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import titanax as tx
from titanax.parallel import hlo
from titanax.parallel.pipeline import compile_tables

D = 6


def stage(p, x):
    return x + jnp.tanh(jax.nn.relu(x @ p["w"] + p["b"]) @ p["w2"])


def loss(lp, y, t):
    return jnp.mean((y @ lp["head"] - t) ** 2)


def sequential(sp, x, t, lp, microbatches):
    """The reference: the stages in order on each microbatch, losses averaged."""
    n = jax.tree.leaves(sp)[0].shape[0]

    def one(xm, tm):
        for s in range(n):
            xm = stage(jax.tree.map(lambda a, s=s: a[s], sp), xm)
        return loss(lp, xm, tm)

    xs = x.reshape(microbatches, -1, *x.shape[1:])
    ts = t.reshape(microbatches, -1, *t.shape[1:])
    return jnp.mean(jax.vmap(one)(xs, ts))


def problem(stages, microbatches, seed=0, rows=2):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.4, jnp.float32)  # noqa: E731
    sp = {"w": f(stages, D, 2 * D), "b": f(stages, 2 * D), "w2": f(stages, 2 * D, D)}
    lp = {"head": f(D, 3)}
    x, t = f(microbatches * rows, D), f(microbatches * rows, 3)
    return sp, x, t, lp


# The reference's loss and gradients (stage params, input, loss params), compiled once per
# shape: the parametrized cases share shapes, and run op by op it compiled every primitive
# again for each new shape (about a third of this file's compile time).
sequential_grads = jax.jit(jax.value_and_grad(sequential, argnums=(0, 1, 3)), static_argnums=4)


def assert_matches(out, ref, rtol=1e-5):
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        a, b = np.asarray(a), np.asarray(b)  # numpy: no program compiled per leaf shape
        scale = float(np.max(np.abs(b))) or 1.0
        assert float(np.max(np.abs(a - b))) <= rtol * scale


CASES = [
    ("gpipe", 2, 1, [1, 3]),
    ("gpipe", 4, 1, [4, 6]),
    ("1f1b", 2, 1, [1, 5]),
    ("1f1b", 4, 1, [3, 8]),
    ("interleaved_1f1b", 2, 2, [2, 4]),
    ("interleaved_1f1b", 4, 2, [4, 8]),
    ("zero_bubble", 2, 1, [2, 5]),
    ("zero_bubble", 4, 1, [4, 7]),
    ("zero_bubble_v", 2, 2, [1, 4]),
    ("zero_bubble_v", 4, 2, [3, 8]),
]


@pytest.mark.parametrize("remat", [False, True], ids=["residuals", "remat"])
@pytest.mark.parametrize("name, p, v, ms", CASES, ids=[f"{c[0]}-p{c[1]}" for c in CASES])
def test_loss_and_all_gradients_equal_value_and_grad(name, p, v, ms, remat):
    mesh = tx.mesh(devices=jax.devices()[:p], stage=p)
    for m in ms:
        sp, x, t, lp = problem(p * v, m)
        pipe = tx.pipeline(
            stage,
            schedule=name,
            microbatches=m,
            loss=loss,
            mesh=mesh,
            virtual_stages=v,
            remat=remat,
        )
        got = pipe(sp, x, t, lp)
        want_loss, want = sequential_grads(sp, x, t, lp, m)
        assert_matches(got, (want_loss, want))


def test_loss_params_are_optional():
    mesh = tx.mesh(devices=jax.devices()[:2], stage=2)
    sp, x, t, _ = problem(2, 4)
    pipe = tx.pipeline(
        stage, microbatches=4, mesh=mesh, loss=lambda _, y, t: jnp.mean((y[:, :3] - t) ** 2)
    )
    value, (g_sp, g_x, g_lp) = pipe(sp, x, t)
    assert g_lp is None and g_x.shape == x.shape and np.isfinite(float(value))


def test_buffers_hold_only_microbatches_in_flight():
    for m in (4, 8, 16):
        one = compile_tables(tx.schedules.get("1f1b", stages=4, microbatches=m))
        gpipe = compile_tables(tx.schedules.get("gpipe", stages=4, microbatches=m))
        assert one.slots["r"] <= 4  # 1F1B: at most p per device, whatever m
        assert gpipe.slots["r"] == m  # GPipe: every microbatch


def test_compile_does_not_grow_with_microbatches():
    mesh = tx.mesh(devices=jax.devices()[:4], stage=4)
    traces = {}
    for m in (4, 32):
        count = []

        def counted(p, x, count=count):
            count.append(1)
            return stage(p, x)

        sp, x, t, lp = problem(4, m)
        tx.pipeline(counted, microbatches=m, loss=loss, mesh=mesh)(sp, x, t, lp)
        traces[m] = len(count)
    assert traces[4] == traces[32]  # the tick loop is traced once, not once per microbatch


def test_errors():
    mesh = tx.mesh(devices=jax.devices()[:4], stage=4)
    sp, x, t, lp = problem(4, 8)
    with pytest.raises(
        tx.ScheduleError,
        match="schedule must be one of 'gpipe', '1f1b', "
        "'interleaved_1f1b', 'zero_bubble', 'zero_bubble_v'; got 'pipedream'",
    ):
        tx.pipeline(stage, schedule="pipedream", microbatches=8, loss=loss)
    with pytest.raises(
        tx.ScheduleError,
        match=r"stage_params leaves have \[3\] rows, but the "
        r"pipeline runs 4 stages \(4 devices along 'stage' x virtual_stages=1\)",
    ):
        tx.pipeline(stage, microbatches=8, loss=loss, mesh=mesh)(problem(3, 8)[0], x, t, lp)
    with pytest.raises(
        tx.ScheduleError,
        match=r"runs 8 stages \(4 devices along 'stage' x "
        r"virtual_stages=2\)",
    ):
        tx.pipeline(
            stage,
            schedule="interleaved_1f1b",
            microbatches=8,
            loss=loss,
            mesh=mesh,
            virtual_stages=2,
        )(sp, x, t, lp)
    with pytest.raises(
        tx.ScheduleError,
        match=r"microbatches=5 must divide the batch, but x and "
        r"targets have leading dimensions \[16\]",
    ):
        tx.pipeline(stage, microbatches=5, loss=loss, mesh=mesh)(sp, x, t, lp)
    with pytest.raises(
        tx.ScheduleError,
        match=r"microbatches must be a multiple of 4 \(and at "
        r"least 4\); got 2. Use microbatches=4",
    ):
        sp8, x2, t2, lp2 = problem(8, 2)
        tx.pipeline(
            stage,
            schedule="interleaved_1f1b",
            microbatches=2,
            loss=loss,
            mesh=mesh,
            virtual_stages=2,
        )(sp8, x2, t2, lp2)
    with pytest.raises(
        tx.ScheduleError,
        match="the schedule is for stages=2, microbatches=8, but the 'stage' axis has 4 devices",
    ):
        s = tx.schedules.get("1f1b", stages=2, microbatches=8)
        tx.pipeline(stage, schedule=s, microbatches=8, loss=loss, mesh=mesh)(sp, x, t, lp)
    with pytest.raises(tx.ScheduleError, match="no mesh"):
        tx.pipeline(stage, microbatches=8, loss=loss)(sp, x, t, lp)
    with pytest.raises(tx.ScheduleError, match=r"the mesh has no axis 'pp' \(axes: stage\)"):
        tx.pipeline(stage, microbatches=8, loss=loss, axis="pp", mesh=mesh)(sp, x, t, lp)
    with pytest.raises(tx.ScheduleError, match="microbatches must be a positive int"):
        tx.pipeline(stage, microbatches=0, loss=loss)
    pipe = tx.pipeline(stage, microbatches=8, loss=loss, mesh=mesh)
    keyed = {**sp, "k": jax.random.split(jax.random.key(0), 4)}  # dropout keys, one per stage
    with pytest.raises(tx.ScheduleError, match=r"stage_params\[k\] is a PRNG key array.*key_data"):
        pipe(keyed, x, t, lp)
    with pytest.raises(tx.ScheduleError, match=r"x\[mask\] of the activation is not floating"):
        pipe(sp, {"h": x, "mask": jnp.ones(x.shape, jnp.int32)}, t, lp)
    widen = tx.pipeline(
        lambda p, h: stage(p, h).astype(jnp.float32), microbatches=8, loss=loss, mesh=mesh
    )
    with pytest.raises(tx.ScheduleError, match=r"takes x: bfloat16\[2, 6\] and returns x: float32"):
        widen(sp, x.astype(jnp.bfloat16), t, lp)


def _reference_step(sp, lp, x, t, m):
    value, (g_sp, _, g_lp) = sequential_grads(sp, x, t, lp, m)
    return value, g_sp, g_lp


def test_inside_data_parallel():
    mesh = tx.mesh(data=2, stage=4)
    sp, x, t, lp = problem(4, 8, rows=2)
    pipe = tx.pipeline(stage, schedule="1f1b", microbatches=4, loss=loss)

    @tx.data_parallel(mesh=mesh, batch_argnums=(2, 3), donate=False)
    def step(sp, lp, x, t):
        value, (g_sp, _, g_lp) = pipe(sp, x, t, lp)  # this replica's half of the batch
        return tx.pmean(value, "data"), tx.pmean(g_sp, "data"), tx.pmean(g_lp, "data")

    # each replica averages over its 4 microbatches; the replicas' mean is the mean over 8
    assert_matches(step(sp, lp, x, t), _reference_step(sp, lp, x, t, 8))


def test_with_tensor_parallel_stages_and_data_parallel():
    mesh = tx.mesh(data=2, stage=2, model=2)
    sp, x, t, lp = problem(2, 8)
    pipe = tx.pipeline(stage, schedule="zero_bubble", microbatches=4, loss=loss)
    model_rules = tx.Rules(
        (r"w$", P(None, None, "model")),
        (r"b$", P(None, "model")),
        (r"w2$", P(None, "model", None)),
        (r".*", P()),
    )
    stage_rules = tx.Rules((r"^(w|b|w2)$", P("stage")), (r".*", P()))  # the stage params

    @tx.data_parallel(mesh=mesh, batch_argnums=(2, 3), donate=False)
    @tx.tensor_parallel(stage_rules, axis="stage")
    @tx.tensor_parallel(model_rules, axis="model")
    def step(sp, lp, x, t):
        value, (g_sp, _, g_lp) = pipe(sp, x, t, lp)
        return tx.pmean(value, "data"), tx.pmean(g_sp, "data"), tx.pmean(g_lp, "data")

    in_specs, _ = step.specs(sp, lp, x, t)
    assert in_specs[0]["w"] == P("stage", None, "model")
    assert_matches(step(sp, lp, x, t), _reference_step(sp, lp, x, t, 8))
    found = hlo.summary(hlo.collectives(step.lower(sp, lp, x, t).compile().as_text(), mesh))
    # p=2: device 0 sends right, device 1 left (to 0): one ppermute carries both
    assert found[("collective-permute", ("stage",))] == 1
    assert found[("all-gather", ("stage",))] == 0  # stage parameters stay where they live


def test_pipeline_alone_on_stage_x_model():
    mesh = tx.mesh(stage=4, model=2)
    sp, x, t, lp = problem(4, 4)
    pipe = tx.pipeline(stage, microbatches=4, loss=loss, mesh=mesh)
    assert_matches(pipe(sp, x, t, lp), sequential_grads(sp, x, t, lp, 4))


def test_tensor_parallel_stages_on_stage_x_model():
    mesh = tx.mesh(stage=4, model=2)
    sp, x, t, lp = problem(4, 4)
    pipe = tx.pipeline(stage, schedule="1f1b", microbatches=4, loss=loss)
    stage_rules = tx.Rules((r"^(w|b|w2)$", P("stage")), (r".*", P()))
    model_rules = tx.Rules(
        (r"^w$", P(None, None, "model")),
        (r"^b$", P(None, "model")),
        (r"^w2$", P(None, "model", None)),
        (r".*", P()),
    )

    @tx.tensor_parallel(stage_rules, axis="stage", mesh=mesh, batch_argnums=(2, 3))
    @tx.tensor_parallel(model_rules, axis="model", batch_argnums=(2, 3))
    def grads(sp, lp, x, t):
        return pipe(sp, x, t, lp)

    assert grads.specs(sp, lp, x, t)[0][0]["w2"] == P("stage", "model")
    value, (g_sp, g_x, g_lp) = grads(sp, lp, x, t)
    want = sequential_grads(sp, x, t, lp, 4)
    assert_matches((value, (g_sp, g_x, g_lp)), want)
    found = hlo.summary(hlo.collectives(grads.lower(sp, lp, x, t).compile().as_text(), mesh))
    # Megatron inside each stage: one all-reduce of the activation in each forward branch
    # (F, F of the last stage) and of its input gradient in B; none in W
    assert found[("all-reduce", ("model",))] == 3
    assert found[("all-gather", ("stage",))] == 0


def test_weight_gradient_split_runs_each_vjp_equation_once():
    """B and W together run the equations of the stage's VJP once: W starts from B's
    stash (the cotangents inside the stage) instead of recomputing them, and neither
    runs the forward again."""
    from titanax.parallel.pipeline.split import StageVJP

    sp, x, _, _ = problem(1, 1)
    row = jax.tree.map(lambda a: a[0], sp)
    vjp = StageVJP(stage, row, x)
    full = jax.make_jaxpr(lambda p, h, g: jax.vjp(stage, p, h)[1](g))(row, x, x).jaxpr
    backward = [e for e in full.eqns if e.primitive.name == "dot_general"][2:]  # after F's 2
    names = [e.primitive.name for e in (*vjp.b_eqns, *vjp.w_eqns)]
    assert names.count("dot_general") == len(backward) == 4  # 2 for dx, 2 for dW
    assert [e.primitive.name for e in vjp.w_eqns].count("dot_general") == 2
    assert not set(map(id, vjp.b_eqns)) & set(map(id, vjp.w_eqns))
    # In the compiled program: 2 dots in each forward branch (F, F of the last stage),
    # 2 in B (stage 0's B is the same branch), 2 in W; the loss adds 3 to the last
    # stage's F (y @ head, and the gradients for head and y)
    mesh = tx.mesh(devices=jax.devices()[:2], stage=2)
    sp, x, t, lp = problem(2, 4)
    pipe = tx.pipeline(stage, schedule="zero_bubble", microbatches=4, loss=loss, mesh=mesh)
    with jax.set_mesh(mesh):
        text = jax.jit(pipe).lower(sp, x, t, lp).compile().as_text()
    assert text.count(" dot(") == 2 + (2 + 3) + 2 + 2


@pytest.mark.parametrize("where", ["jit", "jit in set_mesh", "set_mesh"])
def test_composes_with_jit(where):
    mesh = tx.mesh(stage=4, rest=2)
    sp, x, t, lp = problem(4, 8)
    pipe = tx.pipeline(stage, schedule="1f1b", microbatches=8, loss=loss, mesh=mesh)
    want = sequential_grads(sp, x, t, lp, 8)
    if where == "jit":
        got = jax.jit(pipe)(sp, x, t, lp)
    else:
        with jax.set_mesh(mesh):
            got = (jax.jit(pipe) if where == "jit in set_mesh" else pipe)(sp, x, t, lp)
    assert_matches(got, want)


def test_stage_and_loss_close_over_values_of_the_callers_jit():
    mesh = tx.mesh(stage=4, rest=2)
    sp, x, t, lp = problem(4, 8)

    @jax.jit
    def step(sp, x, t, lp, scale):
        gain = 1 + scale  # computed in the step: the stage and loss close over it
        pipe = tx.pipeline(
            lambda p, h: stage(p, h) * gain,
            microbatches=8,
            loss=lambda q, y, tt: loss(q, y, tt) / scale,
            mesh=mesh,
        )
        return pipe(sp, x, t, lp)

    def reference(sp, x, lp):
        def one(xm, tm):
            for s in range(4):
                xm = stage(jax.tree.map(lambda a, s=s: a[s], sp), xm) * 1.5
            return loss(lp, xm, tm) / 0.5

        xs, ts = x.reshape(8, -1, D), t.reshape(8, -1, 3)
        return jnp.mean(jax.vmap(one)(xs, ts))

    want = jax.value_and_grad(reference, argnums=(0, 1, 2))(sp, x, lp)
    assert_matches(step(sp, x, t, lp, 0.5), want)


def test_closing_over_a_value_of_the_step_is_a_clear_error():
    mesh = tx.mesh(data=2, stage=4)
    sp, x, t, lp = problem(4, 8, rows=2)

    @tx.data_parallel(mesh=mesh, batch_argnums=(2, 3), donate=False)
    def step(sp, lp, x, t):
        tokens = tx.psum(jnp.float32(x.shape[0]), "data")
        pipe = tx.pipeline(stage, microbatches=4, loss=lambda q, y, tt: loss(q, y, tt) / tokens)
        value, (g_sp, _, g_lp) = pipe(sp, x, t, lp)
        return tx.pmean(value, "data"), tx.pmean(g_sp, "data"), tx.pmean(g_lp, "data")

    with pytest.raises(tx.ScheduleError, match="uses an array computed inside the step"):
        step(sp, lp, x, t)


def test_zero_bubble_v_inside_data_parallel():
    mesh = tx.mesh(data=2, stage=4)
    sp, x, t, lp = problem(8, 16, rows=1)
    pipe = tx.pipeline(stage, schedule="zero_bubble_v", virtual_stages=2, microbatches=8, loss=loss)

    @tx.data_parallel(mesh=mesh, batch_argnums=(2, 3), donate=False)
    def step(sp, lp, x, t):
        value, (g_sp, _, g_lp) = pipe(sp, x, t, lp)
        return tx.pmean(value, "data"), tx.pmean(g_sp, "data"), tx.pmean(g_lp, "data")

    assert_matches(step(sp, lp, x, t), _reference_step(sp, lp, x, t, 16))


def test_bf16_gradients_are_accumulated_in_float32():
    """With bf16 stage parameters, the microbatch gradients are summed in float32 and
    cast once: the error against float32 does not grow with the number of microbatches
    (summing in bf16 grew it from 0.0055 at m=1 to 0.0098 at m=64)."""
    mesh = tx.mesh(devices=jax.devices()[:2], stage=2)
    sp, x, t, lp = problem(2, 32, rows=1)
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), sp)
    want = sequential_grads(jax.tree.map(lambda a: a.astype(jnp.float32), low), x, t, lp, 1)[1][0]

    def error(m):
        pipe = tx.pipeline(stage, microbatches=m, loss=loss, mesh=mesh)
        _, (g, _, _) = pipe(low, x.astype(jnp.bfloat16), t, lp)
        assert g["w"].dtype == jnp.bfloat16
        return max(
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want))
        )

    one, many = error(1), error(32)
    assert many <= max(1.2 * one, 2**-8)  # bf16's own rounding of the result: 2^-8 relative


def test_bf16_stages_on_stage_x_data():
    """bf16 stage parameters, activations and gradients on a stage x data mesh: the user's
    tx.pmean of bf16 gradients is a bf16 all-reduce in a partly manual program, which
    aborted XLA:CPU's compiler (AllReducePromotion) before the guarded collectives
    reduced bf16 in float32 there."""
    mesh = tx.mesh(stage=4, data=2)
    sp, x, t, lp = problem(4, 16, rows=1)
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), sp)
    pipe = tx.pipeline(stage, microbatches=4, loss=loss)

    @tx.data_parallel(mesh=mesh, batch_argnums=(2, 3), donate=False)
    def step(sp, lp, x, t):
        value, (g_sp, _, g_lp) = pipe(sp, x, t, lp)
        return tx.pmean(value, "data"), tx.pmean(g_sp, "data"), tx.pmean(g_lp, "data")

    value, g, _ = step(low, lp, x.astype(jnp.bfloat16), t)
    assert g["w"].dtype == jnp.bfloat16
    wide = jax.tree.map(lambda a: a.astype(jnp.float32), low)
    want_value, (want, _, _) = sequential_grads(wide, x, t, lp, 8)
    np.testing.assert_allclose(float(value), float(want_value), rtol=2e-2)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
        assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) <= 0.02 * float(
            jnp.max(jnp.abs(b))
        )


@pytest.mark.parametrize("name, v", [("1f1b", 1), ("zero_bubble_v", 2)])
def test_pipeline_claims_the_stage_axis_for_stage_params_and_their_moments(name, v):
    """Inside a data_parallel step on data x stage, with no tensor_parallel layer over
    'stage', the stage parameters and their Adam moments are laid out along 'stage' by
    the pipeline itself: no all-gather of stage weights or gradients per step."""
    import optax

    mesh = tx.mesh(data=2, stage=4)
    sp, x, t, lp = problem(4 * v, 8, rows=2)
    pipe = tx.pipeline(stage, schedule=name, virtual_stages=v, microbatches=4, loss=loss)
    state = tx.TrainState.create({"stages": sp, "head": lp}, optax.adam(1e-2))

    @tx.data_parallel(mesh=mesh, batch_argnums=1)
    def step(state, batch):
        x, t = batch
        value, (g_sp, _, g_lp) = pipe(state.params["stages"], x, t, state.params["head"])
        grads = tx.pmean({"stages": g_sp, "head": g_lp}, "data")
        return state.apply_gradients(grads=grads), tx.pmean(value, "data")

    in_specs, out_specs = step.specs(state, (x, t))
    assert in_specs[0].params["stages"]["w"] == P("stage")
    assert in_specs[0].opt_state[0].mu["stages"]["w2"] == P("stage")
    assert in_specs[0].params["head"]["head"] == P()  # not a stage parameter
    assert out_specs[0].opt_state[0].nu["stages"]["b"] == P("stage")
    text = step.lower(state, (x, t)).compile().as_text()
    found = hlo.summary(hlo.collectives(text, mesh))
    if v == 1:
        assert found.get(("all-gather", ("stage",)), 0) == 0
    # the same numbers as the reference step
    _, g_ref, g_lp_ref = _reference_step(sp, lp, x, t, 8)
    want = optax.adam(1e-2).update({"stages": g_ref, "head": g_lp_ref}, state.opt_state)[0]
    before = jax.tree.map(np.asarray, state.params)
    new, _ = step(state, (x, t))  # donates state
    assert_matches(
        jax.tree.map(lambda a, b: np.asarray(a) - b, new.params, before), want, rtol=1e-4
    )
    assert new.params["stages"]["w"].sharding.spec == P("stage")


# Collectives over an outer manual axis inside a stage. The stage runs inside the
# executor's per-tick switch, which only one stage's devices take; a plain ppermute there
# met the pipeline's own permute in XLA:CPU's rendezvous and gave wrong values (loss 12.0
# against 15.6 on stage=2 x data=4, jaxlib 0.10.2).
RING = [(i, (i + 1) % 4) for i in range(4)]


def _mix(h):  # a per-replica hidden value mixed across the data replicas three ways
    gathered = jnp.einsum("n...,n->...", tx.all_gather(h, "data"), jnp.arange(4.0))
    return tx.ppermute(h, "data", RING) + tx.psum(h, "data") / 4 + 0.1 * gathered


def _outer_problem(schedule, v):
    mesh = tx.mesh(stage=2, data=4)
    rng = np.random.default_rng(1)
    sp = {"w": jnp.asarray(rng.normal(size=(2 * v, 4, 4)) * 0.5, jnp.float32)}
    x, t = (jnp.asarray(rng.normal(size=(32, 4)) * s, jnp.float32) for s in (1.0, 3.0))

    def mixed(p, x):
        return x + 2.0 * _mix(jnp.tanh(x @ p["w"]))

    mse = lambda _, y, t: jnp.mean((y - t) ** 2)  # noqa: E731
    pipe = tx.pipeline(mixed, schedule=schedule, microbatches=4, loss=mse, virtual_stages=v)

    @tx.data_parallel(axis="data", mesh=mesh, batch_argnums=(1, 2), donate=False)
    def piped(sp, x, t):
        value, (g, g_x, _) = pipe(sp, x, t)
        return tx.pmean(value, "data"), tx.pmean(g, "data"), tx.all_gather(g_x, "data")

    def seq(sp, x, t):  # the same stages in order, per microbatch, without the pipeline
        def one(xm, tm):
            for s in range(2 * v):
                xm = mixed({"w": sp["w"][s]}, xm)
            return mse(None, xm, tm)

        return jnp.mean(jax.vmap(one)(x.reshape(4, -1, 4), t.reshape(4, -1, 4)))

    @tx.data_parallel(axis="data", mesh=mesh, batch_argnums=(1, 2), donate=False)
    def reference(sp, x, t):
        value, (g, g_x) = jax.value_and_grad(seq, argnums=(0, 1))(sp, x, t)
        return tx.pmean(value, "data"), tx.pmean(g, "data"), tx.all_gather(g_x, "data")

    return piped(sp, x, t), reference(sp, x, t)


SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 1)]


@pytest.mark.parametrize("schedule, v", SCHEDULES, ids=[s for s, _ in SCHEDULES])
def test_ppermute_psum_all_gather_over_an_outer_axis_inside_a_stage(schedule, v):
    """Loss and every gradient equal the same stages run without the pipeline, in the same
    data_parallel step (tx.ppermute inside a stage runs as an all_to_all)."""
    got, want = _outer_problem(schedule, v)
    assert abs(float(want[0]) - 1.0) > 0.1  # not a trivial loss
    assert_matches(got, want)


def test_plain_ppermute_or_a_collective_over_the_stage_axis_in_a_stage_is_an_error():
    mesh = tx.mesh(stage=2, data=4)
    sp, x, t, lp = problem(2, 4, rows=4)
    ring = [(i, (i + 1) % 4) for i in range(4)]

    def step_with(stage_fn, loss_fn=loss):
        pipe = tx.pipeline(stage_fn, schedule="1f1b", microbatches=4, loss=loss_fn)

        @tx.data_parallel(axis="data", mesh=mesh, batch_argnums=(2, 3), donate=False)
        def step(sp, lp, x, t):
            return tx.pmean(pipe(sp, x, t, lp)[0], "data")

        return step

    plain = step_with(lambda p, x: stage(p, jax.lax.ppermute(x, "data", ring)))
    with pytest.raises(
        tx.CollectiveError, match=r"the stage runs a plain ppermute over \('data',\).*tx.ppermute"
    ):
        plain(sp, lp, x, t)
    looped = step_with(  # nested in a scan: found all the same
        lambda p, x: jax.lax.fori_loop(0, 2, lambda i, h: jax.lax.ppermute(h, "data", ring), x)
    )
    with pytest.raises(tx.CollectiveError, match="plain ppermute"):
        looped(sp, lp, x, t)
    twice = step_with(lambda p, x: tx.ppermute(x, "data", [(0, 1), (2, 1)]))
    with pytest.raises(tx.CollectiveError, match=r"perm=\[\(0, 1\), \(2, 1\)\] is not a perm"):
        twice(sp, lp, x, t)
    over_stage = step_with(lambda p, x: stage(p, x) + tx.psum(x, "stage"))
    with pytest.raises(
        tx.CollectiveError, match="tx.psum: axis 'stage' is the axis of the enclosing"
    ):
        over_stage(sp, lp, x, t)
    bare_loss = lambda lp, y, t: jax.lax.pmean(loss(lp, y, t), "stage")  # noqa: E731
    with pytest.raises(tx.CollectiveError, match=r"the loss runs pmean|the loss runs psum"):
        step_with(stage, bare_loss)(sp, lp, x, t)
