"""Metric sinks: stdout, JSONL, TensorBoard, Weights & Biases, or anything with ``write``."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import IO, Any, Protocol, runtime_checkable

from titanax.errors import TitanaxError

# --------------------------------------------------------------------------- sinks


@runtime_checkable
class Sink(Protocol):
    """Where a `Logger` sends metrics: anything with these two methods."""

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records ``metrics`` (names to Python floats) for ``step``."""

    def close(self) -> None:
        """Flushes and releases what the sink holds."""


class Stdout:
    """One readable line per write: ``step 10: loss=0.25 accuracy=0.9``.

    Args:
      file: where to print; ``None`` (the default) is ``sys.stdout`` at the
        time of each write.
      precision: significant digits of each value.

    Examples:
      >>> import titanax as tx
      >>> tx.metrics.Stdout().write(10, {"loss": 0.123456, "examples_per_s": 12345.6})
      step 10: loss=0.1235 examples_per_s=1.235e+04
    """

    def __init__(self, file: IO[str] | None = None, *, precision: int = 4):
        self.file, self.precision = file, precision

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        values = " ".join(f"{k}={v:.{self.precision}g}" for k, v in metrics.items())
        print(f"step {step}: {values}".rstrip(), file=self.file or sys.stdout, flush=True)

    def close(self) -> None:
        pass


class JSONL:
    """One JSON object per line, ``{"step": 10, "loss": 0.25, ...}``, flushed at each write.

    The file is opened (for appending, so a resumed run continues it; its
    directory is created) at the first write: a sink built on every process
    touches nothing on the processes that never write.

    Args:
      path: the file.
      mode: ``"a"`` to append (default) or ``"w"`` to start afresh.

    Examples:
      >>> import json, os, tempfile
      >>> import titanax as tx
      >>> path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
      >>> sink = tx.metrics.JSONL(path)
      >>> sink.write(1, {"loss": 0.5}); sink.write(2, {"loss": 0.25}); sink.close()
      >>> [json.loads(line) for line in open(path)]
      [{'step': 1, 'loss': 0.5}, {'step': 2, 'loss': 0.25}]
    """

    def __init__(self, path: str | os.PathLike[str], *, mode: str = "a"):
        if mode not in ("a", "w"):
            raise TitanaxError(f"tx.metrics.JSONL: mode must be one of 'a', 'w'; got {mode!r}")
        self.path, self.mode = os.fspath(path), mode
        self._file: IO[str] | None = None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, self.mode)
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _require(module: str, extra: str, who: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{who} needs the optional package {module!r}, which is not installed. "
            f"Install it with: pip install titanax[{extra}]"
        ) from e


class TensorBoard:
    """Scalars in TensorBoard event files, through ``tensorboardX.SummaryWriter``.

    Needs the optional extra: ``pip install titanax[tensorboard]``. The writer
    (and its event file) is created at the first write. ``tensorboardX``
    writes from a background thread and flushes every ``flush_secs`` (120 s
    unless given); `close` writes everything that is pending.

    Args:
      logdir: the directory of the event files (``tensorboard --logdir`` it).
      **writer_kwargs: passed to ``tensorboardX.SummaryWriter``.

    Raises:
      ImportError: ``tensorboardX`` is not installed.

    Examples:
      >>> import os, tempfile
      >>> import titanax as tx
      >>> logdir = tempfile.mkdtemp()
      >>> with tx.metrics.Logger(tx.metrics.TensorBoard(logdir)) as log:
      ...     log.log(0, {"loss": 1.0})
      >>> [name.startswith("events.out.tfevents") for name in os.listdir(logdir)]
      [True]
    """

    def __init__(self, logdir: str | os.PathLike[str], **writer_kwargs: Any):
        self._tbx = _require("tensorboardX", "tensorboard", "tx.metrics.TensorBoard")
        self.logdir, self.writer_kwargs = os.fspath(logdir), writer_kwargs
        self._writer: Any = None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._writer is None:
            self._writer = self._tbx.SummaryWriter(self.logdir, **self.writer_kwargs)
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandB:
    """A Weights & Biases run, through ``wandb``; each write is ``run.log(metrics, step=step)``.

    Needs the optional extra: ``pip install titanax[wandb]``. The run starts
    (``wandb.init``) at the first write, or when `run` is first read, and
    finishes at `close`. W&B wants steps that never decrease.

    Args:
      project: the W&B project.
      mode: ``"online"``, ``"offline"`` (files only, ``wandb sync`` them later)
        or ``"disabled"``; ``None`` lets ``wandb`` decide (``WANDB_MODE``).
      **init_kwargs: passed to ``wandb.init`` (``name``, ``config``, ``dir``, ...).

    Raises:
      ImportError: ``wandb`` is not installed.
    """

    def __init__(self, project: str, *, mode: str | None = None, **init_kwargs: Any):
        self._wandb = _require("wandb", "wandb", "tx.metrics.WandB")
        self.project, self.mode, self.init_kwargs = project, mode, init_kwargs
        self._run: Any = None

    @property
    def run(self) -> Any:
        """The ``wandb`` run (started on first use)."""
        if self._run is None:
            self._run = self._wandb.init(project=self.project, mode=self.mode, **self.init_kwargs)
        return self._run

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


# --------------------------------------------------------------------------- logger
