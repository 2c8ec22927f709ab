import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import titanax as tx
from titanax.parallel import hlo

F, D, H, B = 16, 32, 128, 16
RULES = tx.rules.megatron_mlp() + tx.Rules((r".*", P()))


def params(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "w_in": jax.random.normal(k[0], (F, D)) * 0.2,
        "mlp": {
            "up": {"kernel": jax.random.normal(k[1], (D, H)) * 0.1, "bias": jnp.zeros(H)},
            "down": {"kernel": jax.random.normal(k[2], (H, D)) * 0.1, "bias": jnp.zeros(D)},
        },
    }


def loss_fn(p, x):
    h = x @ p["w_in"]  # the block's input needs a gradient: the backward all-reduce
    mlp = p["mlp"]
    up = jax.nn.relu(h @ mlp["up"]["kernel"] + mlp["up"]["bias"])
    h = h + up @ mlp["down"]["kernel"] + mlp["down"]["bias"]
    return jnp.mean(h**2)


def step(p, x):
    loss, g = jax.value_and_grad(loss_fn)(p, x)
    g = tx.pmean(g, "data")
    return jax.tree.map(lambda a, b: a - 0.01 * b, p, g), tx.pmean(loss, "data")


def reference(p, x):
    loss, g = jax.value_and_grad(loss_fn)(p, x)
    return jax.tree.map(lambda a, b: a - 0.01 * b, p, g), loss


X = np.random.default_rng(0).normal(size=(B, F)).astype(np.float32)


@pytest.fixture(scope="module")
def mesh():
    return tx.mesh(data=2, model=4)


def test_megatron_mlp_communication_in_the_hlo(mesh):
    f = tx.data_parallel(tx.tensor_parallel(RULES)(step), mesh=mesh, donate=False)
    found = hlo.collectives(f.lower(params(), X).compile().as_text(), mesh)
    by_kind = hlo.summary(found)
    activation = (B // 2) * D * 4  # one replica's (batch, d_model) float32 activation
    model_ars = [c for c in found if c.kind == "all-reduce" and c.axes == ("model",)]
    # exactly two all-reduces over 'model': the activation forward, its gradient backward
    assert [c.bytes for c in model_ars] == [activation, activation]
    # the DP reduction: one all-reduce over 'data' of the local gradient shards (and the loss)
    data_ars = [c for c in found if c.kind == "all-reduce" and c.axes == ("data",)]
    shard_bytes = 4 * (F * D + D * H // 4 + H // 4 + H * D // 4 + D)
    assert sum(c.bytes for c in data_ars) == shard_bytes + 4
    # no weight is ever gathered, and nothing else communicates
    assert by_kind[("all-gather", ("model",))] == 0
    assert sum(by_kind.values()) == len(model_ars) + len(data_ars)
    assert {k for k, _ in by_kind} == {"all-reduce"}


def test_parity_with_single_device(mesh):
    f = tx.data_parallel(tx.tensor_parallel(RULES)(step), mesh=mesh, donate=False)
    out = f(params(), X)
    ref = jax.jit(reference)(params(), X)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert out[0]["mlp"]["up"]["kernel"].sharding.spec == P(None, "model")
    assert out[0]["mlp"]["down"]["kernel"].sharding.spec == P("model")


def _program(f):
    text = f.lower(params(), X).as_text()
    return re.sub(r"loc\([^)]*\)|#loc\d*( = .*)?", "", text)


def test_decorator_order_gives_the_same_program(mesh):
    a = tx.data_parallel(tx.tensor_parallel(RULES)(step), mesh=mesh, donate=False)
    b = tx.tensor_parallel(RULES, mesh=mesh)(tx.data_parallel(step, donate=False))
    assert a.plan.manual_axes == b.plan.manual_axes == {"data"}
    assert _program(a) == _program(b)
    for x, y in zip(jax.tree.leaves(a(params(), X)), jax.tree.leaves(b(params(), X))):
        np.testing.assert_array_equal(x, y)


def test_tensor_parallel_alone_sees_global_arrays():
    mesh = tx.mesh(model=8)
    seen = []

    @tx.tensor_parallel(RULES, mesh=mesh)
    def forward(p, x):
        seen.append(p["mlp"]["up"]["kernel"].shape)
        return loss_fn(p, x)

    assert float(forward(params(), X)) == pytest.approx(float(loss_fn(params(), X)), rel=1e-6)
    assert seen == [(D, H)]  # global shape, not a shard


def test_optimizer_state_follows_parameters(mesh):
    def train_step(state, x):
        loss, g = jax.value_and_grad(loss_fn)(state.params, x)
        return state.apply_gradients(tx.pmean(g, "data")), tx.pmean(loss, "data")

    f = tx.data_parallel(tx.tensor_parallel(RULES)(train_step), mesh=mesh)
    state, _ = f(tx.TrainState.create(params(), optax.adam(1e-3)), X)
    assert state.opt_state[0].mu["mlp"]["up"]["kernel"].sharding.spec == P(None, "model")
    assert state.opt_state[0].nu["mlp"]["down"]["kernel"].sharding.spec == P("model")
    per_device = state.params["mlp"]["up"]["kernel"].addressable_shards[0].data.shape
    assert per_device == (D, H // 4)


def test_rule_errors_list_every_offending_leaf(mesh):
    def run(rules, p):
        f = tx.tensor_parallel(rules, mesh=mesh)(lambda p, x: loss_fn(p, x))
        return f(p, X)

    bad_div = tx.Rules((r"(kernel|w_in)$", P(None, "model")), (r".*", P()))
    p = params()
    p["w_in"] = jnp.zeros((F, 30))  # 30 does not divide by 4
    p["mlp"]["down"]["kernel"] = jnp.zeros((H, 30))
    with pytest.raises(
        tx.RuleError,
        match=r"(?s)tensor_parallel\(axis='model'\): the spec of 2 "
        r"leaves of argument 0 \(p\) does not fit.*mlp/down/kernel  shape \(128, 30\)"
        r".*w_in  shape \(16, 30\): dimension 1 \(size 30\) is not divisible by "
        r"'model'=4",
    ):
        run(bad_div, p)
    with pytest.raises(
        tx.RuleError,
        match=r"(?s)2 leaves.*names axis 'tensor', which is not in "
        r"the mesh \(axes: data, model\).*build the mesh with that axis",
    ):
        run(tx.Rules((r"up/(kernel|bias)$", P("tensor")), (r".*", P())), params())
    with pytest.raises(
        tx.RuleError,
        match=r"(?s)2 leaves.*up/bias  shape \(128,\): spec "
        r"P\(None, 'model'\) has 2 entries but the leaf has 1 dimension\n",
    ):
        run(tx.Rules((r"bias$", P(None, "model")), (r".*", P())), params())
    with pytest.raises(tx.RuleError, match=r"match no rule:\n  \* mlp/down/bias"):
        run(tx.Rules((r"kernel$", P()), (r"up/bias$", P())), params())


def test_rules_may_not_name_another_axis(mesh):
    f = tx.tensor_parallel(tx.Rules((r".*", P("data"))), mesh=mesh)(loss_fn)
    with pytest.raises(tx.RuleError, match="along axes other than 'model'"):
        f(params(), X)


def test_constrain_is_guarded_and_pins_layouts(mesh):
    with pytest.raises(tx.PlanError, match="no tensor_parallel transform is active"):
        tx.constrain(jnp.ones(4), P("model"))

    @tx.data_parallel(mesh=mesh, donate=False)
    def dp_only(x):
        return tx.pmean(tx.constrain(x, P("data")).sum(), "data")

    with pytest.raises(tx.PlanError, match="no tensor_parallel transform is active"):
        dp_only(X)

    @tx.data_parallel(mesh=mesh, donate=False)
    @tx.tensor_parallel(RULES)
    def pinned(p, x):
        h = tx.constrain(x @ p["w_in"], P(None, "model"))
        return tx.pmean(jnp.sum(h), "data")

    lowered = pinned.lower(params(), X).as_text()
    assert "sharding_constraint" in lowered or "sdy.sharding_constraint" in lowered
    np.testing.assert_allclose(pinned(params(), X), jnp.sum(X @ params()["w_in"]) / 2, rtol=1e-5)

    @tx.tensor_parallel(RULES, mesh=mesh)
    def wrong_axis(p, x):
        return tx.constrain(x, P("data")).sum()

    with pytest.raises(tx.PlanError, match=r"axis 'data' is not a global-view axis here"):
        wrong_axis(params(), X)


def test_collectives_over_the_tp_axis_are_refused(mesh):
    @tx.tensor_parallel(RULES, mesh=mesh)
    def f(p, x):
        return tx.psum(loss_fn(p, x), "model")

    with pytest.raises(
        tx.CollectiveError, match="bound by tx.tensor_parallel, whose body sees global arrays"
    ):
        f(params(), X)


def test_axis_claimed_twice_and_bad_rules(mesh):
    with pytest.raises(tx.PlanError, match="both claim mesh axis 'model'"):
        tx.tensor_parallel(RULES, axis="model")(tx.tensor_parallel(RULES, axis="model")(step))
    with pytest.raises(tx.PlanError, match="first argument must be a tx.Rules"):
        tx.tensor_parallel({"up": P("model")})


def test_explain_shows_layouts_and_collectives(mesh):
    f = tx.data_parallel(tx.tensor_parallel(RULES)(step), mesh=mesh, donate=False)
    text = str(f.explain(params(), X))
    assert "p/mlp/up/kernel" in text and "P(None, 'model')" in text
    assert re.search(r"all-reduce\s+model\s+1.0 KiB", text)  # (8, 32) float32
    assert re.search(r"all-reduce\s+data", text)


def test_rule_sets():
    attn = tx.rules.megatron_attention()
    assert attn.spec_for("h/3/attn/v/bias") == P("model")
    assert attn.spec_for("h/3/attn/proj/bias") == P()
    assert attn.spec_for("h/3/attn/qkv/bias") == P(None, "model")
    mlp = tx.rules.megatron_mlp(up="ffn/wi", down="ffn/wo", axis="tp")
    assert mlp.spec_for("layers/0/ffn/wi/kernel") == P(None, "tp")
    combined = attn + mlp
    assert len(combined) == len(attn) + len(mlp) and list(combined)[: len(attn)] == list(attn)
