"""A GPT whose MLPs are mixtures of experts (8 experts, top-2), trained on ``data x expert``.

Each block's MLP is an MoE layer: a router picks two of eight experts per token
(`tx.moe.route`), the tokens travel to the devices holding their experts
(`tx.moe.dispatch`: one ``all_to_all`` over ``expert``), the local experts run batched, and
`tx.moe.combine` brings the results back weighted by the gates. The experts of every block
are stacked ``(layers, experts, ...)`` and split along ``expert`` on dimension 1; the rest
of the model is replicated and data parallel over ``data x expert``.

    python examples/gpt_moe/train.py --steps 100 --data 2 --expert 4
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import titanax as tx  # noqa: E402
from examples import common  # noqa: E402
from examples.gpt_small_tp import model as gpt  # noqa: E402

# (layers, experts, ...): the expert dimension is dimension 1.
RULES = tx.Rules(
    (r"moe/experts/", P(None, "expert")),
)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    gpt: gpt.GPTConfig = gpt.GPTConfig(seq_len=64, d_model=64, heads=4, layers=2)
    experts: int = 8
    k: int = 2
    hidden: int = 128  # each expert's hidden width
    capacity_factor: float | None = 1.25
    aux_weight: float = 0.01  # Switch load-balancing loss
    z_weight: float = 1e-3  # ST-MoE router z-loss


def init(key: Any, cfg: MoEConfig) -> dict[str, Any]:
    params = gpt.init(key, cfg.gpt)
    layers, d, e, h = cfg.gpt.layers, cfg.gpt.d_model, cfg.experts, cfg.hidden
    k = jax.random.split(jax.random.fold_in(key, 1), 3)
    del params["h"]["mlp"]
    params["h"]["moe"] = {
        "router": jax.random.normal(k[0], (layers, d, e)) * 0.02,
        "experts": {
            "up": jax.random.normal(k[1], (layers, e, d, h)) * 0.02,
            "down": jax.random.normal(k[2], (layers, e, h, d)) * 0.02 / np.sqrt(2 * layers),
        },
    }
    return params


def moe_mlp(p: dict[str, Any], x: jax.Array, cfg: MoEConfig, axis: str | None) -> tuple:
    """The MoE MLP of one block on ``(batch, seq, d)``: output, auxiliary loss, dropped."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens @ p["router"]
    routing = tx.moe.route(logits, k=cfg.k, capacity_factor=cfg.capacity_factor)
    xs = tx.moe.dispatch(tokens, routing, axis=axis)  # (local experts, slots, d)
    h = jax.nn.gelu(jnp.einsum("esd,edh->esh", xs, p["experts"]["up"]))
    ys = jnp.einsum("esh,ehd->esd", h, p["experts"]["down"])
    y = tx.moe.combine(ys, routing, axis=axis).reshape(x.shape)
    aux = cfg.aux_weight * tx.moe.load_balancing_loss(logits, routing)
    aux = aux + cfg.z_weight * tx.moe.z_loss(logits)
    return y, aux, routing.dropped


def loss_fn(params: dict[str, Any], tokens: jax.Array, cfg: MoEConfig, axis: str | None) -> Any:
    """Next-byte cross-entropy plus the routers' auxiliary losses; ``axis=None``: one device."""
    rest = {k: v for k, v in params.items() if k != "h"}
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def layer(carry: tuple, p: dict[str, Any]) -> tuple[tuple, None]:
        x, aux, dropped = carry
        x = x + gpt.attention(p["attn"], gpt.layer_norm(p["ln1"], x), cfg.gpt.heads)
        y, a, d = moe_mlp(p["moe"], gpt.layer_norm(p["ln2"], x), cfg, axis)
        return (x + y, aux + a, dropped + d), None

    start = (gpt.embed(rest, inputs), jnp.zeros(()), jnp.zeros((), jnp.int32))
    (x, aux, dropped), _ = jax.lax.scan(layer, start, params["h"])
    ce = gpt.head_loss(rest, x, targets)
    return ce + aux, (ce, dropped)


def make_step(cfg: MoEConfig, mesh: Mesh) -> Any:
    @tx.data_parallel(axis="data", mesh=mesh)
    @tx.expert_parallel(RULES, axis="expert")
    def step(state: tx.TrainState, tokens: jax.Array) -> tuple[tx.TrainState, dict[str, Any]]:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (ce, dropped)), grads = grad_fn(state.params, tokens, cfg, "expert")
        grads = tx.moe.reduce_gradients(grads, RULES, axis="expert", data_axes="data")
        both = ("data", "expert")
        metrics = {"loss": tx.pmean(ce, both), "dropped": tx.psum(dropped, both)}
        return state.apply_gradients(grads), metrics

    return step


def reference_step(cfg: MoEConfig) -> Any:
    """The same step on one device, every expert local (for the tests)."""

    @jax.jit
    def step(state: tx.TrainState, tokens: jax.Array) -> tuple[tx.TrainState, dict[str, Any]]:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (ce, dropped)), grads = grad_fn(state.params, tokens, cfg, None)
        return state.apply_gradients(grads), {"loss": ce, "dropped": dropped}

    return step


def train(
    cfg: MoEConfig, mesh: Mesh | None, steps: int, batch_size: int, lr: float = 3e-3, seed: int = 0
) -> tuple[Any, list[float], int]:
    """Trains ``steps`` steps; ``mesh=None``: the one-device reference. Returns the state,
    every step's loss and the assignments dropped in all."""
    data, _ = gpt.split(gpt.corpus())
    rng = np.random.default_rng(seed)
    state = tx.TrainState.create(init(jax.random.key(seed), cfg), optax.adam(lr))
    step = reference_step(cfg) if mesh is None else make_step(cfg, mesh)
    losses, dropped = [], 0
    for _ in range(steps):
        state, metrics = step(state, gpt.windows(data, batch_size, cfg.gpt.seq_len + 1, rng))
        losses.append(float(metrics["loss"]))
        dropped += int(metrics["dropped"])
    return state, losses, dropped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data", type=int, default=2)
    parser.add_argument("--expert", type=int, default=4)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    args = parser.parse_args(argv)
    common.start(args.data * args.expert)
    cfg = MoEConfig(capacity_factor=args.capacity_factor or None)
    mesh = tx.mesh(data=args.data, expert=args.expert)
    _, losses, dropped = train(cfg, mesh, args.steps, args.batch_size)
    assignments = args.steps * args.batch_size * cfg.gpt.seq_len * cfg.k * cfg.gpt.layers
    common.say(
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps; "
        f"dropped {dropped} of {assignments} assignments ({dropped / assignments:.1%})"
    )


if __name__ == "__main__":
    main()
