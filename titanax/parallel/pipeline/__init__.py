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

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, Mesh, PartitionSpec

from titanax._util import leaves_with_paths, shape_of
from titanax.errors import ScheduleError
from titanax.parallel.claims import claim
from titanax.parallel.collectives import BoundAxis, bind_axes, bound_axes
from titanax.parallel.pipeline.executor import executor as _executor
from titanax.parallel.pipeline.tables import Tables, compile_tables
from titanax.parallel.plan import context_mesh
from titanax.parallel.schedules import NAMES, Schedule, get

__all__ = ["pipeline", "compile_tables", "Tables"]

P = PartitionSpec


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
    holding ``virtual_stages`` stages; ZB-V: device ``d`` holds ``d`` and ``2p - 1 - d``). Activations travel forward and
    gradients backward with ``ppermute``; the schedule decides the order. Call
    ``pipe`` anywhere: at top level, or inside a ``data_parallel`` step (mesh
    ``data x stage``) where it sees the replica's batch, with tensor-parallel
    stage parameters (mesh ``stage x model``), or both.

    Args:
      stages: the stage function.
      schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"``, ``"zero_bubble"``
        (ZB-H1), ``"zero_bubble_v"`` (ZB-V), or a `Schedule`.
      microbatches: microbatches per call.
      axis: the mesh axis the stages are spread over.
      loss: ``loss(loss_params, y, targets) -> scalar``, applied after the last stage.
      mesh: the mesh, when ``pipe`` is called outside a Titanax step; defaults
        to the one set with ``jax.set_mesh``.
      virtual_stages: stages per device (``interleaved_1f1b`` needs 2 or more,
        ``zero_bubble_v`` exactly 2).
      remat: keep only each stage's input per microbatch in flight and recompute
        its forward in the backward pass, instead of keeping its residuals.

    Returns:
      ``pipe(stage_params, x, targets, loss_params=None)``.

    Raises:
      ScheduleError: an unknown schedule name (the allowed ones are listed);
        at call time, ``stage_params`` with a number of rows other than the
        axis size times ``virtual_stages``, microbatches that do not divide
        the batch, or fewer microbatches than the schedule needs.
      CollectiveError: at call time, a stage or loss function that runs a plain
        ``jax.lax.ppermute`` (use `tx.ppermute`) or a collective over ``axis``.

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

    def loss_of(has_loss_params: bool) -> Callable[[Any, Any, Any], Any]:
        return lambda q, y, t: loss(q if has_loss_params else None, y, t)

    def program(
        view: Mesh | AbstractMesh,
        concrete: Mesh | None,
        stage_fn: Callable[[Any, Any], Any],
        loss_fn: Callable[[Any, Any, Any], Any],
        has_loss_params: bool,
    ) -> Callable[..., Any]:
        """``call(stage_params, x, targets, loss_params)`` for one mesh."""
        p = view.shape[axis]
        s, tables = plan(p)
        v = s.virtual_stages
        explicit = view._name_to_type[axis] == AxisType.Explicit
        # grid[c, d] is the model stage of chunk c on device d ("loop": c * p + d).
        order = [[_stage_at(s, c, d) for d in range(p)] for c in range(v)]
        looped = all(order[c][d] == c * p + d for c in range(v) for d in range(p))
        flat = [st for chunk in order for st in chunk]
        back = [flat.index(st) for st in range(p * v)]

        def split(a: Any) -> Any:
            return a.reshape(microbatches, a.shape[0] // microbatches, *a.shape[1:])

        def to_grid(a: Any) -> Any:
            a = a if looped else a[jnp.asarray(flat)]
            a = a.reshape(v, p, *a.shape[1:])
            if explicit:  # an Explicit axis is part of the type: lay the rows out first
                a = jax.sharding.reshard(a, P(None, axis))
            return a

        def from_grid(a: Any) -> Any:  # (v, p, ...) back to model-stage order (p * v, ...)
            shape = (p * v, *a.shape[2:])
            if explicit:
                out = P(axis) if v == 1 else P()  # other rows are not one block per device
                a = jax.lax.reshape(a, shape, out_sharding=out)
            else:
                a = a.reshape(shape)
            return a if looped else a[jnp.asarray(back)]

        run = _executor(stage_fn, loss_fn, s, tables, axis, remat)

        def call(stage_params: Any, x: Any, targets: Any, lp: Any) -> Any:
            local = jax.shard_map(
                functools.partial(_squeeze_run, run),
                mesh=concrete,
                in_specs=(P(None, axis), P(), P(), P()),
                out_specs=(P(), P(None, axis), P(), P()),
                axis_names={axis},
                check_vma=False,
            )
            grid = jax.tree.map(to_grid, stage_params)
            xs, ts = jax.tree.map(split, x), jax.tree.map(split, targets)
            loss_value, g_grid, g_xs, g_lp = local(grid, xs, ts, lp)
            g_x = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), g_xs)
            g_stage = jax.tree.map(from_grid, g_grid)
            return loss_value, (g_stage, g_x, g_lp if has_loss_params else None)

        return call

    @functools.cache
    def compiled(view: Mesh, has_loss_params: bool) -> Any:
        """Outside any trace: one ``jax.jit`` per mesh (repeated calls reuse it)."""
        return jax.jit(program(view, None, stages, loss_of(has_loss_params), has_loss_params))

    checked: set[Any] = set()

    def pipe(stage_params: Any, x: Any, targets: Any, loss_params: Any = None) -> Any:
        args = (stage_params, x, targets, loss_params)
        traced = any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args))
        ctx = context_mesh()
        view: Mesh | AbstractMesh | None = mesh if ctx.empty else ctx
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
        binder = {b.name: b for b in bound_axes()}.get(axis)
        if binder is not None and binder.manual:
            raise ScheduleError(
                f"pipeline(axis={axis!r}): the step's tx.{binder.transform} already makes "
                f"{axis!r} a manual axis, so the body sees one device's share along it and the "
                "pipeline cannot run its own program over it. Give that transform another "
                f"axis; the pipeline lays out {axis!r} itself."
            )
        p = view.shape[axis]
        v = plan(p)[0].virtual_stages
        rows = {shape_of(a)[0] if shape_of(a) else -1 for a in jax.tree.leaves(stage_params)}
        if rows != {p * v}:
            raise ScheduleError(
                f"pipeline(axis={axis!r}): stage_params leaves have {sorted(rows)} rows, but the "
                f"pipeline runs {p * v} stages ({p} devices along {axis!r} x virtual_stages="
                f"{v}). Stack one row per stage (tx.stack_layers), or change the mesh or "
                "virtual_stages."
            )
        batch = {shape_of(a)[0] if shape_of(a) else -1 for a in jax.tree.leaves((x, targets))}
        if len(batch) != 1 or min(batch) < 1 or min(batch) % microbatches:
            raise ScheduleError(
                f"pipeline: microbatches={microbatches} must divide the batch, but x and "
                f"targets have leading dimensions {sorted(batch)}. Use a batch that is a "
                f"multiple of {microbatches}, or another number of microbatches."
            )
        signature = jax.tree.map(
            lambda a: (shape_of(a), str(jnp.result_type(a))), (stage_params, x, loss_params)
        )
        key = (jax.tree.structure(signature), tuple(jax.tree.leaves(signature)))
        if key not in checked:  # once per structure: it traces the stage
            _check_leaves(stages, stage_params, x, loss_params, microbatches, axis)
            checked.add(key)
        has_lp = loss_params is not None
        lp = {} if loss_params is None else loss_params
        if not traced:
            assert isinstance(view, Mesh)  # outside a trace the mesh is concrete
            call = compiled(view, has_lp)
            if ctx.empty:
                with jax.set_mesh(view):
                    return call(stage_params, x, targets, lp)
            return call(stage_params, x, targets, lp)
        # Inside a trace (a Titanax step, or the user's own jax.jit): no jit of our own.
        if not ctx.empty and view._name_to_type[axis] != AxisType.Manual:
            # In a Titanax step that leaves the axis Auto: lay the stage parameters (and
            # their optimizer moments) out along it, one block of rows per device, rather
            # than replicated and all-gathered every step (titanax.parallel.claims).
            claim(axis, jax.tree.leaves(stage_params), by=f"pipeline(axis={axis!r})")
        concrete = view if isinstance(view, Mesh) else None
        call = program(view, concrete, stages, loss_of(has_lp), has_lp)
        try:
            if ctx.empty:  # the user's own jit without jax.set_mesh: give the trace the mesh
                with jax.sharding.use_abstract_mesh(view.abstract_mesh):
                    return call(stage_params, x, targets, lp)
            return call(stage_params, x, targets, lp)
        except ValueError as e:
            if "should match the aval mesh" not in str(e):
                raise
            manual = [n for n, t in view._name_to_type.items() if t == AxisType.Manual]
            raise ScheduleError(
                f"pipeline(axis={axis!r}): the stage or loss function uses an array computed "
                f"inside the step (manual axes {manual}) that it does not receive as an "
                "argument; JAX cannot close over such a value inside the pipeline's own "
                f"shard_map over {axis!r} (jax 0.10.2). Pass it in: as a leaf of loss_params "
                "(its gradient comes back in g_loss_params), or as a stage_params leaf with "
                "one row per stage; or compute it inside the stage or loss function."
            ) from e

    return pipe


def _check_leaves(
    stages: Callable[[Any, Any], Any],
    stage_params: Any,
    x: Any,
    loss_params: Any,
    m: int,
    axis: str,
) -> None:
    """Raises a `ScheduleError` for leaves the pipeline cannot carry or differentiate."""
    where = f"pipeline(axis={axis!r})"
    keys = [
        f"{name}[{path}]" if path else name
        for name, tree in (("stage_params", stage_params), ("x", x), ("loss_params", loss_params))
        for path, a in leaves_with_paths(tree)
        if jax.dtypes.issubdtype(jnp.result_type(a), jax.dtypes.prng_key)
    ]
    if keys:
        raise ScheduleError(
            f"{where}: {', '.join(keys)} "
            f"{'is a PRNG key array' if len(keys) == 1 else 'are PRNG key arrays'}, which the "
            "pipeline cannot pass between stages or differentiate. Pass "
            "jax.random.key_data(key) (uint32) instead and rebuild the key inside the stage "
            "with jax.random.wrap_key_data."
        )
    ints = [
        f"x[{path}]" if path else "x"
        for path, a in leaves_with_paths(x)
        if not jnp.issubdtype(jnp.result_type(a), jnp.inexact)
    ]
    if ints:
        raise ScheduleError(
            f"{where}: {', '.join(ints)} of the activation {'is' if len(ints) == 1 else 'are'} "
            "not floating point; the pipeline sends activations forward and their gradients "
            "back. Carry integer data (masks, positions) in stage_params or compute it "
            "inside the stage."
        )
    row = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(shape_of(a)[1:], jnp.result_type(a)), stage_params
    )
    x_mb = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct((shape_of(a)[0] // m, *shape_of(a)[1:]), jnp.result_type(a)),
        x,
    )
    with bind_axes([BoundAxis(axis, "pipeline", True)]):  # as the executor traces it
        y = jax.eval_shape(stages, row, x_mb)
    want = [(p, a.shape, a.dtype) for p, a in leaves_with_paths(x_mb)]
    got = [(p, a.shape, a.dtype) for p, a in leaves_with_paths(y)]
    same: bool = jax.tree.structure(y) == jax.tree.structure(x_mb)  # type: ignore[operator]
    if not same or got != want:
        show = lambda t: ", ".join(f"{p or 'x'}: {d}{list(s)}" for p, s, d in t)  # noqa: E731
        raise ScheduleError(
            f"{where}: each stage must return an activation of the structure, shapes and "
            f"dtypes it takes (the next stage takes it); for a microbatch it takes "
            f"{show(want)} and returns {show(got)}. Cast inside the stage (e.g. return "
            "y.astype(x.dtype)), or move the change of shape into the loss."
        )


def _stage_at(s: Schedule, chunk: int, device: int) -> int:
    """The model stage whose parameters sit at ``(chunk, device)`` of the executor's grid."""
    return next(
        st for st in range(s.num_stages) if (s.chunk_of(st), s.device_of(st)) == (chunk, device)
    )


def _squeeze_run(run: Callable[..., Any], grid: Any, *rest: Any) -> Any:
    """Runs the executor on this device's ``(v, 1, ...)`` rows, as ``(v, ...)``."""
    params = jax.tree.map(lambda a: a[:, 0], grid)
    loss, g_params, g_x, g_lp = run(params, *rest)
    return loss, jax.tree.map(lambda a: a[:, None], g_params), g_x, g_lp
