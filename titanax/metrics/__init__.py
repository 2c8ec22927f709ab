"""``tx.metrics``: metric logging and throughput for the user's own training loop.

A `Logger` fans each logged step out to *sinks* (`Stdout`,
`JSONL`, `TensorBoard`, `WandB`, or any object with
``write(step, metrics)`` and ``close()``). It logs every ``every`` steps, on
process 0 only, and turns device arrays into Python floats only on the steps
it logs: the steps it skips never wait for the device.

`Throughput` turns wall time between logged steps into examples/s,
tokens/s, achieved FLOP/s and model FLOPs utilisation (MFU);
`step_flops` reads the FLOPs of a compiled step from XLA's cost
analysis and `peak_flops` the peak FLOP/s of known accelerators.
"""

from titanax.metrics.logger import Logger
from titanax.metrics.sinks import JSONL, Sink, Stdout, TensorBoard, WandB
from titanax.metrics.throughput import PEAK_FLOPS, Throughput, flops_of, mfu, peak_flops, step_flops

__all__ = [
    "Sink",
    "Stdout",
    "JSONL",
    "TensorBoard",
    "WandB",
    "Logger",
    "Throughput",
    "step_flops",
    "flops_of",
    "peak_flops",
    "mfu",
    "PEAK_FLOPS",
]
