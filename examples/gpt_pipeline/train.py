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

from examples.common import mine, run, say, start
from examples.gpt_small_tp import model as gpt
from examples.gpt_small_tp.train import make_optimizer, validation_batches


def to_pipeline(params: gpt.Params) -> gpt.Params:
    """``h`` (a list of blocks) becomes ``blocks``: each leaf stacked on a leading stage axis."""
    import jax
    import jax.numpy as jnp

    out = {k: v for k, v in params.items() if k != "h"}
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *params["h"])
    return out


def from_pipeline(params: gpt.Params) -> gpt.Params:
    import jax

    n = jax.tree.leaves(params["blocks"])[0].shape[0]
    out = {k: v for k, v in params.items() if k != "blocks"}
    out["h"] = [jax.tree.map(lambda a, i=i: a[i], params["blocks"]) for i in range(n)]
    return out


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

    ``zero=3``: ``fully_sharded`` over ``data`` instead of ``data_parallel``; each
    stage's blocks, and their Adam moments, are also split over ``data``.
    """
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
        p = tx.gather_params(state.params, "data") if zero else state.params
        x, embed_vjp = jax.vjp(
            lambda e: gpt.embed(e, tokens[:, :-1]), {"wte": p["wte"], "wpe": p["wpe"]}
        )
        head = {"ln_f": p["ln_f"], "wte": p["wte"]}
        loss, (g_blocks, g_x, g_head) = pipe(p["blocks"], x, tokens[:, 1:], head)
        (g_embed,) = embed_vjp(g_x)  # the pipeline's input gradient flows on into the embedding
        grads = {
            "blocks": g_blocks,
            "ln_f": g_head["ln_f"],
            "wpe": g_embed["wpe"],
            "wte": g_embed["wte"] + g_head["wte"],  # tied: used by the embedding and the head
        }
        # the DP reduction: whole gradients averaged, or (ZeRO-3) each device keeps its shard
        grads = tx.scatter_grads(grads, "data") if zero else tx.pmean(grads, "data")
        return state.apply_gradients(grads), {"loss": tx.pmean(loss, "data")}

    def eval_step(params: Any, tokens: Any) -> Any:
        params = tx.gather_params(params, "data") if zero else params
        return tx.pmean(gpt.loss_fn(from_pipeline(params), tokens, cfg), "data")

    if zero not in (0, 3):
        raise ValueError(f"zero must be 0 (data_parallel) or 3 (fully_sharded), got {zero}")

    # Each stage's blocks (and their optimizer moments) live on their stage's devices.
    stage_layout = tx.Rules((r"blocks/", P("stage")), (r".*", P()))
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
    params = to_pipeline(gpt.init(jax.random.key(seed), cfg))
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

    schedule: str = "1f1b"  # gpipe, 1f1b, interleaved_1f1b, zero_bubble
    data: int = 2  # data-parallel replicas
    stages: int = 4  # devices along the stage axis
    virtual_stages: int = 1  # stages per device (interleaved_1f1b: 2 or more)
    microbatches: int = 4  # per replica and step
    devices: int = 8  # simulated CPU devices
    steps: int = 150
    batch_size: int = 16  # global batch (sequences)
    lr: float = 1e-3
    d_model: int = 256
    heads: int = 4
    seq_len: int = 128
    seed: int = 0
    zero: int = 0  # 0: data_parallel over data; 3: fully_sharded (ZeRO-3)


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
        to_pipeline(gpt.init(jax.random.key(cfg.seed), gcfg)), make_optimizer(cfg.lr, cfg.steps)
    )
    return step, (state, np.zeros((cfg.batch_size, cfg.seq_len + 1), np.int32))


def main(argv: list[str] | None = None) -> float:
    """``train.py [--config FILE] [--set key=value ...] [--key value ...]``."""
    import titanax.parallel.schedules as schedules
    from titanax.launch.config import from_argv

    args = from_argv(Config, sys.argv[1:] if argv is None else argv, default=CONFIG)
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
    main()
