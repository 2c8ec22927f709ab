import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import titanax as tx


@pytest.fixture
def mesh():
    return tx.mesh(data=2, model=4)


def params():
    return {
        "h": [
            {
                "mlp": {
                    "up": {"kernel": jnp.zeros((8, 32)), "bias": jnp.zeros(32)},
                    "down": {"kernel": jnp.zeros((32, 8))},
                }
            },
            {
                "mlp": {
                    "up": {"kernel": jnp.zeros((8, 32)), "bias": jnp.zeros(32)},
                    "down": {"kernel": jnp.zeros((32, 8))},
                }
            },
        ],
        "scale": jnp.ones(()),
    }


MEGATRON = tx.Rules(
    (r"mlp/up/kernel$", P(None, "model")),
    (r"mlp/up/bias$", P("model")),
    (r"mlp/down/kernel$", P("model", None)),
)


def test_first_match_wins_and_search_semantics():
    rules = tx.Rules((r"up/kernel", P("a")), (r"kernel$", P("b")), (r".*", P()))
    assert rules.spec_for("h/0/mlp/up/kernel") == P("a")  # search, not match
    assert rules.spec_for("h/0/mlp/down/kernel") == P("b")
    assert rules.spec_for("anything") == P()
    assert tx.Rules((r"^x$", P())).spec_for("a/x") is None


def test_specs_tree_and_scalars_replicated(mesh):
    specs = MEGATRON.specs(params(), mesh)
    assert specs["h"][1]["mlp"]["up"]["kernel"] == P(None, "model")
    assert specs["h"][0]["mlp"]["down"]["kernel"] == P("model", None)
    assert specs["scale"] == P()  # a scalar, though no rule matches it


def test_optimizer_state_follows_its_parameter(mesh):
    state = tx.TrainState.create(params(), optax.adam(1e-3))
    specs = MEGATRON.specs(state, mesh)
    assert specs.opt_state[0].mu["h"][0]["mlp"]["up"]["kernel"] == P(None, "model")
    assert specs.opt_state[0].nu["h"][1]["mlp"]["down"]["kernel"] == P("model", None)
    assert specs.opt_state[0].count == P() and specs.step == P()


def test_unmatched_leaves_all_listed_once():
    rules = tx.Rules((r"kernel$", P()))
    with pytest.raises(tx.RuleError) as e:
        rules.specs(params(), where="tensor_parallel(axis='model')", what="argument 0 (state)")
    msg = str(e.value)
    assert "tensor_parallel(axis='model'): 2 leaves of argument 0 (state) match no rule:" in msg
    assert "h/0/mlp/up/bias" in msg and "h/1/mlp/up/bias" in msg and "shape (32,)" in msg
    assert 'e.g. (r"up/bias$", P()), or end the rules with (r".*", P())' in msg
    assert "scale" not in msg  # scalars need no rule


def test_divisibility_lists_every_leaf(mesh):
    rules = tx.Rules((r"kernel$", P(None, "model")), (r".*", P("model")))
    tree = {
        "a": {"kernel": jnp.zeros((4, 6))},
        "b": {"kernel": jnp.zeros((4, 10))},
        "c": jnp.zeros(6),
    }
    with pytest.raises(tx.RuleError, match="the spec of 3 leaves of the tree does not fit") as e:
        rules.specs(tree, mesh)
    msg = str(e.value)
    assert "a/kernel  shape (4, 6): dimension 1 (size 6) is not divisible by 'model'=4" in msg
    assert "b/kernel  shape (4, 10)" in msg and "c  shape (6,)" in msg
    assert "mesh axis sizes (data=2, model=4)" in msg


def test_unknown_axis_and_too_many_dims(mesh):
    with pytest.raises(
        tx.RuleError,
        match=r"x  shape \(8,\): spec P\('tensor',\) names axis "
        r"'tensor', which is not in the mesh \(axes: data, model\)",
    ):
        tx.Rules((r".*", P("tensor"))).specs({"x": jnp.zeros(8)}, mesh)
    with pytest.raises(
        tx.RuleError,
        match=r"spec P\(None, 'model'\) has 2 entries but the leaf "
        "has 1 dimension\\n",
    ):
        tx.Rules((r".*", P(None, "model"))).specs({"x": jnp.zeros(8)}, mesh)
    with pytest.raises(tx.RuleError, match="uses axis 'model' more than once"):
        tx.Rules((r".*", P("model", "model"))).specs({"x": jnp.zeros((8, 8))}, mesh)


def test_multi_axis_dimension(mesh):
    specs = tx.Rules((r".*", P(("data", "model")))).specs({"x": jnp.zeros(16)}, mesh)
    assert specs["x"] == P(("data", "model"))
    with pytest.raises(tx.RuleError, match=r"'data'=2 x 'model'=4 = 8"):
        tx.Rules((r".*", P(("data", "model")))).specs({"x": jnp.zeros(12)}, mesh)


@pytest.mark.parametrize(
    "rule, match",
    [
        ("x", "must be a \\(pattern, PartitionSpec\\) pair"),
        ((r"(", P()), "is not a valid regular expression"),
        ((r"x", ("model",)), "which is not a PartitionSpec"),
    ],
)
def test_bad_rules(rule, match):
    with pytest.raises(tx.RuleError, match=match):
        tx.Rules(rule)


def test_explain_table(mesh):
    text = MEGATRON.explain({"mlp": {"up": {"kernel": jnp.zeros((8, 32), jnp.float32)}}}, mesh)
    lines = str(text).splitlines()
    assert lines[0].split() == ["path", "shape", "spec", "bytes/device"]
    assert lines[1].split() == ["mlp/up/kernel", "(8,", "32)", "P(None,", "'model')", "256", "B"]
    assert repr(text) == str(text)


def test_rules_value_semantics():
    assert tx.Rules((r"a", P("x"))) == tx.Rules((r"a", P("x")))
    assert len(MEGATRON) == 3 and list(MEGATRON)[0] == (r"mlp/up/kernel$", P(None, "model"))
    assert "mlp/up/kernel" in repr(MEGATRON)
    assert np.shape(jnp.zeros((2, 3))) == (2, 3)
