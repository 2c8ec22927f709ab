"""A small GPT trained with data x tensor parallelism (``tx.data_parallel`` over
``tx.tensor_parallel``) on the prose of Python's own documentation (no download).

    python examples/gpt_small_tp/train.py --mesh data=2,model=4 --steps 200
    python examples/gpt_small_tp/train.py --zero 3   # parameters and Adam state split over data

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

from examples.common import Checkpoints, command, mine, run, say, start
from examples.gpt_small_tp import model as gpt


def gpt_rules(axis: str = "model") -> Any:
    """Megatron layouts: attention heads and MLP hidden units split over ``axis``.

    The blocks are stacked (``params["h"]``: a leading layer dimension), so each Megatron
    spec gains a leading ``None``: the layer dimension stays whole.
    """
    from jax.sharding import PartitionSpec as P

    import titanax as tx

    megatron = tx.rules.megatron_attention(axis=axis) + tx.rules.megatron_mlp(axis=axis)
    return tx.Rules(
        *((pattern, P(None, *spec)) for pattern, spec in megatron),
        (r".*", P()),  # embeddings, norms: replicated
    )


def make_steps(cfg: gpt.GPTConfig, mesh: Any, zero: int = 0) -> tuple[Any, Any]:
    """The training and evaluation steps on ``mesh`` (axes ``data``, ``model``).

    ``zero=0``: ``data_parallel`` (state replicated over ``data``); ``zero=3``:
    ``fully_sharded`` (parameters and optimizer state split over ``data``);
    ``zero=1``: ``fully_sharded(shard="optimizer")``. All compose with
    ``tensor_parallel`` over ``model``; the collectives over ``data`` are written here.

    ZeRO-3 gathers a block at a time: the model calls the gather inside its scan over the
    stacked blocks, under ``jax.checkpoint``, so one block's whole parameters are alive at
    a time and the step's temporary memory stays below ``data_parallel``'s.
    """
    import functools

    import jax
    import optax

    import titanax as tx

    def value_and_grad(params: Any, tokens: Any) -> Any:
        return jax.value_and_grad(gpt.loss_fn)(params, tokens, cfg)

    def dp_step(state: Any, tokens: Any) -> tuple[Any, dict[str, Any]]:
        loss, grads = value_and_grad(state.params, tokens)
        grads = tx.pmean(grads, "data")  # the DP reduction; TP needs none (global view)
        return state.apply_gradients(grads), {"loss": tx.pmean(loss, "data")}

    # ZeRO-3's all-gather, one block at a time; its backward pass reduce-scatters that
    # block's gradient (vjp="mean"), so value_and_grad returns this device's reduced shards.
    gather = functools.partial(tx.gather_params, axis="data", vjp="mean")

    def zero3_step(state: Any, tokens: Any) -> tuple[Any, dict[str, Any]]:
        loss, grads = jax.value_and_grad(gpt.loss_fn)(state.params, tokens, cfg, gather)
        return state.apply_gradients(grads), {"loss": tx.pmean(loss, "data")}

    def zero1_step(state: Any, tokens: Any) -> tuple[Any, dict[str, Any]]:
        loss, grads = value_and_grad(state.params, tokens)
        grads = tx.scatter_grads(grads, "data")  # reduce-scatter: this device's shard
        shard = tx.shard_params(state.params, "data")  # the slice it updates
        updates, opt_state = state.optimizer.update(grads, state.opt_state, shard)
        params = tx.gather_params(optax.apply_updates(shard, updates), "data")
        new = dataclasses.replace(state, params=params, opt_state=opt_state, step=state.step + 1)
        return new, {"loss": tx.pmean(loss, "data")}

    def eval_step(params: Any, tokens: Any) -> Any:
        loss = gpt.loss_fn(params, tokens, cfg, gather if zero == 3 else None)
        return tx.pmean(loss, "data")

    if zero not in (0, 1, 3):
        raise ValueError(f"zero must be 0 (data_parallel), 1 or 3 (fully_sharded), got {zero}")
    rules = gpt_rules()
    if zero == 0:
        outer, step = tx.data_parallel(mesh=mesh), dp_step
        evaluate = tx.data_parallel(mesh=mesh, donate=False)
    elif zero == 3:
        # Only kernels and embeddings are split: the stacked biases and norms (at most
        # 4 x d_model elements per block) stay replicated. Split, each would cost a collective
        # per block for a few hundred bytes; and one whose d_model the model axis splits
        # (qkv's and up's biases) has only its layer dimension left for data, which the scan
        # over the blocks could not slice.
        small = 4 * cfg.d_model * cfg.layers + 1
        outer, step = tx.fully_sharded(mesh=mesh, min_size=small), zero3_step
        evaluate = tx.fully_sharded(mesh=mesh, min_size=small, donate=False)  # as in training
    else:  # ZeRO-1 splits the optimizer state only: evaluation is plain data parallelism
        outer, step = tx.fully_sharded(mesh=mesh, shard="optimizer"), zero1_step
        evaluate = tx.data_parallel(mesh=mesh, donate=False)
    train = outer(tx.tensor_parallel(rules)(step))
    return train, evaluate(tx.tensor_parallel(rules)(eval_step))


def validation_batches(
    valid: np.ndarray, cfg: gpt.GPTConfig, n: int, batch: int
) -> list[np.ndarray]:
    rng = np.random.default_rng(1234)  # the same windows for every run
    return [gpt.windows(valid, batch, cfg.seq_len + 1, rng) for _ in range(n)]


def make_optimizer(lr: float, steps: int) -> Any:
    """AdamW with warm-up, cosine decay and gradient clipping."""
    import optax

    import titanax as tx

    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 5 + 1), steps)
    # tx.clip_by_global_norm is optax's, with the norm of gradients split over 'data' under ZeRO.
    return optax.chain(tx.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))


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
    zero: int = 0,
) -> tuple[Any, list[float], float]:
    """Trains to ``steps`` (``zero``: see `make_steps`); returns the state, the losses of the steps run and the validation loss.

    Batch ``i`` is drawn with the seed ``(seed, i)``, so the data position is the step
    itself: with ``checkpoint_dir`` a run resumes exactly from its newest checkpoint.
    """
    import jax

    import titanax as tx

    train_data, valid_data = gpt.split(gpt.corpus())
    optimizer = make_optimizer(lr, steps)
    step, evaluate = make_steps(cfg, mesh, zero)

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
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}`` (an axis left out has size 1).

    Raises:
      MeshError: an item that is not ``name=size``, or an axis given twice.
    """
    from titanax.mesh import parse_axes

    axes = parse_axes(text)
    return {"data": axes.pop("data", 1), "model": axes.pop("model", 1), **axes}


@dataclasses.dataclass
class Config:
    """The example's settings; ``config.yaml`` beside this file holds the defaults."""

    mesh: str = "data=2,model=4"
    """Axis sizes, name=size joined by commas: data (replicas) and model (tensor parallel)."""
    devices: int = 8
    """Simulated CPU devices (under `titanax launch`: all processes' devices)."""
    steps: int = 200
    """Training steps."""
    batch_size: int = 16
    """Global batch, in sequences of seq_len + 1 bytes."""
    lr: float = 1e-3
    """AdamW's peak learning rate (warm-up, then cosine decay)."""
    layers: int = 4
    """Transformer blocks."""
    d_model: int = 256
    """Width of the residual stream."""
    heads: int = 4
    """Attention heads (split over the model axis)."""
    seq_len: int = 128
    """Context length, in bytes."""
    seed: int = 0
    """Seed of the initial parameters and the data order."""
    checkpoint_dir: str | None = None
    """Save checkpoints here; resume from the newest one found."""
    save_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    metrics: str | None = None
    """Append one JSON line per step (loss, throughput) to this file."""
    zero: int = 0
    """0: data_parallel; 3: fully_sharded (ZeRO-3); 1: optimizer state only (ZeRO-1)."""


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
    step, _ = make_steps(gcfg, mesh, cfg.zero)
    state = tx.TrainState.create(
        gpt.init(jax.random.key(cfg.seed), gcfg), make_optimizer(cfg.lr, cfg.steps)
    )
    return step, (state, np.zeros((cfg.batch_size, cfg.seq_len + 1), np.int32))


def main(argv: list[str] | None = None) -> float:
    """``train.py [--config FILE] [--set key=value ...] [--key value ...]``."""
    from titanax.launch.config import from_argv

    args = from_argv(Config, argv, default=CONFIG, description=__doc__, exit_on_error=True)

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
    say(f"GPT {cfg}; mesh {dict(mesh.shape)}; ZeRO stage {args.zero}")
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
        zero=args.zero,
    )
    say(
        f"final train loss {losses[-1] if losses else float('nan'):.4f}; validation loss {val_loss:.4f}, "
        f"perplexity {math.exp(val_loss):.2f} (bytes)"
    )
    return val_loss


if __name__ == "__main__":
    command(main)
