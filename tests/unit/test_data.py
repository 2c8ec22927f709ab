import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import titanax as tx


def test_epochs_cover_every_example_once_and_reshuffle():
    x = np.arange(12)
    loader = tx.data.Loader(x, batch_size=4, seed=3)
    epoch0 = np.concatenate([next(loader) for _ in range(3)])
    epoch1 = np.concatenate([next(loader) for _ in range(3)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert not np.array_equal(epoch0, epoch1)
    assert loader.state()["epoch"] == 1 and loader.state()["batch"] == 3


def test_last_partial_batch_is_dropped_and_order_kept_without_shuffle():
    loader = tx.data.Loader({"x": np.arange(10), "y": -np.arange(10)}, 4, shuffle=False)
    assert [b["x"].tolist() for b in (next(loader), next(loader), next(loader))] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [0, 1, 2, 3],
    ]
    b = next(loader)
    np.testing.assert_array_equal(b["y"], -b["x"])  # rows stay together across leaves


def test_resume_yields_exactly_the_same_batches():
    x = np.arange(50) * 10
    a = tx.data.Loader(x, 8, seed=1)
    for _ in range(9):
        next(a)
    b = tx.data.Loader(x, 8, seed=1, position=a.state())
    for _ in range(12):
        np.testing.assert_array_equal(next(a), next(b))


def test_placed_batches_for_a_plan():
    mesh = tx.mesh(data=8)
    loader = tx.data.Loader(
        (np.arange(64.0), np.arange(64)), 16, sharding=NamedSharding(mesh, P("data"))
    )
    x, y = next(loader)
    assert isinstance(x, jax.Array) and x.sharding.spec == P("data") and x.shape == (16,)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y).astype(float))


def test_each_process_reads_its_own_rows(monkeypatch):
    x = np.arange(40)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    rows = []
    for pid in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        loader = tx.data.Loader(x, 8, seed=5)
        rows.append([next(loader) for _ in range(2)])
    monkeypatch.undo()
    whole = tx.data.Loader(x, 8, seed=5)
    for k in range(2):
        assert len(rows[0][k]) == len(rows[1][k]) == 4
        assert sorted(np.concatenate([rows[0][k], rows[1][k]])) == sorted(next(whole))


def test_errors():
    with pytest.raises(tx.DataError, match="share their leading"):
        tx.data.Loader({"x": np.zeros(4), "y": np.zeros(5)}, 2)
    with pytest.raises(tx.DataError, match="batch_size=20 is more than the 10 examples"):
        tx.data.Loader(np.zeros(10), 20)
    saved = tx.data.Loader(np.zeros(10), 2, seed=1).state()
    with pytest.raises(tx.DataError) as e:
        tx.data.Loader(np.zeros(10), 5, seed=2, position=saved)
    assert "  * seed: saved 1, this loader has 2\n" in str(e.value)
    assert "  * batch_size: saved 2, this loader has 5\n" in str(e.value)
    assert "Build the loader as the saved run did (seed=1, shuffle=True, batch_size=2" in str(
        e.value
    )


# Issue #15, data position: each case below was silent or a raw error before.

X = np.arange(20)


def saved_position(**changes):
    """The position of a shuffled loader over X after 2 batches of 4, with ``changes``."""
    loader = tx.data.Loader(X, 4, seed=0)
    next(loader), next(loader)
    return {**loader.state(), **changes}


def test_resume_with_shuffle_changed_is_an_error():
    # before: the shuffled run's position resumed unshuffled, silently yielding rows 8..11
    with pytest.raises(tx.DataError, match=r"\* shuffle: saved True, this loader has False"):
        tx.data.Loader(X, 4, seed=0, shuffle=False, position=saved_position())
    with pytest.raises(tx.DataError, match=r"\* shuffle: saved False, this loader has True"):
        tx.data.Loader(X, 4, position=tx.data.Loader(X, 4, shuffle=False).state())


def test_seed_is_not_checked_without_shuffling():
    # the seed changes no row when nothing is shuffled (before: a DataError all the same)
    a = tx.data.Loader(X, 4, seed=1, shuffle=False)
    next(a)
    b = tx.data.Loader(X, 4, seed=2, shuffle=False, position=a.state())
    np.testing.assert_array_equal(next(b), next(a))


def test_resume_on_other_data_of_the_same_size_is_an_error():
    # before: the position resumed on reversed data, silently
    other = X[::-1].copy()
    with pytest.raises(tx.DataError) as e:
        tx.data.Loader(other, 4, position=saved_position())
    message = str(e.value)
    assert "* fingerprint: saved '" in message and "the data differ" in message
    new = tx.data.Loader(other, 4).fingerprint
    assert f"dict(position, fingerprint={new!r})" in message
    # the override the message offers works
    resumed = tx.data.Loader(other, 4, position=dict(saved_position(), fingerprint=new))
    assert resumed.state()["batch"] == 2
    # structure and dtype count too
    with pytest.raises(tx.DataError, match="fingerprint"):
        tx.data.Loader(X.astype(np.int32), 4, position=saved_position())
    with pytest.raises(tx.DataError, match="fingerprint"):
        tx.data.Loader({"x": X}, 4, position=saved_position())


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "batch",
            -1,
            r"batch: -1 \(int\) is out of range: an epoch of 20 examples in batches "
            r"of 4 has 5 batches, so batch .* is an integer from 0 to 5",
        ),  # before: an empty batch
        ("batch", 6, r"batch: 6 \(int\) is out of range"),  # before: the next epoch, silently
        ("batch", 2.0, r"batch: 2.0 \(float\) is out of range"),  # before: accepted
        ("epoch", -1, r"epoch: -1 \(int\) is not an integer >= 0"),  # before: numpy ValueError
        ("epoch", 1.7, r"epoch: 1.7 \(float\) is not an integer >= 0"),  # before: epoch 1
        ("epoch", "1", r"epoch: '1' \(str\) is not an integer >= 0"),  # before: accepted
        ("shuffle", "yes", r"shuffle: 'yes' \(str\) is not True or False"),
        ("seed", None, r"seed: None \(NoneType\) is not an integer >= 0"),
        ("fingerprint", 7, r"fingerprint: 7 \(int\) is not a str"),
    ],
)
def test_position_fields_out_of_range_or_of_the_wrong_type(field, value, message):
    with pytest.raises(tx.DataError, match=message) as e:
        tx.data.Loader(X, 4, seed=0, position=saved_position(**{field: value}))
    assert "not written by Loader.state() or was edited" in str(e.value)
    assert "position=None to start from the beginning" in str(e.value)


def test_every_field_at_fault_is_listed_once():
    bad = saved_position(batch=-1, shuffle=False, seed=3)
    with pytest.raises(tx.DataError) as e:
        tx.data.Loader(X, 4, seed=0, position=bad)
    bullets = [line for line in str(e.value).splitlines() if line.startswith("  * ")]
    assert bullets == [  # in the order of the position's fields
        "  * batch: -1 (int) is out of range: an epoch of 20 examples in batches of 4 has 5 "
        "batches, so batch (the batches of the epoch already yielded) is an integer from 0 to 5",
        "  * seed: saved 3, this loader has 0",
        "  * shuffle: saved False, this loader has True",
    ]


def test_the_last_batch_of_an_epoch_is_a_valid_position():
    end = saved_position(batch=5)
    loader = tx.data.Loader(X, 4, seed=0, position=end)
    next(loader)
    assert loader.state()["epoch"] == 1 and loader.state()["batch"] == 1


def test_positions_that_are_not_a_loaders_state():
    with pytest.raises(tx.DataError, match=r"missing 'epoch'\. Pass the position saved"):
        tx.data.Loader(X, 4, position={k: v for k, v in saved_position().items() if k != "epoch"})
    with pytest.raises(tx.DataError, match=r"unknown 'shard'\. Pass the position saved"):
        tx.data.Loader(X, 4, position=saved_position(shard=1))  # before: ignored
    with pytest.raises(tx.DataError, match="missing 'version', .*; unknown 'next_index'"):
        tx.data.Loader(X, 4, position={"next_index": 3})  # e.g. a Grain iterator's state
    with pytest.raises(tx.DataError, match=r"position must be the dict .* got \[0, 2\] \(list\)"):
        tx.data.Loader(X, 4, position=[0, 2])  # before: AttributeError
    with pytest.raises(tx.DataError, match="written by a newer Titanax .* reads version 2"):
        tx.data.Loader(X, 4, position=saved_position(version=3))
    with pytest.raises(tx.DataError, match="version 1 is not one this Titanax reads"):
        tx.data.Loader(X, 4, position=saved_position(version=1))


def test_a_position_of_the_older_version_says_how_to_resume_it():
    # what Titanax 0.1 saved: no version, no shuffle, no fingerprint (before: resumed unchecked)
    old = {"epoch": 0, "batch": 2, "seed": 0, "batch_size": 4, "size": 20}
    with pytest.raises(tx.DataError, match="older Titanax .* neither 'shuffle' nor") as e:
        tx.data.Loader(X, 4, seed=0, position=old)
    upgraded = eval(str(e.value).split("resume with position=")[1].split("; else")[0])
    assert upgraded == saved_position()
    assert tx.data.Loader(X, 4, seed=0, position=upgraded).state() == saved_position()


def test_position_from_another_dataset_size():
    with pytest.raises(tx.DataError) as e:
        tx.data.Loader(np.arange(24), 4, seed=0, position=saved_position())
    assert "  * size: saved 20, this loader has 24\n" in str(e.value)
    assert "fingerprint" not in str(e.value)  # implied by the size; not listed twice
    assert "on its data of 20 examples" in str(e.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=None), r"seed must be a non-negative integer; got None"),  # before: TypeError
        (dict(seed=1.5), r"seed must be a non-negative integer; got 1.5 \(float\)"),
        (dict(seed="0"), r"seed must be a non-negative integer; got '0' \(str\)"),
        (dict(seed=-1), r"seed must be a non-negative integer; got -1 \(int\)"),
        (dict(batch_size=-1), r"batch_size must be a positive integer .* got -1 \(int\)"),
        (dict(batch_size=0), r"batch_size must be a positive integer .* from 1 to 20"),
        (dict(batch_size=4.0), r"batch_size must be a positive integer .* 4.0 \(float\)"),
        (dict(batch_size=True), r"batch_size must be a positive integer .* True \(bool\)"),
        (dict(shuffle="no"), r"shuffle must be True or False; got 'no' \(str\)"),
        (dict(sharding="data"), r"sharding must be a jax.sharding.Sharding, .* got 'data'"),
        (dict(sharding={"x": None}), r"sharding must be .* the structure of data"),
    ],
)
def test_constructor_arguments(kwargs, message):
    with pytest.raises(tx.DataError, match=message):
        tx.data.Loader(X, **{"batch_size": 4, **kwargs})


def test_batch_size_must_divide_over_processes(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    with pytest.raises(tx.DataError, match="batch_size=6 is not a multiple of the 4 .* use 4 or 8"):
        tx.data.Loader(X, 6)


def test_numpy_settings_give_a_json_position():
    # before: state() held np.int64(4) and json.dumps failed
    loader = tx.data.Loader(X, np.int64(4), seed=np.uint32(7), shuffle=np.True_)
    next(loader)
    position = json.loads(json.dumps(loader.state()))
    np.testing.assert_array_equal(
        next(tx.data.Loader(X, 4, seed=7, position=position)), next(loader)
    )


def test_a_position_resumes_on_another_process_count(monkeypatch):
    # the global batches do not depend on the process count, so neither does the position
    one = tx.data.Loader(X, 4, seed=2)
    next(one)
    position = one.state()
    expected = next(one)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    rows = []
    for pid in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        rows.append(next(tx.data.Loader(X, 4, seed=2, position=position)))
    assert sorted(np.concatenate(rows)) == sorted(expected)


def test_memory_mapped_data(tmp_path):
    np.save(tmp_path / "x.npy", X * 3)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    a, b = tx.data.Loader(mapped, 4, seed=1), tx.data.Loader(X * 3, 4, seed=1)
    assert a.fingerprint == b.fingerprint
    for _ in range(7):
        np.testing.assert_array_equal(next(a), next(b))
