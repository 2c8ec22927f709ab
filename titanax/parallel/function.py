"""``ParallelFunction``: a plan compiled once as
``jax.jit(jax.shard_map(body, axis_names=manual_axes, ...))``, and called.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from titanax._util import Report, bullets, count, leaves_with_paths, shape_of
from titanax.errors import DistributedError, PlanError, TitanaxError
from titanax.parallel import hlo
from titanax.parallel.collectives import bind_axes
from titanax.parallel.plan import Layer, Plan, _is_spec, _restrict, _spec_leaves
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
    """The compiled program for one argument structure."""

    def __init__(self, pf: ParallelFunction, args: tuple[Any, ...]):
        plan = pf.plan
        self.mesh = plan.resolve_mesh()
        self.cmesh = plan.compile_mesh(self.mesh)
        self.names = _arg_names(pf.fun, len(args))
        self.batch = plan.batch_indices(len(args))
        self.multiprocess = jax.process_count() > 1
        if self.multiprocess:  # each process passes its own rows of every batch
            args = tuple(_global_rows(a) if i in self.batch else a for i, a in enumerate(args))
        self.in_specs = plan.in_specs(args, self.mesh, self.names)
        manual = plan.manual_axes
        self.in_shardings = jax.tree.map(
            lambda s: NamedSharding(self.cmesh, s), self.in_specs, is_leaf=_is_spec
        )
        self.out_specs: Any = None
        self.checked = not manual  # replica agreement is checked once when axes are manual
        # Donate the state, not batches, keys or hyperparameters: arguments with an array leaf.
        kept = plan.kept_indices(len(args))
        donate = tuple(
            i
            for i, a in enumerate(args)
            if plan.donate
            and i not in self.batch
            and i not in kept
            and any(shape_of(x) for x in jax.tree.leaves(a))
        )
        fun, bound = pf.fun, plan.bound_axes(self.mesh)
        in_trees = [jax.tree.structure(a) for a in args]
        avals = jax.tree.map(lambda x: jax.ShapeDtypeStruct(shape_of(x), jnp.result_type(x)), args)
        local_specs = jax.tree.map(lambda s: _restrict(s, manual), self.in_specs, is_leaf=_is_spec)
        # State stored split along a manual axis (fully_sharded) comes back split: which
        # outputs are shards is known only from the traced body (see `outer`).
        split_state = any(
            spec_axes(s)
            for i, tree in enumerate(local_specs)
            if i not in self.batch
            for s in _spec_leaves(tree)
        )

        def body(*local_args: Any) -> Any:
            with bind_axes(bound), plan.entered(avals, self.in_specs, self.mesh, local_args):
                return fun(*local_args)

        def smap(out_specs: Any, f: Callable[..., Any] = body) -> Callable[..., Any]:
            return jax.shard_map(
                f,
                mesh=self.cmesh,
                in_specs=local_specs,
                out_specs=out_specs,
                axis_names=set(manual),
                check_vma=False,  # pmap semantics: per-replica gradients, user reduces
            )

        def outer(*global_args: Any) -> Any:
            # The plan's mesh is the context mesh of the body (whatever jax.set_mesh says).
            with jax.sharding.use_abstract_mesh(self.cmesh.abstract_mesh):
                if not manual:
                    out = body(*global_args)
                    self.out_specs = _out_specs(out, avals, in_trees, self.in_specs, self.batch)
                elif split_state:
                    # Trace the body once to a jaxpr (for its output shapes), then run that
                    # jaxpr under the shard_map whose out_specs the shapes decide.
                    traced: dict[str, Any] = {}

                    def trace_body(*local_args: Any) -> Any:
                        closed, shapes = jax.make_jaxpr(body, return_shape=True)(*local_args)
                        traced["jaxpr"], traced["shapes"] = closed, shapes
                        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

                    jax.eval_shape(smap(P(), trace_body), *global_args)
                    local_out, closed = traced["shapes"], traced["jaxpr"]
                    local_in = jax.tree.map(
                        lambda a, s: _local(a, s, self.mesh), avals, local_specs
                    )
                    vary = varying_axes(
                        closed.jaxpr,
                        [frozenset(spec_axes(s)) & manual for s in _spec_leaves(local_specs)],
                    )
                    self.out_specs = _out_specs(
                        local_out, local_in, in_trees, self.in_specs, self.batch, vary, manual
                    )
                    _check_stray_shards(
                        local_out, self.out_specs, vary, local_in, local_specs, self.batch
                    )
                    restricted = jax.tree.map(
                        lambda s: _restrict(s, manual), self.out_specs, is_leaf=_is_spec
                    )
                    out_tree = jax.tree.structure(local_out)

                    def replay(*local_args: Any) -> Any:
                        flat = jax.core.eval_jaxpr(
                            closed.jaxpr, closed.consts, *jax.tree.leaves(local_args)
                        )
                        return jax.tree.unflatten(out_tree, flat)

                    out = smap(restricted, replay)(*global_args)
                else:
                    out = smap(P())(*global_args)
                    self.out_specs = _out_specs(out, avals, in_trees, self.in_specs, self.batch)
                return _constrain(out, self.out_specs, self.cmesh, plan)

        self.jitted = jax.jit(outer, in_shardings=self.in_shardings, donate_argnums=donate)

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

    def check_replicas(self, out: Any, plan: Plan) -> None:
        """Raises if an output that must be replicated along a manual axis is not."""
        self.checked = True
        bad = []
        for k, part in enumerate(_top_level(out)):
            for path, leaf in leaves_with_paths(part):
                if isinstance(leaf, jax.Array) and not _agrees(leaf):
                    bad.append(f"output {k}" + (f" [{path}]" if path else ""))
        if bad:
            axes = ", ".join(repr(a) for a in sorted(plan.manual_axes))
            raise PlanError(
                f"{' + '.join(lay.describe() for lay in plan.layers if lay.manual)}: "
                f"{count(len(bad), 'output leaf', 'output leaves')} differ"
                f"{'s' if len(bad) == 1 else ''} between replicas along {axes}, but outputs "
                f"are replicated:\n{bullets(bad)}\n"
                "Each replica computed its own value and nothing reduced it. Reduce in the step: "
                f"grads = tx.pmean(grads, {sorted(plan.manual_axes)[0]!r}) before the update, and "
                f"tx.pmean(loss, {sorted(plan.manual_axes)[0]!r}) for metrics."
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


def _top_level(out: Any) -> tuple[Any, ...]:
    return out if isinstance(out, tuple) else (out,)


def _out_specs(
    out: Any,
    args: Sequence[Any],
    in_trees: Sequence[Any],
    in_specs: Sequence[Any],
    batch: frozenset[int],
    vary: Sequence[frozenset[str]] | None = None,
    manual: frozenset[str] = frozenset(),
) -> Any:
    """An output shaped like a non-batch input takes its layout; everything else is replicated.

    With ``vary`` (the manual axes each output leaf varies along), an output takes a
    layout split along manual axes only if it varies along them: a reduced metric with a
    shard's shape stays replicated.
    """
    specs = []
    leaf_vary = iter(vary if vary is not None else [])
    for part in _top_level(out):
        tree = jax.tree.structure(part)
        leaves = jax.tree.leaves(part)
        shapes = [shape_of(x) for x in leaves]
        part_vary = [next(leaf_vary) for _ in leaves] if vary is not None else None
        for i, arg in enumerate(args):
            if (
                i not in batch
                and in_trees[i] == tree
                and shapes == [shape_of(x) for x in jax.tree.leaves(arg)]
                and (
                    part_vary is None
                    or all(
                        set(spec_axes(s)) & manual <= v
                        for s, v in zip(_spec_leaves(in_specs[i]), part_vary)
                    )
                )
            ):
                specs.append(in_specs[i])
                break
        else:
            specs.append(jax.tree.map(lambda _: P(), part))
    return tuple(specs) if isinstance(out, tuple) else specs[0]


def _check_stray_shards(
    out: Any,
    out_specs: Any,
    vary: Sequence[frozenset[str]],
    local_in: Sequence[Any],
    local_specs: Sequence[Any],
    batch: frozenset[int],
) -> None:
    """Raises for an output left replicated that varies across replicas with a shard's shape:
    a shard of the state returned where its layout cannot follow it."""
    shard_shapes = {
        shape_of(a)
        for i, (tree, spec_tree) in enumerate(zip(local_in, local_specs))
        if i not in batch
        for a, s in zip(jax.tree.leaves(tree), _spec_leaves(spec_tree))
        if spec_axes(s)
    }
    specs = _spec_leaves(out_specs)
    stray = [
        f"output {path or '(the output)'}: shape {shape_of(x)}, varies along "
        + ", ".join(repr(a) for a in sorted(v))
        for (path, x), spec, v in zip(leaves_with_paths(out), specs, vary)
        if v and not spec_axes(spec) and shape_of(x) in shard_shapes
    ]
    if stray:
        raise PlanError(
            f"{count(len(stray), 'output leaf', 'output leaves')} of the step "
            f"{'is a shard' if len(stray) == 1 else 'are shards'} of split state, returned "
            f"where no layout follows {'it' if len(stray) == 1 else 'them'}:\n{bullets(stray)}\n"
            "An output takes a state argument's split layout only when it is a top-level "
            "output with the argument's structure (return `state, metrics`, not "
            "`{'state': state}`). A per-replica metric must be reduced (tx.pmean)."
        )


def _constrain(out: Any, out_specs: Any, mesh: Mesh, plan: Plan) -> Any:
    """Pins output layouts along the global-view (``Auto``) axes."""
    auto = {layer.axis for layer in plan.layers if not layer.manual}
    if not auto:
        return out

    def pin(x: Any, spec: PartitionSpec) -> Any:
        if not set(spec_axes(spec)) & auto:
            return x
        # The manual axes of the spec are already in the output's type (shard_map's out_specs).
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, _restrict(spec, frozenset(auto)))
        )

    return jax.tree.map(pin, out, out_specs)


def _agrees(x: jax.Array) -> bool:
    """Whether every addressable copy of each shard of ``x`` holds the same values."""
    groups: dict[tuple[Any, ...], np.ndarray] = {}
    for shard in x.addressable_shards:
        key = tuple((s.start, s.stop, s.step) for s in shard.index)
        data = np.asarray(shard.data)
        if key not in groups:
            groups[key] = data
        elif not np.array_equal(groups[key], data, equal_nan=True):
            return False
    return True


class ParallelFunction:
    """A step function with a parallel plan: what every Titanax transform returns.

    Call it like the function it wraps. The first call for an argument
    structure lays out the arguments, traces the function once and compiles
    ``jax.jit(jax.shard_map(...))``; later calls are a cache lookup and one
    compiled call. Wrapping it with another transform merges the plans; the
    result is still one program.

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
        functools.update_wrapper(self, fun)

    def with_layer(self, layer: Layer) -> ParallelFunction:
        """The same function under one more transform (used by the transforms)."""
        return ParallelFunction(self.fun, self.plan.add(layer))

    def __repr__(self) -> str:
        stack = " + ".join(layer.describe() for layer in self.plan.layers)
        return f"<ParallelFunction {getattr(self.fun, '__name__', self.fun)!r}: {stack}>"

    def _key(self, treedef: Any) -> Any:
        return treedef if self.plan.mesh is not None else (treedef, jax.sharding.get_mesh())

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

    def __call__(self, *args: Any) -> Any:
        # Steady state: one flatten, one dict lookup, one compiled call. JAX's own
        # dispatch checks shapes and layouts; anything new goes the slow way.
        entry = self._recent.get(self._key(jax.tree.structure(args)))
        if entry is not None and entry.checked and not entry.multiprocess:
            try:
                return entry.jitted(*args)
            except TitanaxError:
                raise
            except ValueError:
                pass  # arguments laid out otherwise, or shapes that need checking
        entry = self._entry(args)
        try:
            out = entry.jitted(*entry.place(args))
        except jax.errors.JaxRuntimeError as e:
            if not entry.multiprocess:
                raise
            raise DistributedError(
                f"process {jax.process_index()} of {jax.process_count()}: a step of "
                f"{getattr(self.fun, '__name__', 'the function')} failed while communicating "
                f"with the other processes; one of them has probably died ({e}). Restart the job "
                "from the newest checkpoint."
            ) from e
        if not entry.checked:
            entry.check_replicas(out, self.plan)
        return out

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
        if entry.out_specs is None:
            self.lower(*args)
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
        for k, (part, spec) in enumerate(zip(_top_level(out_avals), _top_level(out_specs))):
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
