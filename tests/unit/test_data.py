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
    with pytest.raises(tx.DataError, match="batch_size=20 must be between 1 and the 10"):
        tx.data.Loader(np.zeros(10), 20)
    saved = tx.data.Loader(np.zeros(10), 2, seed=1).state()
    with pytest.raises(
        tx.DataError,
        match="saved with seed=1, batch_size=2 but this loader has seed=2, batch_size=5",
    ):
        tx.data.Loader(np.zeros(10), 5, seed=2, position=saved)
