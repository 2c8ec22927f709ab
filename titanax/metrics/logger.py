"""``Logger``: fans logged steps out to sinks, on process 0, every ``every`` steps."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import jax
import numpy as np

from titanax import distributed
from titanax._util import bullets
from titanax.errors import TitanaxError
from titanax.metrics.sinks import Sink
from titanax.metrics.throughput import Throughput


class Logger:
    """Sends metrics to sinks every ``every`` steps, from process 0 only.

    ``log(step, metrics)`` does nothing, and touches no value, unless the step
    is due (``step % every == 0``, or ``force=True``) and this is process 0.
    On a due step it fetches every value in one ``jax.device_get`` (the only
    point where the loop waits for the device), converts each to a Python
    float, adds the `Throughput` figures if one is given, and writes to
    each sink in order.

    ``metrics`` maps names to scalars: jax or numpy arrays with one element,
    or Python numbers. Nested mappings are flattened with ``/``
    (``{"train": {"loss": x}}`` logs ``train/loss``).

    Args:
      *sinks: where to write (each a `Sink`).
      every: log the steps that ``every`` divides.
      throughput: a `Throughput` measured at each logged step; its
        figures are added to the metrics.

    Examples:
      >>> import jax.numpy as jnp
      >>> import titanax as tx
      >>> with tx.metrics.Logger(tx.metrics.Stdout(), every=2) as log:
      ...     for step in range(5):
      ...         log.log(step, {"loss": jnp.float32(1.0) / (step + 1)})
      step 0: loss=1
      step 2: loss=0.3333
      step 4: loss=0.2
    """

    def __init__(self, *sinks: Sink, every: int = 1, throughput: Throughput | None = None):
        bad = [
            f"sink {i}: {type(s).__name__}" for i, s in enumerate(sinks) if not isinstance(s, Sink)
        ]
        if bad:
            raise TypeError(
                "tx.metrics.Logger: every sink needs write(step, metrics) and close():\n"
                + bullets(bad)
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise TitanaxError(f"tx.metrics.Logger: every must be an int >= 1; got {every!r}")
        self.sinks, self.every, self.throughput = sinks, every, throughput

    def due(self, step: int) -> bool:
        """Whether `log` at ``step`` writes (on process 0)."""
        return step % self.every == 0

    def log(self, step: int, metrics: Mapping[str, Any], *, force: bool = False) -> None:
        """Writes ``metrics`` for ``step`` if the step is due and this is process 0.

        Args:
          step: the step number, a Python ``int`` (the loop's counter: reading
            ``state.step`` would wait for the device on every step).
          metrics: names to scalars (device arrays stay untouched unless written).
          force: write even if ``every`` does not divide ``step`` (e.g. the last step).

        Raises:
          TitanaxError: a metric that is not a scalar.
        """
        if not (force or self.due(step)) or not distributed.is_main_process():
            return
        values = _floats(_flatten(metrics), step)
        if self.throughput is not None:
            values.update(self.throughput.measure(step))
        for sink in self.sinks:
            sink.write(int(step), values)

    def close(self) -> None:
        """Closes every sink (all of them, even if one fails; the first error is raised)."""
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> Logger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def _floats(metrics: dict[str, Any], step: int) -> dict[str, float]:
    fetched = jax.device_get(metrics)  # one wait for all of them
    out, bad = {}, []
    for name, value in fetched.items():
        array = np.asarray(value)
        if array.dtype == object or array.size != 1:
            try:
                out[name] = float(value)
            except (TypeError, ValueError):
                bad.append(f"{name}: {type(value).__name__} of shape {array.shape}")
            continue
        out[name] = float(array.reshape(()))
    if bad:
        raise TitanaxError(
            f"tx.metrics.Logger.log(step={step}): metrics must be scalars, but:\n{bullets(bad)}\n"
            "Reduce them in the step (e.g. jnp.mean) or log one element."
        )
    return out
