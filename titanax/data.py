"""``tx.data``: shuffled, epoch-aware batches from host arrays, with a resumable position.

Each process reads only its own rows of every global batch and, given a
sharding, assembles them into one global ``jax.Array`` with
``jax.make_array_from_process_local_data``. The position (epoch, batch within
it) is a small dict that checkpoints carry, so a resumed run sees exactly the
batches it would have seen. The position also records every setting that
decides which rows a batch holds (seed, shuffle, batch size, number of
examples, a fingerprint of the data), and resuming with any of them changed is
a ``DataError`` instead of a run that silently trains on other rows.

The global batches do not depend on the number of processes (each process
takes its share of the same global batch), so a position saved by a run on
``p`` processes resumes on any process count that divides the batch.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

from titanax.errors import DataError

__all__ = ["Loader", "POSITION_VERSION", "fingerprint"]

POSITION_VERSION = 2
"""The version of the position dict that `Loader.state` writes and `Loader` reads."""

# Version 1 (Titanax 0.1) recorded neither `shuffle` nor the data's fingerprint.
_V1_KEYS = frozenset({"epoch", "batch", "seed", "batch_size", "size"})
_KEYS = ("version", "epoch", "batch", "seed", "shuffle", "batch_size", "size", "fingerprint")
_SETTINGS = ("seed", "shuffle", "batch_size", "size", "fingerprint")
_FINGERPRINT_ROWS = 64  # rows hashed, evenly spaced; the first and the last always among them


def _integer(value: Any) -> int | None:
    """``value`` as an ``int`` if it is an integer (Python or numpy, not a bool), else ``None``."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def fingerprint(data: Any) -> str:
    """A short hash of ``data``: each leaf's path, dtype and trailing shape, and a sample of rows.

    The rows hashed are at most 64, evenly spaced from the first to the last, so
    the cost does not grow with the data (memory-mapped arrays read only those
    rows). It tells a different dataset from the saved run's; it does not see an
    edit to a few rows between the sampled ones.

    Examples:
      >>> import numpy as np
      >>> from titanax.data import fingerprint
      >>> fingerprint(np.arange(10)) == fingerprint(np.arange(10))
      True
      >>> fingerprint(np.arange(10)) == fingerprint(np.arange(10)[::-1])
      False
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(data)
    size = int(np.shape(leaves[0][1])[0]) if leaves else 0
    rows = np.unique(np.linspace(0, max(size - 1, 0), min(size, _FINGERPRINT_ROWS)).astype(int))
    h = hashlib.blake2b(digest_size=8)
    for path, leaf in leaves:
        sample = np.asarray(leaf)[rows]
        h.update(f"{jax.tree_util.keystr(path)}|{sample.dtype.str}|{sample.shape[1:]}|".encode())
        # object arrays hold pointers: hash what they print, not their bytes
        h.update(
            repr(sample.tolist()).encode()
            if sample.dtype.hasobject
            else np.ascontiguousarray(sample).tobytes()
        )
    return h.hexdigest()


class Loader:
    """Batches of host arrays, reshuffled every epoch; an iterator with a resumable position.

    Args:
      data: a pytree of arrays with the same leading dimension (the examples).
        Memory-mapped arrays (``np.load(path, mmap_mode="r")``) work: only the
        rows of each batch are read.
      batch_size: the global batch size, a positive integer no larger than the
        number of examples; each process yields its ``batch_size / process_count``
        rows, so it must be a multiple of the process count.
      seed: a non-negative integer; the shuffle of epoch ``e`` is a function of
        ``(seed, e)`` only.
      shuffle: ``True`` to shuffle each epoch, ``False`` to keep the order.
      sharding: a ``jax.sharding.Sharding`` (or a pytree of them, one per leaf
        of ``data``) to yield global ``jax.Array``s laid out for a plan; ``None``
        yields host arrays.
      position: a dict from `state` to resume from. It must have been saved with
        the same ``seed``, ``shuffle``, ``batch_size`` and data (the same number
        of examples and the same `fingerprint`).

    The last partial batch of an epoch is dropped, so every batch has
    ``batch_size`` rows.

    Raises:
      DataError: ``data`` that cannot be batched, an argument of the wrong type
        or out of range, or a ``position`` that this loader cannot resume:
        saved with other settings or data, out of range, missing fields, or
        written by another version. The message names each field at fault with
        the saved value and this loader's, and how to fix it.

    Examples:
      >>> import numpy as np, titanax as tx
      >>> x = np.arange(10)
      >>> loader = tx.data.Loader(x, batch_size=4, seed=0)
      >>> first = [next(loader) for _ in range(3)]      # 2 batches per epoch
      >>> loader.state()
      {'version': 2, 'epoch': 1, 'batch': 1, 'seed': 0, 'shuffle': True, 'batch_size': 4,
       'size': 10, 'fingerprint': '...'}
      >>> resumed = tx.data.Loader(x, batch_size=4, seed=0, position=loader.state())
      >>> bool(np.array_equal(next(resumed), next(loader)))
      True

      Resuming with a setting that changes the order is an error:

      >>> tx.data.Loader(x, batch_size=4, seed=0, shuffle=False, position=loader.state())
      Traceback (most recent call last):
        ...
      titanax.errors.DataError: tx.data.Loader: cannot resume from this position:
        * shuffle: saved True, this loader has False
      Build the loader as the saved run did (seed=0, shuffle=True, batch_size=4, ...), or pass position=None to start from the beginning.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        sharding: Sharding | Any | None = None,
        position: Mapping[str, Any] | None = None,
    ):
        leaves = jax.tree.leaves(data)
        sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
        if not leaves or len(sizes) != 1 or None in sizes:
            raise DataError(
                "tx.data.Loader: data must be a pytree of arrays that share their leading "
                f"(example) dimension; got leading dimensions {sorted(map(str, sizes))}."
            )
        self.size = int(np.shape(leaves[0])[0])
        if self.size == 0:
            raise DataError("tx.data.Loader: data has no examples (its leading dimension is 0).")
        self.batch_size = self._check_batch_size(batch_size)
        seed_ = _integer(seed)
        if seed_ is None or seed_ < 0:
            raise DataError(
                f"tx.data.Loader: seed must be a non-negative integer; got {_describe(seed)}. "
                "The shuffle of epoch e is a function of (seed, e), so a run is reproducible "
                "only from an integer seed: pass one, e.g. seed=0."
            )
        self.seed = seed_
        if not isinstance(shuffle, bool | np.bool_):
            raise DataError(
                f"tx.data.Loader: shuffle must be True or False; got {_describe(shuffle)}."
            )
        self.shuffle = bool(shuffle)
        self.data = data
        self.sharding = self._check_sharding(sharding, data)
        self.batches_per_epoch = self.size // self.batch_size
        self.fingerprint = fingerprint(data)
        self.epoch, self.batch = 0, 0
        if position is not None:
            self.epoch, self.batch = self._check_position(position)
        self._order: tuple[int, np.ndarray] | None = None

    def _check_batch_size(self, batch_size: Any) -> int:
        n = _integer(batch_size)
        if n is None or n < 1:
            raise DataError(
                "tx.data.Loader: batch_size must be a positive integer (the global batch); "
                f"got {_describe(batch_size)}. Pass the number of examples per step, from 1 to "
                f"{self.size}."
            )
        if n > self.size:
            raise DataError(
                f"tx.data.Loader: batch_size={n} is more than the {self.size} examples in data; "
                "the last partial batch of an epoch is dropped, so no batch would ever be "
                f"yielded. Use a batch_size of at most {self.size}."
            )
        processes = jax.process_count()
        if n % processes:
            lower, upper = n // processes * processes, (n // processes + 1) * processes
            suggest = " or ".join(str(k) for k in (lower, upper) if 0 < k <= self.size)
            raise DataError(
                f"tx.data.Loader: batch_size={n} is not a multiple of the {processes} "
                f"processes (each process yields batch_size / {processes} rows); "
                f"use {suggest}."
            )
        return n

    @staticmethod
    def _check_sharding(sharding: Any, data: Any) -> Any:
        if sharding is None or isinstance(sharding, Sharding):
            return sharding
        is_sharding = lambda s: isinstance(s, Sharding)
        leaves = jax.tree.leaves(sharding, is_leaf=is_sharding)
        structure = jax.tree.structure(sharding, is_leaf=is_sharding)
        same: bool = structure == jax.tree.structure(data)  # type: ignore[operator]
        if not (leaves and all(map(is_sharding, leaves)) and same):
            raise DataError(
                "tx.data.Loader: sharding must be a jax.sharding.Sharding, a pytree of them "
                f"with the structure of data ({jax.tree.structure(data)}), or None; got "
                f"{_describe(sharding)}. E.g. sharding=NamedSharding(mesh, P('data')) lays "
                "every leaf out along the 'data' axis."
            )
        return sharding

    def _check_position(self, position: Any) -> tuple[int, int]:
        """``(epoch, batch)`` of ``position``, or a `DataError` listing every field at fault."""
        restart = "or pass position=None to start from the beginning."
        if not isinstance(position, Mapping):
            raise DataError(
                "tx.data.Loader: position must be the dict that Loader.state() returned; "
                f"got {_describe(position)}. Pass the position saved with the checkpoint, "
                + restart
            )
        keys = set(position)
        if "version" not in keys and keys == _V1_KEYS:
            old = dict(position)
            new = dict(version=POSITION_VERSION, shuffle=self.shuffle, fingerprint=self.fingerprint)
            upgraded = {k: {**old, **new}[k] for k in _KEYS}
            raise DataError(
                f"tx.data.Loader: position {old} was saved by an older Titanax "
                f"(position version 1), which recorded neither 'shuffle' nor the data's "
                f"fingerprint, so this loader cannot check that they match. If the saved run "
                f"used shuffle={self.shuffle} and these data, resume with position="
                f"{upgraded}; else build the loader as the saved run did, " + restart
            )
        missing = [k for k in _KEYS if k not in keys]
        unknown = sorted(map(str, keys - set(_KEYS)))
        if missing or unknown:
            raise DataError(
                f"tx.data.Loader: position {dict(position)} is not a Loader.state() of "
                f"position version {POSITION_VERSION}: "
                + "; ".join(
                    part
                    for part in (
                        f"missing {', '.join(map(repr, missing))}" if missing else "",
                        f"unknown {', '.join(map(repr, unknown))}" if unknown else "",
                    )
                    if part
                )
                + ". Pass the position saved with the checkpoint, unedited, "
                + restart
            )
        version = _integer(position["version"])
        if version != POSITION_VERSION:
            newer = version is not None and version > POSITION_VERSION
            raise DataError(
                f"tx.data.Loader: position version {position['version']!r} "
                + (
                    f"was written by a newer Titanax (this one reads version {POSITION_VERSION})"
                    "; resume with the Titanax that saved it, "
                    if newer
                    else f"is not one this Titanax reads (it reads version {POSITION_VERSION})"
                    ": pass the position saved with the checkpoint, "
                )
                + restart
            )

        return self._check_fields(position)

    def _check_fields(self, position: Mapping[str, Any]) -> tuple[int, int]:
        """The fields of a version-2 position: types, ranges, and the settings against ours."""
        problems: dict[str, str] = {}  # field -> what is wrong with it
        saved: dict[str, Any] = {}  # the saved settings, None where invalid
        for key in ("seed", "batch_size", "size"):
            value, least = _integer(position[key]), 0 if key == "seed" else 1
            saved[key] = value if value is not None and value >= least else None
            if saved[key] is None:
                problems[key] = f"{_describe(position[key])} is not an integer >= {least}"
        for key, kind, ok in (
            ("shuffle", "True or False", bool | np.bool_),
            ("fingerprint", "a str", str),
        ):
            saved[key] = position[key] if isinstance(position[key], ok) else None
            if saved[key] is None:
                problems[key] = f"{_describe(position[key])} is not {kind}"
        if saved["shuffle"] is not None:
            saved["shuffle"] = bool(saved["shuffle"])  # np.bool_ as bool
        invalid = bool(problems)
        mismatched = [
            key
            for key in _SETTINGS
            if saved[key] is not None
            and saved[key] != getattr(self, key)
            # another size samples other rows: a fingerprint mismatch would say nothing more
            and not (key == "fingerprint" and saved["size"] != self.size)
            # without shuffling the seed changes nothing
            and not (key == "seed" and saved["shuffle"] is False and not self.shuffle)
        ]
        for key in mismatched:
            problems[key] = f"saved {saved[key]!r}, this loader has {getattr(self, key)!r}"
        if "fingerprint" in mismatched:
            problems["fingerprint"] += (
                f" (a hash of the data's structure, dtypes and {_FINGERPRINT_ROWS} sampled "
                "rows: the data differ from the saved run's)"
            )
        epoch, batch = _integer(position["epoch"]), _integer(position["batch"])
        size, batch_size = saved["size"] or self.size, saved["batch_size"] or self.batch_size
        per_epoch = size // batch_size
        if epoch is None or epoch < 0:
            invalid = True
            problems["epoch"] = f"{_describe(position['epoch'])} is not an integer >= 0"
        if batch is None or not 0 <= batch <= per_epoch:
            invalid = True
            problems["batch"] = (
                f"{_describe(position['batch'])} is out of range: an epoch of {size} examples "
                f"in batches of {batch_size} has {per_epoch} batches, so batch (the batches of "
                f"the epoch already yielded) is an integer from 0 to {per_epoch}"
            )
        if not problems:
            assert epoch is not None and batch is not None
            return epoch, batch

        restart = "or pass position=None to start from the beginning."
        fixes = []
        if set(mismatched) - {"fingerprint"}:
            settings = [
                f"{k}={saved[k]!r}"
                for k in ("seed", "shuffle", "batch_size")
                if saved[k] is not None
            ]
            if saved["size"] is not None:
                settings.append(f"on its data of {saved['size']} examples")
            fixes.append(
                f"Build the loader as the saved run did ({', '.join(settings)}), " + restart
            )
        if "fingerprint" in mismatched:
            fixes.append(
                "Pass the saved run's data; to continue this position over these data on "
                f"purpose, resume with dict(position, fingerprint={self.fingerprint!r})."
            )
        if invalid:
            fixes.append(
                "This position was not written by Loader.state() or was edited: pass the "
                "position saved with the checkpoint, " + restart
            )
        raise DataError(
            "tx.data.Loader: cannot resume from this position:\n"
            + "".join(f"  * {k}: {problems[k]}\n" for k in _KEYS if k in problems)
            + "\n".join(fixes)
        )

    def state(self) -> dict[str, Any]:
        """The position: JSON-able, for ``tx.checkpoint.Manager.save(..., extra=...)``.

        It records where the loader is (``epoch``; ``batch``, the number of
        batches of that epoch already yielded) and every setting that decides
        which rows a batch holds, so that `Loader` can refuse to resume it with
        other settings. It is the same on every process.
        """
        return {
            "version": POSITION_VERSION,
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "size": self.size,
            "fingerprint": self.fingerprint,
        }

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            order = (
                np.random.default_rng((self.seed, self.epoch)).permutation(self.size)
                if self.shuffle
                else np.arange(self.size)
            )
            self._order = (self.epoch, order)
        return self._order[1]

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> Any:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        rows = self._permutation()[
            self.batch * self.batch_size : (self.batch + 1) * self.batch_size
        ]
        self.batch += 1
        local = self.batch_size // jax.process_count()
        mine = np.sort(rows[jax.process_index() * local : (jax.process_index() + 1) * local])
        batch = jax.tree.map(lambda a: np.asarray(a)[mine], self.data)
        if self.sharding is None:
            return batch
        shardings = (
            jax.tree.map(lambda _: self.sharding, batch)
            if isinstance(self.sharding, Sharding)
            else self.sharding
        )
        return jax.tree.map(jax.make_array_from_process_local_data, shardings, batch)
