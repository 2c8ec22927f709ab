"""What the examples share: simulated devices, the training loop, checkpoints and resume."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


def start(devices: int) -> None:
    """Simulates ``devices`` CPU devices in all and joins the other processes, if any.

    Run directly, it is one process with ``devices`` simulated devices. Under
    ``titanax launch --nproc N`` each process simulates its share, ``devices / N``
    (``--devices-per-process`` decides instead when given), and
    ``tx.distributed.initialize()`` joins them: every process then holds part of a
    mesh over ``jax.devices()[:devices]``.
    """
    import jax

    import titanax as tx

    if "JAX_NUM_CPU_DEVICES" not in os.environ:
        processes = int(os.environ.get(tx.distributed.ENV_NUM_PROCESSES, "1"))
        try:  # must come before JAX starts (GPUs are real devices: it changes nothing there)
            jax.config.update("jax_num_cpu_devices", max(devices // processes, 1))
        except RuntimeError:  # JAX already started (e.g. under pytest): use what is there
            pass
    tx.distributed.initialize(heartbeat_s=10)


def mine(batch: Any) -> Any:
    """This process's rows of a global batch (all of it with one process)."""
    import jax

    def rows(a: Any) -> Any:
        n = a.shape[0] // jax.process_count()
        return a[jax.process_index() * n : (jax.process_index() + 1) * n]

    return jax.tree.map(rows, batch)


def say(*args: Any) -> None:
    """``print``, on process 0 only."""
    import jax

    if jax.process_index() == 0:
        print(*args, flush=True)


def command(main: Callable[[list[str] | None], Any]) -> None:
    """Runs an example's ``main`` on ``sys.argv``, as ``python train.py ...`` does.

    ``--help`` and mistakes in the arguments are ``from_argv``'s (exit codes 0 and 2);
    a Titanax error from the settings' values (a mesh that does not fit the devices,
    an unknown schedule) prints one line to stderr and exits with code 1: no traceback.
    """
    from titanax.errors import ConfigError, TitanaxError

    try:
        main(None)
    except TitanaxError as e:
        prog = os.path.basename(sys.argv[0])
        print(f"{prog}: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ConfigError) else 1) from None


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
        say(f"resuming from step {step} in {self.mngr.directory}")
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
    metrics_path: str | None = None,
    examples_per_step: int | None = None,
    tokens_per_step: int | None = None,
) -> tuple[Any, list[float]]:
    """The user's loop, as plain as it gets: ``state, metrics = step(state, batch)``.

    Runs steps ``start .. steps - 1`` (``next_batch(i)`` gives batch ``i``) and
    returns the final state and every step's loss. ``desc`` shows a progress
    bar; ``metrics_path`` gets one JSON line per step (loss and throughput) through
    ``tx.metrics``. Both happen on process 0 only.
    """
    import jax

    import titanax as tx

    desc = desc if jax.process_index() == 0 else None
    logger = None
    if metrics_path:
        throughput = tx.metrics.Throughput(
            examples_per_step=examples_per_step, tokens_per_step=tokens_per_step
        )
        logger = tx.metrics.Logger(tx.metrics.JSONL(metrics_path), throughput=throughput)
    loop: Any = range(start, steps)
    if desc is not None:
        from tqdm import tqdm

        loop = tqdm(loop, desc=desc, unit="step", file=sys.stdout, initial=start, total=steps)
    losses = []
    for i in loop:
        state, metrics = step(state, next_batch(i))
        losses.append(metrics["loss"])
        if logger is not None:
            logger.log(i + 1, metrics)
        if checkpoints is not None:
            checkpoints(i + 1, state, steps)
        if desc is not None and i % 10 == 0:
            loop.set_postfix(loss=f"{float(metrics['loss']):.4f}")
    if checkpoints is not None:
        checkpoints.close()
    if logger is not None:
        logger.close()
    return state, [float(v) for v in losses]
