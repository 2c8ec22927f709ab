"""Llama trained from a YAML config whose mesh selects the parallelism: data parallel,
ZeRO-3 (fsdp), tensor parallel (model), pipeline (stage), and their compositions.

    python examples/llama/train.py                                  # config.yaml: data=8
    python examples/llama/train.py --config examples/llama/configs/fsdp_tp.yaml
    python examples/llama/train.py --mesh data=2,stage=4 --steps 50
    python examples/llama/train.py --quick                          # tiny model, few steps

Settings come from ``config.yaml`` beside this file (or ``--config FILE``), overridden by
``--set key=value`` or ``--key value`` (model sizes: ``--set model.hidden_size=512``).
The data is the prose of Python's own documentation (no download), byte-level unless
``tokenizer`` names a ``tokenizer.json``.
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

from examples.common import Checkpoints, command, mine, say, start
from examples.llama.model import LlamaConfig


@dataclasses.dataclass
class Config:
    """The example's settings; ``config.yaml`` beside this file holds the defaults."""

    model: LlamaConfig = dataclasses.field(
        default_factory=lambda: LlamaConfig(
            hidden_size=128, intermediate_size=352, num_key_value_heads=2
        )
    )
    """Model sizes, with Hugging Face's config.json names (hf_checkpoint's config wins)."""
    mesh: str = "data=8"
    """Axis sizes name=size joined by commas; axes data, fsdp (ZeRO-3), model (tensor), stage (pipeline)."""
    devices: int = 8
    """Simulated CPU devices (under `titanax launch`: all processes' devices)."""
    steps: int = 100
    """Optimizer updates."""
    batch_size: int = 16
    """Global batch of one update, in sequences of seq_len + 1 tokens (split into `accumulate` calls)."""
    seq_len: int = 128
    """Context length, in tokens."""
    lr: float = 3e-3
    """Peak learning rate of AdamW (linear warm-up, then cosine decay to lr / 10)."""
    warmup: int = 10
    """Warm-up updates."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay (kernels and embeddings; not the norms)."""
    clip: float = 1.0
    """Clip gradients to this global norm."""
    accumulate: int = 1
    """Gradient accumulation: calls per update (optax.MultiSteps)."""
    dtype: str = "float32"
    """Compute dtype: float32, or bfloat16 (float32 master weights, norms, softmax and loss)."""
    schedule: str = "1f1b"
    """Pipeline schedule (with a stage axis; one model stage per device): gpipe, 1f1b or zero_bubble."""
    microbatches: int = 4
    """Pipeline microbatches per call and replica."""
    eval_every: int = 50
    """Evaluate every this many updates (0: at the end only)."""
    eval_batches: int = 4
    """Validation batches per evaluation (0: no evaluation)."""
    save_every: int = 0
    """Updates between checkpoints (0: only at the end; needs checkpoint_dir)."""
    checkpoint_dir: str | None = None
    """Save checkpoints here; resume from the newest one found."""
    metrics: str | None = None
    """Append one JSON line per update (loss, tokens/s, MFU where the device peak is known)."""
    tensorboard: str | None = None
    """Write the same metrics as TensorBoard scalars to this directory (needs tensorboardX)."""
    hf_checkpoint: str | None = None
    """Hugging Face Llama directory (config.json + safetensors) to start from."""
    export_hf: str | None = None
    """Save the trained weights here in Hugging Face's format."""
    tokenizer: str | None = None
    """A tokenizer.json; default: bytes (vocab 256)."""
    seed: int = 0
    """Seed of the initial parameters and the data order."""
    quick: bool = False
    """Preset: a tiny model and a few steps (a smoke test)."""


QUICK = {"steps": 4, "batch_size": 8, "seq_len": 32, "warmup": 1, "eval_batches": 1}
QUICK_MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.yaml")


def make_optimizer(args: Config) -> Any:
    """AdamW with warm-up and cosine decay, gradient clipping, and accumulation.

    The schedule counts updates; ``tx.clip_by_global_norm`` sums the squares of shards over
    ``fsdp`` (outside ``fully_sharded`` it is optax's). Both sit inside ``MultiSteps``, so
    they see the accumulated mean gradient, as one big-batch step would.
    """
    import jax
    import optax

    import titanax as tx

    lr = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, args.warmup, max(args.steps, args.warmup + 1), end_value=args.lr / 10
    )
    decay = lambda params: jax.tree.map_with_path(  # noqa: E731
        lambda path, _: path[-1].key != "weight", params
    )
    opt = optax.chain(
        tx.clip_by_global_norm(args.clip, axis="fsdp"),
        optax.adamw(lr, weight_decay=args.weight_decay, mask=decay),
    )
    return optax.MultiSteps(opt, every_k_schedule=args.accumulate) if args.accumulate > 1 else opt


def hf_config(args: Config) -> LlamaConfig:
    """The model's sizes: ``hf_checkpoint``'s ``config.json`` if given, else ``args.model``."""
    if not args.hf_checkpoint:
        return args.model
    from examples.llama import hf

    return hf.read_config(args.hf_checkpoint)


def load_data(args: Config, cfg: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(train, valid)``: the corpus as token ids (bytes, or ``args.tokenizer``'s), split 90/10.

    Raises:
      ConfigError: a tokenizer with more ids than ``cfg.vocab_size``.
    """
    from examples.gpt_small_tp.model import corpus, split

    if not args.tokenizer:
        return split(corpus().astype(np.int32))
    from examples.llama import tokens

    tok = tokens.load(args.tokenizer)
    tokens.check_vocab(tok, cfg)
    return split(tokens.corpus_tokens(tok))


def windows(data: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``batch`` random windows of ``length`` tokens, as int32."""
    starts = rng.integers(0, len(data) - length, size=batch)
    return np.stack([data[s : s + length] for s in starts]).astype(np.int32)


def train(args: Config, mesh: Any) -> tuple[Any, list[float], float]:
    """Trains ``args.steps`` updates on ``mesh``; returns the state, the loss of every update
    run and the final validation loss.

    Update ``j`` draws its ``batch_size`` rows with the seed ``(seed, j)`` and runs them as
    ``accumulate`` calls of equal slices, so the data position is the update number: with
    ``checkpoint_dir`` a run resumes exactly where its newest checkpoint left off.
    """
    import jax
    import jax.numpy as jnp

    import titanax as tx
    from examples.llama import model as llama
    from examples.llama.steps import make_steps

    cfg = hf_config(args)
    train_data, valid_data = load_data(args, cfg)
    k, rows = args.accumulate, args.batch_size // args.accumulate
    if rows * k != args.batch_size:
        raise tx.errors.ConfigError(
            f"batch_size={args.batch_size} does not divide by accumulate={k}"
        )
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(args.dtype)
    if dtype is None:
        raise tx.errors.ConfigError(f"dtype={args.dtype!r}: use float32 or bfloat16")
    step, evaluate = make_steps(
        cfg, mesh, dtype=dtype, schedule=args.schedule, microbatches=args.microbatches
    )

    def batch(j: int) -> np.ndarray:  # the same global batch everywhere
        return windows(
            train_data, args.batch_size, args.seq_len + 1, np.random.default_rng((args.seed, j))
        )

    optimizer = make_optimizer(args)
    params = jax.jit(llama.init, static_argnums=1)(jax.random.key(args.seed), cfg)
    state = step.place(tx.TrainState.create(params, optimizer), batch(0)[:rows])[0]
    if args.hf_checkpoint:
        from examples.llama import hf

        shardings = jax.tree.map(lambda a: a.sharding, state.params)  # the step's layout
        params = hf.load_params(args.hf_checkpoint, cfg, shardings, dtype=jnp.float32)
        state = step.place(tx.TrainState.create(params, optimizer), batch(0)[:rows])[0]
    ckpt = Checkpoints(args.checkpoint_dir, args.save_every, lambda: None)
    state, first, _ = ckpt.resume(state)

    rng = np.random.default_rng(1234)  # the same validation windows for every run
    valid = [windows(valid_data, rows, args.seq_len + 1, rng) for _ in range(args.eval_batches)]

    def validation_loss() -> float:
        if not valid:
            return float("nan")
        return float(np.mean([float(evaluate(state.params, mine(b))) for b in valid]))

    tokens = args.batch_size * args.seq_len
    throughput = tx.metrics.Throughput(
        flops_per_step=llama.flops_per_token(cfg, args.seq_len) * tokens / mesh.devices.size,
        examples_per_step=args.batch_size,
        tokens_per_step=tokens,
    )
    sinks: list[Any] = [tx.metrics.JSONL(args.metrics)] if args.metrics else []
    if args.tensorboard:
        sinks.append(tx.metrics.TensorBoard(args.tensorboard))
    logger = tx.metrics.Logger(*sinks)
    losses: list[float] = []
    for j in range(first, args.steps):
        full = batch(j)
        micro = []
        for m in range(k):  # one optimizer update; MultiSteps applies it on the k-th call
            state, metrics = step(state, mine(full[m * rows : (m + 1) * rows]))
            micro.append(metrics["loss"])
        # equal slices: the mean is the whole batch's loss. float() waits for the update,
        # so that the clock read next measures compute, not dispatch.
        losses.append(float(sum(micro) / k))
        values = {"loss": losses[-1], **throughput.measure(j + 1)}
        if valid and args.eval_every and (j + 1) % args.eval_every == 0 and j + 1 < args.steps:
            values["eval_loss"] = validation_loss()
            throughput.start(j + 1)  # the next rate excludes the evaluation
        logger.log(j + 1, values)
        if j % 10 == 0 or j + 1 == args.steps:
            say(f"update {j + 1}/{args.steps}: loss {losses[-1]:.4f}")
        ckpt(j + 1, state, args.steps)
    ckpt.close()
    val_loss = validation_loss()
    if valid:
        logger.log(args.steps, {"eval_loss": val_loss}, force=True)
    logger.close()
    if args.export_hf:
        from examples.llama import hf

        hf.save_params(state.params, cfg, args.export_hf)  # a leaf at a time to the host
        say(f"saved Hugging Face weights to {args.export_hf}")
    return state, losses, val_loss


def configure(argv: list[str] | None) -> Config:
    """The settings from the command line (a bare ``--quick``, a bool field, means true)."""
    from titanax.launch.config import from_argv

    argv = list(sys.argv[1:] if argv is None else argv)
    args = from_argv(Config, argv, default=CONFIG, description=__doc__, exit_on_error=True)
    if args.quick:  # the preset wins over the file, not over what the command line says
        given = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
        given |= {a.split("=")[0] for a in argv if "=" in a and not a.startswith("--")}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
        sizes = {k: v for k, v in QUICK_MODEL.items() if f"model.{k}" not in given}
        if "model.head_dim" not in given:  # hidden_size // heads again, not the file's
            sizes["head_dim"] = None
        args.model = dataclasses.replace(args.model, **sizes)
    return args


def main(argv: list[str] | None = None) -> float:
    """``train.py [--config FILE] [--set key=value ...] [--key value ...]``."""
    args = configure(argv)

    import jax

    start(args.devices)  # devices, and the other processes under `titanax launch`
    import titanax as tx
    from examples.llama.steps import make_mesh, parse_mesh

    sizes = parse_mesh(args.mesh)
    n = math.prod(sizes.values())
    if len(jax.devices()) < n:
        raise tx.MeshError(f"mesh {args.mesh} needs {n} devices; {len(jax.devices())} available")
    mesh = make_mesh(sizes, jax.devices())
    say(
        f"Llama {hf_config(args)}; mesh {dict(mesh.shape)}; {args.dtype}; accumulate {args.accumulate}"
    )
    _, losses, val_loss = train(args, mesh)
    valid = f"validation loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}"
    say(
        f"final train loss {losses[-1] if losses else float('nan'):.4f}; "
        + (valid if math.isfinite(val_loss) else "no validation (eval_batches=0)")
        + ("" if tx.metrics.peak_flops() else "; MFU n/a (no known peak FLOP/s for this device)")
    )
    return val_loss


if __name__ == "__main__":
    command(main)
