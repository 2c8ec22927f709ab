"""``ParallelFunction``: a plan compiled once as
``jax.jit(jax.shard_map(body, axis_names=manual_axes, ...))``, and called.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from titanax._util import Report, bullets, count, leaves_with_paths, shape_of
from titanax.errors import DistributedError, PlanError
from titanax.parallel import hlo
from titanax.parallel.collectives import bind_axes, bound_axes
from titanax.parallel.outputs import check_reduced, check_stray_shards, output_layout, top_level
from titanax.parallel.plan import Layer, Plan, _is_spec, _restrict, _spec_leaves, context_mesh
from titanax.parallel.rules import layout_table, spec_axes
from titanax.parallel.varying import varying_axes

__all__ = ["ParallelFunction", "apply_layer"]

P = PartitionSpec


def _arg_names(fun: Callable[..., Any], nargs: int) -> list[str]:
    try:
        params = list(inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(nargs):
        p = params[i] if i < len(params) else (params[-1] if params else None)
        label = p.name if p is not None and p.kind != p.VAR_KEYWORD else None
        names.append(f"argument {i} ({label})" if label else f"argument {i}")
    return names


class _Entry:
    """The compiled program for one argument structure.

    Built on the first call for a structure: the arguments' layouts are planned, the body
    is traced once to a jaxpr, and every check runs on that jaxpr (outputs that still vary
    along a manual axis, shards returned where no layout follows them). Only then is the
    program wrapped in ``jax.jit``, replaying the jaxpr; so a `TitanaxError` is raised
    before anything runs and before any argument is donated.
    """

    def __init__(self, pf: ParallelFunction, args: tuple[Any, ...]):
        plan = pf.plan
        self.mesh = plan.resolve_mesh()
        self.cmesh = plan.compile_mesh(self.mesh)
        self.names = _arg_names(pf.fun, len(args))
        self.batch = plan.batch_indices(len(args))
        self.multiprocess = jax.process_count() > 1
        if self.multiprocess:  # the mesh spans every process; all pass the same shapes
            from titanax.distributed import check_first_call

            check_first_call(pf.fun, self.mesh, args, self.batch, self.names)
        if self.multiprocess:  # each process passes its own rows of every batch
            args = tuple(_global_rows(a) if i in self.batch else a for i, a in enumerate(args))
        self.in_specs = plan.in_specs(args, self.mesh, self.names)
        self.in_shardings = jax.tree.map(
            lambda s: NamedSharding(self.cmesh, s), self.in_specs, is_leaf=_is_spec
        )
        self.donate: tuple[int, ...] = ()
        self.const_ids: frozenset[int] = frozenset()
        self._pf, self._args = pf, args
        self._jitted: Any = None
        self._out_specs: Any = None

    @property
    def jitted(self) -> Any:
        """The jitted program (traced and checked on first use)."""
        if self._jitted is None:
            self._build()
        return self._jitted

    @property
    def out_specs(self) -> Any:
        """The ``PartitionSpec`` tree of the outputs (traced and checked on first use)."""
        if self._jitted is None:
            self._build()
        return self._out_specs

    def _build(self) -> None:
        pf, args, plan = self._pf, self._args, self._pf.plan
        manual = plan.manual_axes
        fun, bound = pf.fun, plan.bound_axes(self.mesh)
        avals = jax.tree.map(lambda x: jax.ShapeDtypeStruct(shape_of(x), _dtype(x)), args)
        local_specs = jax.tree.map(lambda s: _restrict(s, manual), self.in_specs, is_leaf=_is_spec)
        local_in = jax.tree.map(lambda a, s: _local(a, s, self.mesh), avals, local_specs)
        where = " + ".join(lay.describe() for lay in plan.layers)

        def body(*local_args: Any) -> Any:
            with bind_axes(bound), plan.entered(avals, self.in_specs, self.mesh, local_args):
                return fun(*local_args)

        def smap(out_specs: Any, f: Callable[..., Any]) -> Callable[..., Any]:
            return jax.shard_map(
                f,
                mesh=self.cmesh,
                in_specs=local_specs,
                out_specs=out_specs,
                axis_names=set(manual),
                check_vma=False,  # pmap semantics: per-replica gradients, user reduces
            )

        # Trace the body once, as each device sees it.
        traced: dict[str, Any] = {}

        def trace_body(*local_args: Any) -> Any:
            closed, shapes = jax.make_jaxpr(body, return_shape=True)(*local_args)
            traced["jaxpr"], traced["shapes"] = closed, shapes
            return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

        with jax.sharding.use_abstract_mesh(self.cmesh.abstract_mesh):
            jax.eval_shape(smap(P(), trace_body) if manual else trace_body, *avals)
        closed, local_out = traced["jaxpr"], traced["shapes"]

        # Decide the outputs' layouts and check them, from the program.
        self.jaxpr = closed  # the body as each device runs it (kept for inspection)
        # Arrays the body closes over: never donated through an argument that is them too.
        self.const_ids = frozenset(id(c) for c in closed.consts if isinstance(c, jax.Array))
        sizes = {a: self.mesh.shape[a] for a in manual}
        self.input_axes = [  # per input leaf: the manual axes it varies along
            frozenset(a for a in spec_axes(s) if sizes.get(a, 1) > 1)
            for s in _spec_leaves(local_specs)
        ]
        every = frozenset(a for a in manual if sizes[a] > 1)
        vary = varying_axes(closed.jaxpr, self.input_axes, every) if manual else None
        kept = plan.kept_indices(len(args))
        layout = output_layout(local_out, local_in, self.in_specs, self.batch, vary, manual, kept)
        if vary is not None:
            check_stray_shards(local_out, layout.specs, vary, local_in, local_specs, self.batch)
            check_reduced(local_out, layout.specs, vary, sizes, where)
        self._out_specs = layout.specs

        # Donate the state: the arguments an output replaces (never batches, constants
        # listed in replicated_argnums, or arguments two outputs could be confused with).
        self.donate = tuple(
            sorted(
                i
                for i in set(layout.sources) - {None} - layout.ambiguous
                if plan.donate and i is not None and i not in self.batch and i not in kept
            )
        )
        restricted = jax.tree.map(lambda s: _restrict(s, manual), layout.specs, is_leaf=_is_spec)
        out_tree = jax.tree.structure(local_out)

        def replay(*local_args: Any) -> Any:
            flat = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *jax.tree.leaves(local_args))
            return jax.tree.unflatten(out_tree, flat)

        expected = [(a.shape, _canonical(a.dtype)) for a in jax.tree.leaves(avals)]

        def outer(*global_args: Any) -> Any:
            # jit traces again for new shapes; this entry's jaxpr is for its own only.
            if [(x.shape, x.dtype) for x in jax.tree.leaves(global_args)] != expected:
                raise _OtherShapes
            with jax.sharding.use_abstract_mesh(self.cmesh.abstract_mesh):
                out = smap(restricted, replay)(*global_args) if manual else replay(*global_args)
                return _pin_auto(out, layout.specs, self.cmesh, plan)

        self._jitted = jax.jit(
            outer,
            in_shardings=self.in_shardings,
            donate_argnums=self.donate,
        )

    def place(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Puts each argument on the mesh as the plan lays it out; placed arrays pass as they are."""
        placed = []
        for i, (arg, shardings) in enumerate(zip(args, self.in_shardings)):
            batch = i in self.batch
            placed.append(jax.tree.map(lambda x, s, b=batch: self._put(x, s, b), arg, shardings))
        return tuple(placed)

    def _put(self, x: Any, sharding: NamedSharding, batch: bool) -> jax.Array:
        if isinstance(x, jax.Array) and _same_layout(x.sharding, sharding, x.ndim):
            return x
        if self.multiprocess and batch and not isinstance(x, jax.Array):
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        if self.multiprocess and not isinstance(x, jax.Array):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
        return jax.device_put(x, sharding)

    def fits(self, leaves: list[Any]) -> bool:
        """Whether ``leaves`` have the shapes this entry was built for."""
        return [shape_of(x) for x in leaves] == [shape_of(a) for a in jax.tree.leaves(self._args)]

    def misplaced(self, args: tuple[Any, ...]) -> bool:
        """Whether a ``jax.Array`` argument is laid out other than as planned."""
        return any(
            isinstance(x, jax.Array) and not _same_layout(x.sharding, s, x.ndim)
            for arg, shardings in zip(args, self.in_shardings)
            for x, s in zip(jax.tree.leaves(arg), jax.tree.leaves(shardings))
        )

    def check_inputs(self, args: tuple[Any, ...], fun: Callable[..., Any]) -> None:
        """Raises for an input array that was deleted (donated to an earlier call)."""
        gone = [
            f"{self.names[i]}" + (f" [{path}]" if path else "")
            for i, arg in enumerate(args)
            for path, x in leaves_with_paths(arg)
            if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted()
        ]
        if gone:
            name = getattr(fun, "__name__", "the step")
            donated = ", ".join(self.names[i] for i in self.donate) or "none"
            raise PlanError(
                f"{name}: {count(len(gone), 'input array was', 'input arrays were')} deleted "
                f"before this call:\n{bullets(gone)}\n"
                f"The step donates its state (here: {donated}) to its output, so the arrays "
                "passed to an earlier call are gone once it returns. Pass what the step "
                "returned (`state, metrics = step(state, batch)`); keep a constant with "
                "replicated_argnums=(...), or pass donate=False to donate nothing."
            )

    def unalias(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Copies donated array leaves that are the same array as another leaf.

        Donating one buffer twice (tied weights ``{"enc": emb, "dec": emb}``, the same
        array passed as two arguments) crashes XLA (segmentation fault, jax 0.10.2 on
        CPU, several devices), so each later occurrence gets its own copy; the step's
        result is what it would be without donation.
        """
        seen: set[int] = set()
        out = []
        for i, arg in enumerate(args):
            donated = i in self.donate

            def one(x: Any, donated: bool = donated) -> Any:
                if not isinstance(x, jax.Array):
                    return x
                if id(x) in seen and donated:
                    return x.copy()
                seen.add(id(x))
                return x

            out.append(jax.tree.map(one, arg))
        # A donated leaf seen before a non-donated copy of itself, or that the body closes
        # over: copy it too.
        later = set(self.const_ids) | {
            id(x)
            for i, arg in enumerate(out)
            if i not in self.donate
            for x in jax.tree.leaves(arg)
            if isinstance(x, jax.Array)
        }
        return tuple(
            jax.tree.map(lambda x: x.copy() if id(x) in later else x, arg)
            if i in self.donate
            else arg
            for i, arg in enumerate(out)
        )


def _same_layout(have: Any, want: NamedSharding, ndim: int) -> bool:
    """Whether an array laid out by ``have`` can be passed as laid out by ``want``.

    Equivalent is not enough when ``want`` names a size-1 axis: a one-device array is
    equivalent, but its type lacks the axis, and ``shard_map`` rejects it.
    """
    if not have.is_equivalent_to(want, ndim):
        return False
    if any(want.mesh.shape[a] == 1 for a in spec_axes(want.spec)):
        return isinstance(have, NamedSharding) and _strip(have.spec) == _strip(want.spec)
    return True


def _strip(spec: PartitionSpec) -> tuple[Any, ...]:
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


def _global_rows(tree: Any) -> Any:
    """A process's rows of a batch, as the global batch they are part of (shapes only)."""

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) or not shape_of(x):
            return x  # already global, or a scalar (an error the layout reports)
        shape = shape_of(x)
        return jax.ShapeDtypeStruct((shape[0] * jax.process_count(), *shape[1:]), _dtype(x))

    return jax.tree.map(one, tree)


def _local(aval: jax.ShapeDtypeStruct, spec: PartitionSpec, mesh: Mesh) -> jax.ShapeDtypeStruct:
    """The per-device shape of ``aval`` under ``spec`` (a spec naming manual axes only)."""
    shape = list(aval.shape)
    for d, entry in enumerate(spec):
        for name in (entry,) if isinstance(entry, str) else entry or ():
            shape[d] //= mesh.shape[name]
    return jax.ShapeDtypeStruct(tuple(shape), aval.dtype)


class ParallelFunction:
    """A step function with a parallel plan: what every Titanax transform returns.

    Call it like the function it wraps. The first call for an argument
    structure lays out the arguments, traces the function once, checks the
    traced program and compiles ``jax.jit(jax.shard_map(...))``; later calls
    are a cache lookup and one compiled call. Wrapping it with another
    transform merges the plans; the result is still one program.

    It composes with JAX and Python as a jitted function does: call it inside
    your own ``jax.jit`` or under ``jax.grad`` (the arrays are then traced and
    laid out by the program's shardings; nothing is donated), pass arguments
    by keyword (bound to their positions by the function's signature), or
    decorate a method (``self`` is bound as a constant of the program, like a
    closure; positions in ``batch_argnums`` do not count it).

    Arrays it returns are laid out on an ``Auto`` view of the mesh (same
    devices and axis names): they work in ordinary JAX code (``jax.jit``,
    eager indexing, third-party models) whatever the mesh's axis types.

    Attributes:
      fun: the wrapped step function.
      plan: the merged `Plan`.
    """

    def __init__(self, fun: Callable[..., Any], plan: Plan):
        if isinstance(fun, ParallelFunction):
            raise TypeError(
                "wrap ParallelFunction.fun, not the ParallelFunction"
            )  # internal misuse
        self.fun = fun
        self.plan = plan
        self._cache: dict[Any, _Entry] = {}  # by structure, shapes and dtypes
        self._recent: dict[Any, _Entry] = {}  # by structure: the steady-state lookup
        self._attr: str | None = None  # the attribute name, when defined in a class
        functools.update_wrapper(self, fun)

    def with_layer(self, layer: Layer) -> ParallelFunction:
        """The same function under one more transform (used by the transforms)."""
        return ParallelFunction(self.fun, self.plan.add(layer))

    def __repr__(self) -> str:
        stack = " + ".join(layer.describe() for layer in self.plan.layers)
        return f"<ParallelFunction {getattr(self.fun, '__name__', self.fun)!r}: {stack}>"

    # -- methods: ``@tx.data_parallel`` on a ``def step(self, state, batch)`` ---------------

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        name = self._attr or getattr(self.fun, "__name__", "step")
        cache = getattr(obj, "__dict__", None)
        if cache is None:
            raise PlanError(
                f"{self!r} is a method of {type(obj).__name__}, whose instances have no "
                "__dict__ (__slots__) to keep the compiled program in, so every call would "
                "compile again. Define the step as a function, or give the class a __dict__."
            )
        # Kept under a private name, so every lookup comes back here and checks that the
        # cached step is bound to this very object (a copy.copy of obj shares its __dict__
        # entries, and must not run with the original's self).
        key = f"_titanax_bound_{name}"
        bound = cache.get(key)
        if isinstance(bound, ParallelFunction) and bound.fun.args[0] is obj:  # type: ignore[attr-defined]
            return bound
        bound = ParallelFunction(functools.partial(self.fun, obj), self.plan)
        functools.update_wrapper(bound, self.fun)
        bound._attr = name
        cache[key] = bound
        return bound

    # -- calls ---------------------------------------------------------------------------

    def _key(self, treedef: Any) -> Any:
        # The context mesh is part of the key even when the plan has its own: a call
        # under another `jax.set_mesh` is then checked again (a PlanError), not run.
        return treedef, context_mesh()

    def _entry(self, args: tuple[Any, ...]) -> _Entry:
        """The compiled entry for the structure, shapes and dtypes of ``args``."""
        leaves, treedef = jax.tree.flatten(args)
        key = self._key(treedef)
        full = (key, tuple((shape_of(x), _dtype(x)) for x in leaves))
        entry = self._cache.get(full)
        if entry is None:
            entry = self._cache[full] = _Entry(self, args)
        self._recent[key] = entry
        return entry

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Keyword arguments moved to their positions by the function's signature.

        The call becomes the positional call it stands for: parameters up to the last one
        given, with defaults only for the gaps (``step(w, batch=x)`` is ``step(w, x)``, so
        ``batch_argnums=(-1,)`` names the same argument either way).
        """
        name = getattr(self.fun, "__name__", "the step")
        try:
            sig = inspect.signature(self.fun)
            bound = sig.bind(*args, **kwargs)
        except (TypeError, ValueError) as e:
            raise PlanError(f"{name}: the arguments do not fit its signature: {e}.") from None
        positional = [
            p
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        named = {p.name for p in positional}
        other = sorted(k for k in bound.arguments if k not in named)
        if other:
            raise PlanError(
                f"{name}: keyword arguments are placed by their position in the signature, "
                f"but {', '.join(other)} has none (keyword-only or **kwargs). Make them "
                "positional parameters, or bind constants with functools.partial before "
                "applying the transform."
            )
        last = max(k for k, p in enumerate(positional) if p.name in bound.arguments)
        return tuple(
            bound.arguments[p.name] if p.name in bound.arguments else p.default
            for p in positional[: last + 1]
        )

    def _check_not_nested(self) -> None:
        """Raises when called inside another Titanax step that binds one of our axes."""
        outer = {b.name: b for b in bound_axes()}
        clash = [lay for lay in self.plan.layers if lay.axis in outer]
        if clash:
            lay = clash[0]
            raise PlanError(
                f"{lay.describe()}: {self!r} is called inside another Titanax step whose "
                f"tx.{outer[lay.axis].transform} already binds axis {lay.axis!r}. Transforms "
                "compose by wrapping, not by calling one step inside another: call the inner "
                f"function itself (`{getattr(self.fun, '__name__', 'step')}.fun`), or wrap it "
                "with the outer transform."
            )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            args = self._bind(args, kwargs)
        leaves, treedef = jax.tree.flatten(args)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            # Inside the user's jax.jit / jax.grad: one more jit in their trace.
            self._check_not_nested()
            return self._entry(args).jitted(*args)
        # Steady state: one flatten, one dict lookup, one compiled call. Host arrays
        # (numpy batches) are placed by jit itself, as its in_shardings say.
        entry = self._recent.get(self._key(treedef))
        ids = {id(x) for x in leaves}
        if (
            entry is not None
            and not entry.multiprocess
            and len(ids) == len(leaves)
            and ids.isdisjoint(entry.const_ids)
        ):
            try:
                return entry.jitted(*args)
            except _OtherShapes:
                pass  # shapes or dtypes of another entry: found below
            except (ValueError, RuntimeError):
                # Look for the cheap causes; anything else is the user's error, re-raised.
                entry.check_inputs(args, self.fun)
                if entry.fits(leaves) and not entry.misplaced(args):
                    raise
        entry = self._entry(args)
        entry.check_inputs(args, self.fun)
        jitted = entry.jitted  # traced and checked: nothing is donated before this passes
        placed = entry.place(entry.unalias(args))
        try:
            return jitted(*placed)
        except jax.errors.JaxRuntimeError as e:
            if not entry.multiprocess:
                raise
            raise DistributedError(
                f"process {jax.process_index()} of {jax.process_count()}: a step of "
                f"{getattr(self.fun, '__name__', 'the function')} failed while communicating "
                f"with the other processes; one of them has probably died ({e}). Restart the job "
                "from the newest checkpoint."
            ) from e

    def place(self, *args: Any) -> tuple[Any, ...]:
        """The arguments placed on the mesh as the plan lays them out.

        Arrays already laid out as planned are returned as they are (no copy).

        Raises:
          PlanError, RuleError: arguments that do not fit the plan.
        """
        return self._entry(args).place(args)

    def lower(self, *args: Any) -> jax.stages.Lowered:
        """Lowers the program for these arguments (``jax.stages.Lowered``)."""
        placed = self.place(*args)
        return self._entry(args).jitted.lower(*placed)

    def specs(self, *args: Any) -> tuple[Any, Any]:
        """The ``PartitionSpec`` trees of the inputs and outputs for these arguments."""
        entry = self._entry(args)
        return entry.in_specs, entry.out_specs

    def explain(self, *args: Any) -> Report:
        """The layout of every input and output leaf, and the collectives the
        compiled program contains (kind, mesh axes, bytes)."""
        in_specs, out_specs = self.specs(*args)
        entry = self._entry(args)
        compiled = self.lower(*args).compile()
        out_avals = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), compiled.out_info
        )
        rows: list[tuple[str, Any]] = []
        specs: list[PartitionSpec] = []
        for name, arg, spec in zip(entry.names, args, in_specs):
            rows += [
                (f"{name.split(' ', 2)[-1].strip('()') or name}/{p}".rstrip("/"), x)
                for p, x in leaves_with_paths(arg)
            ]
            specs += _spec_leaves(spec)
        for k, (part, spec) in enumerate(zip(top_level(out_avals), top_level(out_specs))):
            rows += [(f"out{k}/{p}".rstrip("/"), x) for p, x in leaves_with_paths(part)]
            specs += _spec_leaves(spec)
        stack = " + ".join(layer.describe() for layer in self.plan.layers)
        mesh = ", ".join(f"{k}={v}" for k, v in entry.mesh.shape.items())
        manual = ", ".join(sorted(self.plan.manual_axes)) or "none"
        text = (
            f"{stack} on mesh ({mesh}); manual axes: {manual}\n\n"
            + layout_table(rows, specs, entry.mesh)
            + "\n\n"
            + hlo.collectives_table(hlo.collectives(compiled.as_text() or "", entry.mesh))
        )
        return Report(text)


def _pin_auto(out: Any, out_specs: Any, mesh: Mesh, plan: Plan) -> Any:
    """Pins output layouts along the global-view (``Auto``) axes.

    Outputs that take no argument's layout are left where XLA's propagation puts them
    along those axes (they are global arrays either way): pinning them replicated
    would add gathers the user never asked for.
    """
    auto = frozenset(layer.axis for layer in plan.layers if not layer.manual)

    def pin(x: Any, spec: PartitionSpec) -> Any:
        if not set(spec_axes(spec)) & auto:
            return x
        # The whole spec: outside the shard_map, an axis it leaves out means "replicated".
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return out if not auto else jax.tree.map(pin, out, out_specs)


class _OtherShapes(Exception):
    """Raised while jit traces an entry's program for shapes it was not built for."""


def _canonical(dtype: Any) -> Any:
    return jax.dtypes.canonicalize_dtype(dtype, allow_extended_dtype=True)


def _dtype(x: Any) -> Any:
    return getattr(x, "dtype", None) or type(x)


def apply_layer(step: Callable[..., Any] | None, layer: Layer) -> Any:
    """Wraps ``step`` (or returns a decorator) with one more layer of plan."""

    def wrap(f: Callable[..., Any]) -> ParallelFunction:
        if isinstance(f, ParallelFunction):
            return f.with_layer(layer)
        if not callable(f):
            raise PlanError(f"{layer.describe()}: expected a function to wrap, got {f!r}.")
        return ParallelFunction(f, Plan.of((layer,)))

    return wrap if step is None else wrap(step)
