"""Llama in pure JAX: parameters are a plain dict pytree, the model a pure function.

The parameter names follow Hugging Face's Flax Llama (``FlaxLlamaForCausalLM``), with the
decoder layers **stacked** on a leading layer dimension ``L`` (no layer index in the path)::

    params = {
      "model": {
        "embed_tokens": {"embedding": (V, D)},
        "layers": {                                   # every leaf has leading dim L
          "input_layernorm": {"weight": (L, D)},
          "self_attn": {"q_proj": {"kernel": (L, D, H*hd)}, "k_proj": {"kernel": (L, D, KV*hd)},
                        "v_proj": {"kernel": (L, D, KV*hd)}, "o_proj": {"kernel": (L, H*hd, D)}},
          "post_attention_layernorm": {"weight": (L, D)},
          "mlp": {"gate_proj": {"kernel": (L, D, F)}, "up_proj": {"kernel": (L, D, F)},
                  "down_proj": {"kernel": (L, F, D)}},
        },
        "norm": {"weight": (D,)},
      },
      "lm_head": {"kernel": (D, V)},   # absent when cfg.tie_word_embeddings
    }

Kernels are ``(d_in, d_out)``; there are no biases. The stacked layers run with one
``lax.scan``: the layout ``tx.pipeline`` takes as stage rows, and the one ZeRO-3 needs to
gather one layer at a time (``gather=``).

RoPE rotates **interleaved pairs** (Meta's original Llama, torchtitan): dimensions
``(2i, 2i+1)`` of each head turn together by ``pos * theta**(-2i/hd)``. Hugging Face's
checkpoints use "rotate_half" with permuted q/k projection rows; ``examples/llama/hf.py``
undoes that permutation on import.

Mixed precision (``dtype=jnp.bfloat16``): the float32 master parameters are cast to
``dtype`` where the matmuls use them; RMSNorm, RoPE angles, the softmax and the loss are
float32; the logits come back float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from titanax.errors import ConfigError

Params = dict[str, Any]
Gather = Callable[[Params], Params]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama's sizes, with Hugging Face's ``config.json`` field names.

    ``num_key_value_heads=None`` means ``num_attention_heads`` (no GQA) and ``head_dim=None``
    means ``hidden_size // num_attention_heads``; both are resolved on construction, so
    ``cfg.num_key_value_heads`` and ``cfg.head_dim`` are always ints.
    """

    vocab_size: int = 256
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        h = self.num_attention_heads
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", h)
        if self.head_dim is None:
            if self.hidden_size % h:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} does not divide by num_attention_heads={h}:"
                    " give head_dim explicitly or change one of them"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // h)
        kv = self.num_key_value_heads
        assert kv is not None
        if kv <= 0 or h % kv:
            raise ConfigError(
                f"num_attention_heads={h} must be a multiple of num_key_value_heads={kv}"
                " (each group of query heads shares one key/value head)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")

    @property
    def kv_heads(self) -> int:
        """``num_key_value_heads`` as an int (for type checkers)."""
        assert self.num_key_value_heads is not None
        return self.num_key_value_heads

    @property
    def hd(self) -> int:
        """``head_dim`` as an int (for type checkers)."""
        assert self.head_dim is not None
        return self.head_dim

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> LlamaConfig:
        """The sizes from a Hugging Face Llama ``config.json`` (a dict); other keys are ignored.

        Raises:
          ConfigError: a feature this model does not implement (``rope_scaling``, biases,
            an activation other than SiLU).
        """
        if config.get("rope_scaling"):
            raise ConfigError(
                f"rope_scaling={config['rope_scaling']!r} is not implemented by"
                " examples/llama/model.py (plain RoPE only): use a checkpoint without it"
            )
        for key in ("attention_bias", "mlp_bias"):
            if config.get(key):
                raise ConfigError(f"{key}=True is not implemented (this Llama has no biases)")
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={config['hidden_act']!r}: only 'silu' is implemented")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``LlamaForCausalLM`` ``config.json`` as a dict."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "rope_scaling": None,
            **dataclasses.asdict(self),
        }


def init(key: Any, cfg: LlamaConfig) -> Params:
    """Float32 parameters: normal(0, 0.02) kernels and embeddings (HF's ``initializer_range``),
    norm weights 1."""
    d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.hd, cfg.kv_heads * cfg.hd
    k = iter(jax.random.split(key, 9))

    def normal(*shape: int) -> jax.Array:
        return jax.random.normal(next(k), shape, jnp.float32) * 0.02

    params: Params = {
        "model": {
            "embed_tokens": {"embedding": normal(cfg.vocab_size, d)},
            "layers": {
                "input_layernorm": {"weight": jnp.ones((n, d), jnp.float32)},
                "self_attn": {
                    "q_proj": {"kernel": normal(n, d, q)},
                    "k_proj": {"kernel": normal(n, d, kv)},
                    "v_proj": {"kernel": normal(n, d, kv)},
                    "o_proj": {"kernel": normal(n, q, d)},
                },
                "post_attention_layernorm": {"weight": jnp.ones((n, d), jnp.float32)},
                "mlp": {
                    "gate_proj": {"kernel": normal(n, d, f)},
                    "up_proj": {"kernel": normal(n, d, f)},
                    "down_proj": {"kernel": normal(n, f, d)},
                },
            },
            "norm": {"weight": jnp.ones((d,), jnp.float32)},
        }
    }
    lm_head = normal(d, cfg.vocab_size)
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": lm_head}
    return params


def rms_norm(weight: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """``x * rsqrt(mean(x^2) + eps) * weight`` in float32, returned in ``x``'s dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates interleaved pairs ``(2i, 2i+1)`` of ``x`` ``(B, T, heads, hd)`` by
    ``positions (B, T) * theta**(-2i/hd)``, in float32."""
    hd = x.shape[-1]
    freq = theta ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)  # (hd/2,)
    angle = positions.astype(jnp.float32)[:, :, None, None] * freq  # (B, T, 1, hd/2)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], hd // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _w(p: Params, dtype: Any) -> jax.Array:
    return p["kernel"].astype(dtype)


def kv_groups(kv_heads: int, axis: str = "model") -> int:
    """The head groups of the fused q/k/v matmul: the KV heads, or one group per device of
    ``axis`` when it has more devices than KV heads (``tx.rules.llama`` then replicates
    k_proj and v_proj, and `attention` repeats each KV head's kernel to one copy per group).

    Read from the mesh the step is traced under (``tensor_parallel``'s); outside any mesh,
    or without ``axis``, the KV heads.
    """
    mesh = jax.sharding.get_abstract_mesh()
    n = 1 if mesh.empty else dict(mesh.shape).get(axis, 1)
    if n % kv_heads and kv_heads % n:
        raise ConfigError(
            f"num_key_value_heads={kv_heads} and the mesh axis {axis}={n}: one must divide the "
            f"other, so that each device holds whole KV heads (or one KV head's copy)"
        )
    return max(kv_heads, n)


def attention(p: Params, x: jax.Array, cfg: LlamaConfig, positions: jax.Array) -> jax.Array:
    """Causal grouped-query attention: query head ``h`` uses key/value head ``h // (H/KV)``.

    q, k and v come from ONE matmul: the three kernels, each split over ``model`` on its
    heads, are stacked per head group on a new axis (a local reshape and concatenation, no
    communication), so under tensor parallelism the backward pass has one input-gradient
    partial sum and one all-reduce instead of three (Megatron's minimum; measured in
    docs/tensor_parallel.md, "Fusing projections": 1.75x the minimum separate, 1.00x fused).
    The parameters stay separate, as Hugging Face stores them.
    """
    b, t, d = x.shape
    h, kv, hd = cfg.num_attention_heads, cfg.kv_heads, cfg.hd
    groups = kv_groups(kv)
    rep = groups // kv  # > 1 only when the model axis has more devices than KV heads
    w = jnp.concatenate(
        [
            _w(p["q_proj"], x.dtype).reshape(d, groups, (h // groups) * hd),
            jnp.repeat(_w(p["k_proj"], x.dtype).reshape(d, kv, hd), rep, axis=1),
            jnp.repeat(_w(p["v_proj"], x.dtype).reshape(d, kv, hd), rep, axis=1),
        ],
        axis=-1,
    )  # (D, groups, (H/groups + 2) * hd)
    qkv = jnp.einsum("btd,dge->btge", x, w)
    q = qkv[..., : -2 * hd].reshape(b, t, h, hd)
    k, v = qkv[..., -2 * hd : -hd], qkv[..., -hd:]  # (B, T, groups, hd)
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    q = q.reshape(b, t, groups, h // groups, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * hd**-0.5
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, t, h * hd)
    return out @ _w(p["o_proj"], x.dtype)


def mlp(p: Params, x: jax.Array) -> jax.Array:
    """SwiGLU, ``down(silu(gate(x)) * up(x))``, with gate and up in one matmul: stacked
    ``(D, 2, F)``, both split over ``model`` on ``F``, so the stack is local and the backward
    pass all-reduces one input gradient, not two."""
    g = jnp.einsum(
        "btd,dkf->btkf",
        x,
        jnp.stack([_w(p["gate_proj"], x.dtype), _w(p["up_proj"], x.dtype)], axis=1),
    )
    return (jax.nn.silu(g[:, :, 0]) * g[:, :, 1]) @ _w(p["down_proj"], x.dtype)


def block(p: Params, x: jax.Array, cfg: LlamaConfig, positions: jax.Array) -> jax.Array:
    """One pre-norm decoder layer (``p``: one layer's leaves, no ``L`` dimension); keeps the
    activation's shape and dtype (a pipeline stage)."""
    eps = cfg.rms_norm_eps
    x = x + attention(
        p["self_attn"], rms_norm(p["input_layernorm"]["weight"], x, eps), cfg, positions
    )
    return x + mlp(p["mlp"], rms_norm(p["post_attention_layernorm"]["weight"], x, eps))


def layers(
    stacked: Params,
    x: jax.Array,
    cfg: LlamaConfig,
    positions: jax.Array,
    gather: Gather | None = None,
) -> jax.Array:
    """The stacked layers applied in order: one ``lax.scan`` over the layer dimension.

    With ``gather``, each layer's parameters are ``gather(p)`` inside the scan, under
    ``jax.checkpoint``: the backward pass gathers its layer again instead of keeping it, so
    one layer's gathered parameters are alive at a time (ZeRO-3).
    """

    def layer(x: jax.Array, p: Params) -> tuple[jax.Array, None]:
        return block(p if gather is None else gather(p), x, cfg, positions), None

    x, _ = jax.lax.scan(layer if gather is None else jax.checkpoint(layer), x, stacked)
    return x


def embed(params: Params, tokens: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """Token embeddings ``(B, T, D)`` in ``dtype``; ``params`` holds ``model/embed_tokens``."""
    return params["model"]["embed_tokens"]["embedding"].astype(dtype)[tokens]


def logits(head_params: Params, x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Final RMSNorm and the output projection, float32 ``(B, T, V)``.

    ``head_params`` holds ``model/norm`` and ``lm_head`` (or, tied, ``model/embed_tokens``).
    """
    x = rms_norm(head_params["model"]["norm"]["weight"], x, eps)
    if "lm_head" in head_params:
        w = head_params["lm_head"]["kernel"].astype(x.dtype)
    else:
        w = head_params["model"]["embed_tokens"]["embedding"].astype(x.dtype).T
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)


def cross_entropy(logits_: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy of float32 ``logits_`` against int ``targets``."""
    logp = jax.nn.log_softmax(logits_.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()


def head_loss(
    head_params: Params, x: jax.Array, targets: jax.Array, eps: float = 1e-5
) -> jax.Array:
    """Final norm, output projection and mean next-token cross-entropy (float32)."""
    return cross_entropy(logits(head_params, x, eps), targets)


def head(params: Params) -> Params:
    """The parameters outside the stacked layers (embedding, final norm, ``lm_head``)."""
    rest: Params = {"model": {k: v for k, v in params["model"].items() if k != "layers"}}
    if "lm_head" in params:
        rest["lm_head"] = params["lm_head"]
    return rest


def forward(
    params: Params,
    tokens: jax.Array,
    cfg: LlamaConfig,
    *,
    gather: Gather | None = None,
    dtype: Any = jnp.float32,
    positions: jax.Array | None = None,
) -> jax.Array:
    """Float32 logits ``(B, T, V)`` of int ``tokens`` ``(B, T)``.

    ``gather``: called on the parameters before they are used, one layer at a time inside
    the scan (see `layers`) and once on the others. Under ``tx.fully_sharded`` it is
    ``tx.gather_params`` with ``vjp="mean"``; ``None``: the parameters are whole already.
    ``dtype``: the compute dtype (``jnp.bfloat16`` for mixed precision). ``positions``:
    ``(B, T)`` RoPE positions, ``arange(T)`` by default.
    """
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    rest = head(params)
    rest = rest if gather is None else gather(rest)
    x = embed(rest, tokens, dtype)
    x = layers(params["model"]["layers"], x, cfg, positions, gather)
    return logits(rest, x, cfg.rms_norm_eps)


def loss_fn(
    params: Params,
    tokens: jax.Array,
    cfg: LlamaConfig,
    *,
    gather: Gather | None = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Mean next-token cross-entropy of ``tokens`` ``(B, T + 1)``: ``tokens[:, :-1]`` predicts
    ``tokens[:, 1:]``. Float32."""
    return cross_entropy(
        forward(params, tokens[:, :-1], cfg, gather=gather, dtype=dtype), tokens[:, 1:]
    )


def num_params(cfg: LlamaConfig) -> int:
    """The number of parameters (``lm_head`` counted unless tied)."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.hd, cfg.kv_heads * cfg.hd
    per_layer = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * f
    out = 0 if cfg.tie_word_embeddings else d * cfg.vocab_size
    return cfg.vocab_size * d + L * per_layer + d + out


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward, no recomputation counted).

    ``6 x`` the matmul parameters (the layers' projections and the output projection; not
    the norms, not the embedding lookup) plus causal attention's scores and values:
    ``2 x 2 x (T/2) x H x hd`` per layer forward, times 3.
    """
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.hd, cfg.kv_heads * cfg.hd
    matmul = cfg.num_hidden_layers * (d * q + 2 * d * kv + q * d + 3 * d * f) + d * cfg.vocab_size
    attn = 3 * cfg.num_hidden_layers * 2 * seq_len * q
    return float(6 * matmul + attn)
