"""The Llama example's step functions, and the transforms its mesh selects.

The mesh has up to four axes; each one present (size > 1) adds one transform:

    data  -> tx.data_parallel(axis="data")      replicas; the step averages gradients (tx.pmean)
    fsdp  -> tx.fully_sharded(axis="fsdp")      ZeRO-3: a layer's parameters gathered at a time
    model -> tx.tensor_parallel(rules)          Megatron layouts; XLA partitions the matmuls
    stage -> tx.pipeline(...)                   layers split into stages, laid out by a
                                                tensor_parallel layer over "stage"

The step bodies below are what a user writes: every reduction over a data axis is in them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import titanax as tx
from examples.llama import model as llama

AXES = ("data", "fsdp", "stage", "model")  # mesh order: the model axis innermost


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "fsdp": 1, "stage": 1, "model": 4}``.

    Raises:
      MeshError: an item that is not ``name=size``, an axis given twice, or one that is
        not data, fsdp, model or stage.
    """
    from titanax.mesh import parse_axes

    axes = parse_axes(text)
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise tx.MeshError(
            f"mesh {text!r}: unknown axis {unknown[0]!r}; the Llama example's axes are "
            "data, fsdp, model and stage (e.g. --mesh data=2,model=4)"
        )
    return {a: int(axes.get(a, 1)) for a in AXES}


def make_mesh(sizes: dict[str, int], devices: list[Any]) -> Any:
    """The mesh of the axes of size > 1 (``data=1`` if none is), on the first devices."""
    axes = {a: n for a, n in sizes.items() if n > 1} or {"data": 1}
    return tx.mesh(devices=devices[: int(np.prod(list(axes.values())))], **axes)


def rules(cfg: llama.LlamaConfig, axis_size: int, axis: str = "model") -> tx.Rules:
    """Megatron layouts of the stacked Llama over ``axis`` (``tx.rules.llama``): q/k/v, gate
    and up split by columns (heads, hidden units), o and down by rows, the embedding and
    lm_head over the vocabulary; k/v replicated when the key/value heads do not divide by
    ``axis_size``; norms replicated."""
    return tx.rules.llama(
        axis=axis, num_key_value_heads=cfg.kv_heads, axis_size=axis_size, stacked=True
    )


def head_params(p: llama.Params) -> llama.Params:
    """What the loss after the last stage uses: the final norm and the output projection."""
    if "lm_head" in p:
        return {"model": {"norm": p["model"]["norm"]}, "lm_head": p["lm_head"]}
    return {"model": {"norm": p["model"]["norm"], "embed_tokens": p["model"]["embed_tokens"]}}


@functools.cache  # the same settings give the same steps, compiled once
def make_steps(
    cfg: llama.LlamaConfig,
    mesh: Any,
    *,
    dtype: Any = jnp.float32,
    schedule: str = "1f1b",
    microbatches: int = 4,
) -> tuple[tx.ParallelFunction, tx.ParallelFunction]:
    """``(train_step(state, tokens) -> (state, {"loss"}), eval_step(params, tokens) -> loss)``.

    ``tokens`` is ``(batch, seq_len + 1)`` int32, the global batch of one call.

    Raises:
      ConfigError: layers that do not divide by the stage axis.
    """
    size = {a: int(mesh.shape.get(a, 1)) for a in AXES}
    stages = size["stage"]
    if cfg.num_hidden_layers % stages:
        raise tx.errors.ConfigError(
            f"num_hidden_layers={cfg.num_hidden_layers} does not divide by the stage axis"
            f" ({stages}): each pipeline stage runs the same number of layers"
        )
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)  # rows split over these

    def mean(x: Any) -> Any:  # the mean over the replicas that saw different rows
        return tx.pmean(x, batch_axes) if batch_axes else x

    # ZeRO-3: each layer's parameters all-gathered in the compute dtype when the scan reaches
    # it; the backward pass of the gather reduce-scatters its gradient (a mean over fsdp).
    gather = None
    if size["fsdp"] > 1:
        gather = functools.partial(tx.gather_params, axis="fsdp", vjp="mean", dtype=dtype)

    def train_step(state: tx.TrainState, tokens: jax.Array) -> tuple[tx.TrainState, Any]:
        loss_fn = functools.partial(llama.loss_fn, cfg=cfg, gather=gather, dtype=dtype)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens)
        if size["data"] > 1:
            grads = tx.pmean(grads, "data")  # DP's reduction (fsdp's is in the gather)
        return state.apply_gradients(grads), {"loss": mean(loss)}

    pipe = tx.pipeline(
        lambda layers, x: llama.layers(layers, x, cfg, positions(x)),
        schedule=schedule,
        microbatches=microbatches,
        loss=functools.partial(llama.head_loss, eps=cfg.rms_norm_eps),
    )

    def pipeline_step(state: tx.TrainState, tokens: jax.Array) -> tuple[tx.TrainState, Any]:
        # ZeRO-3 with a pipeline: gather this device's stage once (float32; the model casts),
        # as every microbatch reuses it; the whole gradients are reduce-scattered below.
        p = tx.gather_params(state.params, "fsdp") if size["fsdp"] > 1 else state.params
        embedding = {"model": {"embed_tokens": p["model"]["embed_tokens"]}}
        x, embed_vjp = jax.vjp(lambda e: llama.embed(e, tokens[:, :-1], dtype), embedding)
        # the stacked layers as `stages` rows of L / stages layers each
        layers = p["model"]["layers"]
        rows = jax.tree.map(lambda a: a.reshape(stages, -1, *a.shape[1:]), layers)
        loss, (g_rows, g_x, g_head) = pipe(rows, x, tokens[:, 1:], head_params(p))
        (g_embed,) = embed_vjp(g_x)  # the input gradient flows on into the embedding
        grads = {
            "model": {
                "embed_tokens": g_embed["model"]["embed_tokens"],
                "layers": jax.tree.map(lambda g, a: g.reshape(a.shape), g_rows, layers),
                "norm": g_head["model"]["norm"],
            }
        }
        if "lm_head" in g_head:
            grads["lm_head"] = g_head["lm_head"]
        else:  # tied: the embedding is used at both ends
            grads["model"]["embed_tokens"] = jax.tree.map(
                jnp.add, grads["model"]["embed_tokens"], g_head["model"]["embed_tokens"]
            )
        if size["data"] > 1:
            grads = tx.pmean(grads, "data")
        if size["fsdp"] > 1:
            grads = tx.scatter_grads(grads, "fsdp")  # this device's shard of the mean
        return state.apply_gradients(grads), {"loss": mean(loss)}

    def eval_step(params: llama.Params, tokens: jax.Array) -> jax.Array:
        g = None if gather is None else functools.partial(tx.gather_params, axis="fsdp")
        return mean(llama.loss_fn(params, tokens, cfg, gather=g, dtype=dtype))

    step = pipeline_step if stages > 1 else train_step
    return wrap(step, cfg, mesh, donate=True), wrap(eval_step, cfg, mesh, donate=False)


def positions(x: jax.Array) -> jax.Array:
    """``arange(T)`` for each row of the activation ``x`` ``(B, T, D)``."""
    return jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])


def wrap(step: Any, cfg: llama.LlamaConfig, mesh: Any, *, donate: bool) -> tx.ParallelFunction:
    """``step`` under the transforms of the mesh's axes (see the module's docstring)."""
    fn = step
    if "model" in mesh.shape:
        fn = tx.tensor_parallel(rules(cfg, mesh.shape["model"]), axis="model", mesh=mesh)(fn)
    if "stage" in mesh.shape:  # each device stores its stage's layers (and their moments)
        layout = tx.Rules((r"(^|/)model/layers/", P("stage")), (r".*", P()))
        fn = tx.tensor_parallel(layout, axis="stage", mesh=mesh)(fn)
    if "fsdp" in mesh.shape:
        # norms (L x D) stay replicated: a collective per layer for a few bytes is not worth it
        small = cfg.num_hidden_layers * cfg.hidden_size + 1
        fn = tx.fully_sharded(axis="fsdp", mesh=mesh, min_size=small, donate=donate)(fn)
    if "data" in mesh.shape:
        fn = tx.data_parallel(axis="data", mesh=mesh, donate=donate)(fn)
    return fn
