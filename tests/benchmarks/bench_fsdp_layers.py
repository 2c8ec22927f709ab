"""ZeRO-3 a layer at a time: compiled memory against depth, and where the gathers run.

Three steps of one model on ``data=8`` with Adam, each compiled and measured with
``memory_analysis()`` (argument and temp bytes):

* ``data_parallel``: whole parameters, a ``lax.scan`` over the stacked layers;
* ZeRO-3 gathering every parameter at the top of the step (``gather_params`` before
  ``value_and_grad``, ``scatter_grads`` after);
* ZeRO-3 a layer at a time: the gather inside the scan, under ``jax.checkpoint``, with
  ``vjp="mean"`` (the pattern of ``docs/fully_sharded.md`` and ``examples/gpt_small_tp``).

for 4, 8 and 16 layers of a residual MLP (d=256, hidden 1024, as issue #16 measured it) and
of the example's GPT (d=128, seq 64). The compiled HLO says where the all-gathers run:
`loop_collectives` gives each collective with the number of times it runs per step (the
trip count of the while loop it is in), so "per layer" is a checked fact.

Printed, not asserted (tests/integration/test_gpt_fsdp.py asserts the example's figures).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import titanax as tx
from titanax.parallel import hlo

LAYERS = (4, 8, 16)
D, HIDDEN, BATCH = 256, 1024, 64  # the residual MLP; BATCH is global (8 rows per device)
GPT = {"seq_len": 64, "d_model": 128, "heads": 4}  # the GPT's widths; a global batch of 8
PYTHON_LOOP = ("ZeRO-3, per layer, Python loop",)

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s*\(")
_CALLEE = re.compile(
    r"\b(condition|body|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def loop_collectives(hlo_text: str, mesh: Any) -> list[tuple[hlo.Collective, int]]:
    """Every collective of a compiled program with the times it runs per step: 1 outside any
    loop, the trip count of its ``while`` inside one (nested loops multiply).

    Raises:
      ValueError: a while loop whose trip count XLA does not know.
    """
    bodies: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            m = _HEADER.match(line)
            name = m.group(1) if m else None
            if name is not None:
                bodies[name] = []
                entry = name if line.startswith("ENTRY") else entry
        elif name is not None and line.startswith(" "):
            bodies[name].append(line)
    if entry is None:
        raise ValueError("loop_collectives: no ENTRY computation in the text")
    times: dict[str, int] = {}

    def visit(comp: str, n: int) -> None:
        times[comp] = max(times.get(comp, 0), n)
        for line in bodies.get(comp, ()):
            trips = 1
            if re.search(r"\swhile\(", line):
                found = _TRIPS.search(line)
                if found is None:
                    raise ValueError(
                        f"loop_collectives: a while loop of unknown trip count: {line}"
                    )
                trips = int(found.group(1))
            callees = [(k, c) for k, c in _CALLEE.findall(line)]
            for branches in _BRANCHES.findall(line):
                callees += [("branch", b.strip().lstrip("%")) for b in branches.split(",")]
            for kind, callee in callees:
                if callee in bodies:
                    visit(callee, n * (trips if kind == "body" else 1))

    visit(entry, 1)
    return [
        (c, times.get(comp, 1))
        for comp, lines in bodies.items()
        for c in hlo.collectives("\n".join(lines), mesh)
    ]


def executed_bytes(found: list[tuple[hlo.Collective, int]], kind: str) -> int:
    """Bytes per device that the collectives of ``kind`` move in one step."""
    return sum(c.bytes * n for c, n in found if c.kind == kind)


def memory(step: Any, mesh: Any, *args: Any) -> dict[str, Any]:
    """Argument and temp bytes of ``step``'s compiled program, and its collectives."""
    compiled = step.lower(*args).compile()
    m = compiled.memory_analysis()
    found = loop_collectives(compiled.as_text(), mesh)
    return {
        "temp": m.temp_size_in_bytes,
        "arg": m.argument_size_in_bytes,
        "gathers": sorted(n for c, n in found if c.kind == "all-gather"),
        "found": found,
    }


# -- a residual MLP -------------------------------------------------------------------------


def mlp_block(p: Any, h: jax.Array) -> jax.Array:
    return h + jnp.tanh(h @ p["up"]) @ p["down"]


def mlp_loss(p: Any, batch: Any, remat: bool = False) -> jax.Array:
    h, y = batch
    block = jax.checkpoint(mlp_block) if remat else mlp_block
    h, _ = jax.lax.scan(lambda h, layer: (block(layer, h), None), h, p["layers"])
    return jnp.mean((h @ p["head"] - y) ** 2)


def mlp_loss_per_layer(shards: Any, batch: Any) -> jax.Array:
    h, y = batch

    def layer(h: jax.Array, s: Any) -> tuple[jax.Array, None]:  # s: one layer's shards
        return mlp_block(tx.gather_params(s, "data", vjp="mean"), h), None

    h, _ = jax.lax.scan(jax.checkpoint(layer), h, shards["layers"])
    head = tx.gather_params(shards["head"], "data", vjp="mean")
    return jnp.mean((h @ head - y) ** 2)


def mlp_loss_python_loop(shards: Any, batch: Any) -> jax.Array:
    """The same per-layer gather in a Python loop over the layers (straight-line code)."""
    h, y = batch
    for i in range(jax.tree.leaves(shards["layers"])[0].shape[0]):
        s = jax.tree.map(lambda a, i=i: a[i], shards["layers"])
        h = jax.checkpoint(lambda s, h: mlp_block(tx.gather_params(s, "data", vjp="mean"), h))(s, h)
    head = tx.gather_params(shards["head"], "data", vjp="mean")
    return jnp.mean((h @ head - y) ** 2)


def mlp_state(layers: int) -> Any:
    r = np.random.default_rng(0)
    params = {
        "layers": {
            "up": (r.normal(size=(layers, D, HIDDEN)) * 0.02).astype(np.float32),
            "down": (r.normal(size=(layers, HIDDEN, D)) * 0.02).astype(np.float32),
        },
        "head": (r.normal(size=(D, D)) * 0.02).astype(np.float32),
    }
    return tx.TrainState.create(params, optax.adam(1e-3))


def mlp_steps(mesh: Any) -> dict[str, Any]:
    def dp(remat: bool) -> Any:
        def step(state, batch):
            loss, grads = jax.value_and_grad(mlp_loss)(state.params, batch, remat)
            return state.apply_gradients(tx.pmean(grads, "data")), tx.pmean(loss, "data")

        return tx.data_parallel(step, mesh=mesh)

    def top(state, batch):
        params = tx.gather_params(state.params, "data")
        loss, grads = jax.value_and_grad(mlp_loss)(params, batch)
        return state.apply_gradients(tx.scatter_grads(grads, "data")), tx.pmean(loss, "data")

    def per_layer(loss_fn: Callable[..., Any]) -> Any:
        def step(state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
            return state.apply_gradients(grads), tx.pmean(loss, "data")

        return tx.fully_sharded(step, mesh=mesh)

    return {
        "data_parallel": dp(False),
        "data_parallel, remat": dp(True),
        "ZeRO-3, top": tx.fully_sharded(top, mesh=mesh),
        "ZeRO-3, per layer": per_layer(mlp_loss_per_layer),
        "ZeRO-3, per layer, Python loop": per_layer(mlp_loss_python_loop),
    }


def mlp_batch() -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(1)
    return r.normal(size=(BATCH, D)).astype(np.float32), r.normal(size=(BATCH, D)).astype(
        np.float32
    )


def measure_mlp(layers=LAYERS, names=None) -> dict[tuple[str, int], dict[str, Any]]:
    """``{(step, layers): memory(...)}`` for the residual MLP on ``data=8``."""
    mesh = tx.mesh(data=8)
    out = {}
    for n in layers:
        for name, step in mlp_steps(mesh).items():
            if (names is None and "Python" not in name) or (names and name in names):
                out[name, n] = memory(step, mesh, mlp_state(n), mlp_batch())
                _print("MLP", name, n, out[name, n])
    return out


# -- the example's GPT ----------------------------------------------------------------------


def gpt_steps(cfg: Any, mesh: Any) -> dict[str, Any]:
    from examples.gpt_small_tp import model as gpt
    from examples.gpt_small_tp import train as example

    def top(state, tokens):  # what the example's ZeRO-3 step was before issue #16
        params = tx.gather_params(state.params, "data")
        loss, grads = jax.value_and_grad(gpt.loss_fn)(params, tokens, cfg)
        return state.apply_gradients(tx.scatter_grads(grads, "data")), {
            "loss": tx.pmean(loss, "data")
        }

    def looped_loss(params, tokens):  # the blocks in a Python loop instead of the scan
        x = gpt.embed(params, tokens[:, :-1])
        for i in range(cfg.layers):
            x = gpt.block(jax.tree.map(lambda a, i=i: a[i], params["h"]), x, cfg.heads)
        return gpt.head_loss(params, x, tokens[:, 1:])

    def looped_dp(state, tokens):
        loss, grads = jax.value_and_grad(looped_loss)(state.params, tokens)
        return state.apply_gradients(tx.pmean(grads, "data")), tx.pmean(loss, "data")

    small = 4 * cfg.d_model * cfg.layers + 1  # the example's min_size: the same layout
    return {
        "data_parallel": example.make_steps(cfg, mesh, zero=0)[0],
        "data_parallel, Python loop": tx.data_parallel(looped_dp, mesh=mesh),
        "ZeRO-3, top": tx.fully_sharded(top, mesh=mesh, min_size=small),
        "ZeRO-3, per layer": example.make_steps(cfg, mesh, zero=3)[0],
    }


def layer_bytes() -> dict[str, tuple[int, int]]:
    """Per model: one layer's parameter bytes (whole), and the bytes of the activation a layer
    passes on (what the scan saves per layer under ``jax.checkpoint``), per device."""
    from examples.gpt_small_tp import model as gpt

    cfg = gpt.GPTConfig(**GPT, layers=1)
    block = sum(a.nbytes for a in jax.tree.leaves(gpt.init(jax.random.key(0), cfg)["h"]))
    return {
        "MLP": (2 * D * HIDDEN * 4, BATCH // 8 * D * 4),
        "GPT": (block, 8 // 8 * cfg.seq_len * cfg.d_model * 4),
    }


def measure_gpt(layers=LAYERS) -> dict[tuple[str, int], dict[str, Any]]:
    """``{(step, layers): memory(...)}`` for the example's GPT (2x128 widths) on ``data=8``."""
    from examples.gpt_small_tp import model as gpt

    mesh = tx.mesh(data=8, model=1)
    tokens = np.zeros((8, GPT["seq_len"] + 1), np.int32)
    out = {}
    for n in layers:
        cfg = gpt.GPTConfig(**GPT, layers=n)
        state = tx.TrainState.create(gpt.init(jax.random.key(0), cfg), optax.adam(1e-3))
        for name, step in gpt_steps(cfg, mesh).items():
            out[name, n] = memory(step, mesh, state, tokens)
            _print("GPT", name, n, out[name, n])
    return out


def rows(results: dict[tuple[str, int], dict[str, Any]], layers=LAYERS) -> list[tuple]:
    """Per depth: DP temp and argument + temp, then ZeRO-3 top and per layer as ratios."""
    out = []
    for n in layers:
        dp = results["data_parallel", n]
        top, per = results["ZeRO-3, top", n], results["ZeRO-3, per layer", n]
        out.append(
            (
                n,
                dp["temp"],
                dp["arg"] + dp["temp"],
                top["temp"],
                top["arg"] + top["temp"],
                per["temp"],
                per["arg"] + per["temp"],
                per["gathers"],
            )
        )
    return out


def growth(results: dict[tuple[str, int], dict[str, Any]], name: str, layers=LAYERS) -> float:
    """Temp bytes added per layer from the smallest to the largest depth."""
    a, b = layers[0], layers[-1]
    return (results[name, b]["temp"] - results[name, a]["temp"]) / (b - a)


def _print(model: str, name: str, n: int, r: dict[str, Any]) -> None:
    loops = {k: r["gathers"].count(k) for k in sorted(set(r["gathers"]))}
    print(
        f"{model} {n} layers, {name}: temp {r['temp']:,} B, argument {r['arg']:,} B; "
        f"all-gathers by times run per step {loops}",
        flush=True,
    )


def test_layer_sweep():
    mlp = measure_mlp()
    for name in ("data_parallel", "ZeRO-3, top", "ZeRO-3, per layer"):
        print(f"MLP {name}: temp grows {growth(mlp, name):,.0f} B per layer")
    gpt = measure_gpt()
    for name in ("data_parallel", "ZeRO-3, top", "ZeRO-3, per layer"):
        print(f"GPT {name}: temp grows {growth(gpt, name):,.0f} B per layer")
