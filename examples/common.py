"""What the examples share: simulated devices, the training loop with its progress bar."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def use_cpu_devices(n: int) -> None:
    """Simulates ``n`` CPU devices, if JAX has not started yet (GPUs are real devices)."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX already started (e.g. under pytest): use what is there
        pass


def run(
    step: Callable[[Any, Any], tuple[Any, dict[str, Any]]],
    state: Any,
    next_batch: Callable[[], Any],
    steps: int,
    *,
    desc: str | None = None,
) -> tuple[Any, list[float]]:
    """The user's loop, as plain as it gets: ``state, metrics = step(state, batch)``.

    Returns the final state and every step's loss. ``desc`` shows a progress bar.
    Losses stay on the device until the end, so the loop never waits on them.
    """
    loop: Any = range(steps)
    if desc is not None:
        from tqdm import tqdm

        loop = tqdm(loop, desc=desc, unit="step", file=sys.stdout)
    losses = []
    for i in loop:
        state, metrics = step(state, next_batch())
        losses.append(metrics["loss"])
        if desc is not None and i % 10 == 0:
            loop.set_postfix(loss=f"{float(metrics['loss']):.4f}")
    return state, [float(v) for v in losses]
