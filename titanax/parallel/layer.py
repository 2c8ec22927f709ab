"""`Layer`: one transform's contribution to a plan, and what its hooks are told.

Every transform of a stack (``tx.data_parallel``, ``tx.fully_sharded``, ...) is a
`Layer` applied to the step with `titanax.extend.apply_layer`. The plan merges the
layers' layouts leaf by leaf into one ``jax.jit(jax.shard_map(...))`` program; a layer
says which mesh axis it owns, whether the body sees per-device values along it
(``manual``) or global arrays (``Auto``, XLA partitions the math), and how it lays out
each argument. This module is public through `titanax.extend`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, cast

import jax
from jax.sharding import Mesh, PartitionSpec

from titanax._util import bullets, count, leaves_with_paths, shape_of
from titanax.errors import PlanError

__all__ = [
    "ArgInfo",
    "EnterHook",
    "Layer",
    "LayoutHook",
    "PrepareHook",
    "TraceInfo",
    "check_axis",
    "normalize_argnums",
    "replicate",
    "resolve_argnums",
    "split_batch",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArgInfo:
    """What a layer's ``layout`` is told about one argument of a call.

    Attributes:
      layer: the `Layer` being asked.
      position: the argument's position in the call (a method's ``self`` not counted).
      name: the argument for messages, e.g. ``"argument 0 (params)"``.
      nargs: how many arguments the call has.
      mesh: the mesh the program runs on.
      is_batch: whether any layer of the stack names this position in its
        ``batch_argnums``: data, never state (a layer that does not split it keeps it
        whole).
      is_own_batch: whether this layer's own ``batch_argnums`` names it (the batches it
        splits).
      is_replicated: whether any layer's ``replicated_argnums`` names it: a constant of
        the step, whole on every device (and never donated).
      others: for a layer with ``sees_others=True``, the merged ``PartitionSpec`` tree
        of the layers laid out before it for this argument (every layer without
        ``sees_others``, then the inner ones with it), to pick dimensions they leave
        free; ``None`` otherwise.
    """

    layer: Layer
    position: int
    name: str
    nargs: int
    mesh: Mesh
    is_batch: bool
    is_own_batch: bool = False
    is_replicated: bool = False
    others: Any = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TraceInfo:
    """What a layer's ``enter`` and ``prepare`` hooks are told while the body is traced.

    Attributes:
      layer: the `Layer` whose hook is called.
      mesh: the mesh the program runs on.
      args: the arguments' global shapes (trees of ``jax.ShapeDtypeStruct``).
      specs: the arguments' merged ``PartitionSpec`` trees (every layer's axes).
      local_args: the values the body receives (per-device along the manual axes):
        tracers, recognized by identity (``id``) by the layers that keep track of them.
      batch: the positions of the batch arguments (of any layer).
      own_batch: the positions this layer's ``batch_argnums`` names.
      replicated: the positions of the constants (any layer's ``replicated_argnums``).
    """

    layer: Layer
    mesh: Mesh
    args: tuple[Any, ...]
    specs: tuple[Any, ...]
    local_args: tuple[Any, ...]
    batch: frozenset[int]
    own_batch: frozenset[int] = frozenset()
    replicated: frozenset[int] = frozenset()


class LayoutHook(Protocol):
    """``layout(arg, info) -> specs``: how a layer lays out one argument.

    Returns a tree of ``PartitionSpec`` with ``arg``'s structure (a spec per leaf) that
    names only the layer's own axis; ``P()`` leaves a leaf whole along it. Called once
    per argument and argument structure, before anything is traced; raise a
    `titanax.errors.TitanaxError` naming the leaf for an argument that cannot be laid
    out.
    """

    def __call__(self, arg: Any, info: ArgInfo, /) -> Any: ...


class EnterHook(Protocol):
    """``enter(trace) -> context manager``: entered while the body is traced.

    For layers whose helpers (called inside the body) need to know the plan: which
    values the body received for which leaf, their global shapes and layouts.
    `tx.fully_sharded` records each parameter's split here for `tx.gather_params`.
    """

    def __call__(self, trace: TraceInfo, /) -> contextlib.AbstractContextManager[Any]: ...


class PrepareHook(Protocol):
    """``prepare(args, trace) -> args``: the arguments the body receives.

    Called inside every layer's ``enter`` context, innermost layer first, on the
    per-device arguments; may move data inside the program (``tx.context_parallel``
    reorders each batch's sequence chunks with two ``ppermute``). Every argument keeps
    its structure, shapes and dtypes (a `titanax.errors.PlanError` otherwise: the output
    layouts and checks were decided from them); the leaves it does not change are
    returned as they are, since other layers recognize them by identity.
    """

    def __call__(self, args: tuple[Any, ...], trace: TraceInfo, /) -> tuple[Any, ...]: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layer:
    """One transform's contribution to a plan: its axis, its kind, how it lays out arguments.

    Attributes:
      transform: the transform's name, for messages (``"data_parallel"``).
      axis: the mesh axis the layer owns; two layers of one stack never share an axis.
      manual: ``True``: the body sees per-device values along ``axis`` (a manual axis
        of the ``shard_map``) and collectives over it are written by the user;
        ``False``: the body sees global arrays and XLA partitions the math from the
        declared layouts (an ``Auto`` axis, as in ``tx.tensor_parallel``).
      layout: a `LayoutHook`: each argument's ``PartitionSpec`` tree along ``axis``.
      mesh: the mesh given to the transform, or ``None`` (another layer's, or
        ``jax.set_mesh``'s).
      batch_argnums: positions of the batch arguments (an int or a sequence of ints;
        negative counts from the end).
      replicated_argnums: positions of non-batch arguments that are constants of the
        step: never donated, and told to every layer's ``layout`` as
        ``info.is_replicated`` (to keep them whole).
      donate: whether the state (non-batch arguments an output replaces) may be
        donated; ``None``: no opinion. Donation happens when every layer with an
        opinion agrees.
      sees_others: lay out after the other layers, with their merged specs in
        ``ArgInfo.others``.
      enter: an `EnterHook`, or ``None``.
      prepare: a `PrepareHook`, or ``None``.
      notes: lines ``ParallelFunction.explain`` prints under the layer (what its rules
        decided and why: `tensor_parallel` passes its `Rules`' notes).

    Raises:
      PlanError: a field of the wrong type (an axis that is not a non-empty string, a
        mesh that is not a ``jax.sharding.Mesh``, argnums that are not ints, a hook
        that is not callable).

    Examples:
      >>> from titanax.extend import Layer, replicate, split_batch
      >>> def layout(arg, info):
      ...     return split_batch(arg, info) if info.is_own_batch else replicate(arg)
      >>> Layer(transform="my_dp", axis="data", manual=True, layout=layout).describe()
      "my_dp(axis='data')"
      >>> Layer(transform="my_dp", axis="", manual=True, layout=layout)
      Traceback (most recent call last):
      ...
      titanax.errors.PlanError: my_dp: axis must be a mesh axis name (a str), got ''.
    """

    transform: str
    axis: str
    manual: bool
    layout: LayoutHook
    mesh: Mesh | None = None
    batch_argnums: int | Sequence[int] = (-1,)
    replicated_argnums: int | Sequence[int] = ()
    donate: bool | None = None
    sees_others: bool = False
    enter: EnterHook | None = None
    prepare: PrepareHook | None = None
    notes: Sequence[str] = ()

    def __post_init__(self) -> None:
        name = self.transform
        if not isinstance(name, str) or not name:
            raise PlanError(f"Layer: transform must be the transform's name (a str), got {name!r}.")
        check_axis(name, self.axis, self.mesh)
        set_ = object.__setattr__  # frozen: normalize once, here
        set_(self, "batch_argnums", normalize_argnums(name, self.batch_argnums))
        set_(
            self,
            "replicated_argnums",
            normalize_argnums(name, self.replicated_argnums, "replicated_argnums"),
        )
        notes = (self.notes,) if isinstance(self.notes, str) else self.notes
        if not isinstance(notes, Sequence) or not all(isinstance(n, str) for n in notes):
            raise PlanError(f"{name}: notes must be a sequence of str, got {self.notes!r}.")
        set_(self, "notes", tuple(notes))
        for field in ("manual", "sees_others"):
            if not isinstance(getattr(self, field), bool):
                raise PlanError(
                    f"{self.describe()}: {field} must be True or False, got "
                    f"{getattr(self, field)!r}."
                )
        if self.donate is not None and not isinstance(self.donate, bool):
            raise PlanError(
                f"{self.describe()}: donate must be True, False or None, got {self.donate!r}."
            )
        hooks = {"layout": self.layout, "enter": self.enter, "prepare": self.prepare}
        for field, hook in hooks.items():
            if not callable(hook) and not (field != "layout" and hook is None):
                raise PlanError(
                    f"{self.describe()}: {field} must be a function"
                    + (" or None" if field != "layout" else "")
                    + f", got {type(hook).__name__}."
                )

    def describe(self) -> str:
        """``transform(axis='...')``, as messages name the layer."""
        return f"{self.transform}(axis={self.axis!r})"

    def batch_positions(self, nargs: int) -> frozenset[int]:
        """``batch_argnums`` as positions of a call with ``nargs`` arguments."""
        return resolve_argnums(cast(tuple[int, ...], self.batch_argnums), nargs)

    def replicated_positions(self, nargs: int) -> frozenset[int]:
        """``replicated_argnums`` as positions of a call with ``nargs`` arguments."""
        return resolve_argnums(cast(tuple[int, ...], self.replicated_argnums), nargs)


def replicate(arg: Any) -> Any:
    """``P()`` for every leaf of ``arg``: whole on every device of the layer's axis.

    Examples:
      >>> replicate({"w": 1.0, "b": (2, 3)})
      {'b': (P(), P()), 'w': P()}
    """
    return jax.tree.map(lambda _: PartitionSpec(), arg)


def split_batch(arg: Any, info: ArgInfo, *, dim: int = 0, chunks: int = 1, fix: str = "") -> Any:
    """Every leaf of ``arg`` split on dimension ``dim`` along the layer's axis.

    The layout of a batch in `data_parallel` (``dim=0``) and `context_parallel`
    (``dim=seq_dim``, ``chunks=2``: two chunks per device).

    Args:
      arg: the argument (a tree of arrays or shapes).
      info: the `ArgInfo` the layout was given.
      dim: the dimension to split.
      chunks: the number of equal pieces per device the dimension must divide into.
      fix: advice appended to the error; by default, to make the batch a multiple.

    Returns:
      A tree of ``PartitionSpec`` of ``arg``'s structure.

    Raises:
      PlanError: leaves without dimension ``dim`` or whose length there does not divide
        by ``chunks`` x the axis size; every such leaf is listed.
    """
    axis, size = info.layer.axis, info.mesh.shape[info.layer.axis]
    parts = size * chunks
    bad = []
    for path, leaf in leaves_with_paths(arg):
        shape, label = shape_of(leaf), path or "(the whole argument)"
        if len(shape) <= dim:
            bad.append(
                f"{label}  is a scalar: a batch leaf needs a leading batch dimension"
                if not shape and dim == 0
                else f"{label}  shape {shape}: has no dimension {dim}"
            )
        elif shape[dim] % parts:
            by = f"{axis!r}={size}" if chunks == 1 else f"{chunks} x {axis!r} = {parts}"
            what = (
                f"leading dimension {shape[0]}" if dim == 0 else f"dimension {dim} ({shape[dim]})"
            )
            bad.append(f"{label}  shape {shape}: {what} is not divisible by {by}")
    if bad:
        if dim == 0 and chunks == 1:
            into = f"{size} replicas"
            default = f"Make the global batch a multiple of {parts}"
        else:
            per = f", {chunks} per device" if chunks > 1 else ""
            into = f"{parts} pieces on dimension {dim}{per},"
            default = f"Make dimension {dim} of every batch leaf a multiple of {parts}"
        raise PlanError(
            f"{info.layer.describe()}: {count(len(bad), 'leaf', 'leaves')} of {info.name} cannot "
            f"be split into {into} along {axis!r}:\n{bullets(bad)}\n"
            + (fix or f"{default}, or pass non-batch arguments outside batch_argnums.")
        )
    spec = PartitionSpec(*[None] * dim, axis)
    return jax.tree.map(lambda _: spec, arg)


def normalize_argnums(
    transform: str, argnums: int | Sequence[int], name: str = "batch_argnums"
) -> tuple[int, ...]:
    """Checks ``argnums`` (an int or a sequence of ints) and returns a tuple."""
    nums = (argnums,) if isinstance(argnums, int) and not isinstance(argnums, bool) else argnums
    if not isinstance(nums, Sequence) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in nums
    ):
        example = "(-1,) for a batch passed last" if name == "batch_argnums" else "(1,)"
        raise PlanError(
            f"{transform}: {name} must be an int or a tuple of ints, got {argnums!r}. "
            f"E.g. {name}={example}."
        )
    return tuple(nums)


def resolve_argnums(nums: Sequence[int], nargs: int) -> frozenset[int]:
    """``nums`` as positions of a call with ``nargs`` arguments (negative ones count from the
    end; those out of range name no argument)."""
    return frozenset(i % nargs for i in nums if -nargs <= i < nargs)


def check_axis(transform: str, axis: object, mesh: object) -> None:
    """Checks the static arguments every transform shares."""
    if not isinstance(axis, str) or not axis:
        raise PlanError(f"{transform}: axis must be a mesh axis name (a str), got {axis!r}.")
    if mesh is not None and not isinstance(mesh, Mesh):
        raise PlanError(
            f"{transform}(axis={axis!r}): mesh must be a jax.sharding.Mesh (from tx.mesh), "
            f"got {type(mesh).__name__}."
        )
