"""`titanax.extend`: the public way to write a transform, and the built-ins written with it.

The transform under test is the one docs/writing_a_transform.md builds (its first code
block is run here), so the page's example is what these tests compose.
"""

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import titanax as tx
from titanax import extend
from titanax.extend import Layer, apply_layer, replicate, split_batch

PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "writing_a_transform.md"
M, D, H = 4, 8, 16  # members, input and hidden width


def _page_transform():
    code = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), re.S | re.M)[0]
    namespace: dict = {}
    exec(compile(code, f"{PAGE.name}[block 0]", "exec"), namespace)
    return namespace["ensemble_parallel"]


ensemble_parallel = _page_transform()


def mlp_loss(w, x, y):  # one member, no randomness: comparable across data splits
    h = jnp.tanh(x @ w["up"])
    return jnp.mean((h @ w["down"] - y) ** 2)


def members_grads(params, x, y):
    return jax.vmap(jax.value_and_grad(mlp_loss), in_axes=(0, None, None))(params, x, y)


@pytest.fixture(scope="module")
def problem():
    ks = jax.random.split(jax.random.key(0), 3)
    params = {
        "up": jax.random.normal(ks[0], (M, D, H)) / 3,
        "down": jax.random.normal(ks[1], (M, H, 1)) / 4,
    }
    x = jax.random.normal(ks[2], (16, D))
    y = jnp.sin(x.sum(-1, keepdims=True))
    return params, (x, y)


def reference(params, batch, lr=0.1):
    """Each member trained alone, on one device."""
    loss, grads = members_grads(params, *batch)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss


def close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# -- every built-in transform is a titanax.extend.Layer --------------------------------


def step(params, batch):
    return params


@pytest.mark.parametrize(
    "make, manual",
    [
        (lambda: tx.data_parallel(step), True),
        (lambda: tx.fully_sharded(step), True),
        (lambda: tx.tensor_parallel(tx.Rules((r".*", P("model"))))(step), False),
        (lambda: tx.context_parallel(step), True),
        (lambda: tx.expert_parallel(tx.Rules((r"experts", P("expert"))))(step), True),
    ],
    ids=["data_parallel", "fully_sharded", "tensor_parallel", "context_parallel", "expert"],
)
def test_built_in_transforms_are_public_layers(make, manual):
    (layer,) = make().plan.layers
    assert type(layer) is extend.Layer
    assert layer.manual is manual
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.axis = "other"  # type: ignore[misc]


# -- the page's transform, alone and composed ------------------------------------------


def test_page_transform_trains_each_member_as_alone(problem):
    params, batch = problem

    @ensemble_parallel(mesh=tx.mesh(member=4, data=2))
    def train(params, batch):
        loss, grads = members_grads(params, *batch)
        new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return new, tx.all_gather(loss, "member", tiled=True)

    new, loss = train(params, batch)
    want, want_loss = reference(params, batch)
    close(new, want)
    close(loss, want_loss)
    assert new["up"].sharding.spec == P("member")
    assert train.specs(params, batch)[0][1] == (P(), P())  # the batch: whole


def test_page_transform_composes_with_data_parallel(problem):
    params, batch = problem

    @tx.data_parallel(axis="data")
    @ensemble_parallel(mesh=tx.mesh(member=4, data=2))
    def train(params, batch):
        loss, grads = members_grads(params, *batch)
        grads, loss = tx.pmean((grads, loss), "data")
        new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return new, tx.all_gather(loss, "member", tiled=True)

    new, loss = train(params, batch)
    close(new, reference(params, batch)[0])
    close(loss, reference(params, batch)[1])
    assert train.specs(params, batch)[0][1] == (P("data"), P("data"))


def test_page_transform_composes_with_fully_sharded(problem):
    # The case of the issue: a hand-written manual layer under fully_sharded (its record
    # of each leaf took the global shape, and gather_params said "already whole").
    params, batch = problem
    state = tx.TrainState.create(params, optax.adam(1e-2))

    @tx.fully_sharded(axis="data", min_size=0)
    @ensemble_parallel(mesh=tx.mesh(member=4, data=2))
    def train(state, batch):
        w = tx.gather_params(state.params, "data")
        loss, grads = members_grads(w, *batch)
        grads = tx.scatter_grads(grads, "data")
        loss = tx.pmean(loss, "data")
        return state.apply_gradients(grads), tx.all_gather(loss, "member", tiled=True)

    specs = train.specs(state, batch)[0][0]
    assert specs.params["up"] == P("member", None, "data")  # members, then ZeRO-3 on H
    assert specs.params["down"] == P("member", "data")
    new, loss = train(state, batch)

    want_loss, grads = members_grads(params, *batch)
    updates, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
    close(new.params, optax.apply_updates(params, updates))
    close(loss, want_loss)


def test_page_transform_composes_with_tensor_parallel(problem):
    params, batch = problem
    rules = tx.Rules((r"up$", P(None, None, "model")), (r"down$", P(None, "model", None)))

    @tx.tensor_parallel(rules)
    @ensemble_parallel(mesh=tx.mesh(member=4, model=2))
    def train(params, batch):
        loss, grads = members_grads(params, *batch)
        new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return new, tx.all_gather(loss, "member", tiled=True)

    assert train.specs(params, batch)[0][0]["up"] == P("member", None, "model")
    new, loss = train(params, batch)
    want, want_loss = reference(params, batch)
    close(new, want)
    close(loss, want_loss)
    assert new["up"].sharding.spec == P("member", None, "model")


def test_page_transform_refuses_an_unreduced_output(problem):
    params, batch = problem

    @ensemble_parallel(mesh=tx.mesh(member=4, data=2))
    def train(params, batch):
        loss, _ = members_grads(params, *batch)
        return loss[0]  # this device's member only

    with pytest.raises(tx.PlanError, match=r"1 output leaf differs between replicas.*'member'"):
        train(params, batch)


# -- the hooks -------------------------------------------------------------------------


def test_enter_and_prepare_are_told_the_plan_innermost_first():
    seen = []

    def hooks(name):
        import contextlib

        @contextlib.contextmanager
        def enter(trace):
            seen.append(("enter", name, trace))
            yield

        def prepare(args, trace):
            seen.append(("prepare", name, trace))
            w, x = args
            return w, x + 1.0  # moves the batch: the body must see it moved, once per layer

        return enter, prepare

    def dp_layout(arg, info):
        return split_batch(arg, info) if info.is_own_batch else replicate(arg)

    inner_enter, inner_prepare = hooks("inner")
    outer_enter, outer_prepare = hooks("outer")
    mesh = tx.mesh(a=4, b=2)
    inner = Layer(
        transform="inner", axis="a", manual=True, layout=dp_layout, mesh=mesh,
        enter=inner_enter, prepare=inner_prepare, replicated_argnums=0,
    )  # fmt: skip
    outer = Layer(
        transform="outer", axis="b", manual=True, layout=dp_layout,
        enter=outer_enter, prepare=outer_prepare,
    )  # fmt: skip

    def body(w, x):
        return tx.all_gather(x * w, ("a", "b"), tiled=True)  # the batch is split a-major

    f = apply_layer(apply_layer(body, inner), outer)
    out = f(jnp.float32(2.0), jnp.arange(16.0))
    np.testing.assert_allclose(out, 2 * (np.arange(16.0) + 2))

    assert [(kind, name) for kind, name, _ in seen] == [
        ("enter", "inner"),
        ("enter", "outer"),
        ("prepare", "inner"),
        ("prepare", "outer"),
    ]
    trace = seen[0][2]
    assert trace.layer is inner and trace.batch == frozenset({1})
    # Constants are the stack's (any layer's replicated_argnums); own batches the layer's.
    assert trace.replicated == frozenset({0}) and seen[1][2].replicated == frozenset({0})
    assert trace.own_batch == frozenset({1}) == seen[1][2].own_batch
    assert trace.args[1].shape == (16,) and trace.local_args[1].shape == (2,)
    assert trace.specs[1] == P(("a", "b"))  # both layers' axes, in mesh order


def test_a_layout_naming_another_axis_or_the_wrong_structure_is_refused():
    mesh = tx.mesh(a=4, b=2)

    def greedy(arg, info):
        return jax.tree.map(lambda _: P("b"), arg)

    f = apply_layer(lambda w: w, Layer(transform="greedy", axis="a", manual=True, layout=greedy))
    with pytest.raises(tx.PlanError, match=r"greedy\(axis='a'\).*names mesh axes other than"):
        with jax.set_mesh(mesh):
            f({"w": jnp.ones(8)})

    g = apply_layer(
        lambda w: w,
        Layer(transform="short", axis="a", manual=True, layout=lambda arg, info: P(), mesh=mesh),
    )
    with pytest.raises(
        tx.PlanError, match=r"1 PartitionSpec\(s\) in another tree structure than the 2 leaves"
    ):
        g({"w": jnp.ones(8), "b": jnp.ones(8)})
    h = apply_layer(
        lambda w: w,
        Layer(transform="typo", axis="a", manual=True, layout=lambda arg, info: "a", mesh=mesh),
    )
    with pytest.raises(tx.PlanError, match=r"str where a PartitionSpec was expected"):
        h(jnp.ones(8))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"transform": ""}, r"transform must be the transform's name"),
        ({"axis": 3}, r"mine: axis must be a mesh axis name"),
        ({"mesh": "data=8"}, r"mesh must be a jax.sharding.Mesh"),
        ({"manual": "yes"}, r"manual must be True or False"),
        ({"batch_argnums": "last"}, r"batch_argnums must be an int or a tuple of ints"),
        ({"replicated_argnums": 1.0}, r"replicated_argnums must be an int"),
        ({"donate": 1}, r"donate must be True, False or None"),
        ({"layout": None}, r"layout must be a function, got NoneType"),
        ({"enter": "ctx"}, r"enter must be a function or None, got str"),
    ],
)
def test_layer_fields_are_checked(fields, message):
    base = {"transform": "mine", "axis": "data", "manual": True, "layout": replicate}
    with pytest.raises(tx.PlanError, match=message):
        Layer(**{**base, **fields})


def test_layer_is_keyword_only_and_normalizes_argnums():
    with pytest.raises(TypeError):
        Layer("mine", "data", True, replicate)  # type: ignore[misc]
    layer = Layer(transform="mine", axis="data", manual=True, layout=replicate, batch_argnums=1)
    assert layer.batch_argnums == (1,) and layer.replicated_argnums == ()
    with pytest.raises(tx.PlanError, match=r"layer must be a titanax.extend.Layer"):
        apply_layer(lambda x: x, "data_parallel")  # type: ignore[arg-type]


def test_two_layers_on_one_axis_are_refused():
    a = Layer(transform="first", axis="data", manual=True, layout=replicate)
    b = Layer(transform="second", axis="data", manual=False, layout=replicate)
    with pytest.raises(tx.PlanError, match=r"second\(axis='data'\) and first\(axis='data'\)"):
        apply_layer(apply_layer(lambda x: x, a), b)


@pytest.mark.parametrize(
    "prepare, message",
    [
        (lambda args, trace: args[:1], r"returned 1 argument where it was given 2 arguments"),
        (lambda args, trace: args[0], r"returned ArrayImpl|returned .*Tracer|returned [A-Za-z]+ "),
        (
            lambda args, trace: (args[0], args[1][:1]),
            r"changed the structure, shapes or dtypes of argument 1 \(\[\(\(2,\), ",
        ),
        (
            lambda args, trace: (args[0], args[1].astype(jnp.int32)),
            r"changed the structure, shapes or dtypes of argument 1",
        ),
    ],
    ids=["fewer", "not-a-tuple", "shape", "dtype"],
)
def test_a_prepare_hook_must_keep_the_arguments_shapes(prepare, message):
    def layout(arg, info):
        return split_batch(arg, info) if info.is_own_batch else replicate(arg)

    layer = Layer(
        transform="mover", axis="data", manual=True, layout=layout, mesh=tx.mesh(data=8),
        prepare=prepare,
    )  # fmt: skip
    f = apply_layer(lambda w, x: tx.pmean(jnp.sum(w * x), "data"), layer)
    with pytest.raises(tx.PlanError, match=r"mover\(axis='data'\): its prepare hook " + message):
        f(jnp.float32(1.0), jnp.arange(16.0))


def _dp_layout(arg, info):
    return split_batch(arg, info) if info.is_own_batch else replicate(arg)


def test_replicated_argnums_out_of_range_or_on_a_batch_is_refused():
    # Out of range was silently ignored: the page's key_argnums=3 on a 3-argument step
    # never folded the key, and every member drew the same noise.
    mesh = tx.mesh(data=8)
    body = lambda w, key, x: tx.pmean(jnp.sum(w * x), "data")  # noqa: E731
    args = (jnp.float32(1.0), jnp.float32(0.0), jnp.arange(16.0))
    far = Layer(
        transform="mine", axis="data", manual=True, layout=_dp_layout, mesh=mesh,
        replicated_argnums=3,
    )  # fmt: skip
    with pytest.raises(tx.PlanError, match=r"replicated_argnums=\(3,\) names argument 3, but"):
        apply_layer(body, far)(*args)
    with pytest.raises(tx.PlanError, match=r"key_argnums|replicated_argnums=\(3,\)"):
        ensemble_parallel(mesh=tx.mesh(member=4, data=2), key_argnums=3)(body)(*args)
    on_batch = dataclasses.replace(far, replicated_argnums=-1)
    with pytest.raises(tx.PlanError, match=r"names argument 2 \(x\), which is a batch argument"):
        apply_layer(body, on_batch)(*args)


def test_hooks_that_fail_are_named():
    mesh = tx.mesh(data=8)
    body = lambda w, x: tx.pmean(jnp.sum(w * x), "data")  # noqa: E731
    args = (jnp.float32(1.0), jnp.arange(16.0))

    def broken_layout(arg, info):
        return {"missing": P()}["w"]

    def not_a_context(trace):
        return None

    def broken_prepare(args, trace):
        raise ValueError("no such leaf")

    cases = [
        ({"layout": broken_layout}, r"its layout raised KeyError: 'w' \(laying out argument 0"),
        ({"enter": not_a_context}, r"its enter hook returned NoneType, not a context manager"),
        ({"prepare": broken_prepare}, r"its prepare hook raised ValueError: no such leaf"),
    ]
    for fields, message in cases:
        layer = Layer(
            **{"transform": "mine", "axis": "data", "manual": True, "layout": _dp_layout,
               "mesh": mesh, **fields}
        )  # fmt: skip
        with pytest.raises(tx.PlanError, match=r"mine\(axis='data'\): " + message):
            apply_layer(body, layer)(*args)


def test_a_layout_naming_an_axis_the_mesh_lacks_suggests_the_closest():
    layer = Layer(
        transform="sweep", axis="sweep", manual=True, mesh=tx.mesh(sweep=4, data=2),
        layout=lambda arg, info: jax.tree.map(lambda _: P("swep"), arg),
    )  # fmt: skip
    with pytest.raises(tx.PlanError, match=r"names 'swep', which is not an axis of the mesh "):
        apply_layer(lambda w: w, layer)(jnp.ones(8))
    with pytest.raises(tx.PlanError, match=r"did you mean 'sweep'\?"):
        apply_layer(lambda w: w, layer)(jnp.ones(8))


def test_split_batch_on_another_dimension_says_which():
    layer = Layer(
        transform="seq", axis="seq", manual=True, mesh=tx.mesh(seq=8),
        layout=lambda arg, info: split_batch(arg, info, dim=1) if info.is_own_batch else replicate(arg),
    )  # fmt: skip
    f = apply_layer(lambda x: tx.pmean(jnp.sum(x), "seq"), layer)
    with pytest.raises(tx.PlanError) as e:
        f(jnp.ones((2, 12)))
    assert "cannot be split into 8 pieces on dimension 1, along 'seq'" in str(e.value)
    assert "dimension 1 (12) is not divisible by 'seq'=8" in str(e.value)
    assert "Make dimension 1 of every batch leaf a multiple of 8" in str(e.value)
    assert "replicas" not in str(e.value)


def test_explain_prints_each_layers_notes():
    rules = tx.Rules((r".*", P("model")), notes="k/v replicated: 2 KV heads on model=4")
    mine = Layer(
        transform="mine", axis="data", manual=True, layout=_dp_layout, notes=["mine's note"]
    )
    f = apply_layer(
        tx.tensor_parallel(rules, mesh=tx.mesh(data=2, model=4))(
            lambda w, x: tx.all_gather(x @ w, "data", tiled=True)
        ),
        mine,
    )
    text = str(f.explain(jnp.ones((8, 8)), jnp.ones((4, 8))))
    assert (
        "notes:\n  * tensor_parallel(axis='model'): k/v replicated: 2 KV heads on model=4\n" in text
    )
    assert "  * mine(axis='data'): mine's note\n" in text
    plain = str(
        tx.data_parallel(lambda x: tx.pmean(x, "data"), mesh=tx.mesh(data=8)).explain(jnp.ones(8))
    )
    assert "notes:" not in plain
    with pytest.raises(tx.PlanError, match=r"notes must be a sequence of str"):
        Layer(transform="mine", axis="data", manual=True, layout=_dp_layout, notes=[1])
