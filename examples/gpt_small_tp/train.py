"""A small GPT trained with data x tensor parallelism (``tx.data_parallel`` over
``tx.tensor_parallel``) on the prose of Python's own documentation (no download).

    python examples/gpt_small_tp/train.py --mesh data=2,model=4 --steps 200

Settings come from ``config.yaml`` beside this file, overridden by ``--set key=value``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))

from examples.common import Checkpoints, mine, run, say, start
from examples.gpt_small_tp import model as gpt


def gpt_rules(axis: str = "model") -> Any:
    """Megatron layouts: attention heads and MLP hidden units split over ``axis``."""
    from jax.sharding import PartitionSpec as P

    import titanax as tx

    return (
        tx.rules.megatron_attention(axis=axis)
        + tx.rules.megatron_mlp(axis=axis)
        + tx.Rules((r".*", P()))  # embeddings, norms: replicated
    )


def make_steps(cfg: gpt.GPTConfig, mesh: Any) -> tuple[Any, Any]:
    """The DP x TP training and evaluation steps on ``mesh`` (axes ``data``, ``model``)."""
    import jax

    import titanax as tx

    def train_step(state: Any, tokens: Any) -> tuple[Any, dict[str, Any]]:
        loss, grads = jax.value_and_grad(gpt.loss_fn)(state.params, tokens, cfg)
        grads = tx.pmean(grads, "data")  # the DP reduction; TP needs none (global view)
        return state.apply_gradients(grads), {"loss": tx.pmean(loss, "data")}

    def eval_step(params: Any, tokens: Any) -> Any:
        return tx.pmean(gpt.loss_fn(params, tokens, cfg), "data")

    rules = gpt_rules()
    train = tx.data_parallel(tx.tensor_parallel(rules)(train_step), mesh=mesh)
    evaluate = tx.data_parallel(tx.tensor_parallel(rules)(eval_step), mesh=mesh, donate=False)
    return train, evaluate


def validation_batches(
    valid: np.ndarray, cfg: gpt.GPTConfig, n: int, batch: int
) -> list[np.ndarray]:
    rng = np.random.default_rng(1234)  # the same windows for every run
    return [gpt.windows(valid, batch, cfg.seq_len + 1, rng) for _ in range(n)]


def make_optimizer(lr: float, steps: int) -> Any:
    """AdamW with warm-up, cosine decay and gradient clipping."""
    import optax

    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 5 + 1), steps)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))


def train(
    cfg: gpt.GPTConfig,
    mesh: Any,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    eval_batches: int = 4,
    progress: bool = False,
    checkpoint_dir: str | None = None,
    save_every: int = 0,
    metrics_path: str | None = None,
) -> tuple[Any, list[float], float]:
    """Trains to ``steps``; returns the state, the losses of the steps run and the validation loss.

    Batch ``i`` is drawn with the seed ``(seed, i)``, so the data position is the step
    itself: with ``checkpoint_dir`` a run resumes exactly from its newest checkpoint.
    """
    import jax

    import titanax as tx

    train_data, valid_data = gpt.split(gpt.corpus())
    optimizer = make_optimizer(lr, steps)
    step, evaluate = make_steps(cfg, mesh)

    def batch(i: int) -> np.ndarray:  # the same global batch everywhere; each process its rows
        rng = np.random.default_rng((seed, i))
        return mine(gpt.windows(train_data, batch_size, cfg.seq_len + 1, rng))

    state = tx.TrainState.create(gpt.init(jax.random.key(seed), cfg), optimizer)
    state = step.place(state, batch(0))[0]  # laid out once, as the step wants it
    ckpt = Checkpoints(checkpoint_dir, save_every, lambda: None)
    state, start, _ = ckpt.resume(state)
    state, losses = run(
        step,
        state,
        batch,
        steps,
        start=start,
        desc="train" if progress else None,
        checkpoints=ckpt,
        metrics_path=metrics_path,
        examples_per_step=batch_size,
        tokens_per_step=batch_size * cfg.seq_len,
    )
    valid = validation_batches(valid_data, cfg, eval_batches, batch_size)
    val_loss = float(np.mean([float(evaluate(state.params, mine(b))) for b in valid]))
    return state, losses, val_loss


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}``."""
    axes = dict(part.split("=") for part in text.split(",") if part)
    return {
        "data": int(axes.pop("data", 1)),
        "model": int(axes.pop("model", 1)),
        **{k: int(v) for k, v in axes.items()},
    }


@dataclasses.dataclass
class Config:
    """The example's settings; ``config.yaml`` beside this file holds the defaults."""

    mesh: str = "data=2,model=4"  # axis sizes
    devices: int = 8  # simulated CPU devices
    steps: int = 200
    batch_size: int = 16  # global batch (sequences)
    lr: float = 1e-3
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    seq_len: int = 128
    seed: int = 0
    checkpoint_dir: str | None = None  # save here; resume from the newest checkpoint
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    metrics: str | None = None  # append one JSON line per step here


CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.yaml")


def build(cfg: Config) -> tuple[Any, tuple[Any, ...]]:
    """The training step and example arguments, for ``titanax explain`` (nothing trains)."""
    import jax

    import titanax as tx

    axes = parse_mesh(cfg.mesh)
    mesh = tx.mesh(devices=jax.devices()[: math.prod(axes.values())], **axes)
    gcfg = gpt.GPTConfig(
        seq_len=cfg.seq_len, d_model=cfg.d_model, heads=cfg.heads, layers=cfg.layers
    )
    step, _ = make_steps(gcfg, mesh)
    state = tx.TrainState.create(
        gpt.init(jax.random.key(cfg.seed), gcfg), make_optimizer(cfg.lr, cfg.steps)
    )
    return step, (state, np.zeros((cfg.batch_size, cfg.seq_len + 1), np.int32))


def main(argv: list[str] | None = None) -> float:
    """``train.py [--config FILE] [--set key=value ...] [--key value ...]``."""
    from titanax.launch.config import from_argv

    args = from_argv(Config, sys.argv[1:] if argv is None else argv, default=CONFIG)

    import jax

    start(args.devices)  # devices, and the other processes under `titanax launch`
    import titanax as tx

    axes = parse_mesh(args.mesh)
    n = math.prod(axes.values())
    if len(jax.devices()) < n:
        raise SystemExit(f"mesh {args.mesh} needs {n} devices; {len(jax.devices())} available")
    mesh = tx.mesh(devices=jax.devices()[:n], **axes)
    cfg = gpt.GPTConfig(
        seq_len=args.seq_len, d_model=args.d_model, heads=args.heads, layers=args.layers
    )
    say(f"GPT {cfg}; mesh {dict(mesh.shape)}")
    _, losses, val_loss = train(
        cfg,
        mesh,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=True,
        checkpoint_dir=args.checkpoint_dir,
        save_every=args.save_every,
        metrics_path=args.metrics,
    )
    say(
        f"final train loss {losses[-1] if losses else float('nan'):.4f}; validation loss {val_loss:.4f}, "
        f"perplexity {math.exp(val_loss):.2f} (bytes)"
    )
    return val_loss


if __name__ == "__main__":
    main()
