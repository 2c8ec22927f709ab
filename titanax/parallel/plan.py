"""Plans: every transform of a stack contributes a `Layer` to one `Plan`.

The plan merges the layers' layouts leaf by leaf and checks that they can share
one program; `titanax.parallel.function` compiles it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, PartitionSpec

from titanax._util import bullets, count, leaves_with_paths, shape_of
from titanax.errors import PlanError, RuleError, TitanaxError
from titanax.parallel.collectives import BoundAxis
from titanax.parallel.layer import (
    ArgInfo,
    Layer,
    TraceInfo,
    check_axis,
    normalize_argnums,
    resolve_argnums,
)
from titanax.parallel.rules import spec_axes, spec_problem

__all__ = [
    "Layer",
    "Plan",
    "ArgInfo",
    "context_mesh",
    "normalize_argnums",
    "resolve_argnums",
    "check_axis",
]

P = PartitionSpec
_is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731


@dataclasses.dataclass(frozen=True)
class Plan:
    """The merged contributions of a stack of transforms.

    Attributes:
      layers: one `Layer` per transform, innermost first.
      mesh: the mesh named by the layers, or ``None`` to take the one set
        with ``jax.set_mesh`` when the function is called.
    """

    layers: tuple[Layer, ...]
    mesh: Mesh | None

    @classmethod
    def of(cls, layers: Sequence[Layer]) -> Plan:
        """Merges layers, checking that they can share one program."""
        seen: dict[str, Layer] = {}
        meshes: list[Mesh] = []
        for layer in layers:
            if layer.axis in seen:
                raise PlanError(
                    f"{layer.describe()} and {seen[layer.axis].describe()} both claim mesh axis "
                    f"{layer.axis!r}; an axis belongs to one transform. Give one of them "
                    "another axis of the mesh."
                )
            seen[layer.axis] = layer
            if layer.mesh is not None and all(layer.mesh is not m for m in meshes):
                meshes.append(layer.mesh)
        if (
            len(
                {
                    (m.axis_names, m.devices.shape, tuple(d.id for d in m.devices.flat))
                    for m in meshes
                }
            )
            > 1
        ):
            raise PlanError(
                " + ".join(layer.describe() for layer in layers)
                + ": the transforms of one stack were given different meshes:\n"
                + bullets(
                    [
                        f"{layer.describe()}: {_mesh_str(layer.mesh)}"
                        for layer in layers
                        if layer.mesh is not None
                    ]
                )
                + "\nGive the mesh to one transform only (the others find it), or the same "
                "mesh to all."
            )
        plan = cls(tuple(layers), meshes[0] if meshes else None)
        if plan.mesh is not None:
            plan.check_mesh(plan.mesh)
        return plan

    def add(self, layer: Layer) -> Plan:
        return Plan.of((*self.layers, layer))

    @property
    def manual_axes(self) -> frozenset[str]:
        """Axes along which the body sees per-replica values."""
        return frozenset(layer.axis for layer in self.layers if layer.manual)

    @property
    def axes(self) -> dict[str, str]:
        """Mesh axis -> name of the transform that claims it."""
        return {layer.axis: layer.transform for layer in self.layers}

    @property
    def donate(self) -> bool:
        votes = [layer.donate for layer in self.layers if layer.donate is not None]
        return bool(votes) and all(votes)

    def check_mesh(self, mesh: Mesh) -> None:
        for layer in self.layers:
            if layer.axis not in mesh.shape:
                raise PlanError(
                    f"{layer.describe()}: the mesh has no axis {layer.axis!r} "
                    f"(axes: {', '.join(mesh.axis_names)}). Pass axis= one of them, or build "
                    f"the mesh with it, e.g. tx.mesh({layer.axis}=-1)."
                )

    def resolve_mesh(self) -> Mesh:
        """The plan's mesh, or the one set with ``jax.set_mesh``.

        Raises:
          PlanError: no mesh, a mesh without the layers' axes, or a ``mesh=`` given to
            a transform while ``jax.set_mesh`` holds a different mesh.
        """
        names = " + ".join(layer.describe() for layer in self.layers)
        context = context_mesh()
        has_context = not context.empty
        if self.mesh is not None:
            if has_context and not _same_mesh(context, self.mesh):
                raise PlanError(
                    f"{names}: the step was given mesh {_mesh_str(self.mesh)} but is called "
                    f"inside `jax.set_mesh` with another mesh, {_mesh_str(context)}. Use one: "
                    "drop mesh= from the transform to follow jax.set_mesh, or call the step "
                    "outside that `with` block."
                )
            return self.mesh
        if not isinstance(context, Mesh):
            raise PlanError(
                f"{names}: no mesh. Pass mesh=tx.mesh(...) to one of the transforms, "
                "or call inside `with jax.set_mesh(mesh):`"
                + (
                    " (inside jax.jit only the abstract mesh is known: pass mesh=)."
                    if has_context
                    else "."
                )
            )
        self.check_mesh(context)
        return context

    def compile_mesh(self, mesh: Mesh) -> Mesh:
        """``mesh`` with every axis ``Auto``: the mesh the program is compiled on.

        Manual axes become ``Manual`` inside the ``shard_map``; the axes of global-view
        transforms stay ``Auto``, so model code contracts sharded dimensions without
        naming an ``out_sharding`` on every operation, and their layouts still come
        only from the declared specs. Arguments and outputs are laid out on this view,
        so the arrays a step returns carry no ``Explicit`` sharding in their type and
        work in ordinary JAX code (``jax.jit``, eager indexing, third-party models),
        whatever the axis types of the user's mesh.
        """
        if all(t == AxisType.Auto for t in mesh.axis_types):
            return mesh
        return Mesh(
            mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names)
        )

    def kept_indices(self, nargs: int) -> frozenset[int]:
        """Positions of arguments that no layer lets be donated."""
        return frozenset().union(*(lay.replicated_positions(nargs) for lay in self.layers))

    def batch_indices(self, nargs: int) -> frozenset[int]:
        """Positions of batch arguments (in any layer) for a call with ``nargs`` arguments."""
        return frozenset().union(*(lay.batch_positions(nargs) for lay in self.layers))

    def in_specs(self, args: Sequence[Any], mesh: Mesh, names: Sequence[str]) -> tuple[Any, ...]:
        """The merged ``PartitionSpec`` tree of every argument.

        Raises:
          PlanError, RuleError: from the layers, or when merged specs do not fit.
        """
        batch = self.batch_indices(len(args))
        for layer in self.layers:
            for field in ("batch_argnums", "replicated_argnums"):
                nums = cast(tuple[int, ...], getattr(layer, field))
                for i in nums:
                    if not -len(args) <= i < len(args):
                        raise PlanError(
                            f"{layer.describe()}: {field}={nums} names argument {i}, but the "
                            f"function was called with {count(len(args), 'argument')}."
                        )
            both = layer.replicated_positions(len(args)) & batch
            if both:
                raise PlanError(
                    f"{layer.describe()}: replicated_argnums names {names[min(both)]}, which "
                    "is a batch argument (batch_argnums of this or another layer). A batch is "
                    "split, a replicated argument is whole on every device: name it in one."
                )
        kept = self.kept_indices(len(args))
        out = []
        for i, arg in enumerate(args):

            def info(layer: Layer, others: Any = None, i: int = i) -> ArgInfo:
                return ArgInfo(
                    layer=layer,
                    position=i,
                    name=names[i],
                    nargs=len(args),
                    mesh=mesh,
                    is_batch=i in batch,
                    is_own_batch=i in layer.batch_positions(len(args)),
                    is_replicated=i in kept,
                    others=others,
                )

            laid = [_layout(lay, arg, info(lay)) for lay in self.layers if not lay.sees_others]
            # Layers that pick dimensions the others leave free see every layer laid out
            # before them, the earlier of their kind included (two never take one dimension).
            for lay in self.layers:
                if lay.sees_others:
                    laid.append(_layout(lay, arg, info(lay, _merge_trees(arg, laid, mesh))))
            merged = _merge_trees(arg, laid, mesh)
            if i not in batch:
                self._check_exclusive(arg, laid, names[i])
            problems = [
                f"{path}  shape {shape_of(leaf)}: {problem}"
                for (path, leaf), spec in zip(leaves_with_paths(arg), _spec_leaves(merged))
                if (problem := spec_problem(shape_of(leaf), spec, mesh))
            ]
            if problems:
                raise PlanError(
                    f"{' + '.join(lay.describe() for lay in self.layers)}: the combined layout of "
                    f"{names[i]} does not fit:\n{bullets(problems)}\n"
                    "Change the mesh axis sizes, the rules or the layer's layout so that each "
                    "spec has at most one entry per dimension and each split dimension divides."
                )
            out.append(merged)
        self._check_global_view_axes(args, out, names)
        return tuple(out)

    def _check_exclusive(self, arg: Any, laid: Sequence[Any], name: str) -> None:
        """Raises when two manual layers split one dimension of a non-batch leaf.

        Each would take its block of the dimension as if it were the only split (an expert
        layer its experts, a ZeRO layer its rows, a custom layer its members), and the body
        would get the wrong block without an error. Batch leaves may be split by several
        layers on one dimension (``data`` x ``fsdp`` x ``expert`` replicas).
        """
        layers = [lay for lay in self.layers if not lay.sees_others]
        layers += [lay for lay in self.layers if lay.sees_others]
        manual = [(lay, _spec_leaves(t)) for lay, t in zip(layers, laid) if lay.manual]
        clashes = []
        for k, (path, leaf) in enumerate(leaves_with_paths(arg)):
            for d in range(len(shape_of(leaf))):
                on = [lay.describe() for lay, specs in manual if _splits(specs[k], d)]
                if len(on) > 1:
                    clashes.append(
                        f"{path or '(the whole argument)'} dimension {d}: {', '.join(on)}"
                    )
        if clashes:
            raise PlanError(
                f"two manual layers split the same dimension of {name}:\n{bullets(clashes)}\n"
                "Each layer would take its block of that dimension as if it were the only split, "
                "and the body would receive the wrong rows. Split another dimension in one of "
                "the layers (a layout with sees_others=True can pick a free one from "
                "ArgInfo.others)."
            )

    def _check_global_view_axes(
        self, args: Sequence[Any], specs: Sequence[Any], names: Sequence[str]
    ) -> None:
        """Raises when a global-view layer (``tensor_parallel``) lays out no leaf along its
        axis: its rules do nothing, e.g. a pattern that matches no path, hidden behind
        the catch-all ``(r".*", P())``."""
        batch = self.batch_indices(len(args))
        used = {a for tree in specs for s in _spec_leaves(tree) for a in spec_axes(s)}
        idle = [lay for lay in self.layers if not lay.manual and lay.axis not in used]
        if not idle:
            return
        if idle[0].transform != "tensor_parallel":
            raise PlanError(
                f"{idle[0].describe()}: its layout splits no leaf of any argument along "
                f"{idle[0].axis!r}, so the layer would replicate everything and do nothing. "
                f"Split some leaf along {idle[0].axis!r}, or drop the layer."
            )
        paths = [
            f"{names[i].split(' ', 2)[-1].strip('()') or names[i]}/{path}".rstrip("/")
            + f"  shape {shape_of(leaf)}"
            for i, arg in enumerate(args)
            if i not in batch
            for path, leaf in leaves_with_paths(arg)
            if shape_of(leaf)
        ]
        raise RuleError(
            f"{idle[0].describe()}: the rules split no leaf along {idle[0].axis!r}, so the "
            "layer would replicate everything and do nothing. "
            + (
                'A pattern probably matches no path, and a catch-all (r".*", P()) took every '
                f"leaf. The non-batch leaves:\n{bullets(paths)}\n"
                if paths
                else "The step has no non-batch array argument to lay out (arrays it closes "
                "over are constants of the program, never laid out): pass the parameters as "
                "an argument.\n"
            )
            + "Fix the patterns (check them with rules.explain(tree, mesh)), or drop the "
            f"layer if nothing should be split along {idle[0].axis!r}."
        )

    def bound_axes(self, mesh: Mesh) -> tuple[BoundAxis, ...]:
        return tuple(
            BoundAxis(layer.axis, layer.transform, layer.manual, mesh.shape[layer.axis])
            for layer in self.layers
        )

    def traces(
        self, args: Sequence[Any], specs: Sequence[Any], mesh: Mesh, local_args: Sequence[Any]
    ) -> list[TraceInfo]:
        """What each layer's hooks are told while the body is traced, innermost first."""
        batch = self.batch_indices(len(args))
        return [
            TraceInfo(
                layer=layer,
                mesh=mesh,
                args=tuple(args),
                specs=tuple(specs),
                local_args=tuple(local_args),
                batch=batch,
                own_batch=layer.batch_positions(len(args)),
                replicated=self.kept_indices(len(args)),
            )
            for layer in self.layers
        ]

    def entered(self, traces: Sequence[TraceInfo]) -> contextlib.ExitStack:
        """The layers' ``enter`` contexts, entered together while the body is traced."""
        stack = contextlib.ExitStack()
        try:
            for trace in traces:
                if trace.layer.enter is not None:
                    context = _hook(trace.layer, "enter", trace.layer.enter, trace)
                    if not hasattr(context, "__enter__") or not hasattr(context, "__exit__"):
                        raise PlanError(
                            f"{trace.layer.describe()}: its enter hook returned "
                            f"{type(context).__name__}, not a context manager. Write it as a "
                            "generator decorated with @contextlib.contextmanager that yields once."
                        )
                    _hook(trace.layer, "enter", stack.enter_context, context)
        except BaseException:
            stack.close()  # the contexts entered before the failure: exited, never left active
            raise
        return stack

    def prepare(self, local_args: tuple[Any, ...], traces: Sequence[TraceInfo]) -> tuple[Any, ...]:
        """The arguments the body receives: each layer's ``prepare``, innermost first."""
        for trace in traces:
            if trace.layer.prepare is not None:
                new = _hook(trace.layer, "prepare", trace.layer.prepare, local_args, trace)
                _check_prepared(trace.layer, local_args, new)
                local_args = tuple(new)
        return local_args


def context_mesh() -> Mesh | AbstractMesh:
    """The mesh set with ``jax.set_mesh``: concrete outside ``jax.jit``, abstract inside
    (where JAX knows only that; ``get_mesh`` raises there, jax 0.10.2). Empty if none."""
    try:
        mesh = jax.sharding.get_mesh()
    except ValueError:  # inside a trace
        return jax.sharding.get_abstract_mesh()
    return mesh if isinstance(mesh, Mesh) and not mesh.empty else jax.sharding.get_abstract_mesh()


def _same_mesh(a: Mesh | AbstractMesh, b: Mesh) -> bool:
    """The same axis names and sizes and, for a concrete ``a``, the same devices (axis
    types may differ)."""
    if tuple(a.axis_names) != tuple(b.axis_names) or tuple(a.axis_sizes) != tuple(b.axis_sizes):
        return False
    return not isinstance(a, Mesh) or all(
        x.id == y.id for x, y in zip(a.devices.flat, b.devices.flat)
    )


def _mesh_str(mesh: Mesh | AbstractMesh | None) -> str:
    if mesh is None:
        return "None"
    return "Mesh(" + ", ".join(f"{k}={v}" for k, v in mesh.shape.items()) + ")"


def _layout(layer: Layer, arg: Any, info: ArgInfo) -> Any:
    """``layer.layout(arg, info)``, checked: a spec per leaf of ``arg``, naming only the
    layer's axis (a layer that lays out another layer's axis would take it silently)."""
    try:
        specs = layer.layout(arg, info)
    except TitanaxError:
        raise
    except Exception as e:
        raise PlanError(
            f"{layer.describe()}: its layout raised {type(e).__name__}: {e} (laying out "
            f"{info.name}). A layout returns a PartitionSpec tree for any argument it is given, "
            "and raises a TitanaxError naming the leaf for one it cannot lay out."
        ) from e
    leaves = _spec_leaves(specs)
    paths = leaves_with_paths(arg)
    wrong = [s for s in leaves if not isinstance(s, PartitionSpec)]
    structure: Any = jax.tree.structure(specs, is_leaf=_is_spec)  # PyTreeDef stub: no __ne__
    if wrong or structure != jax.tree.structure(arg):
        raise PlanError(
            f"{layer.describe()}: its layout returned "
            + (
                f"{type(wrong[0]).__name__} where a PartitionSpec was expected"
                if wrong
                else f"{len(leaves)} PartitionSpec(s) in another tree structure than the "
                f"{len(paths)} leaves"
            )
            + f" of {info.name}. A layout returns a tree of PartitionSpec with the argument's "
            "structure, one spec per leaf (titanax.extend.replicate(arg) for P() everywhere)."
        )
    unknown = sorted({a for s in leaves for a in spec_axes(s) if a not in info.mesh.shape})
    if unknown:
        close = difflib.get_close_matches(unknown[0], [str(a) for a in info.mesh.axis_names], 1)
        raise PlanError(
            f"{layer.describe()}: its layout of {info.name} names {unknown[0]!r}, which is not "
            f"an axis of the mesh (axes: {', '.join(map(str, info.mesh.axis_names))})"
            + (f"; did you mean {close[0]!r}?" if close else ".")
        )
    other = [
        f"{path or '(the whole argument)'}: {spec}"
        for (path, _), spec in zip(paths, leaves)
        if set(spec_axes(spec)) - {layer.axis}
    ]
    if other:
        raise PlanError(
            f"{layer.describe()}: its layout of {info.name} names mesh axes other than its own "
            f"{layer.axis!r}:\n{bullets(other)}\nA layer lays out its own axis only; the other "
            "axes belong to the transforms that claim them."
        )
    return specs


def _splits(spec: PartitionSpec, dim: int) -> bool:
    return dim < len(spec) and spec[dim] is not None


def _hook(layer: Layer, name: str, hook: Callable[..., Any], *args: Any) -> Any:
    """Calls a layer's hook; an exception that is not a TitanaxError names the layer."""
    try:
        return hook(*args)
    except TitanaxError:
        raise
    except Exception as e:
        raise PlanError(
            f"{layer.describe()}: its {name} hook raised {type(e).__name__}: {e}"
        ) from e


def _check_prepared(layer: Layer, before: tuple[Any, ...], after: Any) -> None:
    """A ``prepare`` hook moves values, never changes what the body receives: the output
    layouts and checks were decided from the arguments' structure and shapes."""

    def shapes(args: Any) -> Any:
        leaves, treedef = jax.tree.flatten(args)
        return treedef, [(shape_of(x), getattr(x, "dtype", None)) for x in leaves]

    if not isinstance(after, (tuple, list)) or len(after) != len(before):
        got = (
            count(len(after), "argument", "arguments")
            if isinstance(after, (tuple, list))
            else type(after).__name__
        )
        given = count(len(before), "argument", "arguments")
        problem = f"returned {got} where it was given {given}"
    else:
        differ = [k for k, (a, b) in enumerate(zip(before, after)) if shapes(a) != shapes(b)]
        if not differ:
            return
        problem = (
            f"changed the structure, shapes or dtypes of argument {differ[0]} "
            f"({shapes(before[differ[0]])[1][:3]} -> {shapes(after[differ[0]])[1][:3]})"
        )
    raise PlanError(
        f"{layer.describe()}: its prepare hook {problem}. prepare may move values between "
        "devices or reorder them, but must return a tuple of the arguments it was given, each "
        "with its structure, shapes and dtypes (the plan's layouts and checks were decided "
        "from them)."
    )


def _spec_leaves(tree: Any) -> list[PartitionSpec]:
    return jax.tree_util.tree_leaves(tree, is_leaf=_is_spec)


def _merge_trees(arg: Any, per_layer: Sequence[Any], mesh: Mesh) -> Any:
    if not per_layer:
        return jax.tree.map(lambda _: P(), arg)
    return jax.tree.map(lambda x, *specs: _merge(x, specs, mesh), arg, *per_layer)


def _merge(leaf: Any, specs: Sequence[PartitionSpec], mesh: Mesh) -> PartitionSpec:
    """Combines the per-axis specs of one leaf, dimension by dimension, in mesh axis order."""
    ndim = len(shape_of(leaf))
    dims: list[list[str]] = [[] for _ in range(max([ndim, *map(len, specs)]))]
    for spec in specs:
        for d, entry in enumerate(spec):
            if entry is not None:
                dims[d].extend((entry,) if isinstance(entry, str) else entry)
    order = {name: k for k, name in enumerate(mesh.axis_names)}
    entries = []
    for axes in dims:
        axes = sorted(axes, key=lambda a: order.get(a, len(order)))
        entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def _restrict(spec: PartitionSpec, axes: frozenset[str]) -> PartitionSpec:
    """``spec`` naming only ``axes`` (the ``in_specs`` of a partly manual ``shard_map``)."""
    entries = []
    for entry in spec:
        kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a in axes)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*entries)
