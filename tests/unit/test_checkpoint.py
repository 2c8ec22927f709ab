import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import titanax as tx

RULES = tx.Rules((r"kernel$", P(None, "model")), (r".*", P()))
OPT = optax.adam(1e-3)


def make_state(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(16,)), jnp.float32),
        },
        "scale": jnp.asarray(rng.normal(), jnp.float32),
    }
    state = tx.TrainState.create(params, OPT)
    # non-trivial optimizer state: two updates
    for _ in range(2):
        state = state.apply_gradients(jax.tree.map(jnp.ones_like, state.params))
    return state


def place(state, mesh):
    if mesh is None:  # one device
        return jax.device_put(state, jax.devices()[0])
    specs = (
        RULES.specs(state, mesh) if "model" in mesh.shape else jax.tree.map(lambda _: P(), state)
    )
    return jax.device_put(
        state,
        jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P)),
    )


def meshes():
    return {
        "data=4 x model=2": tx.mesh(data=4, model=2),
        "data=2 x model=4": tx.mesh(data=2, model=4),
        "data=8": tx.mesh(data=8),
        "1 device": None,
    }


@pytest.mark.parametrize(
    "source, target",
    [
        ("data=4 x model=2", "data=2 x model=4"),
        ("data=4 x model=2", "data=8"),
        ("data=4 x model=2", "1 device"),
        ("1 device", "data=2 x model=4"),
    ],
)
def test_round_trip_onto_another_mesh_is_bit_exact(tmp_path, source, target):
    m = meshes()
    saved = place(make_state(), m[source])
    with tx.checkpoint.Manager(tmp_path) as mngr:
        mngr.save(7, saved, extra={"note": source})
        mngr.wait()
        like = place(make_state(seed=1), m[target])  # other values, the target layout
        restored = mngr.restore(like=like)
        assert mngr.extra(7) == {"note": source}
        meta = mngr.metadata()
    for got, want, lay in zip(
        jax.tree.leaves(restored), jax.tree.leaves(saved), jax.tree.leaves(like)
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bit-exact
        assert got.sharding == lay.sharding
    assert meta["mesh"] == (
        None
        if m[source] is None
        else {
            "axis_names": list(m[source].axis_names),
            "axis_sizes": [m[source].shape[a] for a in m[source].axis_names],
            "axis_types": ["Auto"] * len(m[source].axis_names),
        }
    )


def test_restore_onto_abstract_arrays(tmp_path):
    mesh = tx.mesh(data=2, model=4)
    with tx.checkpoint.Manager(tmp_path, async_save=False) as mngr:
        mngr.save(1, place(make_state(), tx.mesh(data=8)))
        target = tx.checkpoint.abstract(place(make_state(), mesh))
        restored = mngr.restore(1, like=target)
    assert restored.params["dense"]["kernel"].sharding.spec == P(None, "model")
    np.testing.assert_array_equal(
        restored.opt_state[0].mu["dense"]["bias"], make_state().opt_state[0].mu["dense"]["bias"]
    )


def test_steps_and_max_to_keep(tmp_path):
    with tx.checkpoint.Manager(tmp_path, max_to_keep=2) as mngr:
        assert mngr.latest_step() is None and mngr.all_steps() == []
        for step in (1, 2, 3):
            mngr.save(step, place(make_state(), None))
        mngr.wait()
        assert mngr.all_steps() == [2, 3] and mngr.latest_step() == 3
        with pytest.raises(tx.CheckpointError, match="step 3 already exists"):
            mngr.save(3, place(make_state(), None))


def test_mismatched_tree_lists_every_leaf(tmp_path):
    with tx.checkpoint.Manager(tmp_path, async_save=False) as mngr:
        mngr.save(1, place(make_state(), None))
        other = tx.TrainState.create(
            {
                "dense": {"kernel": jnp.zeros((8, 32)), "bias": jnp.zeros(16)},
                "extra_layer": jnp.zeros(3),
            },
            OPT,
        )
        with pytest.raises(tx.CheckpointError) as e:
            mngr.restore(like=place(other, None))
    msg = str(e.value)
    assert "step 1 in" in msg and "does not match `like`" in msg
    assert "3 leaves of `like` not in the checkpoint:\n  * opt_state/0/mu/extra_layer" in msg
    assert "3 leaves in the checkpoint not in `like`:\n  * opt_state/0/mu/scale" in msg
    assert "3 leaves with another shape or dtype:" in msg
    for path in ("params/extra_layer", "opt_state/0/nu/scale", "params/scale"):
        assert f"  * {path}\n" in msg
    assert "  * params/dense/kernel: saved float32(8, 16), like has float32(8, 32)" in msg


def test_not_a_titanax_checkpoint(tmp_path):
    with pytest.raises(tx.CheckpointError, match="no checkpoint in .* \\(it holds nothing\\)"):
        tx.checkpoint.Manager(tmp_path / "empty").restore(like=make_state())
    plain = tmp_path / "plain"
    with ocp.CheckpointManager(plain) as mngr:  # written by Orbax alone
        mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.ones(3)})))
    with pytest.raises(tx.CheckpointError, match="is not a Titanax checkpoint"):
        tx.checkpoint.Manager(plain).restore(like={"w": jnp.ones(3)})
    with pytest.raises(tx.CheckpointError, match="no checkpoint for step 9 .* steps there are"):
        tx.checkpoint.Manager(plain).restore(9, like={"w": jnp.ones(3)})
    (tmp_path / "file").write_text("x")
    with pytest.raises(tx.CheckpointError, match="is a file, not a directory"):
        tx.checkpoint.Manager(tmp_path / "file")


def test_extra_must_be_json(tmp_path):
    with (
        tx.checkpoint.Manager(tmp_path) as mngr,
        pytest.raises(tx.CheckpointError, match="extra must be JSON-able"),
    ):
        mngr.save(1, make_state(), extra={"rng": np.random.default_rng(0)})


def test_unplaced_like_leaves(tmp_path):
    with tx.checkpoint.Manager(tmp_path, async_save=False) as mngr:
        mngr.save(1, {"w": jnp.ones(3)})
        with pytest.raises(tx.CheckpointError, match="carry no sharding"):
            mngr.restore(like={"w": jax.ShapeDtypeStruct((3,), jnp.float32)})


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import conftest  # 8 simulated devices, like the tests
    import jax, jax.numpy as jnp, titanax as tx
    mngr = tx.checkpoint.Manager({directory!r})
    mngr.save(1, {{"w": jnp.arange(8.0)}})
    mngr.wait()
    big = {{"w": jnp.arange(8.0), "big": jnp.ones((6, 2**25), jnp.float32)}}  # 768 MiB
    jax.block_until_ready(big)
    mngr.save(2, big)                      # async: returns while the write goes on
    print("SAVING", flush=True)
    time.sleep(120)
""")


def test_process_killed_during_async_save_leaves_previous_checkpoint(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = KILLED_SAVE.format(root=root, directory=str(tmp_path))
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert child.stdout.readline().strip() == "SAVING"
        child.send_signal(signal.SIGKILL)  # in the middle of writing step 2
    finally:
        child.wait(timeout=60)
    leftovers = [n for n in os.listdir(tmp_path) if n not in ("1",)]
    mngr = tx.checkpoint.Manager(tmp_path)
    assert mngr.all_steps() == [1], (mngr.all_steps(), os.listdir(tmp_path))
    assert leftovers, "the save should have been interrupted, leaving its temporary directory"
    w = mngr.restore(like={"w": jax.device_put(jnp.zeros(8), jax.devices()[0])})["w"]
    np.testing.assert_array_equal(w, np.arange(8.0))
