"""The GPT of ``gpt_small_tp`` with its blocks split into pipeline stages: the embedding
runs before the pipeline, the head and loss after its last stage, and ``tx.pipeline``
runs the blocks with a real schedule (``--schedule``, default 1F1B) inside a
``tx.data_parallel`` step, on a ``data=2 x stage=4`` mesh.

    python examples/gpt_pipeline/train.py --schedule 1f1b --steps 150
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

from examples.common import command, mine, run, say, start
from examples.gpt_small_tp import model as gpt
from examples.gpt_small_tp.train import make_optimizer, validation_batches


def make_steps(
    cfg: gpt.GPTConfig,
    mesh: Any,
    *,
    schedule: str,
    microbatches: int,
    virtual_stages: int = 1,
    zero: int = 0,
) -> tuple[Any, Any]:
    """The DP x PP training step and the evaluation step (which needs no pipeline).

    The model's stacked blocks (``params["h"]``, a leading layer dimension) are the
    pipeline's stage rows as they are: one block per model stage.

    ``zero=3``: ``fully_sharded`` over ``data`` instead of ``data_parallel``; each
    stage's blocks, and their Adam moments, are also split over ``data``. The step
    gathers them once, at its top: a device's stage rows are its own blocks only (one
    per virtual stage), so that is already a block at a time, and every microbatch's
    forward and backward pass reuse them (a gather inside the stage would repeat the
    all-gather and reduce-scatter for each microbatch).
    """
    import functools

    import jax
    from jax.sharding import PartitionSpec as P

    import titanax as tx

    pipe = tx.pipeline(
        lambda block, x: gpt.block(block, x, cfg.heads),
        schedule=schedule,
        microbatches=microbatches,
        virtual_stages=virtual_stages,
        loss=gpt.head_loss,  # head_loss({"ln_f", "wte"}, y, targets)
    )

    def train_step(state: Any, tokens: Any) -> tuple[Any, dict[str, Any]]:
        # ZeRO-3: each device gathers its stage's blocks over data (not the other stages')
        p = tx.gather_params(state.params, "data") if zero else state.params
        x, embed_vjp = jax.vjp(
            lambda e: gpt.embed(e, tokens[:, :-1]), {"wte": p["wte"], "wpe": p["wpe"]}
        )
        head = {"ln_f": p["ln_f"], "wte": p["wte"]}
        loss, (g_blocks, g_x, g_head) = pipe(p["h"], x, tokens[:, 1:], head)
        (g_embed,) = embed_vjp(g_x)  # the pipeline's input gradient flows on into the embedding
        grads = {
            "h": g_blocks,
            "ln_f": g_head["ln_f"],
            "wpe": g_embed["wpe"],
            "wte": g_embed["wte"] + g_head["wte"],  # tied: used by the embedding and the head
        }
        # the DP reduction: whole gradients averaged, or (ZeRO-3) each device keeps its shard
        grads = tx.scatter_grads(grads, "data") if zero else tx.pmean(grads, "data")
        return state.apply_gradients(grads), {"loss": tx.pmean(loss, "data")}

    def eval_step(params: Any, tokens: Any) -> Any:
        gather = functools.partial(tx.gather_params, axis="data") if zero else None
        return tx.pmean(gpt.loss_fn(params, tokens, cfg, gather), "data")  # a block at a time

    if zero not in (0, 3):
        raise ValueError(f"zero must be 0 (data_parallel) or 3 (fully_sharded), got {zero}")

    # Each stage's blocks (and their optimizer moments) live on their stage's devices.
    stage_layout = tx.Rules((r"(^|/)h/", P("stage")), (r".*", P()))
    data = tx.fully_sharded if zero else tx.data_parallel
    train = data(tx.tensor_parallel(stage_layout, axis="stage")(train_step), mesh=mesh)
    evaluate = data(
        tx.tensor_parallel(stage_layout, axis="stage")(eval_step), mesh=mesh, donate=False
    )
    return train, evaluate


def train(
    cfg: gpt.GPTConfig,
    mesh: Any,
    *,
    steps: int,
    schedule: str = "1f1b",
    microbatches: int = 4,
    virtual_stages: int = 1,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    eval_batches: int = 4,
    progress: bool = False,
    zero: int = 0,
) -> tuple[Any, list[float], float]:
    """Trains for ``steps``; returns the state, the training losses and the validation loss."""
    import jax

    import titanax as tx

    train_data, valid_data = gpt.split(gpt.corpus())
    optimizer = make_optimizer(lr, steps)
    params = gpt.init(jax.random.key(seed), cfg)
    state = tx.TrainState.create(params, optimizer)
    step, evaluate = make_steps(
        cfg,
        mesh,
        schedule=schedule,
        microbatches=microbatches,
        virtual_stages=virtual_stages,
        zero=zero,
    )
    state, losses = run(
        step,
        state,
        lambda i: mine(
            gpt.windows(train_data, batch_size, cfg.seq_len + 1, np.random.default_rng((seed, i)))
        ),
        steps,
        desc=f"train ({schedule})" if progress else None,
    )
    valid = validation_batches(valid_data, cfg, eval_batches, batch_size)
    val_loss = float(np.mean([float(evaluate(state.params, mine(b))) for b in valid]))
    return state, losses, val_loss


@dataclasses.dataclass
class Config:
    """The example's settings; ``config.yaml`` beside this file holds the defaults."""

    schedule: str = "1f1b"
    """Pipeline schedule: gpipe, 1f1b, interleaved_1f1b, zero_bubble or zero_bubble_v."""
    data: int = 2
    """Data-parallel replicas."""
    stages: int = 4
    """Devices along the stage axis (one GPT block per stage)."""
    virtual_stages: int = 1
    """Stages per device (interleaved_1f1b: 2 or more)."""
    microbatches: int = 4
    """Microbatches per replica and step."""
    devices: int = 8
    """Simulated CPU devices (under `titanax launch`: all processes' devices)."""
    steps: int = 150
    """Training steps."""
    batch_size: int = 16
    """Global batch, in sequences of seq_len + 1 bytes."""
    lr: float = 1e-3
    """AdamW's peak learning rate (warm-up, then cosine decay)."""
    d_model: int = 256
    """Width of the residual stream."""
    heads: int = 4
    """Attention heads."""
    seq_len: int = 128
    """Context length, in bytes."""
    seed: int = 0
    """Seed of the initial parameters and the data order."""
    zero: int = 0
    """0: data_parallel over data; 3: fully_sharded (ZeRO-3)."""


CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.yaml")


def build(cfg: Config) -> tuple[Any, tuple[Any, ...]]:
    """The training step and example arguments, for ``titanax explain`` (nothing trains)."""
    import jax

    import titanax as tx

    v = max(cfg.virtual_stages, 2) if cfg.schedule == "interleaved_1f1b" else cfg.virtual_stages
    mesh = tx.mesh(devices=jax.devices()[: cfg.data * cfg.stages], data=cfg.data, stage=cfg.stages)
    gcfg = gpt.GPTConfig(
        seq_len=cfg.seq_len, d_model=cfg.d_model, heads=cfg.heads, layers=cfg.stages * v
    )
    step, _ = make_steps(
        gcfg,
        mesh,
        schedule=cfg.schedule,
        microbatches=cfg.microbatches,
        virtual_stages=v,
        zero=cfg.zero,
    )
    state = tx.TrainState.create(
        gpt.init(jax.random.key(cfg.seed), gcfg), make_optimizer(cfg.lr, cfg.steps)
    )
    return step, (state, np.zeros((cfg.batch_size, cfg.seq_len + 1), np.int32))


def main(argv: list[str] | None = None) -> float:
    """``train.py [--config FILE] [--set key=value ...] [--key value ...]``."""
    import titanax.parallel.schedules as schedules
    from titanax.launch.config import from_argv

    args = from_argv(Config, argv, default=CONFIG, description=__doc__, exit_on_error=True)
    if args.schedule == "interleaved_1f1b" and args.virtual_stages < 2:
        args.virtual_stages = 2

    import jax

    start(args.devices)  # devices, and the other processes under `titanax launch`
    import titanax as tx

    n = args.data * args.stages
    if len(jax.devices()) < n:
        raise SystemExit(f"data={args.data} x stages={args.stages} needs {n} devices")
    mesh = tx.mesh(devices=jax.devices()[:n], data=args.data, stage=args.stages)
    layers = args.stages * args.virtual_stages  # one block per stage
    cfg = gpt.GPTConfig(seq_len=args.seq_len, d_model=args.d_model, heads=args.heads, layers=layers)
    s = schedules.get(
        args.schedule,
        stages=args.stages,
        microbatches=args.microbatches,
        virtual_stages=args.virtual_stages,
    )
    say(
        f"GPT {cfg}; mesh {dict(mesh.shape)}; {args.schedule}: bubble "
        f"{s.bubble_fraction:.3f}, activations held per device {s.peak_in_flight}"
    )
    _, losses, val_loss = train(
        cfg,
        mesh,
        steps=args.steps,
        schedule=args.schedule,
        microbatches=args.microbatches,
        virtual_stages=args.virtual_stages,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=True,
        zero=args.zero,
    )
    say(
        f"final train loss {losses[-1]:.4f}; validation loss {val_loss:.4f}, "
        f"perplexity {math.exp(val_loss):.2f} (bytes)"
    )
    return val_loss


if __name__ == "__main__":
    command(main)
