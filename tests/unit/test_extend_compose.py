"""How layers of a stack see each other: found by trying to break `titanax.extend`.

Each test was a silently wrong number, a crash or a misleading error before its fix.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import titanax as tx
from titanax.extend import Layer, apply_layer, replicate, split_batch


def dp_layout(arg, info):
    return split_batch(arg, info) if info.is_own_batch else replicate(arg)


def largest_free_dim(axis):
    """A custom ZeRO-like layer: each non-batch leaf split on its largest free dimension."""

    def layout(arg, info):
        if info.is_batch:
            return replicate(arg)

        def one(leaf, taken):
            free = [d for d in range(np.ndim(leaf)) if len(taken) <= d or taken[d] is None]
            d = max(free, key=lambda d: np.shape(leaf)[d])
            return P(*[None] * d, axis)

        return jax.tree.map(one, arg, info.others, is_leaf=lambda s: isinstance(s, P))

    return Layer(transform="my_shard", axis=axis, manual=True, layout=layout, sees_others=True)


@pytest.mark.parametrize("axes", [{"c": 4, "data": 2}, {"data": 2, "c": 4}], ids=str)
def test_two_layers_that_pick_free_dimensions_see_each_other(axes):
    # Both used to see only the other kind of layer and took the same dimension: with
    # the mesh (data, c) the body got rows 0, 32, 8, 40, ... and no error.
    w = jnp.arange(64.0 * 4).reshape(64, 4)

    def step(params, x):
        whole = tx.gather_params(params, "data")["w"]
        whole = tx.all_gather(whole, "c", axis=int(whole.shape[1] != 4), tiled=True)
        return tx.all_gather(whole[None], ("data", "c"), tiled=True)[0]

    mesh = tx.mesh(**axes)
    f = apply_layer(
        tx.fully_sharded(axis="data", mesh=mesh, min_size=1)(step), largest_free_dim("c")
    )
    (spec,) = f.specs({"w": w}, jnp.ones((16, 64)))[0][0].values()
    assert sorted(a for a in spec if a) == ["c", "data"]  # one dimension each
    np.testing.assert_array_equal(f({"w": w}, jnp.ones((16, 64))), w)


def test_two_manual_layers_on_one_dimension_of_the_state_are_refused():
    mine = Layer(
        transform="rows", axis="c", manual=True,
        layout=lambda a, i: replicate(a) if i.is_batch else jax.tree.map(lambda _: P("c"), a),
    )  # fmt: skip
    experts = tx.expert_parallel(tx.Rules((r"w", P("expert"))), mesh=tx.mesh(c=2, expert=4))
    f = apply_layer(
        experts(lambda p, x: tx.pmean(jnp.sum(p["w"]) * x.sum(), ("c", "expert"))), mine
    )
    with pytest.raises(tx.PlanError) as e:
        f({"w": jnp.ones((8, 4))}, jnp.ones((8, 4)))
    assert "two manual layers split the same dimension of argument 0 (p)" in str(e.value)
    assert "w dimension 0: expert_parallel(axis='expert'), rows(axis='c')" in str(e.value)


def test_context_parallel_refuses_a_sequence_dimension_split_by_another_layer():
    # data_parallel splits dimension 0, so did context_parallel(seq_dim=0): positions came
    # out [0..7, 0..7] for 16 tokens and ring attention was off by up to 0.58.
    @tx.data_parallel(axis="data")
    @tx.context_parallel(axis="seq", seq_dim=0, mesh=tx.mesh(data=2, seq=4))
    def step(tokens):
        pos = tx.context_positions(tokens.shape[0], axis="seq")
        return tx.pmean(jnp.mean(pos * tokens), ("data", "seq"))

    with pytest.raises(
        tx.PlanError, match=r"dimension 0 of argument 0 is laid out \('data', 'seq'\)"
    ):
        step(jnp.ones(16))


def test_context_parallel_splits_only_its_own_batches():
    # data_parallel names labels a batch; context_parallel(batch_argnums=1) used to split
    # them along the sequence too (an error blaming it for what it was not asked to do).
    @tx.data_parallel(axis="data", batch_argnums=(1, 2))
    @tx.context_parallel(axis="seq", mesh=tx.mesh(data=2, seq=4), batch_argnums=1)
    def step(w, tokens, labels):  # labels (B,): one per sequence
        return tx.pmean(jnp.mean(tokens) * w + jnp.mean(labels), ("data", "seq"))

    tokens, labels = jnp.arange(64.0).reshape(4, 16), jnp.arange(4.0)
    assert step.specs(1.0, tokens, labels)[0][1:] == (P("data", "seq"), P("data"))
    np.testing.assert_allclose(step(1.0, tokens, labels), tokens.mean() + labels.mean())


def test_a_constant_named_by_one_layer_is_whole_in_every_layer():
    # fully_sharded split a table another layer declared a constant: max(table) was the
    # max of a shard: 49121 where 2047 x 32 + 1 = 65505 is right.
    table = jnp.arange(64.0 * 32).reshape(64, 32)
    ens = Layer(
        transform="members", axis="member", manual=True, replicated_argnums=1,
        layout=lambda a, i: replicate(a)
        if i.is_batch or i.is_replicated
        else jax.tree.map(lambda _: P("member"), a),
    )  # fmt: skip

    def body(params, table, x):
        w = tx.gather_params(params, "data")["w"]
        s = jnp.max(table) * jnp.sum(w, axis=1) + tx.pmean(jnp.mean(x), "data")
        return tx.all_gather(tx.pmean(s, "data"), "member", tiled=True)

    mesh = tx.mesh(member=4, data=2)
    f = apply_layer(tx.fully_sharded(axis="data", mesh=mesh, min_size=16)(body), ens)
    params = {"w": jnp.ones((4, 32))}
    assert f.specs(params, table, jnp.ones((8, 32)))[0][1] == P()
    np.testing.assert_allclose(f(params, table, jnp.ones((8, 32))), np.full(4, 2047.0 * 32 + 1))


def test_a_failing_enter_hook_leaves_no_context_behind():
    # fully_sharded's registry stayed active after a later layer's enter raised, and a
    # later plain data_parallel step got tx.global_norm 16.0 instead of 5.657.
    def boom(trace):
        raise ValueError("outer enter failed")

    outer = Layer(transform="outer", axis="member", manual=True, layout=dp_layout, enter=boom)
    inner = tx.fully_sharded(axis="data", mesh=tx.mesh(member=4, data=2), min_size=1)
    f = apply_layer(inner(lambda p, x: (p, tx.pmean(jnp.mean(x), "data"))), outer)
    with pytest.raises(
        tx.PlanError, match=r"outer\(axis='member'\): its enter hook raised"
    ) as kept:
        f({"w": jnp.ones((16, 4))}, jnp.ones((8, 4)))
    assert kept.value is not None  # the exception (and its traceback) is still alive here

    @tx.data_parallel(axis="data", mesh=tx.mesh(data=8))
    def norm(g, x):
        return tx.global_norm(g, "data") + 0 * tx.pmean(jnp.mean(x), "data")

    g = {"w": jnp.ones((8, 4))}
    np.testing.assert_allclose(norm(g, jnp.ones((8, 4))), optax.tree.norm(g), rtol=1e-6)


def test_an_enter_hook_failing_inside_its_context_is_named():
    import contextlib

    @contextlib.contextmanager
    def enter(trace):
        raise RuntimeError("enter boom")
        yield

    layer = Layer(
        transform="mine", axis="data", manual=True, layout=dp_layout, mesh=tx.mesh(data=8),
        enter=enter,
    )  # fmt: skip
    with pytest.raises(tx.PlanError, match=r"mine\(axis='data'\): its enter hook raised Runtime"):
        apply_layer(lambda x: tx.pmean(x.sum(), "data"), layer)(jnp.ones(8))


def test_a_layout_of_another_structure_is_refused():
    layer = Layer(
        transform="mine", axis="data", manual=True, mesh=tx.mesh(data=8),
        layout=lambda a, i: replicate(a) if i.is_batch else [P(), P()],
    )  # fmt: skip
    f = apply_layer(lambda p, x: tx.pmean(x.sum(), "data"), layer)
    with pytest.raises(tx.PlanError, match=r"2 PartitionSpec\(s\) in another tree structure"):
        f({"a": jnp.ones(2), "b": jnp.ones(2)}, jnp.ones(8))


def test_a_global_view_layer_may_split_only_the_batch():
    gdp = Layer(
        transform="global_dp", axis="data", manual=False, mesh=tx.mesh(data=8),
        layout=lambda a, i: split_batch(a, i) if i.is_batch else replicate(a),
    )  # fmt: skip
    f = apply_layer(lambda w, x: jnp.mean(x @ w), gdp)
    x = jnp.arange(64.0).reshape(16, 4)
    np.testing.assert_allclose(f(jnp.ones((4, 2)), x), jnp.mean(x @ jnp.ones((4, 2))))
    idle = Layer(
        transform="idle", axis="data", manual=False, mesh=tx.mesh(data=8), layout=replicate_all
    )
    with pytest.raises(tx.PlanError, match=r"idle\(axis='data'\): its layout splits no leaf"):
        apply_layer(lambda w, x: jnp.mean(x @ w), idle)(jnp.ones((4, 2)), x)


def replicate_all(arg, info):
    return replicate(arg)


def test_a_pipeline_on_an_axis_the_step_made_manual_is_refused():
    pipe = tx.pipeline(
        lambda w, x: jnp.tanh(x @ w), schedule="gpipe", microbatches=4,
        loss=lambda _, y, t: jnp.mean((y - t) ** 2),
    )  # fmt: skip

    @tx.data_parallel(axis="stage", mesh=tx.mesh(stage=4, rep=2))
    def step(w, batch):
        return tx.pmean(pipe(w, *batch)[0], "stage")

    with pytest.raises(tx.ScheduleError, match=r"tx.data_parallel already makes 'stage' a manual"):
        step(jnp.ones((4, 8, 8)) / 8, (jnp.ones((16, 8)), jnp.zeros((16, 8))))


def test_an_array_on_the_mesh_closed_over_is_a_clear_error():
    mesh = tx.mesh(data=8)
    table = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P()))

    @tx.data_parallel(axis="data", mesh=mesh)
    def step(w, x):
        return w + table[:2], tx.pmean(jnp.mean(x), "data")

    with pytest.raises(
        tx.PlanError, match=r"uses an array laid out on the mesh that is not one of"
    ):
        step(jnp.ones(2), jnp.ones((16, 2)))


def test_explain_takes_a_typed_key_argument():
    @tx.data_parallel(axis="data", mesh=tx.mesh(data=8), replicated_argnums=1)
    def step(w, key, x):
        return w, tx.pmean(jnp.mean(x * jax.random.normal(key, x.shape)), "data")

    text = str(step.explain(jnp.ones(4), jax.random.key(0), jnp.ones((16, 4))))
    assert "key   ()       P()         8 B" in text


def test_a_deleted_input_on_the_first_call_does_not_say_nothing_is_donated():
    w = jnp.ones(4)
    w.delete()
    step = tx.data_parallel(lambda w, x: (w, tx.pmean(x.sum(), "data")), mesh=tx.mesh(data=8))
    with pytest.raises(tx.PlanError, match=r"donates its state to its output") as e:
        step(w, jnp.ones((8, 4)))
    assert "here: none" not in str(e.value)
