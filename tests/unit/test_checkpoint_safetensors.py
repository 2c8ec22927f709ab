"""tx.checkpoint.safetensors: lazy transforms read exactly the elements an index needs."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

import titanax as tx
from titanax.checkpoint import safetensors as st
from titanax.errors import CheckpointError


def random_chain(rng, reader, arrays):
    """A random lazy expression over the file's tensors, the same expression in numpy on the
    data, and in numpy on global element ids (to know which stored elements it needs)."""
    names = list(arrays)
    offsets = dict(zip(names, np.cumsum([0] + [arrays[n].size for n in names[:-1]])))
    shape = arrays[names[0]].shape
    same = [n for n in names if arrays[n].shape == shape]
    if len(same) > 1 and rng.random() < 0.5:
        picked = list(rng.choice(same, size=rng.integers(1, len(same) + 1), replace=False))
        axis = int(rng.integers(0, len(shape) + 1))
        lazy = st.stack([reader.tensor(n) for n in picked], axis)
        data = np.stack([arrays[n] for n in picked], axis)
        ids = np.stack(
            [offsets[n] + np.arange(arrays[n].size).reshape(shape) for n in picked], axis
        )
    else:
        lazy, data = reader.tensor(names[0]), arrays[names[0]]
        ids = np.arange(data.size).reshape(shape)
    for _ in range(rng.integers(0, 4)):
        if rng.random() < 0.5:
            axes = tuple(rng.permutation(data.ndim).tolist())
            lazy, data, ids = lazy.transpose(*axes), data.transpose(axes), ids.transpose(axes)
        else:
            axis = int(rng.integers(0, data.ndim))
            idx = rng.integers(0, data.shape[axis], size=rng.integers(1, 2 * data.shape[axis] + 1))
            if rng.random() < 0.5:  # a permutation, as RoPE's
                idx = rng.permutation(data.shape[axis])
            lazy, data, ids = lazy.take(idx, axis), data.take(idx, axis), ids.take(idx, axis)
    return lazy, data, ids


def random_index(rng, shape):
    out = []
    for n in shape:
        a = int(rng.integers(0, n))
        b = int(rng.integers(a + 1, n + 1))
        out.append(slice(a, b, int(rng.integers(1, 3))) if rng.random() < 0.3 else slice(a, b))
    return tuple(out)


@pytest.mark.parametrize("seed", range(40))
def test_lazy_transforms_equal_numpy_and_read_only_needed_elements(tmp_path, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(1, 7, size=rng.integers(1, 4)))
    arrays = {f"t{i}": rng.standard_normal(shape).astype(np.float32) for i in range(3)}
    arrays["other"] = rng.standard_normal((5,)).astype(np.float32)
    save_file(arrays, tmp_path / "m.safetensors")
    reader = st.Reader(tmp_path / "m.safetensors")
    lazy, data, ids = random_chain(rng, reader, arrays)
    assert lazy.shape == data.shape and lazy.dtype == data.dtype
    index = random_index(rng, data.shape)
    got = lazy[index]
    np.testing.assert_array_equal(got, data[index])
    assert reader.elements_read == len(np.unique(ids[index]))  # each needed element once


def test_getitem_accepts_ints_and_ellipsis(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    save_file({"a": a}, tmp_path / "m.safetensors")
    t = st.Reader(tmp_path).tensor("a")
    np.testing.assert_array_equal(t[1], a[1])
    np.testing.assert_array_equal(t[..., -1], a[..., -1])
    np.testing.assert_array_equal(t[:, 1, 2:], a[:, 1, 2:])
    np.testing.assert_array_equal(t.T[...], a.T)


def test_to_array_bf16_sharded_reads_each_shard_once(tmp_path):
    a = np.random.default_rng(0).standard_normal((16, 8)).astype(ml_dtypes.bfloat16)
    save_file({"w": a}, tmp_path / "m.safetensors")
    reader = st.Reader(tmp_path)
    mesh = tx.mesh(data=2, model=4)
    x = st.to_array(reader.tensor("w").T, NamedSharding(mesh, P("model", None)))
    assert x.dtype == ml_dtypes.bfloat16 and x.addressable_shards[0].data.shape == (2, 16)
    np.testing.assert_array_equal(np.asarray(x), a.T)
    assert reader.elements_read == a.size  # the data-axis replicas are not read again
    y = st.to_array(reader.tensor("w"), NamedSharding(mesh, P()), dtype=np.float32)
    assert y.dtype == np.float32 and np.array_equal(np.asarray(y), a.astype(np.float32))
    with pytest.raises(CheckpointError, match=r"w.take\(axis=0\): shape \(3, 8\) does not fit"):
        st.to_array(reader.tensor("w").take([0, 1, 2]), NamedSharding(mesh, P("model", None)))


def write_index(directory, weight_map):
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_reader_errors_name_the_tensors_and_files(tmp_path):
    a = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match="no .safetensors file"):
        st.Reader(tmp_path)
    save_file({"a": a, "b": a}, tmp_path / "one.safetensors")
    save_file({"b": a}, tmp_path / "two.safetensors")
    with pytest.raises(
        CheckpointError,
        match="1 tensors are in two files:\n  \\* b: in .*one.safetensors and .*two.safetensors",
    ):
        st.Reader(tmp_path)
    write_index(
        tmp_path, {"a": "one.safetensors", "b": "two.safetensors", "c": "three.safetensors"}
    )
    with pytest.raises(
        CheckpointError, match="names 1 files that are not there:\n  \\* three.safetensors"
    ):
        st.Reader(tmp_path)
    write_index(tmp_path, {"a": "one.safetensors", "b": "two.safetensors"})
    with pytest.raises(
        CheckpointError,
        match="index does not match the files:\n  \\* b: in one.safetensors, the index says two",
    ):
        st.Reader(tmp_path)  # one.safetensors also holds b
    write_index(tmp_path, {"a": "two.safetensors", "b": "two.safetensors"})
    with pytest.raises(CheckpointError, match="a: the index says two.safetensors, which does not"):
        st.Reader(tmp_path)
    os.remove(tmp_path / "two.safetensors")
    write_index(tmp_path, {"a": "one.safetensors", "b": "one.safetensors"})
    reader = st.Reader(tmp_path)
    assert reader.names == ("a", "b")
    with pytest.raises(CheckpointError, match="no tensor named 'c'"):
        reader.tensor("c")
    save_file({"c": np.zeros(4, np.float32)}, tmp_path / "c.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"stack: 1 tensors differ from a \(float32\[3\]\):\n  \* c: float32\[4\]",
    ):
        st.stack([reader.tensor("a"), st.Reader(tmp_path / "c.safetensors").tensor("c")])
