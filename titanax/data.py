"""``tx.data``: shuffled, epoch-aware batches from host arrays, with a resumable position.

Each process reads only its own rows of every global batch and, given a
sharding, assembles them into one global ``jax.Array`` with
``jax.make_array_from_process_local_data``. The position (epoch, batch within
it) is a small dict that checkpoints carry, so a resumed run sees exactly the
batches it would have seen.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

from titanax.errors import DataError

__all__ = ["Loader"]


class Loader:
    """Batches of host arrays, reshuffled every epoch; an iterator with a resumable position.

    Args:
      data: a pytree of arrays with the same leading dimension (the examples).
      batch_size: the global batch size; each process yields its
        ``batch_size / process_count`` rows.
      seed: the shuffle of epoch ``e`` is a function of ``(seed, e)`` only.
      shuffle: shuffle each epoch (else keep the order).
      sharding: a ``jax.sharding.Sharding`` (or a pytree of them, one per leaf)
        to yield global ``jax.Array``s laid out for a plan; ``None`` yields
        host arrays.
      position: a `state` to resume from.

    The last partial batch of an epoch is dropped, so every batch has
    ``batch_size`` rows.

    Examples:
      >>> import numpy as np, titanax as tx
      >>> x = np.arange(10)
      >>> loader = tx.data.Loader(x, batch_size=4, seed=0)
      >>> first = [next(loader) for _ in range(3)]      # 2 batches per epoch
      >>> loader.state()
      {'epoch': 1, 'batch': 1, 'seed': 0, 'batch_size': 4, 'size': 10}
      >>> resumed = tx.data.Loader(x, batch_size=4, seed=0, position=loader.state())
      >>> bool(np.array_equal(next(resumed), next(loader)))
      True
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        sharding: Sharding | Any | None = None,
        position: dict[str, Any] | None = None,
    ):
        leaves = jax.tree.leaves(data)
        sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
        if not leaves or len(sizes) != 1 or None in sizes:
            raise DataError(
                "tx.data.Loader: data must be a pytree of arrays that share their leading "
                f"(example) dimension; got leading dimensions {sorted(map(str, sizes))}."
            )
        self.size = int(np.shape(leaves[0])[0])
        processes = jax.process_count()
        if batch_size < 1 or batch_size > self.size or batch_size % processes:
            raise DataError(
                f"tx.data.Loader: batch_size={batch_size} must be between 1 and the "
                f"{self.size} examples, and a multiple of the {processes} processes."
            )
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.sharding = sharding
        self.batches_per_epoch = self.size // batch_size
        self.epoch, self.batch = 0, 0
        if position is not None:
            self._resume(position)
        self._order: tuple[int, np.ndarray] | None = None

    def _resume(self, position: dict[str, Any]) -> None:
        expected = {"seed": self.seed, "batch_size": self.batch_size, "size": self.size}
        wrong = {k: position.get(k) for k, v in expected.items() if position.get(k) != v}
        if wrong:
            raise DataError(
                f"tx.data.Loader: cannot resume from {position}: it was saved with "
                + ", ".join(f"{k}={v}" for k, v in wrong.items())
                + " but this loader has "
                + ", ".join(f"{k}={expected[k]}" for k in wrong)
                + ". Resume with the data and settings of the saved run."
            )
        self.epoch, self.batch = int(position["epoch"]), int(position["batch"])

    def state(self) -> dict[str, Any]:
        """The position: JSON-able, for ``tx.checkpoint.Manager.save(..., extra=...)``."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "size": self.size,
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
