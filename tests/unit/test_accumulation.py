"""Gradient accumulation with ``optax.MultiSteps`` under every transform and composition.

Every run takes ``2 * K`` micro-steps (one call each, one micro-batch each), so two real
updates happen, and is compared with two single-device runs on the same micro-batches:

- the same ``MultiSteps`` optimizer: the whole state (parameters, accumulator, Adam's
  moments, counters) after every micro-step;
- a plain Adam step on each group of ``K`` micro-batches concatenated: the parameters and
  Adam's state after each real update. For equal-size micro-batches the mean of the
  micro-gradients is the gradient of the mean loss, so the two must agree.

Between real updates the parameters must not change at all, ``state.step`` counts
micro-steps, ``opt_state.gradient_step`` real updates, and the accumulator
(``opt_state.acc_grads``) must be laid out like the parameters (like the optimizer moments
under ZeRO-1, whose parameters are replicated).
"""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import titanax as tx

K = 3  # micro-steps per real update
RTOL, ATOL = 1e-5, 1e-7
# The second real update uses a smaller rate than the first: a schedule that counted
# micro-steps (count K instead of 1) would give 1e-3 and show.
LR = optax.linear_schedule(1e-2, 1e-3, transition_steps=2)


def accumulating(k=K, **kwargs):
    return optax.MultiSteps(optax.adam(LR), every_k_schedule=k, **kwargs)


ACC = accumulating()  # one instance: the optimizer is static, part of the state's type


# --- a Megatron MLP for data_parallel, fully_sharded and tensor_parallel ----------------------

D, H = 16, 32


def mlp_params(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.normal(size=s) * 0.3).astype(np.float32)  # noqa: E731
    return {
        "embed": f(8, D),  # 128 elements
        "mlp": {"up": {"kernel": f(D, H), "bias": f(H)}, "down": {"kernel": f(H, D)}},
        "head": f(D, 4),
    }


def mlp_loss(p, batch):
    x, y = batch
    h = x @ p["embed"]
    mlp = p["mlp"]
    h = h + jnp.tanh(h @ mlp["up"]["kernel"] + mlp["up"]["bias"]) @ mlp["down"]["kernel"]
    return jnp.mean((h @ p["head"] - y) ** 2)


def mlp_batches(rows=16, seed=1):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.normal(size=(rows, 8)).astype(np.float32),
            rng.normal(size=(rows, 4)).astype(np.float32),
        )
        for _ in range(2 * K)
    ]


TP_RULES = tx.rules.megatron_mlp() + tx.Rules((r".*", P()))
MIN_SIZE = 64  # fully_sharded: splits embed, the kernels and head; keeps the bias (32) whole


def dp_step(state, batch):
    loss, grads = jax.value_and_grad(mlp_loss)(state.params, batch)
    return state.apply_gradients(tx.pmean(grads, "data")), tx.pmean(loss, "data")


def zero3_step(state, batch):
    params = tx.gather_params(state.params, "data")
    loss, grads = jax.value_and_grad(mlp_loss)(params, batch)
    return state.apply_gradients(tx.scatter_grads(grads, "data")), tx.pmean(loss, "data")


def zero1_step(state, batch):
    loss, grads = jax.value_and_grad(mlp_loss)(state.params, batch)
    grads = tx.scatter_grads(grads, "data")
    shard = tx.shard_params(state.params, "data")
    updates, opt_state = state.optimizer.update(grads, state.opt_state, shard)
    params = tx.gather_params(optax.apply_updates(shard, updates), "data")
    state = dataclasses.replace(state, params=params, opt_state=opt_state, step=state.step + 1)
    return state, tx.pmean(loss, "data")


def tp_step(state, batch):
    loss, grads = jax.value_and_grad(mlp_loss)(state.params, batch)
    return state.apply_gradients(grads), loss


# --- a pipeline of 4 residual stages, with the head as the loss's parameters ------------------

S, W = 4, 6


def pipe_params(seed=2):
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.normal(size=s) * 0.4).astype(np.float32)  # noqa: E731
    return {"stages": {"w": f(S, W, 2 * W), "w2": f(S, 2 * W, W)}, "head": f(W, 3)}


def stage(p, h):
    return h + jnp.tanh(h @ p["w"]) @ p["w2"]


def head_loss(head, h, t):
    return jnp.mean((h @ head - t) ** 2)


def pipe_loss(params, batch):
    """The reference: the stages in order on the whole batch."""
    h, t = batch
    for s in range(S):
        h = stage(jax.tree.map(lambda a, s=s: a[s], params["stages"]), h)
    return head_loss(params["head"], h, t)


def pipe_batches(rows=16, seed=3):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.normal(size=(rows, W)).astype(np.float32),
            rng.normal(size=(rows, 3)).astype(np.float32),
        )
        for _ in range(2 * K)
    ]


def pipeline_step(pipe):
    def step(state, batch):
        x, t = batch
        loss, (g_sp, _, g_head) = pipe(state.params["stages"], x, t, state.params["head"])
        return state.apply_gradients({"stages": g_sp, "head": g_head}), loss

    return step


def dp_pipeline_step(pipe):
    def step(state, batch):
        x, t = batch
        loss, (g_sp, _, g_head) = pipe(state.params["stages"], x, t, state.params["head"])
        grads = tx.pmean({"stages": g_sp, "head": g_head}, "data")
        return state.apply_gradients(grads), tx.pmean(loss, "data")

    return step


# --- runs and references -----------------------------------------------------------------------


def run(step, params, batches, optimizer=ACC):
    """The state after every micro-step, on the host (index 0: the initial state), and the
    last state as the step returned it (its arrays keep their layout)."""
    # On the host: placing it is a copy, not a reshard that compiles a program per layout.
    state = jax.device_get(tx.TrainState.create(params, optimizer))
    history = [state]
    for b in batches:
        state, _ = step(state, b)
        history.append(jax.device_get(state))
    return history, state


def single_device_step(loss_fn):
    @jax.jit
    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        return state.apply_gradients(grads), loss

    return step


def big_batch_run(loss_fn, params, batches, k=K):
    """Plain Adam on one device, one step per ``k`` micro-batches concatenated."""
    big = [
        tuple(np.concatenate(parts) for parts in zip(*batches[i : i + k]))
        for i in range(0, len(batches), k)
    ]
    return run(single_device_step(loss_fn), params, big, optax.adam(LR))[0]


_REFERENCES = {}


def references(loss_fn, params_fn, batches_fn):
    """The single-device accumulated run and the big-batch run (computed once per model)."""
    if loss_fn not in _REFERENCES:
        params, batches = params_fn(), batches_fn()
        accumulated = run(single_device_step(loss_fn), params, batches)[0]
        _REFERENCES[loss_fn] = (accumulated, big_batch_run(loss_fn, params, batches))
    return _REFERENCES[loss_fn]


def worst(a, b):
    """The largest absolute and relative (to the largest reference value) error of two trees."""
    abs_err, rel_err = 0.0, 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        err = float(np.max(np.abs(x - y), initial=0.0))
        abs_err = max(abs_err, err)
        rel_err = max(rel_err, err / max(float(np.max(np.abs(y), initial=0.0)), 1e-30))
    return abs_err, rel_err


def assert_close(a, b, what):
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL, err_msg=f"{what}: {name}")


def check_against_one_device(history, accumulated):
    """The whole state after every micro-step equals the single-device accumulated run's."""
    assert len(history) == len(accumulated)
    for j in range(1, len(history)):
        assert_close(history[j], accumulated[j], f"micro-step {j} vs one device")


def check_against_big_batch(history, big, k=K):
    """After each real update, the parameters and Adam's state equal the big-batch run's."""
    for update in range(1, len(big)):
        got = history[update * k]
        assert_close(got.params, big[update].params, f"update {update} vs big batch")
        assert_close(
            got.opt_state.inner_opt_state, big[update].opt_state, f"update {update}: Adam's state"
        )


def check(history, accumulated, big, k=K):
    """Checks a run of ``2 * k`` micro-steps against both references; returns the worst
    errors (against the accumulated run, against the big-batch run)."""
    assert len(history) == 2 * k + 1
    for j in range(1, 2 * k + 1):
        same = j % k != 0  # a micro-step that only accumulates
        for before, after in zip(
            jax.tree.leaves(history[j - 1].params), jax.tree.leaves(history[j].params)
        ):
            assert np.array_equal(before, after) == same, f"micro-step {j}"
    check_against_one_device(history, accumulated)
    check_against_big_batch(history, big, k)
    last = history[-1]
    assert int(last.step) == 2 * k  # TrainState.step counts micro-steps
    assert (int(last.opt_state.mini_step), int(last.opt_state.gradient_step)) == (0, 2)
    inner = last.opt_state.inner_opt_state  # Adam's count and the schedule's: updates
    assert (int(inner[0].count), int(inner[1].count)) == (2, 2)
    # Something really happened: each update moved the parameters well past the tolerance.
    assert worst(big[1].params, big[0].params)[1] > 1e3 * RTOL
    return worst(history, accumulated), worst(
        [h.params for h in history[k::k]], [b.params for b in big[1:]]
    )


def spec(x):
    """``x``'s spec without trailing ``None``s."""
    entries = list(x.sharding.spec)
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


def assert_accumulator_laid_out_like(state, like, axis):
    """``acc_grads``, and Adam's moments inside MultiSteps, have the layout of ``like`` (the
    parameters, or under ZeRO-1 the first moment) leaf by leaf; some leaf is split along
    ``axis``."""
    want = jax.tree.map(spec, like)
    adam = state.opt_state.inner_opt_state[0]
    for tree in (state.opt_state.acc_grads, adam.mu, adam.nu):
        assert jax.tree.map(spec, tree) == want
    assert any(axis in s for s in jax.tree.leaves(want, is_leaf=lambda s: isinstance(s, tuple)))


# --- tests ---------------------------------------------------------------------------------


MESH8 = tx.mesh(data=8)
MESH_DM = tx.mesh(data=2, model=4)

MLP_STEPS = {
    "data_parallel": lambda: tx.data_parallel(dp_step, mesh=MESH8),
    "zero3": lambda: tx.fully_sharded(zero3_step, mesh=MESH8, min_size=MIN_SIZE),
    "zero1": lambda: tx.fully_sharded(zero1_step, mesh=MESH8, shard="optimizer", min_size=MIN_SIZE),
    "tensor_parallel": lambda: tx.tensor_parallel(TP_RULES, mesh=tx.mesh(model=8))(tp_step),
    "dp_x_tp": lambda: tx.data_parallel(tx.tensor_parallel(TP_RULES)(dp_step), mesh=MESH_DM),
    "zero3_x_tp": lambda: tx.fully_sharded(
        tx.tensor_parallel(TP_RULES)(zero3_step), mesh=MESH_DM, min_size=MIN_SIZE
    ),
}
SPLIT_AXIS = {  # an axis some leaf of the accumulator must be split along
    "zero3": "data",
    "zero1": "data",
    "tensor_parallel": "model",
    "dp_x_tp": "model",
    "zero3_x_tp": "data",
}


@pytest.mark.parametrize("name", list(MLP_STEPS))
def test_accumulation_equals_one_device_and_the_big_batch(name):
    accumulated, big = references(mlp_loss, mlp_params, mlp_batches)
    history, state = run(MLP_STEPS[name](), mlp_params(), mlp_batches())
    check(history, accumulated, big)
    if name == "zero1":  # parameters replicated, the accumulator split like the moments
        assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(state.params))
        like = state.opt_state.inner_opt_state[0].mu
    else:
        like = state.params
    if name in SPLIT_AXIS:
        assert_accumulator_laid_out_like(state, like, SPLIT_AXIS[name])
    else:  # data_parallel: everything replicated
        assert all(a.sharding.is_fully_replicated for a in jax.tree.leaves(state))
    if name == "zero3_x_tp":  # split over both axes, as the kernel is
        assert spec(state.opt_state.acc_grads["mlp"]["up"]["kernel"]) == ("data", "model")


def test_pipeline_alone():
    accumulated, big = references(pipe_loss, pipe_params, pipe_batches)
    mesh = tx.mesh(jax.devices()[:4], stage=4)
    pipe = tx.pipeline(stage, schedule="1f1b", microbatches=4, loss=head_loss, mesh=mesh)
    history, _ = run(jax.jit(pipeline_step(pipe)), pipe_params(), pipe_batches())
    check(history, accumulated, big)


def test_pipeline_inside_data_parallel_on_stage_x_data():
    accumulated, big = references(pipe_loss, pipe_params, pipe_batches)
    mesh = tx.mesh(stage=4, data=2)
    pipe = tx.pipeline(stage, schedule="1f1b", microbatches=4, loss=head_loss)
    step = tx.data_parallel(dp_pipeline_step(pipe), mesh=mesh)
    history, state = run(step, pipe_params(), pipe_batches())
    check(history, accumulated, big)
    # The pipeline lays the stage parameters out along 'stage', and with them every leaf
    # whose path ends with theirs: Adam's moments and the accumulator.
    assert spec(state.params["stages"]["w"]) == ("stage",)
    assert_accumulator_laid_out_like(state, state.params, "stage")


def test_the_comparison_fails_for_a_wrong_accumulation():
    """The big-batch reference, which does not use MultiSteps, tells a wrong accumulation."""
    _, big = references(mlp_loss, mlp_params, mlp_batches)
    step = single_device_step(mlp_loss)
    wrong_k = run(step, mlp_params(), mlp_batches(), accumulating(K - 1))[0]
    with pytest.raises(AssertionError, match="update 1 vs big batch"):
        check_against_big_batch(wrong_k, big)
    assert worst(wrong_k[-1].params, big[-1].params)[1] > 1e3 * RTOL  # measured 4.5e-2
    # A sum where the mean belongs: Adam's update hardly sees the scale of the gradient
    # (measured 8.3e-7 on the parameters), but its moments do.
    summed = run(step, mlp_params(), mlp_batches(), accumulating(use_grad_mean=False))[0]
    with pytest.raises(AssertionError, match="Adam's state"):
        check_against_big_batch(summed, big)


def test_the_accumulator_is_float32_for_bfloat16_parameters():
    """optax >= 0.2.8 accumulates in float32 (``accumulator_dtype``) and casts the mean back
    to the gradients' dtype for the inner optimizer; earlier versions accumulated in the
    parameters' dtype (what docs/data_parallel.md says)."""
    if "accumulator_dtype" not in inspect.signature(optax.MultiSteps).parameters:
        pytest.skip("optax < 0.2.8 accumulates in the parameters' dtype")
    params = {"w": jnp.ones((4,), jnp.bfloat16)}
    opt = accumulating(2)
    state = opt.init(params)
    assert state.acc_grads["w"].dtype == jnp.float32
    updates, state = opt.update({"w": jnp.full((4,), 0.1, jnp.bfloat16)}, state, params)
    assert state.acc_grads["w"].dtype == jnp.float32
    assert updates["w"].dtype == jnp.bfloat16
