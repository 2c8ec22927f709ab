import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

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


# --- Operations that never lose work (issue 15) ---------------------------------------------


def one_device(tree):
    return jax.device_put(tree, jax.devices()[0])


def test_saving_at_or_below_the_newest_step_is_an_error_not_a_silent_skip(tmp_path):
    w = lambda v: one_device({"w": jnp.full(4, v)})  # noqa: E731
    with tx.checkpoint.Manager(tmp_path, async_save=False) as mngr:
        mngr.save(100, w(1.0))
        mngr.save(200, w(2.0))
        with pytest.raises(
            tx.CheckpointError,
            match=r"cannot save step 150 in .*: steps only go forward, and the newest there is "
            r"200 \(steps there: 100, 200\)\. .* delete the newer steps first: mngr\.delete\(200\)",
        ):
            mngr.save(150, w(1.5))
        with pytest.raises(tx.CheckpointError, match=r"step 200 already exists .*delete\(200\)"):
            mngr.save(200, w(2.5))
        for bad in (1.5, True, -1, "7"):
            with pytest.raises(tx.CheckpointError, match=r"a step is an int >= 0"):
                mngr.save(bad, w(0.0))
        assert mngr.all_steps() == [100, 200]
        mngr.delete(200)  # the documented way back
        mngr.save(150, w(1.5))
        assert mngr.all_steps() == [100, 150]
        np.testing.assert_array_equal(mngr.restore(like=w(0.0))["w"], np.full(4, 1.5))
        with pytest.raises(tx.CheckpointError, match="no checkpoint for step 200"):
            mngr.delete(200)


def test_no_orbax_decision_drops_a_save(tmp_path, monkeypatch):
    # A save-decision policy that says no (an interval, a preemption policy): Titanax saves.
    monkeypatch.setattr(ocp.CheckpointManager, "should_save", lambda self, step: False)
    with tx.checkpoint.Manager(tmp_path, async_save=False) as mngr:
        mngr.save(1, one_device({"w": jnp.ones(2)}))
        assert mngr.all_steps() == [1]
        # and any other "nothing written" from Orbax is an error, never silence
        monkeypatch.setattr(ocp.CheckpointManager, "save", lambda self, step, **kw: False)
        with pytest.raises(tx.CheckpointError, match="declined to save step 2 .*nothing was"):
            mngr.save(2, one_device({"w": jnp.ones(2)}))


# Orbax leaves the reads of a step's other arrays unawaited when one fails (orbax 0.12.8).
ORBAX_READ_NOISE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def corrupt_state(tmp_path, mesh):
    """Steps 100 and 200 of a state written on ``mesh``. Random bits do not compress, so zstd
    stores them as they are and one flipped byte is one wrong value (a flipped bit in
    compressed data may be an error of the decompressor instead, or several wrong values)."""
    rng = np.random.default_rng(0)
    state = {
        "params": {"big": rng.integers(-(2**31), 2**31, size=(64, 256), dtype=np.int32)},
        "count": np.int32(3) * np.ones((), np.int32),
    }
    placed = jax.device_put(state, NamedSharding(mesh, P()))
    mngr = tx.checkpoint.Manager(tmp_path, async_save=False)
    mngr.save(100, placed)
    mngr.save(200, placed)
    return mngr, state, placed


def largest_file(directory):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


@ORBAX_READ_NOISE
def test_a_flipped_byte_is_a_checksum_error_naming_the_leaf_and_step(tmp_path):
    mngr, state, _ = corrupt_state(tmp_path, tx.mesh(data=4, model=2))
    data = largest_file(tmp_path / "200" / "state")
    raw = bytearray(open(data, "rb").read())
    raw[len(raw) // 2] ^= 0x10
    open(data, "wb").write(raw)
    like = jax.device_put(jax.tree.map(np.zeros_like, state), NamedSharding(tx.mesh(data=8), P()))
    with pytest.raises(tx.CheckpointError) as e:
        mngr.restore(like=like)  # another mesh than the save's: the checksum does not care
    assert str(e.value).startswith(
        f"tx.checkpoint: step 200 in {tmp_path} is corrupt: 1 leaf does not match the checksum "
        "recorded when it was saved:\n  * params/big\n"
    )
    assert "mngr.restore(100, like=...) (steps there: 100, 200)" in str(e.value)
    # what the check catches: without it, one value is silently wrong
    got = mngr.restore(like=like, verify=False)["params"]["big"]
    assert np.sum(np.asarray(got) != state["params"]["big"]) == 1
    np.testing.assert_array_equal(
        mngr.restore(100, like=like)["params"]["big"], state["params"]["big"]
    )


def test_edited_extra_is_a_checksum_error(tmp_path):
    with tx.checkpoint.Manager(tmp_path, async_save=False) as mngr:
        mngr.save(1, one_device({"w": jnp.ones(2)}), extra={"data": {"epoch": 2, "batch": 7}})
        mngr.save(2, one_device({"w": jnp.ones(2)}), extra={"data": {"epoch": 2, "batch": 9}})
        path = tmp_path / "2" / "extra" / "metadata"  # Orbax's JSON
        path.write_text(path.read_text().replace('"batch": 9', '"batch": 3'))
        with pytest.raises(
            tx.CheckpointError, match=r"step 2 .* is corrupt: its extra .*restore\(1"
        ):
            mngr.extra()
        assert mngr.extra(1) == {"data": {"epoch": 2, "batch": 7}}


DAMAGE = {
    "data file deleted": ("state", "largest", os.remove),
    "data file truncated": ("state", "largest", lambda f: open(f, "r+b").truncate(100)),
    "manifest deleted": ("state", "manifest.ocdbt", os.remove),
    "array metadata truncated": ("state", "process_0", lambda f: open(f, "r+b").truncate(20)),
    "titanax metadata truncated": ("titanax", "metadata", lambda f: open(f, "r+b").truncate(20)),
}


@ORBAX_READ_NOISE
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_missing_or_damaged_files_name_the_step_and_the_one_before(tmp_path, damage):
    mngr, state, placed = corrupt_state(tmp_path, tx.mesh(data=8))
    part, name, hurt = DAMAGE[damage]
    root = tmp_path / "200" / part
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    hurt(largest_file(root) if name == "largest" else next(f for f in files if f.endswith(name)))
    with pytest.raises(tx.CheckpointError) as e:
        mngr.restore(like=placed)
    msg = str(e.value)
    assert msg.startswith(f"tx.checkpoint: step 200 in {tmp_path} "), msg
    assert "Restore the previous step instead: mngr.restore(100, like=...)" in msg, msg
    np.testing.assert_array_equal(
        mngr.restore(100, like=placed)["params"]["big"], state["params"]["big"]
    )


def test_extra_files_deleted_is_a_checkpoint_error(tmp_path):
    with tx.checkpoint.Manager(tmp_path, async_save=False) as mngr:
        for step in (1, 2):
            mngr.save(step, one_device({"w": jnp.ones(2)}), extra={"step": step})
        for f in (tmp_path / "2" / "extra").iterdir():
            f.unlink()
        with pytest.raises(
            tx.CheckpointError, match=r"step 2 .*cannot be read: its extra .*restore\(1"
        ):
            mngr.extra()


def test_a_step_still_being_written_is_not_listed(tmp_path, monkeypatch):
    release = threading.Event()
    finalize = ocp.CheckpointManager._finalize  # the background thread's last act (orbax 0.12.8)

    def slow_finalize(self, *args, **kwargs):
        release.wait(timeout=60)
        return finalize(self, *args, **kwargs)

    w = lambda v: one_device({"w": jnp.full(4, v)})  # noqa: E731
    with tx.checkpoint.Manager(tmp_path) as mngr:
        mngr.save(1, w(1.0))
        mngr.wait()
        monkeypatch.setattr(ocp.CheckpointManager, "_finalize", slow_finalize)
        mngr.save(2, w(2.0))
        try:
            assert mngr.is_saving()
            assert mngr.latest_step() == 1 and mngr.all_steps() == [1]
            np.testing.assert_array_equal(mngr.restore(like=w(0.0))["w"], np.full(4, 1.0))
            for read in (lambda: mngr.restore(2, like=w(0.0)), lambda: mngr.extra(2)):
                with pytest.raises(
                    tx.CheckpointError, match=r"step 2 .*still being written .*wait\(\)"
                ):
                    read()
            with pytest.raises(tx.CheckpointError, match="step 2 already exists"):
                mngr.save(2, w(2.0))
        finally:
            release.set()
        mngr.wait()
        assert mngr.all_steps() == [1, 2]
        np.testing.assert_array_equal(mngr.restore(like=w(0.0))["w"], np.full(4, 2.0))


def test_python_scalars_and_strings_round_trip_with_their_types(tmp_path):
    values = {
        "epoch": 3,
        "big": 2**70,
        "name": "run-ä/1",
        "lr": 0.1,
        "inf": float("-inf"),
        "flag": True,
        "np32": np.float32(2.5),
        "bf16": jnp.dtype(jnp.bfloat16).type(1.5),  # a numpy (ml_dtypes) scalar
    }
    state = {"w": one_device(jnp.arange(4.0)), **values}
    like = {
        "w": one_device(jnp.zeros(4)),
        **{k: type(v)(0) if not isinstance(v, str) else "" for k, v in values.items()},
    }
    with tx.checkpoint.Manager(tmp_path, async_save=False) as mngr:
        mngr.save(1, state)
        got = mngr.restore(like=like)
        assert mngr.metadata()["leaves"]["epoch"]["kind"] == "int"
        for k, v in values.items():
            assert type(got[k]) is type(v) and got[k] == v, (k, got[k], v)
        np.testing.assert_array_equal(got["w"], np.arange(4.0))
        # restoring into a state of the wrong type says so
        with pytest.raises(tx.CheckpointError, match=r"\* epoch: saved int, like has float\n"):
            mngr.restore(like={**like, "epoch": 0.0})
        # a value edited on disk is caught like an array's
        path = tmp_path / "1" / "titanax" / "metadata"
        path.write_text(path.read_text().replace('"value": 3,', '"value": 4,'))
        with pytest.raises(tx.CheckpointError, match=r"corrupt: 1 leaf does not .*\n  \* epoch\n"):
            mngr.restore(like=like)
        # what cannot be saved is named, all at once
        with pytest.raises(
            tx.CheckpointError,
            match=r"save\(step=2\): 3 leaves of the state cannot be saved:\n"
            r"  \* blob: builtins.bytes\n  \* fn: builtins.function\n  \* s: numpy array of <U1",
        ):
            mngr.save(2, {"w": state["w"], "blob": b"x", "fn": lambda: 0, "s": np.array(["a"])})


def reference_checksum(value):
    """The checksum's definition, in numpy: sum over the value's 32-bit words w at row-major
    position p of fmix32(w + p * 0x9E3779B9), modulo 2**32."""
    value = np.ascontiguousarray(value)
    if value.dtype.itemsize == 8:
        w = value.view(np.uint32).astype(np.uint64).ravel()  # two words an element, low first
    elif value.dtype == np.bool_:
        w = value.astype(np.uint64).ravel()
    else:
        w = value.view(f"uint{8 * value.dtype.itemsize}").astype(np.uint64).ravel()
    m = 2**32 - 1
    h = (w + np.arange(w.size, dtype=np.uint64) * 0x9E3779B9) & m
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    h ^= h >> 16
    return int(h.sum() & m)


def test_checksum_is_of_the_global_value_whatever_the_layout():
    from titanax.checkpoint.checksum import checksums

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 12)).astype(np.float32)
    want = reference_checksum(x)
    mesh = tx.mesh(data=4, model=2)
    layouts = [P(), P("data"), P(None, "model"), P("data", "model"), P(("data", "model"))]
    placed = [jax.device_put(x, NamedSharding(mesh, s)) for s in layouts]
    placed.append(jax.device_put(x[:, :10], NamedSharding(mesh, P(None, "model")))[:, :10])
    uneven = jax.device_put(rng.normal(size=(6, 3)).astype(np.float32), jax.devices()[1])
    got = checksums([x, jax.device_put(x, jax.devices()[5]), *placed, uneven])
    assert got[:-2] == [want] * (len(got) - 2)
    assert got[-1] == reference_checksum(np.asarray(uneven))
    # dtypes: as their words; 64-bit numpy (jax_enable_x64 off) as two words, low first
    for v in (
        np.arange(24, dtype=np.int64).reshape(4, 6) << 33,
        np.linspace(0, 1, 10),
        np.array([True, False, True]),
        np.arange(12, dtype=np.uint16),
        np.asarray(jnp.arange(6, dtype=jnp.bfloat16)),
    ):
        assert checksums([v]) == [reference_checksum(v)], v.dtype
    # any one word changed changes it (fmix32 is a bijection)
    for i in range(0, x.size, 7):
        y = x.copy()
        y.reshape(-1).view(np.uint32)[i] ^= np.uint32(1 << (i % 32))
        assert checksums([jax.device_put(y, NamedSharding(mesh, P("data")))]) != [want]


def test_checkpoints_from_before_checksums_still_restore(tmp_path):
    with tx.checkpoint.Manager(tmp_path, async_save=False) as mngr:
        mngr.save(1, one_device({"w": jnp.arange(3.0)}), extra={"epoch": 1})
    path = tmp_path / "1" / "titanax" / "metadata"
    meta = json.loads(path.read_text())  # made what Titanax 1 wrote: no kinds, no checksums
    for key in ("checksum", "extra_checksum"):
        del meta[key]
    meta["version"] = 1
    meta["leaves"] = {
        p: {k: v for k, v in leaf.items() if k in ("shape", "dtype", "spec")}
        for p, leaf in meta["leaves"].items()
    }
    path.write_text(json.dumps(meta))
    with tx.checkpoint.Manager(tmp_path) as mngr:
        got = mngr.restore(like=one_device({"w": jnp.zeros(3)}))
        np.testing.assert_array_equal(got["w"], np.arange(3.0))
        assert mngr.extra() == {"epoch": 1}
