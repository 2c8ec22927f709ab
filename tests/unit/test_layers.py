"""tx.stack_layers and tx.unstack_layers: per-layer trees to the stacked layout and back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import titanax as tx

DTYPES = ["float32", "int32", "bfloat16"]


@st.composite
def layer_lists(draw):
    """``n`` layers of one random structure: nested dicts and lists, numpy or jax leaves."""
    n = draw(st.integers(1, 5))
    names = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=4, unique=True))
    specs = {
        k: (
            draw(st.lists(st.integers(0, 3), max_size=3).map(tuple)),
            draw(st.sampled_from(DTYPES)),
            draw(st.booleans()),  # on the host (numpy) or a jax Array
            draw(st.booleans()),  # nested in a list
        )
        for k in names
    }
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))

    def leaf(shape, dtype, host):
        x = rng.normal(size=shape).astype(jnp.dtype(dtype))
        return x if host else jnp.asarray(x)

    layers = []
    for _ in range(n):
        layer = {}
        for k, (shape, dtype, host, nested) in specs.items():
            x = leaf(shape, dtype, host)
            layer[k] = [x, {"bias": None}] if nested else x
        layers.append(layer)
    return layers


@given(layer_lists())
def test_stack_then_unstack_is_the_identity(layers):
    stacked = tx.stack_layers(layers)
    assert jax.tree.structure(stacked) == jax.tree.structure(layers[0])
    for j, leaf in enumerate(jax.tree.leaves(stacked)):
        column = [jax.tree.leaves(layer)[j] for layer in layers]
        assert leaf.shape == (len(layers), *column[0].shape)
        assert leaf.dtype == column[0].dtype
        assert isinstance(leaf, np.ndarray) == isinstance(column[0], np.ndarray)  # host stays host
        for i, x in enumerate(column):
            np.testing.assert_array_equal(np.asarray(leaf[i]), np.asarray(x))

    back = tx.unstack_layers(stacked, n=len(layers))
    assert len(back) == len(layers)
    for got, want in zip(back, layers):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert a.shape == b.shape and a.dtype == b.dtype and type(a) is type(b)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_none_is_kept_and_numbers_become_arrays():
    layers = [{"w": np.ones((2, 3), np.float32), "b": None, "scale": float(i)} for i in range(3)]
    stacked = tx.stack_layers(tuple(layers))
    assert stacked["b"] is None
    assert stacked["scale"].shape == (3,) and stacked["scale"].dtype == jnp.float32
    back = tx.unstack_layers(stacked)
    assert [float(layer["scale"]) for layer in back] == [0.0, 1.0, 2.0]
    assert back[2]["b"] is None and back[2]["scale"].shape == ()


def test_a_tree_without_leaves_needs_n():
    assert tx.stack_layers([{"b": None}, {"b": None}]) == {"b": None}
    assert tx.unstack_layers({"b": None}, n=2) == [{"b": None}, {"b": None}]
    with pytest.raises(tx.LayerError, match="no array leaves.*pass n"):
        tx.unstack_layers({"b": None})


def layer(d=64):
    return {"attn": {"wq": jnp.zeros((64, d)), "wk": jnp.zeros((64, 64))}, "mlp": jnp.zeros(8)}


def test_shape_and_dtype_errors_list_every_leaf_by_layer_and_path():
    layers = [layer(), layer(), layer(), layer(32), layer()]
    layers[4]["mlp"] = layers[4]["mlp"].astype(jnp.bfloat16)
    with pytest.raises(tx.LayerError) as e:
        tx.stack_layers(layers)
    msg = str(e.value)
    assert msg.startswith("stack_layers: 2 leaves differ in shape or dtype from layer 0:")
    assert "layers[3]['attn']['wq']: shape (64, 32) vs (64, 64) in layers[0]" in msg
    assert "layers[4]['mlp']: dtype bfloat16 vs float32 in layers[0]" in msg
    assert "cast (x.astype) or pad" in msg
    with pytest.raises(tx.LayerError, match=r"layers\[1\]\['s'\]: dtype int vs float"):
        tx.stack_layers([{"s": 1.0}, {"s": 1}])


def test_structure_errors_name_the_first_layer_and_the_paths():
    odd = layer()
    odd["attn"]["bias"] = jnp.zeros(64)
    with pytest.raises(tx.LayerError) as e:
        tx.stack_layers([layer(), layer(), odd, [1, 2]])
    msg = str(e.value)
    assert "layers[2] has a different tree structure from layers[0]" in msg
    assert "only in layers[2]: ['attn']['bias']" in msg
    assert "layers[0]: PyTreeDef({'attn': {'wk': *, 'wq': *}, 'mlp': *})" in msg
    assert "stack each kind separately" in msg
    with pytest.raises(tx.LayerError, match=r"only in layers\[1\]: \['b'\]\n"):
        tx.stack_layers([{"w": 1.0, "b": None}, {"w": 1.0, "b": 2.0}])  # None is no leaf


@pytest.mark.parametrize(
    "layers, match",
    [
        ([], "got no layers"),
        ({"0": {"w": 1.0}}, r"got type dict\..*sorted\(layers, key=int\)"),
        (jnp.zeros((2, 3)), "looks stacked already"),
        ([{"act": "gelu"}] * 2, r"(?s)2 leaves are neither.*layers\[0\]\['act'\]: str"),
    ],
)
def test_stack_errors(layers, match):
    with pytest.raises(tx.LayerError, match=match):
        tx.stack_layers(layers)


def test_unstack_errors_name_the_paths():
    with pytest.raises(tx.LayerError) as e:
        tx.unstack_layers({"a": jnp.ones((3, 2)), "b": jnp.ones(4), "c": [jnp.ones((4, 1))]})
    msg = str(e.value)
    assert "leading dimensions differ" in msg
    assert "* 3 rows: tree['a']\n" in msg and "* 4 rows: tree['b'], tree['c'][0]\n" in msg

    with pytest.raises(tx.LayerError, match=r"1 leaf is 0-d.*\n  \* tree\['step'\]"):
        tx.unstack_layers({"w": jnp.ones((2, 3)), "step": jnp.zeros((), jnp.int32)})
    with pytest.raises(
        tx.LayerError, match=r"unstack_layers\(n=3\): the leaves have 2 rows, not 3"
    ):
        tx.unstack_layers({"w": jnp.ones((2, 3))}, n=3)
    for n in (-1, 1.5, True):
        with pytest.raises(tx.LayerError, match="n must be a non-negative integer"):
            tx.unstack_layers({"w": jnp.ones((2, 3))}, n=n)


def test_inside_jit_and_with_scan_over_layers():
    rng = np.random.default_rng(0)
    layers = [{"w": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)} for _ in range(3)]
    x = jnp.ones((2, 4))

    @jax.jit
    def both(layers, x):
        stacked = tx.stack_layers(layers)
        y, _ = jax.lax.scan(lambda h, p: (jnp.tanh(h @ p["w"]), None), x, stacked)
        return y, tx.unstack_layers(stacked)

    y, back = both(layers, x)
    want = x
    for p in layers:
        want = jnp.tanh(want @ p["w"])
    np.testing.assert_allclose(y, want, rtol=1e-6)
    for got, orig in zip(back, layers):
        np.testing.assert_array_equal(got["w"], orig["w"])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_unstack_a_leading_dim_laid_out_along_an_explicit_axis(jit):
    # Plain indexing of such an array is a ShardingTypeError (jax 0.10.2).
    mesh = jax.make_mesh((4, 2), ("stage", "rest"), axis_types=(AxisType.Explicit,) * 2)
    w = np.arange(4 * 6 * 2, dtype=np.float32).reshape(4, 6, 2)
    stacked = {"w": jax.device_put(w, NamedSharding(mesh, P("stage", "rest")))}
    unstack = jax.jit(tx.unstack_layers) if jit else tx.unstack_layers
    rows = unstack(stacked)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(row["w"], w[i])
        assert row["w"].sharding.spec[0] == "rest"  # the other dimensions keep their layout


D = 6


def block(p, x):
    return x + jnp.tanh(x @ p["attn"]["w"]) @ p["mlp"]["w2"] + p["mlp"]["b"]


def loss(head, y, t):
    return jnp.mean((y @ head - t) ** 2)


def test_unstack_the_gradients_of_pipeline_per_layer():
    rng = np.random.default_rng(1)
    f = lambda *s: rng.normal(size=s).astype(np.float32) * 0.4  # noqa: E731
    layers = [{"attn": {"w": f(D, 8)}, "mlp": {"w2": f(8, D), "b": f(D)}} for _ in range(4)]
    head, x, t = f(D, 3), f(16, D), f(16, 3)

    mesh = tx.mesh(stage=4, rest=2)
    pipe = tx.pipeline(block, schedule="1f1b", microbatches=4, loss=loss, mesh=mesh)
    stacked = tx.stack_layers(layers)  # numpy layers: stacked on the host, placed by pipe
    assert isinstance(stacked["attn"]["w"], np.ndarray)
    value, (g_stacked, _, _) = pipe(stacked, x, t, head)

    def sequential(layers):  # the user's model: a loop over a list of layer dicts
        y = x
        for p in layers:
            y = block(p, y)
        return loss(head, y, t)

    want_value, want = jax.value_and_grad(sequential)(layers)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    g = g_stacked["attn"]["w"]
    assert isinstance(g, jax.Array) and g.sharding.spec[0] == "stage"
    grads = tx.unstack_layers(g_stacked, n=4)
    assert isinstance(grads, list) and len(grads) == 4
    for i in range(4):
        for a, b in zip(jax.tree.leaves(grads[i]), jax.tree.leaves(want[i])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(g[i], grads[i]["attn"]["w"])  # plain indexing agrees

    # In the user's own format again: a list of layer dicts, updated layer by layer.
    new = [jax.tree.map(lambda p, d: p - 0.1 * d, p, d) for p, d in zip(layers, grads)]
    assert jax.tree.structure(new) == jax.tree.structure(layers)
