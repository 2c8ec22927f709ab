"""How a ``fully_sharded`` body knows the layout of what it holds.

While the body is traced, a `Registry` records the layout (`Leaf`) of every leaf of
every state argument: its whole shape, the dimension split along the data axis, and
its spec over the whole mesh. The body's helpers look a tree up here: leaves the body
received are known by identity; other trees (gradients, updated shards, a layer
sliced out of stacked layers, a masked subset) by structure, shapes and paths.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import PartitionSpec

from titanax._util import bullets, count, leaves_with_paths, shape_of
from titanax.errors import CollectiveError
from titanax.parallel import collectives as c
from titanax.parallel.plan import _restrict
from titanax.parallel.rules import spec_axes

__all__ = ["Leaf", "Registry", "active", "registered", "registry", "layout_of", "split_dim"]

P = PartitionSpec


@dataclasses.dataclass(frozen=True)
class Leaf:
    """What the body's helpers know of one state leaf (a pytree leaf, on purpose)."""

    path: str
    shape: tuple[int, ...]  # the whole leaf
    dim: int | None  # the dimension the rule splits; None: never split
    stored_split: bool  # whether the body receives a shard of it
    size: int  # the axis size
    spec: PartitionSpec  # its layout over the whole mesh

    @property
    def shard_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        return tuple(s // self.size if d == self.dim else s for d, s in enumerate(self.shape))

    def holds_shard(self, shape: tuple[int, ...]) -> bool:
        """Whether a value of ``shape`` laid out like this leaf is a shard of it (it is split,
        along an axis of size > 1, and the value has the shard's shape, not the whole's)."""
        return self.dim is not None and self.size > 1 and shape == self.shard_shape

    def inner(self, k: int) -> Leaf | None:
        """The layout of one slice ``x[i_0, ..., i_{k-1}]`` (a layer of stacked layers), or
        ``None`` when the slice would cut the split dimension."""
        if k == 0:
            return self
        if self.dim is not None and self.dim < k:
            return None
        dim = None if self.dim is None else self.dim - k
        spec = P(*tuple(self.spec)[k:])
        return dataclasses.replace(self, shape=self.shape[k:], dim=dim, spec=spec)


class Registry(NamedTuple):
    where: str  # "fully_sharded(axis='data')"
    axis: str
    size: int
    states: tuple[Any, ...]  # one tree of Leaf per non-batch argument
    received: dict[int, tuple[Any, Leaf]]  # id(leaf the body received) -> (the leaf, layout)


_ACTIVE: contextvars.ContextVar[tuple[Registry, ...]] = contextvars.ContextVar(
    "titanax_fully_sharded", default=()
)


def active(axis: str) -> Registry | None:
    """The registry of the innermost ``fully_sharded`` body over ``axis`` being traced."""
    return next((r for r in reversed(_ACTIVE.get()) if r.axis == axis), None)


def active_or_whole(fn: str, axis: str) -> Registry | None:
    """`active` for helpers that are exact on whole values too (norms): ``None`` where no
    ``fully_sharded`` body is traced, and an error where one is traced over another axis,
    since the shards along that axis would be taken for whole leaves.

    Raises:
      CollectiveError: a ``fully_sharded`` body over another axis is being traced.
    """
    reg = active(axis)
    others = sorted({r.axis for r in _ACTIVE.get()} - {axis})
    if reg is None and others:
        raise CollectiveError(
            f"tx.{fn}: axis={axis!r}, but the state is split along {others[0]!r} "
            f"(the step is traced under tx.fully_sharded(axis={others[0]!r})): the norm would "
            f"take each device's shards for whole leaves. Pass axis={others[0]!r}."
        )
    return reg


@contextlib.contextmanager
def registered(registry: Registry) -> Iterator[None]:
    """Makes ``registry`` known to the helpers while a body is traced."""
    token = _ACTIVE.set((*_ACTIVE.get(), registry))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def split_dim(shape: Sequence[int], taken: PartitionSpec, size: int, min_size: int) -> int | None:
    """The dimension ``fully_sharded`` splits: the largest one that ``size`` divides and
    ``taken`` (the other transforms' spec) leaves free; ``None`` for a leaf with fewer
    than ``min_size`` elements or no such dimension.

    >>> split_dim((512, 2048), P(), 8, 1024), split_dim((512, 2048), P(None, "model"), 8, 1024)
    (1, 0)
    >>> split_dim((30,), P(), 8, 1024) is None      # too small, and 8 does not divide 30
    True
    """
    if not shape or math.prod(shape) < max(min_size, 1):
        return None
    used = {d for d, entry in enumerate(taken) if entry is not None}
    free = [d for d, n in enumerate(shape) if d not in used and n >= size and n % size == 0]
    return max(free, key=lambda d: (shape[d], -d)) if free else None


def registry(fn: str, axis: str) -> Registry:
    reg = active(axis)
    if reg is None:
        c._check(fn, axis)  # an unbound axis: the guarded collectives' error
        raise CollectiveError(
            f"tx.{fn}: axis {axis!r} is not bound by tx.fully_sharded here, so nothing is "
            f"stored split along it. Wrap the step with tx.fully_sharded(axis={axis!r}), or "
            f"use tx.pmean(grads, {axis!r}) under data_parallel."
        )
    return reg


def layout_of(fn: str, tree: Any, axis: str, like: Any = None) -> list[Leaf]:
    """The `Leaf` of every leaf of ``tree``.

    Leaves the body received as they are are known exactly. Any other tree is matched,
    by structure and shapes, to part of a state argument (``state.params``, its
    gradients, ZeRO-1's updated shards), or to one slice of it along leading stacked
    dimensions (a layer inside a ``lax.scan`` over stacked layers). ``like``: a tree the
    body received, whose layout ``tree`` has.
    """
    reg = registry(fn, axis)
    ref = tree if like is None else like
    leaves = jax.tree.leaves(ref)
    same: bool = jax.tree.structure(like) == jax.tree.structure(tree)  # type: ignore[operator]
    if like is not None and not same:
        raise CollectiveError(
            f"tx.{fn}: like= must have the structure of the tree given "
            f"({jax.tree.structure(like)} vs {jax.tree.structure(tree)})."
        )
    known = [reg.received.get(id(x)) for x in leaves]
    if all(k is not None and k[0] is x for k, x in zip(known, leaves)):
        return [k[1] for k in known if k is not None]
    if like is not None:
        raise CollectiveError(
            f"tx.{fn}: like= must be leaves the step received as they are (e.g. "
            "state.params['mlp']['kernel']), not values computed from them."
        )
    treedef: Any = jax.tree.structure(tree)
    shapes = [shape_of(x) for x in leaves]
    found: list[list[Leaf]] = []
    near: list[str] = []
    for state in reg.states:
        parts = jax.tree.leaves(state, is_leaf=lambda n: jax.tree.structure(n) == treedef)
        for part in parts:
            if jax.tree.structure(part) != treedef:
                continue
            match = _match(jax.tree.leaves(part), shapes, near)
            key = _key(match or [], axis)
            if match is not None and all(key != _key(f, axis) for f in found):
                found.append(match)
    if not found and (by_path := _by_path(tree, reg, axis)) is not None:
        return by_path
    if not found:
        detail = f" Closest parts of the state differ in shape:\n{bullets(near)}" if near else ""
        raise CollectiveError(
            f"tx.{fn}: the tree given ({count(len(shapes), 'leaf', 'leaves')}) is not laid out "
            f"by {reg.where}: it must have the structure and shapes of part of a state "
            "argument, e.g. state.params, or the gradients of state.params." + detail
        )
    if len(found) > 1:
        raise CollectiveError(
            f"tx.{fn}: the tree given matches several parts of the state that are laid out "
            f"differently ({', '.join(f[0].path for f in found)}...). Pass like= the leaves "
            "the step received for it (e.g. like=state.params['mlp']['up']['kernel'])."
        )
    return found[0]


def _by_path(tree: Any, reg: Registry, axis: str) -> list[Leaf] | None:
    """Layouts found leaf by leaf: a state leaf whose path ends with the leaf's path and whose
    whole or shard shape it has (a tree of some of the gradients, e.g. under ``optax.masked``).
    ``None`` unless every leaf finds layouts and they agree."""
    state_leaves = [a for state in reg.states for a in jax.tree.leaves(state)]
    out = []
    for path, x in leaves_with_paths(tree):
        if not path:
            return None
        shape = shape_of(x)
        hits = [
            a
            for a in state_leaves
            if (a.path == path or a.path.endswith("/" + path)) and shape in (a.shape, a.shard_shape)
        ]
        if not hits or len({tuple(_key([a], axis)) for a in hits}) > 1:
            return None
        out.append(hits[0])
    return out


def _key(leaves: list[Leaf], axis: str) -> list[tuple[Any, ...]]:
    """What a helper does with each leaf: the split dimension and the other axes' layout."""

    def others(a: Leaf) -> tuple[Any, ...]:
        entries = list(_restrict(a.spec, frozenset(spec_axes(a.spec)) - {axis}))
        while entries and entries[-1] is None:
            entries.pop()
        return tuple(entries)

    return [(a.dim, others(a)) for a in leaves]


def _match(part: list[Leaf], shapes: list[tuple[int, ...]], near: list[str]) -> list[Leaf] | None:
    """``part``'s layouts if ``shapes`` are its whole or shard shapes, or those of one slice
    along the same number of leading dimensions of every leaf."""
    for k in range(1 + min((len(a.shape) for a in part), default=0)):
        inner = [a.inner(k) for a in part]
        if all(
            a is not None and shape in (a.shape, a.shard_shape) for a, shape in zip(inner, shapes)
        ):
            return [a for a in inner if a is not None]
    bad = [
        f"{a.path}: {shape} is neither {a.shape} nor the shard {a.shard_shape}"
        for a, shape in zip(part, shapes)
        if shape not in (a.shape, a.shard_shape)
    ]
    near.extend(bad[:1])
    return None
