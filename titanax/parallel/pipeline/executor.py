"""The per-device program: a scan over ticks that replays the tables, with residuals kept
or recomputed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from titanax.errors import ScheduleError
from titanax.parallel.collectives import BoundAxis, bind_axes
from titanax.parallel.pipeline.tables import Tables
from titanax.parallel.schedules import Schedule

__all__ = ["executor"]


def _index(tree: Any, i: Any) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _update(tree: Any, value: Any, i: Any) -> Any:
    return jax.tree.map(lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, 0), tree, value)


def _add_at(tree: Any, value: Any, i: Any) -> Any:
    return _update(tree, jax.tree.map(jnp.add, _index(tree, i), value), i)


def _zeros(tree: Any, n: int) -> Any:
    return jax.tree.map(lambda a: jnp.zeros((n, *a.shape), a.dtype), tree)


class _Residuals:
    """What a stage's backward needs, split into what is kept and what is found again.

    ``jax.vjp`` of the stage closes over its residuals. Tracing its VJP function
    to a jaxpr turns them into explicit constants and the backward into a pure
    function of ``(cotangent, *residuals)``. Residuals that *are* the stage's
    parameters or its input are not stored again (the backward takes them from
    the parameters and the input buffer), and constants of the stage function
    are kept once; only the rest is stored per microbatch in flight.
    """

    def __init__(self, stage: Callable[[Any, Any], Any], params: Any, x: Any):
        box: dict[str, Any] = {}

        def probe(pc: Any, xin: Any) -> Any:
            _, jaxpr, out_tree, res = self._vjp(stage, pc, xin)
            kinds = self._classify(res, pc, xin)
            box.update(
                jaxpr=jaxpr,
                out_tree=out_tree,
                kinds=kinds,
                consts={i: r for i, (r, k) in enumerate(zip(res, kinds)) if k[0] == "const"},
            )
            return [r for r, k in zip(res, kinds) if k[0] == "saved"]

        self.saved = jax.eval_shape(probe, params, x)
        self.stage = stage
        self.jaxpr, self.out_tree = box["jaxpr"], box["out_tree"]
        self.kinds, self.consts = box["kinds"], box["consts"]

    @staticmethod
    def _vjp(stage: Callable[[Any, Any], Any], pc: Any, xin: Any) -> Any:
        y, vjp_fn = jax.vjp(stage, pc, xin)
        closed, out_shape = jax.make_jaxpr(vjp_fn, return_shape=True)(y)
        return y, closed.jaxpr, jax.tree.structure(out_shape), list(closed.consts)

    @staticmethod
    def _classify(res: list[Any], pc: Any, xin: Any) -> list[tuple[str, int]]:
        params, inputs = jax.tree.leaves(pc), jax.tree.leaves(xin)
        kinds = []
        for r in res:
            kind = next((("param", i) for i, leaf in enumerate(params) if r is leaf), None)
            kind = kind or next((("input", i) for i, leaf in enumerate(inputs) if r is leaf), None)
            if kind is None and not isinstance(r, jax.core.Tracer):
                kind = ("const", -1)  # a constant of the stage function: the same every time
            kinds.append(kind or ("saved", -1))
        return kinds

    def forward(self, pc: Any, xin: Any) -> tuple[Any, list[Any]]:
        """The stage output and the residuals to keep."""
        y, _, _, res = self._vjp(self.stage, pc, xin)
        if self._classify(res, pc, xin) != self.kinds:
            raise ScheduleError(
                "pipeline: the stage function saved different residuals on two traces; "
                "use pipeline(..., remat=True), which keeps only stage inputs."
            )
        return y, [r for r, k in zip(res, self.kinds) if k[0] == "saved"]

    def backward(self, pc: Any, xin: Any, saved: list[Any], g_out: Any) -> Any:
        """``(g_params, g_input)`` from the kept residuals."""
        params, inputs, kept = jax.tree.leaves(pc), jax.tree.leaves(xin), iter(saved)
        pick = {
            "param": lambda i, _: params[i],
            "input": lambda i, _: inputs[i],
            "const": lambda _, n: self.consts[n],
            "saved": lambda i, _: next(kept),
        }
        res = [pick[k](i, n) for n, (k, i) in enumerate(self.kinds)]
        flat = jax.core.eval_jaxpr(self.jaxpr, res, *jax.tree.leaves(g_out))
        return jax.tree.unflatten(self.out_tree, flat)


def executor(
    stage_fn: Callable[[Any, Any], Any],
    loss_fn: Callable[[Any, Any, Any], Any],
    s: Schedule,
    tables: Tables,
    axis: str,
    remat: bool,
) -> Callable[..., Any]:
    """The per-device program: ``(params (v, ...), x (m, b, ...), targets, loss_params)``."""
    p, m = s.stages, s.microbatches
    split = s.split_backward
    ring = s.virtual_stages > 1  # the last device feeds the first device's next chunk
    fwd_perm = [(d, (d + 1) % p) for d in range(p)] if ring else [(d, d + 1) for d in range(p - 1)]
    bwd_perm = [(d, (d - 1) % p) for d in range(p)] if ring else [(d + 1, d) for d in range(p - 1)]

    def run(params: Any, xs: Any, targets: Any, loss_params: Any) -> Any:
        me = jax.lax.axis_index(axis)
        act = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), xs)
        res = None if remat else _Residuals(stage_fn, _index(params, 0), act)

        def stage_input(c: dict[str, Any], row: dict[str, Any]) -> Any:
            first = (row["chunk"] == 0) & (me == 0)
            from_x, from_buf = _index(xs, row["microbatch"]), _index(c["x"], row["x_slot"])
            return jax.tree.map(lambda a, b: jnp.where(first, a, b), from_x, from_buf)

        def forward(c: dict[str, Any], row: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            pc, xin = _index(params, row["chunk"]), stage_input(c, row)
            if res is None:
                return stage_fn(pc, xin), c
            y, kept = res.forward(pc, xin)
            return y, {**c, "r": _update(c["r"], kept, row["r_slot"])}

        def backward(c: dict[str, Any], row: dict[str, Any]) -> tuple[Any, Any]:
            pc, xin = _index(params, row["chunk"]), stage_input(c, row)
            g_out = _index(c["c"], row["c_slot"])
            if res is None:  # recompute the stage forward (remat), then its VJP
                return jax.vjp(stage_fn, pc, xin)[1](g_out)
            return res.backward(pc, xin, _index(c["r"], row["r_slot"]), g_out)

        def idle(c: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
            return c

        def fwd(c: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
            y, c = forward(c, row)
            return {**c, "send_x": y}

        def fwd_last(c: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
            y, c = forward(c, row)
            t = _index(targets, row["microbatch"])
            loss, (g_lp, g_y) = jax.value_and_grad(loss_fn, argnums=(0, 1))(loss_params, y, t)
            scale = lambda tree: jax.tree.map(lambda g: g / m, tree)  # noqa: E731
            return {
                **c,
                "loss": c["loss"] + loss / m,
                "g_lp": jax.tree.map(jnp.add, c["g_lp"], scale(g_lp)),
                "c": _update(c["c"], scale(g_y), row["c_slot"]),
            }

        def bwd(c: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
            g_params, g_in = backward(c, row)  # under split, XLA prunes the unused g_params
            c = {**c, "send_c": g_in}
            if not split:
                c["g_params"] = _add_at(c["g_params"], g_params, row["chunk"])
            return c

        def bwd_first(c: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
            g_params, g_in = backward(c, row)
            c = {**c, "g_x": _update(c["g_x"], g_in, row["microbatch"])}
            if not split:
                c["g_params"] = _add_at(c["g_params"], g_params, row["chunk"])
            return c

        def wgt(c: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
            g_params, _ = backward(c, row)  # XLA prunes the unused input gradient
            return {**c, "g_params": _add_at(c["g_params"], g_params, row["chunk"])}

        branches = [idle, fwd, fwd_last, bwd, bwd_first, wgt]

        def tick(c: dict[str, Any], row_all: dict[str, Any]) -> tuple[dict[str, Any], None]:
            row = {k: v[me] for k, v in row_all.items()}
            c = jax.lax.switch(row["kind"], branches, {**c, "send_x": act, "send_c": act}, row)
            got = {
                "x": jax.lax.ppermute(c.pop("send_x"), axis, fwd_perm),
                "c": jax.lax.ppermute(c.pop("send_c"), axis, bwd_perm),
            }
            for buf, value in got.items():  # store what arrived, where the table says
                slot = row[f"recv_{buf}"]
                k = jnp.maximum(slot, 0)
                keep = _index(c[buf], k)
                ok = slot >= 0
                arrived = jax.tree.map(lambda g, o, ok=ok: jnp.where(ok, g, o), value, keep)
                c[buf] = _update(c[buf], arrived, k)
            return c, None

        carry = {
            "x": _zeros(act, tables.slots["x"]),
            "c": _zeros(act, tables.slots["c"]),
            "r": [] if res is None else _zeros(res.saved, tables.slots["r"]),
            "g_params": jax.tree.map(jnp.zeros_like, params),
            "g_x": jax.tree.map(jnp.zeros_like, xs),
            "g_lp": jax.tree.map(jnp.zeros_like, loss_params),
            "loss": jnp.zeros((), jnp.float32),
        }
        with bind_axes([BoundAxis(axis, "pipeline", True, p)]):
            carry, _ = jax.lax.scan(tick, carry, tables.rows())
        # loss, g_x and g_loss_params each live on one device: share them along the axis
        loss = jax.lax.psum(carry["loss"], axis)
        g_x = jax.lax.psum(carry["g_x"], axis)
        g_lp = jax.lax.psum(carry["g_lp"], axis)
        return loss, carry["g_params"], g_x, g_lp

    return run
