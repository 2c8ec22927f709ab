"""``tx.pipeline``: pipeline parallelism that runs a `Schedule` in one SPMD program.

The schedule's lockstep table becomes integer tables (per tick, per device: what to
do, on which microbatch and stage, in which buffer slot). One ``lax.scan`` over the
ticks runs them under ``shard_map`` over the stage axis: ``lax.switch`` picks the
action, ``ppermute`` passes activations forward and gradients backward between
ticks. The loop body is traced once, so compile time does not grow with the
number of microbatches, and buffers hold only the microbatches in flight (1F1B: at
most ``p`` per device).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, PartitionSpec

from titanax._util import shape_of
from titanax.errors import ScheduleError
from titanax.parallel.collectives import BoundAxis, bind_axes
from titanax.parallel.schedules import NAMES, Action, Kind, Schedule, get

__all__ = ["pipeline"]

P = PartitionSpec
IDLE, FWD, FWD_LAST, BWD, BWD_FIRST, WGT = range(6)


@dataclasses.dataclass(frozen=True)
class Tables:
    """A schedule compiled to per-tick, per-device integer tables (all ``(ticks, p)``)."""

    kind: np.ndarray
    microbatch: np.ndarray
    chunk: np.ndarray  # the device's local stage index: stage // p
    x_slot: np.ndarray  # buffer slot of the stage input (stages > 0)
    c_slot: np.ndarray  # buffer slot of the output cotangent
    r_slot: np.ndarray  # buffer slot of the saved residuals (F to the last B or W)
    recv_x: np.ndarray  # slot for the activation received after this tick, or -1
    recv_c: np.ndarray  # slot for the cotangent received after this tick, or -1
    slots: dict[str, int]  # buffer sizes: "x", "c", "r"

    def rows(self) -> dict[str, jax.Array]:
        names = ("kind", "microbatch", "chunk", "x_slot", "c_slot", "r_slot", "recv_x", "recv_c")
        return {k: jnp.asarray(getattr(self, k)) for k in names}


def _allocate(intervals: list[tuple[int, int, Any]]) -> tuple[dict[Any, int], int]:
    """Slots for values written at the end of tick ``w`` and last read at tick ``r``."""
    free_at: list[int] = []  # per slot: the tick of its last read
    slot_of: dict[Any, int] = {}
    for w, r, key in sorted(intervals, key=lambda i: (i[0], i[1])):
        for k, last in enumerate(free_at):
            if last <= w:
                free_at[k] = r
                slot_of[key] = k
                break
        else:
            slot_of[key] = len(free_at)
            free_at.append(r)
    return slot_of, len(free_at)


def compile_tables(s: Schedule) -> Tables:
    """Turns the schedule's lockstep table into the executor's integer tables."""
    p, last = s.stages, s.num_stages - 1
    when = {a: t for t, row in enumerate(s.ticks) for a in row if a is not None}
    release: Kind = "W" if s.split_backward else "B"
    lives: dict[str, list[list[tuple[int, int, Any]]]] = {
        k: [[] for _ in range(p)] for k in ("x", "c", "r")
    }
    for mb in range(s.microbatches):
        for st in range(s.num_stages):
            d, end, key = st % p, when[Action(release, mb, st)], (mb, st)
            if st > 0:
                lives["x"][d].append((when[Action("F", mb, st - 1)], end, key))
            made = when[Action("F", mb, st)] if st == last else when[Action("B", mb, st + 1)]
            lives["c"][d].append((made, end, key))
            lives["r"][d].append((when[Action("F", mb, st)], end, key))
    slot: dict[str, dict[Any, int]] = {k: {} for k in lives}
    sizes = dict.fromkeys(lives, 1)
    for k, per_device in lives.items():
        for intervals in per_device:
            got, n = _allocate(intervals)
            slot[k].update(got)
            sizes[k] = max(sizes[k], n)
    ticks = len(s.ticks)
    t = {k: np.zeros((ticks, p), np.int32) for k in ("kind", "mb", "chunk", "x", "c", "r")}
    recv = {k: np.full((ticks, p), -1, np.int32) for k in ("x", "c")}
    for tick, row in enumerate(s.ticks):
        for d, a in enumerate(row):
            if a is None:
                continue
            key = (a.microbatch, a.stage)
            if a.kind == "F":
                kind = FWD_LAST if a.stage == last else FWD
                if a.stage < last:  # the next stage's device receives it after this tick
                    recv["x"][tick, (a.stage + 1) % p] = slot["x"][(a.microbatch, a.stage + 1)]
            elif a.kind == "B":
                kind = BWD_FIRST if a.stage == 0 else BWD
                if a.stage > 0:
                    recv["c"][tick, (a.stage - 1) % p] = slot["c"][(a.microbatch, a.stage - 1)]
            else:
                kind = WGT
            t["kind"][tick, d], t["mb"][tick, d] = kind, a.microbatch
            t["chunk"][tick, d] = a.stage // p
            t["x"][tick, d] = slot["x"].get(key, 0)
            t["c"][tick, d], t["r"][tick, d] = slot["c"][key], slot["r"][key]
    return Tables(
        t["kind"], t["mb"], t["chunk"], t["x"], t["c"], t["r"], recv["x"], recv["c"], sizes
    )


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


def _executor(
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


def pipeline(
    stages: Callable[[Any, Any], Any],
    /,
    *,
    schedule: str | Schedule = "1f1b",
    microbatches: int,
    axis: str = "stage",
    loss: Callable[[Any, Any, Any], Any],
    mesh: Mesh | None = None,
    virtual_stages: int = 1,
    remat: bool = False,
) -> Callable[..., Any]:
    """Pipeline parallelism: a value-and-grad transform that runs a schedule in one program.

    ``stages(params, x) -> x`` is one stage of the model (the activation keeps its
    shape and dtype); stage ``s`` runs with row ``s`` of ``stage_params``. The
    returned ``pipe(stage_params, x, targets, loss_params=None)`` splits ``x`` and
    ``targets`` into ``microbatches`` along their leading dimension and returns
    ``(loss, (g_stage_params, g_x, g_loss_params))``, equal to
    ``jax.value_and_grad`` of running the stages in order on each microbatch and
    averaging ``loss(loss_params, y, targets)`` over the microbatches.

    Stage ``s`` runs on device ``s % p`` of the ``axis`` (``p`` devices, each
    holding ``virtual_stages`` stages). Activations travel forward and
    gradients backward with ``ppermute``; the schedule decides the order. Call
    ``pipe`` anywhere: at top level, or inside a ``data_parallel`` step (mesh
    ``data x stage``) where it sees the replica's batch, with tensor-parallel
    stage parameters (mesh ``stage x model``), or both.

    Args:
      stages: the stage function.
      schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"``, ``"zero_bubble"``,
        or a `Schedule`.
      microbatches: microbatches per call.
      axis: the mesh axis the stages are spread over.
      loss: ``loss(loss_params, y, targets) -> scalar``, applied after the last stage.
      mesh: the mesh, when ``pipe`` is called outside a Titanax step; defaults
        to the one set with ``jax.set_mesh``.
      virtual_stages: stages per device (``interleaved_1f1b`` needs 2 or more).
      remat: keep only each stage's input per microbatch in flight and recompute
        its forward in the backward pass, instead of keeping its residuals.

    Returns:
      ``pipe(stage_params, x, targets, loss_params=None)``.

    Raises:
      ScheduleError: an unknown schedule name (the allowed ones are listed);
        at call time, ``stage_params`` with a number of rows other than the
        axis size times ``virtual_stages``, microbatches that do not divide
        the batch, or fewer microbatches than the schedule needs.

    Examples:
      >>> import jax, jax.numpy as jnp, titanax as tx
      >>> mesh = tx.mesh(stage=4, rest=2)
      >>> pipe = tx.pipeline(lambda w, x: jnp.tanh(x @ w), schedule="1f1b", microbatches=8,
      ...                    loss=lambda _, y, t: jnp.mean((y - t) ** 2), mesh=mesh)
      >>> w = jnp.stack([jnp.eye(3) * 0.5] * 4)            # 4 stages, stacked
      >>> x, t = jnp.ones((16, 3)), jnp.zeros((16, 3))
      >>> loss, (g_w, g_x, _) = pipe(w, x, t)
      >>> def sequential(w, x):
      ...     for s in range(4):
      ...         x = jnp.tanh(x @ w[s])
      ...     return jnp.mean(x ** 2)
      >>> bool(jnp.allclose(g_w, jax.grad(sequential)(w, x), rtol=1e-5))
      True
    """
    if isinstance(schedule, str) and schedule not in NAMES:
        allowed = ", ".join(repr(n) for n in NAMES)
        raise ScheduleError(f"schedule must be one of {allowed}; got {schedule!r}.")
    if not isinstance(schedule, (str, Schedule)):
        raise ScheduleError(f"schedule must be a name or a tx.Schedule, got {schedule!r}.")
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ScheduleError(f"pipeline: microbatches must be a positive int, got {microbatches!r}.")
    if not callable(stages) or not callable(loss):
        raise ScheduleError("pipeline: `stages` and `loss` must be functions.")

    @functools.cache
    def plan(p: int) -> tuple[Schedule, Tables]:
        if isinstance(schedule, Schedule):
            if (schedule.stages, schedule.microbatches) != (p, microbatches):
                raise ScheduleError(
                    f"pipeline: the schedule is for stages={schedule.stages}, microbatches="
                    f"{schedule.microbatches}, but the {axis!r} axis has {p} devices and "
                    f"microbatches={microbatches}. Build it with tx.schedules.get(..., "
                    f"stages={p}, microbatches={microbatches})."
                )
            s = schedule
        else:
            s = get(schedule, stages=p, microbatches=microbatches, virtual_stages=virtual_stages)
        return s, compile_tables(s)

    @functools.cache
    def program(view: Mesh | AbstractMesh, in_trace: bool, has_loss_params: bool) -> Any:
        """The traced computation for one mesh (cached: repeated calls reuse one jit)."""
        p = view.shape[axis]
        s, tables = plan(p)
        v = s.virtual_stages
        explicit = view._name_to_type[axis] == AxisType.Explicit

        def loss_of(q: Any, y: Any, t: Any) -> Any:
            return loss(q if has_loss_params else None, y, t)

        run = _executor(stages, loss_of, s, tables, axis, remat)

        def split(a: Any) -> Any:
            return a.reshape(microbatches, a.shape[0] // microbatches, *a.shape[1:])

        def rows(a: Any) -> Any:  # (v, p, ...) back to stage order (p * v, ...)
            shape = (p * v, *a.shape[2:])
            if not explicit:
                return a.reshape(shape)
            out = P(axis) if v == 1 else P()  # interleaved rows are not one block per device
            return jax.lax.reshape(a, shape, out_sharding=out)

        def call(stage_params: Any, x: Any, targets: Any, lp: Any) -> Any:
            # Stage s lives on device s % p: view rows as (v, p) and split the p dimension.
            grid = jax.tree.map(lambda a: a.reshape(v, p, *a.shape[1:]), stage_params)
            if explicit:  # an Explicit axis is part of the type: lay the rows out first
                grid = jax.tree.map(lambda a: jax.sharding.reshard(a, P(None, axis)), grid)
            local = jax.shard_map(
                lambda g, *rest: _squeeze_run(run, g, *rest),
                mesh=None if in_trace else view,
                in_specs=(P(None, axis), P(), P(), P()),
                out_specs=(P(), P(None, axis), P(), P()),
                axis_names={axis},
                check_vma=False,
            )
            xs, ts = jax.tree.map(split, x), jax.tree.map(split, targets)
            loss_value, g_grid, g_xs, g_lp = local(grid, xs, ts, lp)
            g_x = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), g_xs)
            g_stage = jax.tree.map(rows, g_grid)
            return loss_value, (g_stage, g_x, g_lp if has_loss_params else None)

        return call if in_trace else jax.jit(call)

    def pipe(stage_params: Any, x: Any, targets: Any, loss_params: Any = None) -> Any:
        ctx = jax.sharding.get_abstract_mesh()
        in_trace = not ctx.empty  # inside a Titanax step (or any trace with a mesh)
        view: Mesh | AbstractMesh | None = (
            ctx if in_trace else mesh if mesh is not None else jax.sharding.get_mesh()
        )
        if view is None or view.empty:
            raise ScheduleError(
                f"pipeline(axis={axis!r}): no mesh. Pass mesh=tx.mesh(...), call it inside a "
                "Titanax step, or inside `with jax.set_mesh(mesh):`."
            )
        if axis not in view.axis_names:
            raise ScheduleError(
                f"pipeline(axis={axis!r}): the mesh has no axis {axis!r} (axes: "
                f"{', '.join(view.axis_names)}). Build the mesh with it, e.g. "
                f"tx.mesh({axis}=4, ...)."
            )
        p = view.shape[axis]
        v = plan(p)[0].virtual_stages
        rows = {shape_of(a)[0] if shape_of(a) else -1 for a in jax.tree.leaves(stage_params)}
        if rows != {p * v}:
            raise ScheduleError(
                f"pipeline(axis={axis!r}): stage_params leaves have {sorted(rows)} rows, but the "
                f"pipeline runs {p * v} stages ({p} devices along {axis!r} x virtual_stages="
                f"{v}). Stack one row per stage, or change the mesh or virtual_stages."
            )
        batch = {shape_of(a)[0] if shape_of(a) else -1 for a in jax.tree.leaves((x, targets))}
        if len(batch) != 1 or min(batch) < 1 or min(batch) % microbatches:
            raise ScheduleError(
                f"pipeline: microbatches={microbatches} must divide the batch, but x and "
                f"targets have leading dimensions {sorted(batch)}. Use a batch that is a "
                f"multiple of {microbatches}, or another number of microbatches."
            )
        call = program(view, in_trace, loss_params is not None)
        lp = {} if loss_params is None else loss_params
        if in_trace:
            return call(stage_params, x, targets, lp)
        assert isinstance(view, Mesh)  # outside a trace the mesh is concrete
        with jax.set_mesh(view):
            return call(stage_params, x, targets, lp)

    return pipe


def _squeeze_run(run: Callable[..., Any], grid: Any, *rest: Any) -> Any:
    """Runs the executor on this device's ``(v, 1, ...)`` rows, as ``(v, ...)``."""
    params = jax.tree.map(lambda a: a[:, 0], grid)
    loss, g_params, g_x, g_lp = run(params, *rest)
    return loss, jax.tree.map(lambda a: a[:, None], g_params), g_x, g_lp
