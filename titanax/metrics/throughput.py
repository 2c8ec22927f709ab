"""FLOPs of a compiled step, peak FLOP/s of known devices, MFU and throughput."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

# --------------------------------------------------------------------------- FLOPs and MFU

# Peak dense bf16 FLOP/s of one device as JAX sees it (jax.devices()[i].device_kind),
# from the vendors' data sheets (their "with sparsity" figures halved). First match wins.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    (r"h100.*pcie", 756e12),
    (r"h100", 989e12),  # SXM (HBM3)
    (r"h200.*nvl", 835e12),
    (r"h200", 989e12),
    (r"a100", 312e12),
    (r"tpu v4", 275e12),
    (r"tpu v5 lite", 197e12),  # v5e
    (r"tpu v6 lite", 918e12),  # v6e (Trillium)
)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of ``device`` (default ``jax.devices()[0]``), if known.

    Looked up by ``device.device_kind`` in `PEAK_FLOPS`. Unknown devices,
    and CPUs, give ``None``: no number is made up. For another dtype (float32,
    fp8), pass your own peak to `Throughput` or `mfu`.

    Returns:
      FLOP/s of one device, or ``None``.

    Examples:
      >>> import titanax as tx
      >>> tx.metrics.peak_flops() is None       # the CPU devices of the test suite
      True
    """
    kind = (device if device is not None else jax.devices()[0]).device_kind.lower()
    for pattern, peak in PEAK_FLOPS:
        if re.search(pattern, kind):
            return peak
    return None


def flops_of(cost: Any) -> float | None:
    """The ``"flops"`` entry of a ``cost_analysis()`` result, or ``None`` if it has none.

    Accepts the dict of ``jax.stages.Compiled.cost_analysis()``, the list of
    dicts older JAX versions returned (the first one with ``"flops"`` counts), or ``None``.

    Examples:
      >>> import titanax as tx
      >>> tx.metrics.flops_of({"flops": 128.0}), tx.metrics.flops_of([{"flops": 8.0}])
      (128.0, 8.0)
      >>> tx.metrics.flops_of({}) is None
      True
    """
    if isinstance(cost, Mapping):
        flops = cost.get("flops")
        try:
            value = float(flops) if flops is not None else math.nan
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) and value >= 0 else None
    if isinstance(cost, (list, tuple)):
        for part in cost:
            if (found := flops_of(part)) is not None:
                return found
    return None


def step_flops(fn: Any, /, *args: Any, **kwargs: Any) -> float | None:
    """FLOPs of one call of a compiled step, from XLA's cost analysis.

    ``fn`` is a `ParallelFunction`, a ``jax.jit`` function
    (anything with ``.lower``: it is lowered with ``args`` and compiled), a
    ``jax.stages.Lowered`` (compiled) or a ``jax.stages.Compiled``; a plain
    function is wrapped in ``jax.jit``. Lowering and compiling run nothing:
    donated arguments stay valid.

    What the number means: the FLOPs of the program **one device** runs. A
    ``shard_map`` body (``tx.data_parallel``) and an XLA-partitioned program
    (``tx.tensor_parallel``) compile to a per-device program, so with ``n``
    devices the whole step does about ``n`` times this. It counts what XLA
    executes: recomputed (rematerialised) activations are included, and the
    body of a loop (``lax.scan``, ``fori_loop``, hence ``tx.pipeline``) is
    counted **once**, whatever its trip count. For such programs, pass an
    analytic count to `Throughput` instead (e.g. ``6 * params * tokens /
    devices`` for a transformer's training step).

    Args:
      fn: what to analyse (see above).
      *args: the step's arguments (arrays or ``jax.ShapeDtypeStruct`` where ``fn`` allows).
      **kwargs: keyword arguments for ``lower``.

    Returns:
      FLOPs per call on one device, or ``None`` when the backend reports none.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import titanax as tx
      >>> a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
      >>> tx.metrics.step_flops(jax.jit(jnp.matmul), a, b) == 2 * 64 * 32 * 16
      True
    """
    if isinstance(fn, jax.stages.Compiled):
        compiled = fn
    elif isinstance(fn, jax.stages.Lowered):
        compiled = fn.compile()
    else:
        lowerable = fn if hasattr(fn, "lower") else jax.jit(fn)
        compiled = lowerable.lower(*args, **kwargs).compile()
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    return flops_of(cost)


def mfu(
    flops_per_step: float | None,
    step_time_s: float,
    *,
    peak_flops_per_s: float | None = None,
) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over peak FLOP/s, for one device.

    Args:
      flops_per_step: FLOPs one device does in one step (`step_flops`).
      step_time_s: seconds per step.
      peak_flops_per_s: the device's peak; ``None`` looks it up with `peak_flops`.

    Returns:
      A fraction (0.4 means 40 %), or ``None`` if the FLOPs or the peak are unknown.

    Examples:
      >>> import titanax as tx
      >>> tx.metrics.mfu(1e12, 0.01, peak_flops_per_s=400e12)
      0.25
      >>> tx.metrics.mfu(1e12, 0.01) is None    # CPU: no known peak
      True
    """
    peak = peak_flops_per_s if peak_flops_per_s is not None else peak_flops()
    if flops_per_step is None or peak is None or step_time_s <= 0:
        return None
    return flops_per_step / step_time_s / peak


class Throughput:
    """Examples/s, tokens/s, FLOP/s and MFU over the steps between two measurements.

    Each `measure` covers the steps since the previous one; the first
    only starts the clock (so compilation is never counted). Call it right
    after something waited for the step, as `Logger` does when given
    ``throughput=``: JAX dispatches steps asynchronously, and a clock read
    before the device has finished measures dispatch, not compute.

    Args:
      flops_per_step: FLOPs one device does per step (`step_flops`), or
        ``None`` to report no FLOP/s and no MFU.
      examples_per_step: examples per step, all devices and processes together.
      tokens_per_step: tokens per step, all devices and processes together.
      peak_flops_per_s: peak FLOP/s of one device; ``None`` looks it up with
        `peak_flops` (and gives no MFU where the device is unknown, as on CPU).
      clock: seconds as a float; ``time.perf_counter`` by default.

    Examples:
      >>> import titanax as tx
      >>> ticks = iter([0.0, 2.0])
      >>> tp = tx.metrics.Throughput(flops_per_step=1e12, examples_per_step=32,
      ...                            tokens_per_step=4096, peak_flops_per_s=1e13,
      ...                            clock=lambda: next(ticks))
      >>> tp.measure(0)                         # starts the clock
      {}
      >>> tp.measure(10)                        # 10 steps in 2 s
      {'step_time_s': 0.2, 'examples_per_s': 160.0, 'tokens_per_s': 20480.0, 'flops_per_s': 5000000000000.0, 'mfu': 0.5}
    """

    def __init__(
        self,
        *,
        flops_per_step: float | None = None,
        examples_per_step: float | None = None,
        tokens_per_step: float | None = None,
        peak_flops_per_s: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.flops_per_step = flops_per_step
        self.examples_per_step = examples_per_step
        self.tokens_per_step = tokens_per_step
        self.peak_flops_per_s = peak_flops_per_s if peak_flops_per_s is not None else peak_flops()
        self.clock = clock
        self._last: tuple[int, float] | None = None

    def start(self, step: int) -> None:
        """Restarts the clock at ``step`` (e.g. after an evaluation or a checkpoint)."""
        self._last = (step, self.clock())

    def measure(self, step: int) -> dict[str, float]:
        """The rates over the steps since the last call (``{}`` on the first call).

        Returns:
          ``step_time_s``, and, where the inputs are known, ``examples_per_s``,
          ``tokens_per_s``, ``flops_per_s`` (one device) and ``mfu``.
        """
        now, last = self.clock(), self._last
        self._last = (step, now)
        if last is None or step <= last[0] or now <= last[1]:
            return {}
        step_time = (now - last[1]) / (step - last[0])
        out = {"step_time_s": step_time}
        if self.examples_per_step is not None:
            out["examples_per_s"] = self.examples_per_step / step_time
        if self.tokens_per_step is not None:
            out["tokens_per_s"] = self.tokens_per_step / step_time
        if self.flops_per_step is not None:
            out["flops_per_s"] = self.flops_per_step / step_time
            if self.peak_flops_per_s is not None:
                out["mfu"] = self.flops_per_step / step_time / self.peak_flops_per_s
        return out
