"""Safetensors checkpoints read lazily, straight into sharded arrays.

A model imported from another framework rarely stores a tensor the way the model code
wants it: PyTorch keeps a linear layer's weight ``(d_out, d_in)``, per-layer tensors are
separate where the model stacks them for ``lax.scan``, and some rows come permuted. Doing
those transforms on whole tensors in host memory, then sharding, needs the whole model in
one place. Here they are lazy instead: `Reader` opens the files (one ``.safetensors``
file, or several with their ``*.safetensors.index.json``) and reads headers only;
`Reader.tensor` gives a `LazyTensor` whose `~LazyTensor.transpose`, `~LazyTensor.take`
(rows in another order), `stack` and `~LazyTensor.astype` are recorded, not computed. Only
indexing reads, and it reads exactly the elements the index needs (contiguous runs of each
source tensor, through safetensors' ``get_slice``). `to_array` builds a ``jax.Array`` with
``jax.make_array_from_callback``: each device's shard is translated back through the
recorded transforms and read on its own, so no device and no host ever holds the whole
tensor, and shards replicated on several devices of a process are read once.

Needs the ``safetensors`` package (``pip install titanax[hf]``).
"""

from __future__ import annotations

import abc
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np

from titanax._util import bullets
from titanax.errors import CheckpointError

__all__ = ["LazyTensor", "Reader", "stack", "to_array"]

# safetensors' dtype names -> numpy (bfloat16 and float8 through ml_dtypes, as JAX has them).
DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "U32": np.uint32,
    "I32": np.int32,
    "U64": np.uint64,
    "I64": np.int64,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F32": np.float32,
    "F64": np.float64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}

Index = tuple[np.ndarray, ...]  # one sorted-or-not array of source positions per axis


class Reader:
    """The tensors of a safetensors checkpoint, read lazily: opening reads headers only.

    Args:
      path: a ``.safetensors`` file, or a directory holding either one
        ``*.safetensors.index.json`` (Hugging Face's sharded layout: its ``weight_map``
        names each tensor's file) or ``.safetensors`` files (every one is read).

    Attributes:
      elements_read: how many tensor elements were read from the files so far.

    Raises:
      CheckpointError: no safetensors file at ``path``, a file the index names is
        missing, two files hold the same tensor, or the index disagrees with the files.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> from safetensors.numpy import save_file
      >>> from titanax.checkpoint.safetensors import Reader
      >>> d = tempfile.mkdtemp()
      >>> w = np.arange(6, dtype=np.float32).reshape(2, 3)
      >>> save_file({"w": w}, os.path.join(d, "m.safetensors"))
      >>> r = Reader(d)
      >>> r.names, r.shape("w"), r.dtype("w")
      (('w',), (2, 3), dtype('float32'))
      >>> r.tensor("w")[:, 1:]
      array([[1., 2.],
             [4., 5.]], dtype=float32)
      >>> r.elements_read
      4
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.elements_read = 0
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, str] = {}
        files, weight_map = _files(self.path)
        held = {file: set(self._handle(file).keys()) for file in files}
        if weight_map is not None:  # the index decides; every file must agree with it
            wrong = [
                f"{name}: the index says {os.path.basename(f)}, which does not hold it"
                for name, f in sorted(weight_map.items())
                if name not in held[f]
            ]
            wrong += [
                f"{name}: in {os.path.basename(f)}, "
                + (
                    f"the index says {os.path.basename(weight_map[name])}"
                    if name in weight_map
                    else "not in the index"
                )
                for f in files
                for name in sorted(held[f])
                if weight_map.get(name) != f
            ]
            if wrong:
                raise CheckpointError(
                    f"Reader({self.path!r}): the index does not match the files:\n"
                    f"{bullets(wrong)}\n"
                    "The checkpoint is incomplete or mixes two versions: copy it again."
                )
            self._file_of = dict(weight_map)
            return
        duplicates = []
        for file in files:
            for name in sorted(held[file]):
                if name in self._file_of:
                    duplicates.append(f"{name}: in {self._file_of[name]} and {file}")
                self._file_of[name] = file
        if duplicates:
            raise CheckpointError(
                f"Reader({self.path!r}): {len(duplicates)} tensors are in two files:\n"
                f"{bullets(duplicates)}\nKeep one copy of each (or write an index.json)."
            )

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(file, framework="numpy")
        return self._handles[file]

    @property
    def names(self) -> tuple[str, ...]:
        """Every tensor's name, sorted."""
        return tuple(sorted(self._file_of))

    def file(self, name: str) -> str:
        """The file that holds tensor ``name``."""
        self._check(name)
        return self._file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Tensor ``name``'s shape, from the header."""
        self._check(name)
        return tuple(self._handle(self._file_of[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> np.dtype:
        """Tensor ``name``'s dtype as numpy has it (``bfloat16`` from ``ml_dtypes``)."""
        self._check(name)
        code = self._handle(self._file_of[name]).get_slice(name).get_dtype()
        if code not in DTYPES:
            raise CheckpointError(f"{name} in {self._file_of[name]}: dtype {code} is not supported")
        return np.dtype(DTYPES[code])

    def tensor(self, name: str) -> LazyTensor:
        """Tensor ``name``, not read yet."""
        return _Source(self, name)

    def _check(self, name: str) -> None:
        if name not in self._file_of:
            raise CheckpointError(
                f"{self.path}: no tensor named {name!r} (it has {len(self._file_of)} tensors,"
                f" e.g. {', '.join(self.names[:3])})"
            )

    def _read(self, name: str, box: tuple[slice, ...]) -> np.ndarray:
        handle = self._handle(self._file_of[name])
        data = np.asarray(handle.get_slice(name)[box] if box else handle.get_tensor(name))
        self.elements_read += data.size
        return data

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the files (a later read opens them again)."""
        self._handles.clear()


def _files(path: str) -> tuple[list[str], dict[str, str] | None]:
    if os.path.isfile(path):
        return [path], None
    if not os.path.isdir(path):
        raise CheckpointError(f"Reader({path!r}): no such file or directory")
    entries = sorted(os.listdir(path))
    indexes = [e for e in entries if e.endswith(".safetensors.index.json")]
    if len(indexes) > 1:
        raise CheckpointError(
            f"Reader({path!r}): {len(indexes)} index files ({', '.join(indexes)}): keep one"
        )
    if indexes:
        with open(os.path.join(path, indexes[0])) as f:
            weight_map = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        files = sorted(set(weight_map.values()))
        missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
        if missing:
            raise CheckpointError(
                f"Reader({path!r}): {indexes[0]} names {len(missing)} files that are not there:\n"
                f"{bullets(missing)}\nCopy the whole checkpoint directory."
            )
        return files, weight_map
    files = [os.path.join(path, e) for e in entries if e.endswith(".safetensors")]
    if not files:
        raise CheckpointError(f"Reader({path!r}): no .safetensors file in this directory")
    return files, None


class LazyTensor(abc.ABC):
    """A tensor of a checkpoint, or a transform of some, that is read only when indexed.

    ``tensor[index]`` (slices, integers, ``...``) returns a numpy array and reads from the
    files only the elements it needs. `to_array` reads one shard per device.
    """

    shape: tuple[int, ...]
    dtype: np.dtype

    @abc.abstractmethod
    def _read(self, index: Index) -> np.ndarray:  # positions along each axis -> outer product
        """The elements at the outer product of ``index``'s positions, read from the files."""

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = (
                index[:at] + (slice(None),) * (len(self.shape) - len(index) + 1) + index[at + 1 :]
            )
        index = index + (slice(None),) * (len(self.shape) - len(index))
        if len(index) != len(self.shape):
            raise IndexError(f"{len(index)} indices for a tensor of shape {self.shape}")
        positions, drop = [], []
        for axis, (i, n) in enumerate(zip(index, self.shape)):
            if isinstance(i, slice):
                positions.append(np.arange(*i.indices(n)))
            else:
                positions.append(np.arange(n)[[i]])  # negative indices and bounds as numpy's
                drop.append(axis)
        return self._read(tuple(positions)).squeeze(axis=tuple(drop))

    def transpose(self, *axes: int) -> LazyTensor:
        """The axes in the order ``axes`` (as ``np.transpose``; none: reversed)."""
        order = tuple(axes) or tuple(reversed(range(len(self.shape))))
        if sorted(order) != list(range(len(self.shape))):
            raise IndexError(f"transpose{order} of a tensor of shape {self.shape}")
        return _Transpose(self, order)

    @property
    def T(self) -> LazyTensor:  # noqa: N802 (numpy's name)
        """The axes reversed."""
        return self.transpose()

    def take(self, indices: Sequence[int] | np.ndarray, axis: int = 0) -> LazyTensor:
        """``np.take(self, indices, axis)``: rows selected or reordered along ``axis``."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (
            indices.size and not (0 <= indices.min() and indices.max() < self.shape[axis])
        ):
            raise IndexError(
                f"take: indices must be 1-D and in [0, {self.shape[axis]}) for axis {axis}"
            )
        return _Take(self, indices, axis % len(self.shape))

    def astype(self, dtype: Any) -> LazyTensor:
        """Converted to ``dtype`` after reading."""
        return _Astype(self, np.dtype(dtype))

    def __repr__(self) -> str:
        return f"LazyTensor({self}: {self.dtype}{list(self.shape)})"


class _Source(LazyTensor):
    def __init__(self, reader: Reader, name: str) -> None:
        self.reader, self.name = reader, name
        self.shape, self.dtype = reader.shape(name), reader.dtype(name)

    def __str__(self) -> str:
        return self.name

    def _read(self, index: Index) -> np.ndarray:
        if not self.shape:
            return self.reader._read(self.name, ())
        unique, inverse = zip(*(np.unique(i, return_inverse=True) for i in index))
        out = np.empty(tuple(len(u) for u in unique), self.dtype)
        if out.size:  # one read per contiguous box of source positions
            for box in itertools.product(*(_runs(u) for u in unique)):
                src = tuple(slice(a, b) for a, b, _ in box)
                dst = tuple(slice(d, d + b - a) for a, b, d in box)
                out[dst] = self.reader._read(self.name, src)
        if all(len(u) == len(i) and np.array_equal(u, i) for u, i in zip(unique, index)):
            return out  # asked in increasing order without repeats: no reordering copy
        return out[np.ix_(*(inv.reshape(-1) for inv in inverse))]


def _runs(sorted_unique: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """``(start, stop, offset)`` of each run of consecutive values."""
    breaks = np.flatnonzero(np.diff(sorted_unique) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(sorted_unique)]])
    for s, e in zip(starts, stops):
        yield int(sorted_unique[s]), int(sorted_unique[e - 1]) + 1, int(s)


class _Transpose(LazyTensor):
    def __init__(self, parent: LazyTensor, axes: tuple[int, ...]) -> None:
        self.parent, self.axes = parent, axes
        self.shape, self.dtype = tuple(parent.shape[a] for a in axes), parent.dtype

    def __str__(self) -> str:
        return f"{self.parent}.transpose{self.axes}"

    def _read(self, index: Index) -> np.ndarray:
        source: list[np.ndarray] = [np.empty(0)] * len(index)
        for out_axis, a in enumerate(self.axes):
            source[a] = index[out_axis]
        return np.transpose(self.parent._read(tuple(source)), self.axes)


class _Take(LazyTensor):
    def __init__(self, parent: LazyTensor, indices: np.ndarray, axis: int) -> None:
        self.parent, self.indices, self.axis = parent, indices, axis
        shape = list(parent.shape)
        shape[axis] = len(indices)
        self.shape, self.dtype = tuple(shape), parent.dtype

    def __str__(self) -> str:
        return f"{self.parent}.take(axis={self.axis})"

    def _read(self, index: Index) -> np.ndarray:
        source = list(index)
        source[self.axis] = self.indices[index[self.axis]]
        return self.parent._read(tuple(source))


class _Astype(LazyTensor):
    def __init__(self, parent: LazyTensor, dtype: np.dtype) -> None:
        self.parent, self.shape, self.dtype = parent, parent.shape, dtype

    def __str__(self) -> str:
        return f"{self.parent}.astype({self.dtype})"

    def _read(self, index: Index) -> np.ndarray:
        return self.parent._read(index).astype(self.dtype)


class _Stack(LazyTensor):
    def __init__(self, parts: Sequence[LazyTensor], axis: int) -> None:
        self.parts, self.axis = tuple(parts), axis
        shape = list(parts[0].shape)
        shape.insert(axis, len(parts))
        self.shape, self.dtype = tuple(shape), parts[0].dtype

    def __str__(self) -> str:
        return f"stack([{self.parts[0]}, ...{len(self.parts)}])"

    def _read(self, index: Index) -> np.ndarray:
        rest = index[: self.axis] + index[self.axis + 1 :]
        if not len(index[self.axis]):
            return np.empty([len(i) for i in index], self.dtype)
        unique, inverse = np.unique(index[self.axis], return_inverse=True)
        blocks = [self.parts[int(j)]._read(rest) for j in unique]  # each part read once
        return np.stack([blocks[k] for k in inverse.reshape(-1)], axis=self.axis)


def stack(tensors: Sequence[LazyTensor], axis: int = 0) -> LazyTensor:
    """``np.stack(tensors, axis)``, lazily: per-layer tensors as one stacked leaf.

    Raises:
      CheckpointError: no tensors, or tensors of different shapes or dtypes (each named).
    """
    if not tensors:
        raise CheckpointError("stack: no tensors to stack")
    first = tensors[0]
    odd = [
        f"{t}: {t.dtype}{list(t.shape)}"
        for t in tensors
        if (t.shape, t.dtype) != (first.shape, first.dtype)
    ]
    if odd:
        raise CheckpointError(
            f"stack: {len(odd)} tensors differ from {first}"
            f" ({first.dtype}{list(first.shape)}):\n{bullets(odd)}"
        )
    return _Stack(tensors, axis % (len(first.shape) + 1))


def to_array(
    tensor: LazyTensor, sharding: jax.sharding.Sharding, *, dtype: Any = None
) -> jax.Array:
    """A ``jax.Array`` laid out by ``sharding``, each device reading only its own shard.

    Built with ``jax.make_array_from_callback``: every addressable device's index is read
    through the recorded transforms, so a process reads from the files only what its
    devices hold (on several hosts, each host reads its part). A shard that several of a
    process's devices hold (replication) is read once.

    Args:
      tensor: what to read (`Reader.tensor`, transformed).
      sharding: the layout, e.g. a ``NamedSharding``; must divide the shape evenly.
      dtype: convert to this dtype after reading (``None``: the file's).

    Returns:
      The array, committed to ``sharding``.

    Raises:
      CheckpointError: ``sharding`` does not fit the tensor's shape.

    Examples:
      >>> import os, tempfile, jax, numpy as np
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> from safetensors.numpy import save_file
      >>> from titanax.checkpoint import safetensors as st
      >>> d = tempfile.mkdtemp()
      >>> w = np.arange(32, dtype=np.float32).reshape(8, 4)      # stored (d_out, d_in)
      >>> save_file({"w": w}, os.path.join(d, "m.safetensors"))
      >>> reader = st.Reader(d)
      >>> mesh = jax.make_mesh((2, 4), ("data", "model"))
      >>> kernel = st.to_array(reader.tensor("w").T, NamedSharding(mesh, P(None, "model")))
      >>> kernel.shape, kernel.addressable_shards[0].data.shape   # (d_in, d_out), split on d_out
      ((4, 8), (4, 2))
      >>> bool(np.array_equal(kernel, w.T)), reader.elements_read  # once, though 2 replicas
      (True, 32)
    """
    target = tensor if dtype is None or np.dtype(dtype) == tensor.dtype else tensor.astype(dtype)
    try:
        sharding.shard_shape(target.shape)
    except ValueError as e:
        raise CheckpointError(
            f"{tensor}: shape {target.shape} does not fit {sharding}: {e}"
        ) from None
    cache: dict[tuple[tuple[Any, Any, Any], ...], np.ndarray] = {}

    def read(index: tuple[slice, ...] | None) -> np.ndarray:
        assert index is not None  # JAX passes one for every device
        key = tuple((s.start, s.stop, s.step) for s in index)  # slices are unhashable in 3.11
        if key not in cache:
            cache[key] = target[index]
        return cache[key]

    return jax.make_array_from_callback(target.shape, sharding, read)
