"""The per-device program: a scan over ticks that replays the tables.

Each tick runs one action per device (``lax.switch`` on the table), then passes
that action's message to a neighbour with ``ppermute`` and files what arrived in
the ``msg`` buffer. Gradients are accumulated in float32 whatever the parameter
dtype and scaled by ``1 / microbatches`` once, at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from titanax.parallel.collectives import BoundAxis, bind_axes
from titanax.parallel.pipeline.collectives import check
from titanax.parallel.pipeline.split import StageVJP
from titanax.parallel.pipeline.tables import (
    BWD,
    BWD_FIRST,
    BWD_FIRST_WGT,
    BWD_WGT,
    FWD,
    FWD_LAST,
    IDLE,
    WGT,
    Tables,
)
from titanax.parallel.schedules import Schedule

__all__ = ["executor", "accumulator_dtype"]


def _index(tree: Any, i: Any) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _update(tree: Any, value: Any, i: Any) -> Any:
    return jax.tree.map(lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, 0), tree, value)


def _zeros(tree: Any, n: int) -> Any:
    return jax.tree.map(lambda a: jnp.zeros((n, *a.shape), a.dtype), tree)


def accumulator_dtype(dtype: Any) -> Any:
    """float32 for floating dtypes narrower than it (bf16, f16), else ``dtype`` itself."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return dtype


def _wide(tree: Any) -> Any:
    return jax.tree.map(lambda a: a.astype(accumulator_dtype(a.dtype)), tree)


def _file(buf: Any, value: Any, slot: Any) -> Any:
    """Writes ``value`` into ``buf[slot]`` when ``slot >= 0``; otherwise leaves ``buf``."""
    k = jnp.maximum(slot, 0)
    old = _index(buf, k)
    new = jax.tree.map(lambda v, o: jnp.where(slot >= 0, v.astype(o.dtype), o), value, old)
    return _update(buf, new, k)


def executor(
    stage_fn: Callable[[Any, Any], Any],
    loss_fn: Callable[[Any, Any, Any], Any],
    s: Schedule,
    tables: Tables,
    axis: str,
    remat: bool,
) -> Callable[..., Any]:
    """The per-device program: ``(params (v, ...), x (m, b, ...), targets, loss_params)``.

    Returns ``(loss, g_params (v, ...), g_x (m, b, ...), g_loss_params)``; ``loss``,
    ``g_x`` and ``g_loss_params`` are summed over the axis (each lives on one device).
    """
    m = s.microbatches

    def run(params: Any, xs: Any, targets: Any, loss_params: Any) -> Any:
        # The stage and loss are traced with the axis bound (the probe of StageVJP too, whose
        # VJP jaxpr B and W replay): tx.ppermute then runs as an all_to_all, and a plain
        # ppermute or a collective over the pipeline axis is refused (.collectives).
        with bind_axes([BoundAxis(axis, "pipeline", True, s.stages)]):
            return traced(params, xs, targets, loss_params)

    def traced(params: Any, xs: Any, targets: Any, loss_params: Any) -> Any:
        me = jax.lax.axis_index(axis)
        act = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), xs)
        vjp = StageVJP(stage_fn, _index(params, 0), act)
        check(jax.make_jaxpr(stage_fn)(_index(params, 0), act).jaxpr, axis, "the stage")
        check(vjp.jaxpr, axis, "the stage's backward")
        value_and_grad = jax.value_and_grad(loss_fn, argnums=(0, 1))
        check(
            jax.make_jaxpr(value_and_grad)(loss_params, act, _index(targets, 0)).jaxpr,
            axis,
            "the loss",
        )
        # one stage per device: its parameters without a dynamic slice (a copy per tick)
        one_chunk = (lambda t: jax.tree.map(lambda a: a[0], t)) if s.virtual_stages == 1 else None

        nothing = {  # what a branch returns for the parts it does not produce
            "out": act,
            "kept": [] if remat else jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), vjp.saved),
            "stash": jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), vjp.stash),
            "loss": jnp.zeros((), jnp.float32),
            "g_lp": jax.tree.map(
                lambda a: jnp.zeros(a.shape, accumulator_dtype(a.dtype)), loss_params
            ),
        }

        # The branches see only this tick's operands (one parameter chunk, one slot of each
        # buffer) and return only this tick's results; the buffers are written outside the
        # switch, so XLA does not copy them into and out of every branch each tick.
        def idle(o: dict[str, Any]) -> dict[str, Any]:
            return nothing

        def fwd(o: dict[str, Any]) -> dict[str, Any]:
            y, kept = vjp.forward(o["pc"], o["xin"])
            return {**nothing, "out": y, "kept": [] if remat else kept}

        def fwd_last(o: dict[str, Any]) -> dict[str, Any]:
            y, kept = vjp.forward(o["pc"], o["xin"])
            value, (g_lp, g_y) = jax.value_and_grad(loss_fn, argnums=(0, 1))(loss_params, y, o["t"])
            return {  # g_y stays on this device (tables: `keep`) as the cotangent of B
                **nothing,
                "out": g_y,
                "kept": [] if remat else kept,
                "loss": value.astype(jnp.float32),
                "g_lp": _wide(g_lp),
            }

        def bwd(o: dict[str, Any]) -> dict[str, Any]:
            saved = None if remat else o["saved"]
            g_in, stash = vjp.backward_input(o["pc"], o["xin"], saved, o["g_out"])
            return {**nothing, "out": g_in, "stash": stash}

        # One branch per distinct action the schedule runs: XLA compiles every branch of the
        # switch, used or not. B serves every backward (stage 0's files g_x below; a whole
        # backward's W runs right after it, below); W runs outside the switch.
        by_kind = [idle, fwd, fwd_last, bwd, bwd, idle, bwd, bwd]  # tables.IDLE, ...
        branches: list[Callable[[dict[str, Any]], dict[str, Any]]] = []
        branch_of = np.zeros(len(by_kind), np.int32)
        for k in sorted({int(k) for k in np.unique(tables.kind)} | {IDLE}):
            if by_kind[k] not in branches:
                branches.append(by_kind[k])
            branch_of[k] = branches.index(by_kind[k])
        rows = {**tables.rows(), "branch": jnp.asarray(branch_of[tables.kind])}
        has_w = bool(np.isin(tables.kind, (WGT, BWD_WGT, BWD_FIRST_WGT)).any())

        def accumulate(acc: Any, pc: Any, xin: Any, stash: Any, chunk: Any) -> Any:
            """W: the weight gradient from B's stash, added to the float32 accumulator.

            Its own ``cond`` with the accumulator as the only large operand: ticks without
            a W leave it in place instead of copying it through the switch."""
            g = vjp.backward_weight(pc, xin, stash)
            total = jax.tree.map(lambda a, b: a + b.astype(a.dtype), _index(acc, chunk), g)
            return _update(acc, total, chunk)

        def tick(c: dict[str, Any], row_all: dict[str, Any]) -> tuple[dict[str, Any], None]:
            row = {k: v[me] for k, v in row_all.items()}
            kind, mb = row["kind"], row["microbatch"]
            first = row["x_slot"] < 0
            from_x, from_msg = _index(xs, mb), _index(c["msg"], jnp.maximum(row["x_slot"], 0))
            operands = {
                "pc": one_chunk(params) if one_chunk else _index(params, row["chunk"]),
                "xin": jax.tree.map(lambda a, b: jnp.where(first, a, b), from_x, from_msg),
                "g_out": _index(c["msg"], row["c_slot"]),
                "saved": [] if remat else _index(c["r"], row["r_slot"]),
                "stash": _index(c["s"], row["s_slot"]),
                "t": _index(targets, mb),
            }
            o = jax.lax.switch(row["branch"], branches, operands)
            is_f, is_b = (kind == FWD) | (kind == FWD_LAST), (kind == BWD) | (kind == BWD_FIRST)
            to_g_x = (kind == BWD_FIRST) | (kind == BWD_FIRST_WGT)
            c = {
                **c,
                "r": c["r"]
                if remat
                else _file(c["r"], o["kept"], jnp.where(is_f, row["r_slot"], -1)),
                "s": _file(c["s"], o["stash"], jnp.where(is_b, row["s_slot"], -1)),
                "g_x": _file(c["g_x"], _wide(o["out"]), jnp.where(to_g_x, mb, -1)),
                "loss": c["loss"] + o["loss"],
                "g_lp": jax.tree.map(jnp.add, c["g_lp"], o["g_lp"]),
            }
            if has_w:
                whole = (kind == BWD_WGT) | (kind == BWD_FIRST_WGT)
                stash = jax.tree.map(
                    lambda a, b: jnp.where(whole, a, b), o["stash"], operands["stash"]
                )
                c["g_params"] = jax.lax.cond(
                    whole | (kind == WGT),
                    accumulate,
                    lambda acc, *_: acc,
                    c["g_params"],
                    operands["pc"],
                    operands["xin"],
                    stash,
                    row["chunk"],
                )
            out = o["out"]
            msg = _file(c["msg"], out, row["keep"])
            # Both ppermutes run every tick, idle or not: under a per-tick lax.cond (to skip
            # an idle one) XLA:CPU aborts in its collective rendezvous ("Check failed: id <
            # num_threads", jaxlib 0.10.2: both permutes get channel_id=1), and the skip
            # bought no measurable CPU time.
            if tables.right:
                msg = _file(msg, jax.lax.ppermute(out, axis, tables.right), row["from_left"])
            if tables.left:
                msg = _file(msg, jax.lax.ppermute(out, axis, tables.left), row["from_right"])
            return {**c, "msg": msg}, None

        carry = {
            "msg": _zeros(act, tables.slots["msg"]),
            "r": [] if remat else _zeros(vjp.saved, tables.slots["r"]),
            "s": _zeros(vjp.stash, tables.slots["s"]),
            "g_params": jax.tree.map(
                lambda a: jnp.zeros(a.shape, accumulator_dtype(a.dtype)), params
            ),
            "g_x": jax.tree.map(lambda a: jnp.zeros(a.shape, accumulator_dtype(a.dtype)), xs),
            "g_lp": jax.tree.map(
                lambda a: jnp.zeros(a.shape, accumulator_dtype(a.dtype)), loss_params
            ),
            "loss": jnp.zeros((), jnp.float32),
        }
        carry, _ = jax.lax.scan(tick, carry, rows)

        def mean(acc: Any, like: Any) -> Any:  # the microbatch mean, cast once
            return jax.tree.map(lambda a, o: (a / m).astype(o.dtype), acc, like)

        # loss, g_x and g_loss_params each live on one device: share them along the axis,
        # in the accumulator dtype (XLA:CPU aborts on bf16 all-reduces in partly manual
        # programs; see DESIGN.md).
        loss = jax.lax.psum(carry["loss"], axis) / m
        g_x = mean(jax.lax.psum(carry["g_x"], axis), xs)
        g_lp = mean(jax.lax.psum(carry["g_lp"], axis), loss_params)
        return loss, mean(carry["g_params"], params), g_x, g_lp

    return run
