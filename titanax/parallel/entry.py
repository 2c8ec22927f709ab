"""One compiled program of a `ParallelFunction`: the entry for one argument structure.

Built on the first call for a structure: the arguments' layouts are planned, the body is
traced once to a jaxpr, the checks run on that jaxpr (`titanax.parallel.outputs`), and
only then is the program wrapped in ``jax.jit`` as
``jax.jit(jax.shard_map(replay of the jaxpr, axis_names=manual_axes, ...))``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from titanax._util import bullets, count, leaves_with_paths, shape_of
from titanax.errors import CollectiveError, PlanError
from titanax.parallel.claims import Claim, collecting
from titanax.parallel.collectives import bind_axes
from titanax.parallel.outputs import (
    OutputLayout,
    check_reduced,
    check_stray_shards,
    output_layout,
    top_level,
)
from titanax.parallel.plan import Plan, _is_spec, _restrict, _spec_leaves
from titanax.parallel.rules import spec_axes
from titanax.parallel.varying import Divergence, varying_axes

if TYPE_CHECKING:
    from titanax.parallel.function import ParallelFunction

__all__ = ["Entry", "OtherShapes", "arg_names", "dtype_of"]

P = PartitionSpec


def arg_names(fun: Callable[..., Any], nargs: int) -> list[str]:
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


class Entry:
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
        self.names = arg_names(pf.fun, len(args))
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
        avals = jax.tree.map(lambda x: jax.ShapeDtypeStruct(shape_of(x), dtype_of(x)), args)
        local_specs = jax.tree.map(lambda s: _restrict(s, manual), self.in_specs, is_leaf=_is_spec)
        local_in = jax.tree.map(lambda a, s: _local(a, s, self.mesh), avals, local_specs)
        where = " + ".join(lay.describe() for lay in plan.layers)
        traced: dict[str, Any] = {}

        def body(*local_args: Any) -> Any:
            traced["inputs"] = jax.tree.leaves(local_args)  # to find what is claimed
            traces = plan.traces(avals, self.in_specs, self.mesh, local_args)
            with bind_axes(bound), plan.entered(traces):
                return fun(*plan.prepare(local_args, traces))

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

        def trace_body(*local_args: Any) -> Any:
            closed, shapes = jax.make_jaxpr(body, return_shape=True)(*local_args)
            traced["jaxpr"], traced["shapes"] = closed, shapes
            return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

        with jax.sharding.use_abstract_mesh(self.cmesh.abstract_mesh), collecting() as claims:
            try:
                jax.eval_shape(smap(P(), trace_body) if manual else trace_body, *avals)
            except ValueError as e:
                if "should match the mesh of sharding" not in str(e):
                    raise
                raise PlanError(
                    f"{where}: the step uses an array laid out on the mesh that is not one of "
                    "its arguments (closed over, or a global), and JAX cannot use it inside "
                    "the step's shard_map, where the manual axes are Manual. Pass it as an "
                    "argument (list it in replicated_argnums to keep it whole and never "
                    "donated), or close over a host array (np.asarray) instead. JAX said: "
                    f"{str(e).splitlines()[0]}"
                ) from e
        closed, local_out = traced["jaxpr"], traced["shapes"]
        self.claimed = self._apply_claims(claims, traced["inputs"], args, manual)

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
        divergent: list[Divergence] = []
        vary = varying_axes(closed.jaxpr, self.input_axes, every, divergent) if manual else None
        if divergent:
            raise _divergence_error(divergent, where)
        kept = plan.kept_indices(len(args))
        layout = output_layout(local_out, local_in, self.in_specs, self.batch, vary, manual, kept)
        if vary is not None:
            check_stray_shards(
                local_out, layout.specs, vary, local_in, local_specs, self.batch, where
            )
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
                raise OtherShapes
            with jax.sharding.use_abstract_mesh(self.cmesh.abstract_mesh):
                out = smap(restricted, replay)(*global_args) if manual else replay(*global_args)
                return _pin_auto(out, layout, self.cmesh, plan, self.claimed)

        self._jitted = jax.jit(
            outer,
            in_shardings=self.in_shardings,
            donate_argnums=self.donate,
        )

    def _apply_claims(
        self, claims: list[Claim], inputs: list[Any], args: tuple[Any, ...], manual: frozenset[str]
    ) -> frozenset[str]:
        """Lays out dimension 0 of the claimed arguments along the claimed axis (see
        `titanax.parallel.claims`), and of the leaves of the same name and shape in other
        non-batch arguments (their optimizer moments: ``opt_state/0/mu/layers/w`` for a
        claimed ``params/layers/w``). Returns the axes claimed."""
        index = {id(x): k for k, x in enumerate(inputs)}
        where = [(i, path) for i, a in enumerate(args) for path, _ in leaves_with_paths(a)]
        shapes = [shape_of(x) for x in jax.tree.leaves(args)]
        specs = _spec_leaves(self.in_specs)
        axes = set()
        for c in claims:
            if c.axis in manual:  # the step already lays it out (a tensor_parallel layer)
                continue
            for leaf in c.leaves:
                k = index.get(id(leaf))
                if k is None or where[k][0] in self.batch:
                    continue  # computed in the step, or a batch: nothing to lay out
                path = where[k][1]
                tail = path.split("/", 1)[1] if "/" in path else path
                for j, (i, other) in enumerate(where):
                    if i in self.batch or shapes[j] != shapes[k]:
                        continue
                    if j == k or other == tail or other.endswith("/" + tail):
                        if c.axis not in spec_axes(specs[j]) and (
                            not specs[j] or specs[j][0] is None
                        ):
                            specs[j] = P(c.axis, *tuple(specs[j])[1:])
                            axes.add(c.axis)
        if axes:
            tree = jax.tree.structure(self.in_specs, is_leaf=_is_spec)
            self.in_specs = jax.tree.unflatten(tree, specs)
            self.in_shardings = jax.tree.map(
                lambda s: NamedSharding(self.cmesh, s), self.in_specs, is_leaf=_is_spec
            )
        return frozenset(axes)

    def place(self, args: tuple[Any, ...], *, for_jit: bool = False) -> tuple[Any, ...]:
        """Puts each argument on the mesh as the plan lays it out; placed arrays pass as they are.

        ``for_jit``: leave one process's host batches to the jitted call (see `_put`).
        """
        placed = []
        for i, (arg, shardings) in enumerate(zip(args, self.in_shardings)):
            lazy = for_jit and i in self.batch
            placed.append(
                jax.tree.map(
                    lambda x, s, b=i in self.batch, z=lazy: self._put(x, s, b, z), arg, shardings
                )
            )
        return tuple(placed)

    def _put(self, x: Any, sharding: NamedSharding, batch: bool, lazy: bool = False) -> Any:
        if isinstance(x, jax.Array) and _same_layout(x.sharding, sharding, x.ndim):
            return x
        if lazy and not self.multiprocess and _uncommitted(x):
            # Host batches (and uncommitted device arrays) go to jit as they are, on the
            # first call as on every later one (the fast path of ParallelFunction): jit
            # places them by its in_shardings. Placed here, they would reach jit typed
            # with the mesh (f32[16,4]({Auto: ('data',)})) and later batches untyped
            # (f32[16,4]({})), and the second call would compile the whole step again.
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
            here = f" (here: {donated})" if self._jitted is not None else ""
            raise PlanError(
                f"{name}: {count(len(gone), 'input array was', 'input arrays were')} deleted "
                f"before this call:\n{bullets(gone)}\n"
                f"The step donates its state{here} to its output, so the arrays "
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


def _uncommitted(x: Any) -> bool:
    """A host array, or a device array that jit may move (``jnp.asarray``, not ``device_put``)."""
    if isinstance(x, jax.Array):
        return not x.committed
    return isinstance(x, np.ndarray | np.generic)


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
        return jax.ShapeDtypeStruct((shape[0] * jax.process_count(), *shape[1:]), dtype_of(x))

    return jax.tree.map(one, tree)


def _local(aval: jax.ShapeDtypeStruct, spec: PartitionSpec, mesh: Mesh) -> jax.ShapeDtypeStruct:
    """The per-device shape of ``aval`` under ``spec`` (a spec naming manual axes only)."""
    shape = list(aval.shape)
    for d, entry in enumerate(spec):
        for name in (entry,) if isinstance(entry, str) else entry or ():
            shape[d] //= mesh.shape[name]
    return jax.ShapeDtypeStruct(tuple(shape), aval.dtype)


def _pin_auto(
    out: Any, layout: OutputLayout, mesh: Mesh, plan: Plan, claimed: frozenset[str] = frozenset()
) -> Any:
    """Pins output layouts along the global-view (``Auto``) axes.

    An output that takes an argument's layout (the new state) is pinned to it whole,
    replicated leaves (``P()``) included: left to XLA's propagation, a leaf its rule
    replicates could come back split along ``model``, and the next call would lay it out
    again. Outputs that take no argument's layout are left where XLA's propagation puts
    them along those axes (they are global arrays either way): pinning them replicated
    would add gathers the user never asked for.
    """
    auto = frozenset(layer.axis for layer in plan.layers if not layer.manual) | claimed
    if not auto:
        return out

    def pin(x: Any, spec: PartitionSpec, state: bool) -> Any:
        if not state and not set(spec_axes(spec)) & auto:
            return x
        # The whole spec: outside the shard_map, an axis it leaves out means "replicated".
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    parts, spec_parts = top_level(out), top_level(layout.specs)
    pinned = tuple(
        jax.tree.map(lambda x, s, state=src is not None: pin(x, s, state), part, specs)
        for part, specs, src in zip(parts, spec_parts, layout.sources)
    )
    return pinned if isinstance(out, tuple) else pinned[0]


def _divergence_error(found: list[Divergence], where: str) -> CollectiveError:
    """Collectives that the devices of their axes may not all reach: the program would hang."""
    lines = [
        f"{d.primitive} over {', '.join(map(repr, sorted(d.axes)))} inside a "
        + ("lax.cond/lax.switch" if d.construct == "cond" else "lax.while_loop")
        + f", at {d.where}"
        for d in found
    ]
    axes = ", ".join(map(repr, sorted(set().union(*(d.axes for d in found)))))
    return CollectiveError(
        f"{where}: {count(len(found), 'collective', 'collectives')} may not be reached by "
        f"every device of its axes:\n{bullets(lines)}\n"
        f"The predicate of the enclosing cond or loop may differ between the devices of {axes} "
        "(it depends on per-device values), so the devices that take the other branch, or "
        "stop iterating, never join the collective and the program hangs. Make the "
        "predicate equal on every device (compute it from reduced values: "
        f"`pred = tx.pmax(pred.astype(jnp.int32), ({axes},)) > 0` is true where any device's "
        "is), or move the collective out of the cond or loop and select its result with "
        "jnp.where."
    )


class OtherShapes(Exception):
    """Raised while jit traces an entry's program for shapes it was not built for."""


def _canonical(dtype: Any) -> Any:
    return jax.dtypes.canonicalize_dtype(dtype, allow_extended_dtype=True)


def dtype_of(x: Any) -> Any:
    return getattr(x, "dtype", None) or type(x)
