"""tx.expert_parallel and tx.moe: an MoE layer against its dense single-device reference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import titanax as tx
from titanax.parallel import hlo

E, K, D, H = 8, 2, 4, 8  # experts, top-k, model width, expert hidden width
RULES = tx.Rules(
    (r"experts/", P("expert")),
)


def init(seed: int = 0) -> dict:
    ks = jax.random.split(jax.random.key(seed), 4)
    return {
        "w_in": jax.random.normal(ks[0], (D, D)) / 2,
        "router": jax.random.normal(ks[1], (D, E)),
        "experts": {
            "up": jax.random.normal(ks[2], (E, D, H)) / 2,
            "down": jax.random.normal(ks[3], (E, H, D)) / 3,
        },
    }


def batch(n: int = 32, seed: int = 1) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, D)), jax.random.normal(ky, (n, D))


def experts_fn(w: dict, xs: jax.Array) -> jax.Array:
    """The local experts on their slots: ``(experts, slots, d) -> (experts, slots, d)``."""
    h = jax.nn.gelu(jnp.einsum("esd,edh->esh", xs, w["up"]))
    return jnp.einsum("esh,ehd->esd", h, w["down"])


def moe_loss(params, b, *, axis, capacity_factor=None):
    x, y = b
    h = jnp.tanh(x @ params["w_in"])
    logits = h @ params["router"]
    r = tx.moe.route(logits, k=K, capacity_factor=capacity_factor)
    out = tx.moe.combine(
        experts_fn(params["experts"], tx.moe.dispatch(h, r, axis=axis)), r, axis=axis
    )
    aux = tx.moe.load_balancing_loss(logits, r) + 1e-3 * tx.moe.z_loss(logits)
    return jnp.mean((h + out - y) ** 2) + 0.01 * aux, r.dropped


def dense_loss(params, b):
    """Every token through its top-k experts, weighted: no routing buffers, no exchange."""
    x, y = b
    h = jnp.tanh(x @ params["w_in"])
    logits = h @ params["router"]
    probs = jax.nn.softmax(logits)
    top, idx = jax.lax.top_k(probs, K)
    gates = top / top.sum(-1, keepdims=True)
    w = params["experts"]
    every = jnp.einsum(
        "teh,ehd->ted", jax.nn.gelu(jnp.einsum("td,edh->teh", h, w["up"])), w["down"]
    )
    out = jnp.einsum("tk,tkd->td", gates, jnp.take_along_axis(every, idx[..., None], axis=1))
    f = jax.nn.one_hot(idx, E).sum((0, 1)) / (x.shape[0] * K)
    aux = E * jnp.sum(f * probs.mean(0)) + 1e-3 * jnp.mean(jax.nn.logsumexp(logits, -1) ** 2)
    return jnp.mean((h + out - y) ** 2) + 0.01 * aux


def make_step(mesh, capacity_factor=None):
    @tx.data_parallel(axis="data", mesh=mesh, donate=False)
    @tx.expert_parallel(RULES, axis="expert")
    def step(params, b):
        grad_fn = jax.value_and_grad(moe_loss, has_aux=True)
        (loss, dropped), grads = grad_fn(params, b, axis="expert", capacity_factor=capacity_factor)
        grads = tx.moe.reduce_gradients(grads, RULES, axis="expert", data_axes="data")
        return grads, tx.pmean(loss, ("data", "expert")), tx.psum(dropped, ("data", "expert"))

    return step


def test_no_dropping_equals_dense_loss_and_gradients():
    mesh = tx.mesh(data=2, expert=4)
    params, b = init(), batch()
    grads, loss, dropped = make_step(mesh)(params, b)
    # Group-wise aux losses average to the global ones only when every group has the same
    # tokens: the reference averages the per-group losses the same way.
    groups = [jax.tree.map(lambda a, g=g: a[g * 4 : (g + 1) * 4], b) for g in range(8)]

    def ref_loss(p):
        return jnp.mean(jnp.stack([dense_loss(p, g) for g in groups]))

    ref, ref_grads = jax.value_and_grad(ref_loss)(params)
    assert int(dropped) == 0
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for path, g, r in zip(
        jax.tree_util.tree_leaves_with_path(grads),
        jax.tree.leaves(grads),
        jax.tree.leaves(ref_grads),
    ):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=str(path[0]))
    assert grads["experts"]["up"].sharding.spec[0] == "expert"


def reference_grads(params, b, groups: int):
    n = b[0].shape[0] // groups
    parts = [jax.tree.map(lambda a, g=g: a[g * n : (g + 1) * n], b) for g in range(groups)]
    return jax.value_and_grad(lambda p: jnp.mean(jnp.stack([dense_loss(p, g) for g in parts])))(
        params
    )


def assert_trees_close(got, want, tol=1e-5):
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(
            g, r, rtol=tol, atol=tol / 10, err_msg=jax.tree_util.keystr(path)
        )


def test_composes_with_fully_sharded():
    mesh = tx.mesh(data=2, expert=4)

    @tx.fully_sharded(axis="data", mesh=mesh, min_size=16, donate=False)
    @tx.expert_parallel(RULES, axis="expert")
    def step(params, b):
        whole = tx.gather_params(params, "data")
        (loss, _), grads = jax.value_and_grad(moe_loss, has_aux=True)(whole, b, axis="expert")
        grads = tx.scatter_grads(grads, "data")
        grads = tx.moe.reduce_gradients(grads, RULES, axis="expert")
        return grads, tx.pmean(loss, ("data", "expert"))

    params, b = init(), batch()
    grads, loss = step(params, b)
    ref, ref_grads = reference_grads(params, b, 8)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert_trees_close(grads, ref_grads)
    spec = grads["experts"]["up"].sharding.spec
    assert spec[0] == "expert" and "data" in spec[1:], spec  # split along both axes


def test_fully_sharded_train_state_step_equals_one_device_adam():
    mesh = tx.mesh(data=2, expert=4)

    @tx.fully_sharded(axis="data", mesh=mesh, min_size=16)
    @tx.expert_parallel(RULES, axis="expert")
    def train(state, b):
        whole = tx.gather_params(state.params, "data")
        (loss, _), g = jax.value_and_grad(moe_loss, has_aux=True)(whole, b, axis="expert")
        g = tx.moe.reduce_gradients(tx.scatter_grads(g, "data"), RULES, axis="expert")
        return state.apply_gradients(g), tx.pmean(loss, ("data", "expert"))

    params, b = init(), batch()
    _, ref_grads = reference_grads(params, b, 8)
    opt = optax.adam(1e-2)
    updates, _ = opt.update(ref_grads, opt.init(params), params)
    want = optax.apply_updates(params, updates)
    state, _ = train(tx.TrainState.create(params, opt), b)
    assert_trees_close(state.params, want, tol=1e-6)
    mu = state.opt_state[0].mu["experts"]["up"]
    assert mu.addressable_shards[0].data.shape == (E // 4, D, H // 2)  # expert x data


def test_naive_pmean_over_expert_is_wrong_for_expert_leaves():
    """What reduce_gradients is for: averaging expert gradients over `expert` mixes experts."""
    mesh = tx.mesh(data=2, expert=4)

    @tx.data_parallel(axis="data", mesh=mesh, donate=False)
    @tx.expert_parallel(RULES, axis="expert")
    def naive(params, b):
        (_, _), grads = jax.value_and_grad(moe_loss, has_aux=True)(params, b, axis="expert")
        return tx.pmean(grads, ("data", "expert"))

    params, b = init(), batch()
    grads = naive(params, b)
    _, ref_grads = reference_grads(params, b, 8)
    np.testing.assert_allclose(grads["router"], ref_grads["router"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(grads["experts"]["up"], ref_grads["experts"]["up"], atol=1e-4)


def test_forgotten_reduction_over_expert_is_a_plan_error_for_replicated_leaves_only():
    mesh = tx.mesh(data=2, expert=4)

    @tx.data_parallel(axis="data", mesh=mesh, donate=False)
    @tx.expert_parallel(RULES, axis="expert")
    def step(params, b):
        (_, _), grads = jax.value_and_grad(moe_loss, has_aux=True)(params, b, axis="expert")
        return tx.pmean(grads, "data")  # nothing over 'expert'

    with pytest.raises(tx.PlanError, match="varies along 'expert'") as info:
        step(init(), batch())
    message = str(info.value)
    assert "[router]" in message and "[w_in]" in message
    assert "experts" not in message  # split along 'expert': allowed to differ there


# -- dropping: the same rule computed densely in numpy ------------------------------------


def np_route(logits: np.ndarray, k: int, capacity: int):
    """Top-k, gates renormalized, slots choice-major then token order; kept below capacity."""
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, idx, -1)
    gates = top / top.sum(-1, keepdims=True)
    kept = np.zeros(idx.shape, bool)
    fill = np.zeros(logits.shape[1], int)
    for j in range(k):
        for t in range(logits.shape[0]):
            e = idx[t, j]
            kept[t, j] = fill[e] < capacity
            fill[e] += 1
    return idx, gates, kept, probs


def np_moe(params, x: np.ndarray, k: int, capacity_factor: float):
    p = jax.tree.map(np.asarray, params)
    h = np.tanh(x @ p["w_in"])
    logits = h @ p["router"]
    t = x.shape[0]
    idx, gates, kept, probs = np_route(logits, k, math.ceil(t * k * capacity_factor / E))
    out = np.zeros_like(h)
    for i in range(t):
        for j in range(k):
            if kept[i, j]:
                e = idx[i, j]
                u = np.asarray(jax.nn.gelu(h[i] @ p["experts"]["up"][e]))
                out[i] += gates[i, j] * (u @ p["experts"]["down"][e])
    return h + out, int((~kept).sum()), logits, idx, probs


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_dropping_equals_numpy_rule(capacity_factor):
    mesh = tx.mesh(data=2, expert=4)

    @tx.data_parallel(axis="data", mesh=mesh, donate=False)
    @tx.expert_parallel(RULES, axis="expert")
    def forward(params, x):
        h = jnp.tanh(x @ params["w_in"])
        r = tx.moe.route(h @ params["router"], k=K, capacity_factor=capacity_factor)
        y = tx.moe.dispatch(h, r, axis="expert")
        out = h + tx.moe.combine(experts_fn(params["experts"], y), r, axis="expert")
        return tx.all_gather(out, ("data", "expert"), axis=0, tiled=True), tx.psum(
            r.dropped, ("data", "expert")
        )

    params, (x, _) = init(), batch(64)
    out, dropped = forward(params, x)
    xs = np.asarray(x).reshape(8, 8, D)  # 8 devices' groups of 8 tokens, data-major
    want = [np_moe(params, g, K, capacity_factor) for g in xs]
    np.testing.assert_allclose(out, np.concatenate([w[0] for w in want]), rtol=1e-5, atol=1e-5)
    assert int(dropped) == sum(w[1] for w in want)
    assert int(dropped) > 0  # the capacity really drops here
    print(f"capacity_factor={capacity_factor}: dropped {int(dropped)} of {64 * K} assignments")


def test_auxiliary_losses_equal_the_formulas_by_hand():
    logits = np.asarray(jax.random.normal(jax.random.key(3), (16, E)))
    r = tx.moe.route(jnp.asarray(logits), k=K, capacity_factor=1.0)
    idx, _, kept, probs = np_route(logits, K, math.ceil(16 * K / E))
    np.testing.assert_array_equal(r.experts, idx)
    np.testing.assert_array_equal(r.kept, kept)
    assert int(r.dropped) == int((~kept).sum())
    f = np.bincount(idx.reshape(-1), minlength=E) / (16 * K)
    np.testing.assert_allclose(
        tx.moe.load_balancing_loss(jnp.asarray(logits), r), E * np.sum(f * probs.mean(0)), rtol=1e-6
    )
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(tx.moe.z_loss(jnp.asarray(logits)), np.mean(lse**2), rtol=1e-6)
    # A balanced router scores 1; the gates of each token sum to 1.
    balanced = jnp.tile(jnp.eye(E) * 5, (2, 1))
    np.testing.assert_allclose(
        tx.moe.load_balancing_loss(balanced, tx.moe.route(balanced, k=1, capacity_factor=None)),
        1.0,
        rtol=1e-6,
    )
    np.testing.assert_allclose(r.gates.sum(-1), 1.0, rtol=1e-6)


def test_no_dropping_capacity_is_the_token_count():
    logits = jnp.zeros((6, E)).at[:, 3].set(10.0)  # every token's first choice: expert 3
    r = tx.moe.route(logits, k=K, capacity_factor=None)
    assert r.capacity == 6 and int(r.dropped) == 0
    np.testing.assert_array_equal(r.position[:, 0], np.arange(6))  # token order


# -- communication ----------------------------------------------------------------------


def test_hlo_all_to_all_over_expert_with_capacity_bytes():
    mesh = tx.mesh(data=2, expert=4)
    step = make_step(mesh, capacity_factor=1.0)
    params, b = init(), batch()
    found = hlo.collectives(step.lower(params, b).compile().as_text(), mesh)
    a2a = [c for c in found if c.kind == "all-to-all"]
    tokens = 32 // 8  # per device
    capacity = math.ceil(tokens * K * 1.0 / E)
    assert len(a2a) == 4, found  # dispatch and combine, forward and backward
    assert all(c.axes == ("expert",) for c in a2a), a2a
    assert all(c.bytes == E * capacity * D * 4 for c in a2a), a2a
    # capacity_factor=1: the exchanged buffer is exactly tokens x k x d (no padding).
    assert E * capacity * D * 4 == tokens * K * D * 4
    assert not [c for c in found if c.kind == "all-gather"], found
    print("collectives:", hlo.summary(found))


# -- composition ------------------------------------------------------------------------


def test_composes_with_tensor_parallel():
    mesh = tx.mesh(expert=4, model=2)
    tp = tx.Rules(
        (r"experts/up", P(None, None, "model")), (r"experts/down", P(None, "model")), (r".*", P())
    )

    @tx.expert_parallel(RULES, axis="expert", mesh=mesh)
    @tx.tensor_parallel(tp, axis="model")
    def step(params, b):
        (loss, _), grads = jax.value_and_grad(moe_loss, has_aux=True)(params, b, axis="expert")
        grads = tx.moe.reduce_gradients(grads, RULES, axis="expert")
        return grads, tx.pmean(loss, "expert")

    params, b = init(), batch()
    ref, ref_grads = reference_grads(params, b, 4)  # first: the step donates params
    grads, loss = step(params, b)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert_trees_close(grads, ref_grads)
    assert grads["experts"]["up"].sharding.spec == P("expert", None, "model")


def test_optimizer_state_follows_expert_layout():
    mesh = tx.mesh(data=2, expert=4)

    @tx.data_parallel(axis="data", mesh=mesh)
    @tx.expert_parallel(RULES, axis="expert")
    def train(state, b):
        (loss, _), g = jax.value_and_grad(moe_loss, has_aux=True)(state.params, b, axis="expert")
        g = tx.moe.reduce_gradients(g, RULES, axis="expert", data_axes="data")
        return state.apply_gradients(g), tx.pmean(loss, ("data", "expert"))

    state = tx.TrainState.create(init(), optax.adam(1e-2))
    state, first = train(state, batch())
    for _ in range(5):
        state, loss = train(state, batch())
    assert float(loss) < float(first)
    mu = state.opt_state[0].mu["experts"]["up"]
    assert mu.sharding.spec[0] == "expert"
    assert mu.addressable_shards[0].data.shape == (E // 4, D, H)


# -- errors -----------------------------------------------------------------------------


def test_k_larger_than_experts_is_an_error():
    with pytest.raises(tx.CollectiveError, match=r"k=9 must be .* number of experts, 8"):
        tx.moe.route(jnp.zeros((4, E)), k=9, capacity_factor=1.0)
    with pytest.raises(tx.CollectiveError, match="capacity_factor=0"):
        tx.moe.route(jnp.zeros((4, E)), k=1, capacity_factor=0)
    with pytest.raises(tx.CollectiveError, match=r"shape \(tokens, experts\)"):
        tx.moe.route(jnp.zeros((2, 4, E)), k=1, capacity_factor=1.0)


def test_experts_not_divisible_by_axis_names_the_leaf():
    mesh = tx.mesh(data=2, expert=4)
    params = init()
    params["experts"] = jax.tree.map(lambda a: a[:6], params["experts"])
    with pytest.raises(tx.RuleError, match=r"(?s)experts/down  shape \(6, 8, 4\).*multiple of"):
        make_step(mesh)(params, batch())


def test_dispatch_checks_expert_count_against_axis():
    mesh = tx.mesh(expert=8)

    @tx.expert_parallel(RULES, axis="expert", mesh=mesh)
    def f(params, x):
        r = tx.moe.route(x @ params["router"], k=1, capacity_factor=None)
        return tx.pmean(tx.moe.dispatch(x, r, axis="expert").sum(), "expert")

    params = {"router": jnp.ones((D, 4)), "experts": jnp.ones((8, 2))}
    with pytest.raises(tx.CollectiveError, match=r"4 experts cannot be split over the 8 devices"):
        f(params, jnp.ones((16, D)))


def test_rules_naming_another_axis_and_bad_rules():
    mesh = tx.mesh(expert=4, model=2)
    with pytest.raises(tx.PlanError, match="must be a tx.Rules"):
        tx.expert_parallel([(r"experts", P("expert"))])  # type: ignore[arg-type]

    @tx.expert_parallel(
        tx.Rules(
            (r"experts/", P("expert", "model")),
        ),
        mesh=mesh,
    )
    def f(params, x):
        return tx.pmean(x.sum(), "expert")

    with pytest.raises(tx.RuleError, match=r"experts/up: .* names 'model'"):
        f(init(), jnp.ones((8, D)))


# -- the ragged exchange ----------------------------------------------------------------


def emulated_ragged_all_to_all(operand, output, in_off, send, out_off, recv, axis):
    """jax.lax.ragged_all_to_all's documented semantics from all_gather (runs on CPU)."""
    me = tx.axis_index(axis)
    ops = tx.all_gather(operand, axis)
    starts, sizes, ats = (tx.all_gather(a, axis)[:, me] for a in (in_off, send, out_off))
    r = jnp.arange(output.shape[0])
    for s in range(tx.axis_size(axis)):
        k = r - ats[s]
        valid = (k >= 0) & (k < sizes[s])
        src = jnp.clip(starts[s] + k, 0, operand.shape[0] - 1)
        output = jnp.where(valid[:, None], ops[s][src], output)
    return output


def ragged_step(mesh, capacity_factor, ragged):
    @tx.data_parallel(axis="data", mesh=mesh, donate=False)
    @tx.expert_parallel(RULES, axis="expert")
    def step(params, b):
        def loss_fn(p):
            x, y = b
            h = jnp.tanh(x @ p["w_in"])
            r = tx.moe.route(h @ p["router"], k=K, capacity_factor=capacity_factor)
            xs = tx.moe.dispatch(h, r, axis="expert", ragged=ragged)
            out = tx.moe.combine(experts_fn(p["experts"], xs), r, axis="expert", ragged=ragged)
            return jnp.mean((h + out - y) ** 2), xs

        (loss, xs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads = tx.moe.reduce_gradients(grads, RULES, axis="expert", data_axes="data")
        return grads, tx.pmean(loss, ("data", "expert")), tx.all_gather(xs, ("data", "expert"))

    return step


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_ragged_path_equals_padded_with_an_emulated_exchange(monkeypatch, capacity_factor):
    """The packing, offsets and unpacking of the ragged path, checked on CPU against the
    padded path: ragged_all_to_all itself is replaced by its documented semantics."""
    mesh = tx.mesh(data=2, expert=4)
    params, b = init(), batch()
    want = ragged_step(mesh, capacity_factor, ragged=False)(params, b)
    monkeypatch.setattr(tx.moe, "ragged_supported", lambda: True)
    calls = []
    monkeypatch.setattr(
        tx.moe, "_ragged_exchange", lambda *a: calls.append(1) or emulated_ragged_all_to_all(*a)
    )
    got = ragged_step(mesh, capacity_factor, ragged=True)(params, b)
    assert len(calls) == 2  # traced once each way (the backward is its transpose)
    np.testing.assert_array_equal(got[2], want[2])  # the experts' slots, exactly
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    assert_trees_close(got[0], want[0], tol=1e-6)


def test_ragged_guard_picks_padded_on_cpu_and_the_ragged_path_lowers(monkeypatch):
    mesh = tx.mesh(data=2, expert=4)
    params, b = init(), batch()
    assert jax.default_backend() == "cpu" and not tx.moe.ragged_supported()
    auto = ragged_step(mesh, 1.0, ragged=None).lower(params, b).as_text()
    assert "all_to_all" in auto and "ragged_all_to_all" not in auto
    with pytest.raises(tx.CollectiveError, match=r"ragged=True.*UNIMPLEMENTED"):
        ragged_step(mesh, 1.0, ragged=True)(params, b)
    # Lowered (not compiled: XLA:CPU would refuse) with the real collective, backward too.
    monkeypatch.setattr(tx.moe, "ragged_supported", lambda: True)
    text = ragged_step(mesh, 1.0, ragged=None).lower(params, b).as_text()
    assert text.count("ragged_all_to_all") >= 4, "dispatch and combine, forward and backward"
