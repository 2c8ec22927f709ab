"""A small GPT trained with data x tensor parallelism (``tx.data_parallel`` over
``tx.tensor_parallel``) on the prose of Python's own documentation (no download).

    python examples/gpt_small_tp/train.py --mesh data=2,model=4 --steps 200
    python examples/gpt_small_tp/train.py --zero 3   # parameters and Adam state split over data
    python examples/gpt_small_tp/train.py --mesh data=2,model=1 --seq 4 --seq-len 1024
        # context parallelism: each sequence split over 4 devices, ring attention
        # (--attention ulysses: all-to-all); the same as --mesh data=2,model=1,seq=4

Settings come from ``config.yaml`` beside this file, overridden by ``--set key=value``.
"""

from __future__ import annotations

import dataclasses
import functools
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


ATTENTIONS = ("ring", "ulysses")


def attend_fn(attention: str) -> Any:
    """``tx.ring_attention`` or ``tx.ulysses_attention`` over ``seq``, causal, as ``attend``."""
    import functools

    import titanax as tx

    if attention not in ATTENTIONS:
        raise tx.PlanError(f"attention must be one of 'ring', 'ulysses'; got {attention!r}")
    fn = tx.ring_attention if attention == "ring" else tx.ulysses_attention
    return functools.partial(fn, axis="seq", causal=True)


def split_sequence(mesh: Any) -> bool:
    """Whether ``mesh`` has a ``seq`` axis: then batches are ``(inputs, targets)`` pairs,
    split over ``seq`` by ``tx.context_parallel``."""
    return "seq" in mesh.axis_names


def as_batch(tokens: np.ndarray, mesh: Any) -> Any:
    """``tokens`` (``(batch, seq_len + 1)``) as the steps on ``mesh`` take them: whole, or
    as ``(inputs, targets)`` of ``seq_len`` each, which ``context_parallel`` can split."""
    return (tokens[:, :-1], tokens[:, 1:]) if split_sequence(mesh) else tokens


def make_steps(
    cfg: gpt.GPTConfig, mesh: Any, zero: int = 0, attention: str = "ring"
) -> tuple[Any, Any]:
    """The training and evaluation steps on ``mesh`` (axes ``data``, ``model``, maybe ``seq``).

    ``zero=0``: ``data_parallel`` (state replicated over ``data``); ``zero=3``:
    ``fully_sharded`` (parameters and optimizer state split over ``data``);
    ``zero=1``: ``fully_sharded(shard="optimizer")``. All compose with
    ``tensor_parallel`` over ``model``; the collectives over ``data`` are written here.

    ZeRO-3 gathers a block at a time: the model calls the gather inside its scan over the
    stacked blocks, under ``jax.checkpoint``, so one block's whole parameters are alive at
    a time and the step's temporary memory stays below ``data_parallel``'s.

    With a ``seq`` axis, ``tx.context_parallel`` splits every sequence over it (batches are
    ``(inputs, targets)``, see `as_batch`): the attention is ``attention`` (``"ring"`` or
    ``"ulysses"``), the learned position embedding takes the global positions of the local
    tokens (``tx.context_positions``), and gradients and losses are averaged over ``seq``
    as well as ``data``.
    """
    import functools

    import jax
    import optax

    import titanax as tx

    seq = split_sequence(mesh)
    attend = attend_fn(attention) if seq else None
    axes = ("data", "seq") if seq else "data"  # the manual axes the batch is split over

    def loss_fn(params: Any, batch: Any, gather: Any = None) -> Any:
        if not seq:
            return gpt.loss_fn(params, batch, cfg, gather)
        inputs, targets = batch  # this device's chunks of the sequence
        positions = tx.context_positions(inputs.shape[1], axis="seq")  # global, for wpe
        return gpt.shifted_loss(
            params, inputs, targets, cfg, gather, attend=attend, positions=positions
        )

    def value_and_grad(params: Any, batch: Any, gather: Any = None) -> Any:
        return jax.value_and_grad(loss_fn)(params, batch, gather)

    def dp_step(state: Any, batch: Any) -> tuple[Any, dict[str, Any]]:
        loss, grads = value_and_grad(state.params, batch)
        grads = tx.pmean(grads, axes)  # the DP (and CP) reduction; TP needs none
        return state.apply_gradients(grads), {"loss": tx.pmean(loss, axes)}

    # ZeRO-3's all-gather, one block at a time; its backward pass reduce-scatters that
    # block's gradient (vjp="mean"), so value_and_grad returns this device's reduced shards.
    gather = functools.partial(tx.gather_params, axis="data", vjp="mean")

    def zero3_step(state: Any, batch: Any) -> tuple[Any, dict[str, Any]]:
        loss, grads = value_and_grad(state.params, batch, gather)
        if seq:  # the shards are averaged over data already; over seq they still differ
            grads = tx.pmean(grads, "seq")
        return state.apply_gradients(grads), {"loss": tx.pmean(loss, axes)}

    def zero1_step(state: Any, batch: Any) -> tuple[Any, dict[str, Any]]:
        loss, grads = value_and_grad(state.params, batch)
        if seq:  # average over seq first, then reduce-scatter over data
            grads = tx.pmean(grads, "seq")
        grads = tx.scatter_grads(grads, "data")  # reduce-scatter: this device's shard
        shard = tx.shard_params(state.params, "data")  # the slice it updates
        updates, opt_state = state.optimizer.update(grads, state.opt_state, shard)
        params = tx.gather_params(optax.apply_updates(shard, updates), "data")
        new = dataclasses.replace(state, params=params, opt_state=opt_state, step=state.step + 1)
        return new, {"loss": tx.pmean(loss, axes)}

    def eval_step(params: Any, batch: Any) -> Any:
        return tx.pmean(loss_fn(params, batch, gather if zero == 3 else None), axes)

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

    def inner(f: Any) -> Any:  # tensor parallel, and the sequence split over seq if asked
        tp = tx.tensor_parallel(rules)(f)
        return tx.context_parallel(tp, axis="seq") if seq else tp

    return outer(inner(step)), evaluate(inner(eval_step))


def attention_temp_bytes(
    cfg: gpt.GPTConfig, batch_size: int, mesh: Any = None, attention: str = "ring"
) -> int:
    """Temporary bytes per device of one attention call, forward and backward, compiled.

    ``q, k, v`` as one block of the model has them for ``batch_size`` sequences of
    ``cfg.seq_len`` tokens. ``mesh=None``: the model's own `gpt.causal_attention` on one
    device; otherwise ``attention`` over the ``seq`` axis of ``mesh`` under
    ``tx.context_parallel`` (and ``tx.data_parallel`` over ``data``, if ``mesh`` has it).
    The figure is XLA's ``memory_analysis().temp_size_in_bytes``: nothing runs.

    Raises:
      PlanError: ``attention`` is not ``"ring"`` or ``"ulysses"``.
    """
    import jax
    import jax.numpy as jnp

    import titanax as tx

    shape = (batch_size, cfg.seq_len, cfg.heads, cfg.d_model // cfg.heads)
    q = k = v = jnp.zeros(shape, jnp.float32)  # small: (seq, heads, head_dim), not scores

    def fwd_bwd(attend: Any, q: Any, k: Any, v: Any) -> Any:
        grads = jax.grad(lambda *qkv: jnp.sum(attend(*qkv) ** 2), argnums=(0, 1, 2))(q, k, v)
        return sum(jnp.sum(g) for g in grads)  # depends on every gradient: none is dropped

    if mesh is None:
        lowered = jax.jit(functools.partial(fwd_bwd, gpt.causal_attention)).lower(q, k, v)
    else:
        attend, axes = attend_fn(attention), ("data", "seq")

        @tx.context_parallel(axis="seq", mesh=mesh, batch_argnums=(0, 1, 2))
        def split(q: Any, k: Any, v: Any) -> Any:
            return tx.psum(fwd_bwd(attend, q, k, v), axes if "data" in mesh.axis_names else "seq")

        lowered = (
            tx.data_parallel(split, batch_argnums=(0, 1, 2)) if "data" in mesh.axis_names else split
        ).lower(q, k, v)
    return int(lowered.compile().memory_analysis().temp_size_in_bytes)


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
    attention: str = "ring",
) -> tuple[Any, list[float], float]:
    """Trains to ``steps`` (``zero``, ``attention``: see `make_steps`); returns the state, the losses of the steps run and the validation loss.

    Batch ``i`` is drawn with the seed ``(seed, i)``, so the data position is the step
    itself: with ``checkpoint_dir`` a run resumes exactly from its newest checkpoint.
    """
    import jax

    import titanax as tx

    train_data, valid_data = gpt.split(gpt.corpus())
    optimizer = make_optimizer(lr, steps)
    step, evaluate = make_steps(cfg, mesh, zero, attention)

    def batch(i: int) -> Any:  # the same global batch everywhere; each process its rows
        rng = np.random.default_rng((seed, i))
        return mine(as_batch(gpt.windows(train_data, batch_size, cfg.seq_len + 1, rng), mesh))

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
    val_loss = float(
        np.mean([float(evaluate(state.params, mine(as_batch(b, mesh)))) for b in valid])
    )
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
    seq: int = 1
    """Devices each sequence is split over (context parallelism): adds seq=N to the mesh."""
    attention: str = "ring"
    """Attention across the seq axis: ring (ppermute of K/V) or ulysses (all_to_all)."""


CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.yaml")


def build(cfg: Config) -> tuple[Any, tuple[Any, ...]]:
    """The training step and example arguments, for ``titanax explain`` (nothing trains)."""
    import jax

    import titanax as tx

    axes = mesh_axes(cfg)
    mesh = tx.mesh(devices=jax.devices()[: math.prod(axes.values())], **axes)
    gcfg = gpt.GPTConfig(
        seq_len=cfg.seq_len, d_model=cfg.d_model, heads=cfg.heads, layers=cfg.layers
    )
    step, _ = make_steps(gcfg, mesh, cfg.zero, cfg.attention)
    state = tx.TrainState.create(
        gpt.init(jax.random.key(cfg.seed), gcfg), make_optimizer(cfg.lr, cfg.steps)
    )
    return step, (state, as_batch(np.zeros((cfg.batch_size, cfg.seq_len + 1), np.int32), mesh))


def mesh_axes(cfg: Config) -> dict[str, int]:
    """The mesh axes of ``cfg``: ``--mesh``, with ``seq=N`` added by ``--seq N``.

    Raises:
      MeshError: ``--mesh`` is malformed, or names a different ``seq`` size than ``--seq``.
    """
    from titanax.errors import MeshError

    axes = parse_mesh(cfg.mesh)
    if cfg.seq != 1:
        if axes.get("seq", cfg.seq) != cfg.seq:
            raise MeshError(
                f"--seq {cfg.seq} and --mesh {cfg.mesh!r} (seq={axes['seq']}) disagree; "
                "give the sequence axis once."
            )
        axes["seq"] = cfg.seq
    return axes


def main(argv: list[str] | None = None) -> float:
    """``train.py [--config FILE] [--set key=value ...] [--key value ...]``."""
    from titanax.launch.config import from_argv

    args = from_argv(Config, argv, default=CONFIG, description=__doc__, exit_on_error=True)

    import jax

    start(args.devices)  # devices, and the other processes under `titanax launch`
    import titanax as tx

    axes = mesh_axes(args)
    n = math.prod(axes.values())
    if len(jax.devices()) < n:
        raise SystemExit(f"mesh {args.mesh} needs {n} devices; {len(jax.devices())} available")
    mesh = tx.mesh(devices=jax.devices()[:n], **axes)
    cfg = gpt.GPTConfig(
        seq_len=args.seq_len, d_model=args.d_model, heads=args.heads, layers=args.layers
    )
    cp = f"; {args.attention} attention over seq" if split_sequence(mesh) else ""
    say(f"GPT {cfg}; mesh {dict(mesh.shape)}; ZeRO stage {args.zero}{cp}")
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
        attention=args.attention,
    )
    say(
        f"final train loss {losses[-1] if losses else float('nan'):.4f}; validation loss {val_loss:.4f}, "
        f"perplexity {math.exp(val_loss):.2f} (bytes)"
    )
    return val_loss


if __name__ == "__main__":
    command(main)
