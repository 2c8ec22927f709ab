"""What the examples share: simulated devices, the training loop, checkpoints and resume."""

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


class Checkpoints:
    """Saves every ``every`` steps (and at the end) into ``directory``; resumes from its newest.

    ``position()`` is saved as JSON next to the state (the data loader's place);
    :meth:`resume` hands it back, so a resumed run sees exactly the batches it
    would have seen.
    """

    def __init__(self, directory: str | None, every: int, position: Callable[[], Any]):
        import titanax as tx

        self.every, self.position = every, position
        self.mngr = tx.checkpoint.Manager(directory) if directory else None

    def resume(self, state: Any) -> tuple[Any, int, Any]:
        """``(state, step, position)`` of the newest checkpoint, or the inputs at step 0."""
        if self.mngr is None or self.mngr.latest_step() is None:
            return state, 0, None
        step = self.mngr.latest_step()
        print(f"resuming from step {step} in {self.mngr.directory}")
        return self.mngr.restore(step, like=state), step, self.mngr.extra(step).get("data")

    def __call__(self, step: int, state: Any, last: int) -> None:
        if self.mngr is not None and (step == last or (self.every and step % self.every == 0)):
            self.mngr.save(step, state, extra={"data": self.position()})

    def close(self) -> None:
        if self.mngr is not None:
            self.mngr.close()  # waits for the last asynchronous save


def run(
    step: Callable[[Any, Any], tuple[Any, dict[str, Any]]],
    state: Any,
    next_batch: Callable[[int], Any],
    steps: int,
    *,
    start: int = 0,
    desc: str | None = None,
    checkpoints: Checkpoints | None = None,
) -> tuple[Any, list[float]]:
    """The user's loop, as plain as it gets: ``state, metrics = step(state, batch)``.

    Runs steps ``start .. steps - 1`` (``next_batch(i)`` gives batch ``i``) and
    returns the final state and every step's loss. ``desc`` shows a progress
    bar. Losses stay on the device until the end, so the loop never waits on them.
    """
    loop: Any = range(start, steps)
    if desc is not None:
        from tqdm import tqdm

        loop = tqdm(loop, desc=desc, unit="step", file=sys.stdout, initial=start, total=steps)
    losses = []
    for i in loop:
        state, metrics = step(state, next_batch(i))
        losses.append(metrics["loss"])
        if checkpoints is not None:
            checkpoints(i + 1, state, steps)
        if desc is not None and i % 10 == 0:
            loop.set_postfix(loss=f"{float(metrics['loss']):.4f}")
    if checkpoints is not None:
        checkpoints.close()
    return state, [float(v) for v in losses]
