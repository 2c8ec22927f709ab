"""A small GPT in pure JAX: parameters are a plain pytree, the model a pure function.

Kernels are stored ``(d_in, d_out)``. The attention's q, k and v come from one fused
projection stored ``(d_model, 3, d_model)``: split over heads on its last dimension, it
is column-parallel with a single input gradient (one all-reduce backward, not three),
as ``tx.rules.megatron_attention`` lays it out.

The blocks are stacked: each leaf of ``params["h"]`` has a leading layer dimension, and
`loss_fn` runs them with one ``lax.scan``. That is the layout ``tx.pipeline`` takes as stage
rows, and the one ZeRO-3 needs to gather one block at a time (see `loss_fn`).

The attention itself is pluggable: ``attend(q, k, v)`` on ``(batch, seq, heads, head_dim)``
arrays (default `causal_attention`, on the whole sequence). Under ``tx.context_parallel``
each device holds part of the sequence: pass ``tx.ring_attention`` or
``tx.ulysses_attention`` as ``attend`` and the global positions of the local tokens
(``tx.context_positions``) as ``positions``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 256  # bytes
    seq_len: int = 128
    d_model: int = 256
    heads: int = 4
    layers: int = 4
    mlp_ratio: int = 4


def _dense(key: Any, n_in: int, n_out: int, scale: float = 0.02) -> Params:
    return {
        "kernel": jax.random.normal(key, (n_in, n_out), jnp.float32) * scale,
        "bias": jnp.zeros((n_out,), jnp.float32),
    }


def _norm(d: int) -> Params:
    return {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}


def init_block(key: Any, cfg: GPTConfig) -> Params:
    d, hidden = cfg.d_model, cfg.mlp_ratio * cfg.d_model
    k = jax.random.split(key, 6)
    resid = 0.02 / np.sqrt(2 * cfg.layers)  # GPT-2's scaled init of residual projections
    return {
        "ln1": _norm(d),
        "attn": {
            "qkv": {
                "kernel": jax.random.normal(k[0], (d, 3, d), jnp.float32) * 0.02,
                "bias": jnp.zeros((3, d), jnp.float32),
            },
            "proj": _dense(k[3], d, d, resid),
        },
        "ln2": _norm(d),
        "mlp": {"up": _dense(k[4], d, hidden), "down": _dense(k[5], hidden, d, resid)},
    }


def init(key: Any, cfg: GPTConfig) -> Params:
    k_wte, k_wpe, *k_blocks = jax.random.split(key, 2 + cfg.layers)
    return {
        "wte": jax.random.normal(k_wte, (cfg.vocab, cfg.d_model), jnp.float32) * 0.02,
        "wpe": jax.random.normal(k_wpe, (cfg.seq_len, cfg.d_model), jnp.float32) * 0.01,
        "h": jax.tree.map(lambda *xs: jnp.stack(xs), *[init_block(k, cfg) for k in k_blocks]),
        "ln_f": _norm(cfg.d_model),
    }


def layer_norm(p: Params, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def dense(p: Params, x: jax.Array) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax attention on the whole sequence; ``(batch, seq, heads, head_dim)``."""
    t = q.shape[1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def attention(p: Params, x: jax.Array, heads: int, attend: Attend | None = None) -> jax.Array:
    b, t, d = x.shape
    qkv = jnp.einsum("btd,dke->btke", x, p["qkv"]["kernel"]) + p["qkv"]["bias"]
    q, k, v = (qkv[:, :, i].reshape(b, t, heads, d // heads) for i in range(3))
    out = (attend or causal_attention)(q, k, v)
    return dense(p["proj"], out.reshape(b, t, d))


def block(p: Params, x: jax.Array, heads: int, attend: Attend | None = None) -> jax.Array:
    """One pre-norm transformer block; keeps the activation's shape (a pipeline stage)."""
    x = x + attention(p["attn"], layer_norm(p["ln1"], x), heads, attend)
    h = jax.nn.gelu(dense(p["mlp"]["up"], layer_norm(p["ln2"], x)))
    return x + dense(p["mlp"]["down"], h)


def embed(params: Params, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Token plus learned position embedding; ``positions`` default ``0 .. seq - 1``."""
    pos = params["wpe"][: tokens.shape[1]] if positions is None else params["wpe"][positions]
    return params["wte"][tokens] + pos


def head_loss(params: Params, x: jax.Array, targets: jax.Array) -> jax.Array:
    """Final norm, tied output embedding and mean next-byte cross-entropy."""
    logits = layer_norm(params["ln_f"], x) @ params["wte"].T
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()


def blocks(
    h: Params,
    x: jax.Array,
    heads: int,
    gather: Callable[[Params], Params] | None = None,
    attend: Attend | None = None,
) -> jax.Array:
    """The stacked blocks ``h`` applied in order: one ``lax.scan`` over the layer dimension.

    With ``gather``, each block's parameters are ``gather(p)`` inside the scan, under
    ``jax.checkpoint``: the backward pass calls ``gather`` again for its block instead of
    keeping it, so one block's gathered parameters are alive at a time (ZeRO-3).
    """

    def layer(x: jax.Array, p: Params) -> tuple[jax.Array, None]:
        return block(p if gather is None else gather(p), x, heads, attend), None

    x, _ = jax.lax.scan(layer if gather is None else jax.checkpoint(layer), x, h)
    return x


def loss_fn(
    params: Params,
    tokens: jax.Array,
    cfg: GPTConfig,
    gather: Callable[[Params], Params] | None = None,
) -> jax.Array:
    """Next-byte loss of ``tokens`` (``(batch, seq_len + 1)`` bytes).

    ``gather``: called on the parameters before they are used, one block at a time inside
    the scan (see `blocks`) and once on the others (embeddings, final norm). Under
    ``tx.fully_sharded`` it is ``tx.gather_params`` with ``vjp="mean"``; ``None``: the
    parameters are whole already.
    """
    return shifted_loss(params, tokens[:, :-1], tokens[:, 1:], cfg, gather)


def shifted_loss(
    params: Params,
    inputs: jax.Array,
    targets: jax.Array,
    cfg: GPTConfig,
    gather: Callable[[Params], Params] | None = None,
    *,
    attend: Attend | None = None,
    positions: jax.Array | None = None,
) -> jax.Array:
    """Mean loss of predicting ``targets`` from ``inputs`` (both ``(batch, seq)``).

    The form `loss_fn` takes once the sequence is split (``tx.context_parallel``): inputs
    and targets are separate batch leaves of the same length, ``attend`` is the attention
    across devices and ``positions`` the global positions of the local tokens. The loss
    is the mean over the local tokens; averaged over the devices of the sequence axis it
    is the mean over the whole sequence.
    """
    rest = {k: v for k, v in params.items() if k != "h"}
    rest = rest if gather is None else gather(rest)
    x = embed(rest, inputs, positions)
    x = blocks(params["h"], x, cfg.heads, gather, attend)
    return head_loss(rest, x, targets)


def corpus() -> np.ndarray:
    """The prose of Python's own documentation topics (``pydoc_data``), as bytes."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def split(data: np.ndarray, valid_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(data) * (1 - valid_fraction))
    return data[:cut], data[cut:]


def windows(data: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``batch`` random windows of ``length`` bytes, as int32."""
    starts = rng.integers(0, len(data) - length, size=batch)
    return np.stack([data[s : s + length] for s in starts]).astype(np.int32)
