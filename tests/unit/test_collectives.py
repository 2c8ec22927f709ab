import jax
import jax.numpy as jnp
import numpy as np
import pytest

import titanax as tx
from titanax.parallel.hlo import collectives


@pytest.fixture(scope="module")
def mesh():
    return tx.mesh(data=8)


def run(mesh, body, *args):
    """Runs ``body`` once per replica on rows of ``args`` (one row per replica)."""
    return tx.data_parallel(body, mesh=mesh, batch_argnums=tuple(range(len(args))), donate=False)(
        *args
    )


X = np.arange(24, dtype=np.float32).reshape(8, 3) ** 1.5


def test_reductions_match_numpy(mesh):
    out = run(mesh, lambda x: (tx.psum(x, "data"), tx.pmean(x, "data"), tx.pmax(x, "data")), X)
    np.testing.assert_allclose(out[0], X.sum(0, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(out[1], X.mean(0, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(out[2], X.max(0, keepdims=True), rtol=1e-6)


def test_gather_scatter_permute_match_numpy(mesh):
    def body(x):
        i = tx.axis_index("data")
        full = tx.all_gather(x, "data", axis=0, tiled=True)  # (8, 3) everywhere
        scattered = tx.psum_scatter(full * (i + 1.0), "data", tiled=True)  # row i: sum_j (j+1) X[i]
        shifted = tx.ppermute(x, "data", [(j, (j + 1) % 8) for j in range(8)])
        blocks = jnp.broadcast_to(i * 10.0 + jnp.arange(8.0)[:, None], (8, 2))
        swapped = tx.all_to_all(blocks, "data", 0, 0, tiled=True)  # row j: j * 10 + i
        g = lambda v: tx.all_gather(v, "data", axis=0, tiled=True)  # noqa: E731
        return full, g(scattered), g(shifted), g(swapped), g(i[None]), tx.axis_size("data")

    full, scattered, shifted, swapped, index, size = run(mesh, body, X)
    np.testing.assert_allclose(full, X)
    np.testing.assert_allclose(scattered, X * 36.0, rtol=1e-6)  # sum_{j<8} (j + 1) = 36
    np.testing.assert_allclose(shifted, np.roll(X, 1, axis=0))
    # replica i ends with block j of replica j, i.e. j * 10 + i at row j
    expected = np.arange(8.0)[None, :] * 10 + np.arange(8.0)[:, None]  # [i, j]
    np.testing.assert_allclose(swapped.reshape(8, 8, 2)[..., 0], expected)
    np.testing.assert_allclose(swapped.reshape(8, 8, 2)[..., 1], expected)
    np.testing.assert_array_equal(index, np.arange(8))
    assert int(size) == 8


def test_same_as_jax_lax_under_vmap():
    x = jnp.arange(12.0).reshape(4, 3)
    for ours, theirs in [
        (tx.psum, jax.lax.psum),
        (tx.pmean, jax.lax.pmean),
        (tx.pmax, jax.lax.pmax),
    ]:
        a = jax.vmap(lambda v, f=ours: f(v, "i"), axis_name="i")(x)
        b = jax.vmap(lambda v, f=theirs: f(v, "i"), axis_name="i")(x)
        np.testing.assert_array_equal(a, b)


def test_unbound_outside_any_transform():
    with pytest.raises(
        tx.CollectiveError,
        match=r"tx.pmean: axis 'data' is not bound here \(no "
        r"Titanax transform is active\). Call it inside a step wrapped with "
        r"tx.data_parallel\(axis='data'\)",
    ):
        tx.pmean(jnp.ones(3), "data")


def test_wrong_axis_names_the_bound_axes(mesh):
    with pytest.raises(
        tx.CollectiveError,
        match=r"tx.psum: axis 'batch' is not bound here "
        r"\(bound axes: 'data' \(tx.data_parallel\)\)",
    ):
        run(mesh, lambda x: tx.psum(x, "batch"), X)


def test_stage_axis_points_to_pipeline():
    with pytest.raises(tx.CollectiveError, match=r"inside a step wrapped with tx.pipeline"):
        tx.ppermute(jnp.ones(3), "stage", [(0, 1)])


def test_axis_tuples_are_checked_per_name(mesh):
    with pytest.raises(tx.CollectiveError, match="axis 'model' is not bound"):
        run(mesh, lambda x: tx.psum(x, ("data", "model")), X)


def test_size_one_axes_under_dp_x_tp_match_jax():
    # XLA rejects all-reduces over a size-1 manual axis of a partly manual program; the
    # guarded collectives compute these identities without one, with jax.lax's results.
    from jax.sharding import PartitionSpec as P

    mesh = tx.mesh(devices=jax.devices()[:4], data=1, model=4)
    x = jnp.arange(24.0).reshape(2, 3, 4)

    def body(x, lax):
        return (
            lax.psum(x, "data"),
            lax.pmean(x, "data"),
            lax.pmax(x, "data"),
            lax.all_gather(x, "data"),
            lax.all_gather(x, "data", axis=1, tiled=True),
            lax.psum_scatter(x[:1], "data"),
            lax.ppermute(x, "data", [(0, 0)]),
            lax.all_to_all(x[:1], "data", 0, 2),
            lax.axis_index("data"),
            lax.axis_size("data"),
        )

    ours = tx.data_parallel(
        tx.tensor_parallel(tx.Rules((".*", P(None, None, "model"))), batch_argnums=())(
            lambda x: body(x, tx)
        ),
        mesh=mesh,
        batch_argnums=(),
        donate=False,
    )(x)
    one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    theirs = jax.shard_map(
        lambda x: body(x, jax.lax), mesh=one, in_specs=P(), out_specs=P(), check_vma=False
    )(x)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_reductions_of_every_dtype_under_dp_x_tp(dtype):
    # A partly manual program (data manual, model Auto). XLA:CPU aborts the process on a
    # bfloat16 all-reduce or reduce-scatter there (AllReducePromotion, "Invalid binary
    # instruction opcode copy"): the guarded collectives reduce bfloat16 in float32 on CPU.
    from jax.sharding import PartitionSpec as P

    mesh = tx.mesh(data=2, model=4)
    x = (jnp.arange(2 * 4 * 8, dtype=jnp.float32).reshape(2, 4, 8) / 7.0).astype(dtype)

    def body(w, x):  # w: laid out along model, so the program is partly manual
        x = x[0] + jnp.zeros_like(w[:1, :1])  # (4, 8): this replica's row
        return (
            tx.psum(x, "data")[None],
            tx.pmean(x, "data")[None],
            tx.pmax(x, "data")[None],
            tx.all_gather(tx.psum_scatter(x, "data", tiled=True), "data", tiled=True)[None],
            tx.all_gather(x, "data")[None],
            tx.all_gather(tx.ppermute(x, "data", [(0, 1), (1, 0)]), "data")[None],
        )

    step = tx.data_parallel(
        tx.tensor_parallel(tx.Rules((".*", P(None, "model"))), batch_argnums=(1,))(body),
        mesh=mesh,
        batch_argnums=(1,),
        donate=False,
    )
    psum, pmean, pmax, scattered, gathered, permuted = step(jnp.zeros((8, 8), dtype), x)
    wide = np.asarray(x, np.float32)
    tol = {"rtol": 1e-2} if dtype != jnp.float32 else {"rtol": 1e-6}
    for out in (psum, pmean, pmax, scattered, gathered, permuted):
        assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(psum[0], np.float32), wide.sum(0), **tol)
    np.testing.assert_allclose(np.asarray(pmean[0], np.float32), wide.mean(0), **tol)
    np.testing.assert_array_equal(np.asarray(pmax[0], np.float32), wide.max(0))
    np.testing.assert_allclose(np.asarray(scattered[0], np.float32), wide.sum(0), **tol)
    np.testing.assert_array_equal(np.asarray(gathered[0], np.float32), wide)
    np.testing.assert_array_equal(np.asarray(permuted[0], np.float32), wide[::-1])
    if dtype == jnp.bfloat16:  # summed in float32 and rounded once
        exact = wide.sum(0).astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(psum[0]), exact)


def test_bf16_reductions_stay_bf16_where_xla_can_take_them():
    # Fully manual (data=8): no float32 detour, the all-reduce moves bfloat16 bytes.
    mesh = tx.mesh(data=8)
    step = tx.data_parallel(lambda x: tx.psum(x, "data"), mesh=mesh, donate=False)
    hlo = step.lower(jnp.ones((8, 16), jnp.bfloat16)).as_text(dialect="hlo")
    found = collectives(hlo, mesh)  # the lowered program, before XLA:CPU promotes it
    assert [(c.kind, c.shapes) for c in found] == [("all-reduce", ("bf16[1,16]",))]
