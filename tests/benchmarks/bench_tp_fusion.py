"""Tensor parallelism of a Llama layer: collective bytes against the Megatron minimum.

A Llama-style decoder layer in pure JAX (RMSNorm, RoPE, grouped-query attention, SwiGLU;
Flax-style kernels ``(d_in, d_out)`` under Hugging Face names) runs ``value_and_grad``
under ``tx.tensor_parallel`` on ``model=4`` and on ``data=2 x model=4``. The compiled HLO's
collectives over ``model`` are counted per layer against the Megatron minimum (Shoeybi et
al. 2019, Sec. 3): forward, one all-reduce of the ``(batch, seq, d_model)`` activation
after attention and one after the MLP; backward, one all-reduce of the input gradient
before attention's column-parallel projections and one before the MLP's: four all-reduces
of ``batch * seq * d_model`` elements per layer per step.

Variants (`VARIANTS`):

* ``separate``: q, k, v, gate and up each their own matmul, as Hugging Face writes them;
* ``stacked``: the same separate parameters, one matmul each for q/k/v and gate/up
  (`qkv` and `gate_up` with ``fuse=True``): the kernels are reshaped per KV head and
  concatenated (stacked), which is local on each device because every piece is split on
  whole KV heads (or hidden columns) the same way;
* ``interleaved``: Megatron's fused parameters, qkv stored ``(d, kv_heads, group + 2,
  head_dim)`` and gate/up ``(d, 2, hidden)``;
* with fewer KV heads than the model axis (``gqa``), k and v are replicated: ``separate``
  as they are, and ``stacked`` with each KV head's kernel repeated to one copy per device
  (`kv_groups`) before the one matmul.

Every variant's loss and gradients are checked against the unsharded ``separate`` layer.
Printed, not asserted (tests/unit/test_tp_fusion.py asserts the recommended fusion).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import titanax as tx
from titanax.parallel import hlo

Params = dict[str, Any]


class Config(NamedTuple):
    batch: int = 8  # global; per data replica it is batch / data
    seq: int = 16
    d_model: int = 64
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 8
    hidden: int = 128
    layers: int = 2


CFG = Config()
GQA = Config(kv_heads=2)  # fewer KV heads than model=4: k and v replicated
VARIANTS = {
    "separate": dict(fuse=False, layout="separate"),
    "stacked": dict(fuse=True, layout="separate"),
    "interleaved": dict(fuse=True, layout="interleaved"),
}


def kv_groups(kv_heads: int, tp: int) -> int:
    """KV head groups of the fused projection: the KV heads, or one per device when the
    model axis is larger (each KV head's kernel repeated ``tp // kv_heads`` times)."""
    if tp % kv_heads and kv_heads % tp:
        raise ValueError(f"kv_heads={kv_heads} and the model axis size {tp} must divide")
    return max(kv_heads, tp)


def init(cfg: Config, seed: int = 0) -> Params:
    """A stack of ``cfg.layers`` layers under Hugging Face names, behind a replicated input
    projection (so that the first layer's input gradient is needed, as in a model)."""
    rng = np.random.default_rng(seed)
    d, hd = cfg.d_model, cfg.head_dim

    def dense(n_in: int, n_out: int) -> Params:
        return {"kernel": (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)}

    def norm() -> Params:
        return {"scale": (1 + 0.1 * rng.normal(size=d)).astype(np.float32)}

    layers = [
        {
            "input_layernorm": norm(),
            "self_attn": {
                "q_proj": dense(d, cfg.heads * hd),
                "k_proj": dense(d, cfg.kv_heads * hd),
                "v_proj": dense(d, cfg.kv_heads * hd),
                "o_proj": dense(cfg.heads * hd, d),
            },
            "post_attention_layernorm": norm(),
            "mlp": {
                "gate_proj": dense(d, cfg.hidden),
                "up_proj": dense(d, cfg.hidden),
                "down_proj": dense(cfg.hidden, d),
            },
        }
        for _ in range(cfg.layers)
    ]
    return {"embed": dense(d, d), "layers": layers}


def interleave(params: Params, cfg: Config) -> Params:
    """The same parameters in Megatron's fused layout: ``qkv_proj`` ``(d, kv_heads, group + 2,
    head_dim)`` (each KV head's queries, then its key, then its value) and ``gate_up_proj``
    ``(d, 2, hidden)``. Linear in the parameters, so it also maps gradients."""
    d, kv, hd = cfg.d_model, cfg.kv_heads, cfg.head_dim

    def layer(p: Params) -> Params:
        a, m = p["self_attn"], p["mlp"]
        q = a["q_proj"]["kernel"].reshape(d, kv, -1, hd)
        k = a["k_proj"]["kernel"].reshape(d, kv, 1, hd)
        v = a["v_proj"]["kernel"].reshape(d, kv, 1, hd)
        gate_up = jnp.stack([m["gate_proj"]["kernel"], m["up_proj"]["kernel"]], axis=1)
        return {
            **p,
            "self_attn": {
                "qkv_proj": {"kernel": jnp.concatenate([q, k, v], axis=2)},
                "o_proj": a["o_proj"],
            },
            "mlp": {"gate_up_proj": {"kernel": gate_up}, "down_proj": m["down_proj"]},
        }

    return {"embed": params["embed"], "layers": [layer(p) for p in params["layers"]]}


def rules(kv_split: bool) -> tx.Rules:
    """Megatron TP for these names: q/k/v and gate/up column-parallel (k/v replicated when
    ``kv_split`` is false), o/down row-parallel, fused kernels split on KV heads / hidden."""
    col = P(None, "model")
    return tx.Rules(
        (r"/(q_proj|gate_proj|up_proj)/kernel$", col),
        (r"/(k_proj|v_proj)/kernel$", col if kv_split else P()),
        (r"/qkv_proj/kernel$", P(None, "model", None, None)),
        (r"/gate_up_proj/kernel$", P(None, None, "model")),
        (r"/(o_proj|down_proj)/kernel$", P("model", None)),
        (r".*", P()),
    )


def rms_norm(p: Params, x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * p["scale"]


def rope(x: jax.Array) -> jax.Array:
    """Rotary embedding (Hugging Face's rotate-half form) of ``x`` ``(batch, seq, ..., hd)``."""
    hd, t = x.shape[-1], x.shape[1]
    freq = 1.0 / 10000 ** (np.arange(0, hd, 2) / hd)
    angle = np.concatenate([np.outer(np.arange(t), freq)] * 2, -1)  # (t, hd)
    shape = (1, t) + (1,) * (x.ndim - 3) + (hd,)
    cos, sin = np.cos(angle).reshape(shape), np.sin(angle).reshape(shape)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def qkv(attn: Params, h: jax.Array, cfg: Config, groups: int, fuse: bool):
    """q ``(b, t, groups, heads / groups, hd)``, k and v ``(b, t, groups, hd)``.

    ``fuse``: one matmul. Each kernel is reshaped per KV head group (query head ``i`` uses
    KV head ``i // (heads / kv_heads)``, Hugging Face's order), k and v repeated when
    ``groups > kv_heads``, and the three concatenated on their last axis: under TP each
    device holds the same whole groups of all three, so the concatenation is local and
    the backward pass has one input-gradient partial sum, all-reduced once.
    """
    b, t, d = h.shape
    hd, kv = cfg.head_dim, cfg.kv_heads
    if "qkv_proj" in attn:  # Megatron's interleaved parameter (groups == kv_heads)
        out = jnp.einsum("btd,dgjh->btgjh", h, attn["qkv_proj"]["kernel"])
        return out[..., :-2, :], out[..., -2, :], out[..., -1, :]
    wq, wk, wv = (attn[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj"))
    if not fuse:
        q = (h @ wq).reshape(b, t, kv, -1, hd)
        return q, (h @ wk).reshape(b, t, kv, hd), (h @ wv).reshape(b, t, kv, hd)
    rep = groups // kv
    w = jnp.concatenate(
        [
            wq.reshape(d, groups, -1),
            jnp.repeat(wk.reshape(d, kv, hd), rep, axis=1),
            jnp.repeat(wv.reshape(d, kv, hd), rep, axis=1),
        ],
        axis=-1,
    )
    out = jnp.einsum("btd,dge->btge", h, w)
    q = out[..., : -2 * hd].reshape(b, t, groups, -1, hd)
    return q, out[..., -2 * hd : -hd], out[..., -hd:]


def gate_up(mlp: Params, h: jax.Array, fuse: bool) -> jax.Array:
    """SwiGLU's ``silu(h @ gate) * (h @ up)``; ``fuse``: one matmul of the kernels stacked
    ``(d, 2, hidden)`` (both split on hidden: the stack is local)."""
    if "gate_up_proj" in mlp:
        w = mlp["gate_up_proj"]["kernel"]
    elif fuse:
        w = jnp.stack([mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"]], axis=1)
    else:
        return jax.nn.silu(h @ mlp["gate_proj"]["kernel"]) * (h @ mlp["up_proj"]["kernel"])
    out = jnp.einsum("btd,dkf->btkf", h, w)
    return jax.nn.silu(out[:, :, 0]) * out[:, :, 1]


def layer(p: Params, x: jax.Array, cfg: Config, groups: int, fuse: bool) -> jax.Array:
    b, t, _ = x.shape
    q, k, v = qkv(p["self_attn"], rms_norm(p["input_layernorm"], x), cfg, groups, fuse)
    q, k = rope(q), rope(k)
    s = jnp.einsum("btgnh,bsgh->bgnts", q, k) / np.sqrt(cfg.head_dim)
    s = jnp.where(np.tril(np.ones((t, t), bool)), s, jnp.finfo(s.dtype).min)
    o = jnp.einsum("bgnts,bsgh->btgnh", jax.nn.softmax(s, -1), v).reshape(b, t, -1)
    x = x + o @ p["self_attn"]["o_proj"]["kernel"]
    h = gate_up(p["mlp"], rms_norm(p["post_attention_layernorm"], x), fuse)
    return x + h @ p["mlp"]["down_proj"]["kernel"]


def loss_fn(params: Params, batch: tuple, cfg: Config, groups: int, fuse: bool) -> jax.Array:
    x, y = batch
    x = x @ params["embed"]["kernel"]
    for p in params["layers"]:
        x = layer(p, x, cfg, groups, fuse)
    return jnp.mean((x - y) ** 2)


def make_batch(cfg: Config, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (cfg.batch, cfg.seq, cfg.d_model)
    return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def make_step(cfg: Config, mesh: Any, fuse: bool):
    """``value_and_grad`` of the layers under ``tensor_parallel`` (and ``data_parallel`` when
    the mesh has a ``data`` axis): ``step(params, batch) -> (grads, loss)``."""
    tp = mesh.shape["model"]
    groups = kv_groups(cfg.kv_heads, tp) if fuse else cfg.kv_heads

    def step(params: Params, batch: tuple) -> tuple[Params, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, cfg, groups, fuse)
        if "data" in mesh.axis_names:
            grads, loss = tx.pmean((grads, loss), "data")
        return grads, loss

    fn = tx.tensor_parallel(rules(cfg.kv_heads % tp == 0), mesh=mesh)(step)
    if "data" in mesh.axis_names:
        fn = tx.data_parallel(fn, mesh=mesh, donate=False)
    return fn


# The unsharded ``separate`` layer's loss and gradients, compiled as one program (op by op,
# each primitive compiled for its shapes, it took most of a measurement's compile time).
reference = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(2, 3, 4))


def minimum(cfg: Config, mesh: Any) -> int:
    """Megatron's minimum over ``model`` per layer per step, in bytes: 4 all-reduces of the
    per-replica ``(batch, seq, d_model)`` float32 activation."""
    rows = cfg.batch // mesh.shape.get("data", 1)
    return 4 * rows * cfg.seq * cfg.d_model * 4


def measure(variant: str, cfg: Config, mesh: Any) -> dict[str, Any]:
    """One variant on ``mesh``: its collectives over ``model`` per layer and their bytes,
    split into all-reduces of the activation (shape ``(rows, seq, d_model)``) and the rest;
    the minimum; and its largest differences from the unsharded ``separate`` layer (loss,
    and gradients relative to each leaf's largest entry)."""
    opts = VARIANTS[variant]
    params = init(cfg)
    batch = make_batch(cfg)
    args = interleave(params, cfg) if opts["layout"] == "interleaved" else params
    step = make_step(cfg, mesh, opts["fuse"])
    found = hlo.collectives(step.lower(args, batch).compile().as_text(), mesh)
    model = [c for c in found if "model" in c.axes]
    act = f"f32[{cfg.batch // mesh.shape.get('data', 1)},{cfg.seq},{cfg.d_model}]"
    is_act = [c.kind == "all-reduce" and set(c.shapes) == {act} for c in model]
    grads, loss = step(args, batch)
    ref_loss, ref = reference(params, batch, cfg, cfg.kv_heads, False)
    if opts["layout"] == "interleaved":
        ref = interleave(ref, cfg)
    error = max(  # in numpy: no program compiled per leaf shape
        float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
        for a, b in zip(
            map(np.asarray, jax.tree.leaves(grads)), map(np.asarray, jax.tree.leaves(ref))
        )
    )
    return {
        "activation_all_reduces": sum(len(c.shapes) for c, a in zip(model, is_act) if a)
        / cfg.layers,
        "activation_bytes": sum(c.bytes for c, a in zip(model, is_act) if a) // cfg.layers,
        "other_bytes": sum(c.bytes for c, a in zip(model, is_act) if not a) // cfg.layers,
        "other": [(c.kind, c.shapes) for c, a in zip(model, is_act) if not a],
        "bytes": sum(c.bytes for c in model) // cfg.layers,
        "minimum": minimum(cfg, mesh),
        "grad_error": error,
        "loss_error": abs(float(loss) - float(ref_loss)),
    }


def meshes() -> dict[str, Any]:
    return {
        "model=4": tx.mesh(devices=jax.devices()[:4], model=4),
        "data=2 x model=4": tx.mesh(data=2, model=4),
    }


CASES = (
    ("separate", CFG),
    ("stacked", CFG),
    ("interleaved", CFG),
    ("separate", GQA),
    ("stacked", GQA),
)


def table() -> list[dict[str, Any]]:
    """`measure` of every case (`CASES`) on both meshes, each with its ``variant``, ``mesh``
    and ``kv_heads``."""
    rows = []
    for name, mesh in meshes().items():
        for variant, cfg in CASES:
            r = measure(variant, cfg, mesh)
            rows.append({"variant": variant, "mesh": name, "kv_heads": cfg.kv_heads, **r})
    return rows


def test_stacked_projections_reach_the_minimum():
    """Fast: the recommended fusion on model=4 (the unit test checks both meshes)."""
    mesh = meshes()["model=4"]
    r = measure("stacked", CFG._replace(layers=1), mesh)
    assert r["bytes"] == r["minimum"], r
    assert r["grad_error"] < 1e-5 and r["loss_error"] < 1e-6


if __name__ == "__main__":
    for row in table():
        print(row)
