"""The layouts of a step's outputs, and the checks that make a forgotten reduction an error.

An output with the tree structure and shapes of a non-batch argument (the new state) takes
that argument's layout; every other output is replicated. Whether an output may be
replicated is decided from the program (`titanax.parallel.varying`), never from the
numbers of one call: a replicated output that still varies along a manual axis is a
`PlanError` raised while the step is traced, before anything runs or is donated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import PartitionSpec

from titanax._util import bullets, count, leaves_with_paths, shape_of
from titanax.errors import PlanError
from titanax.parallel.plan import _spec_leaves
from titanax.parallel.rules import spec_axes

__all__ = ["OutputLayout", "output_layout", "check_reduced", "check_stray_shards", "top_level"]

P = PartitionSpec


def top_level(out: Any) -> tuple[Any, ...]:
    """The top-level outputs of a step: the parts of a returned tuple, or the one output."""
    return out if isinstance(out, tuple) else (out,)


class OutputLayout(NamedTuple):
    """Where each top-level output's layout comes from.

    Attributes:
      specs: the ``PartitionSpec`` tree of the outputs (a tuple when the step returns one).
      sources: per top-level output, the position of the argument whose layout it takes
        (the state it replaces), or ``None`` (replicated).
      ambiguous: positions of arguments that an output could replace but so could
        another argument (same structure and shapes): never donated.
    """

    specs: Any
    sources: tuple[int | None, ...]
    ambiguous: frozenset[int]


def output_layout(
    out: Any,
    args: Sequence[Any],
    in_specs: Sequence[Any],
    batch: frozenset[int],
    vary: Sequence[frozenset[str]] | None = None,
    manual: frozenset[str] = frozenset(),
    kept: frozenset[int] = frozenset(),
) -> OutputLayout:
    """An output shaped like a non-batch argument takes its layout; every other is replicated.

    ``out`` and ``args`` are shapes as the body sees them (per device along manual axes).
    With ``vary`` (per output leaf, the manual axes it varies along), a bare-array output
    takes a layout split along manual axes only if it varies along them: a reduced metric
    with a shard's shape stays replicated. A container (dict, tuple, TrainState) with the
    argument's structure and shapes takes its layout even where it is equal on every
    device (a state reset to zeros is still a set of shards). Arguments in ``kept`` (constants) are never the
    state an output replaces.
    """
    specs, sources, ambiguous = [], [], set()
    leaf_vary = iter(vary if vary is not None else [])
    in_trees: list[Any] = [jax.tree.structure(a) for a in args]
    for part in top_level(out):
        tree = jax.tree.structure(part)
        leaves = jax.tree.leaves(part)
        shapes = [shape_of(x) for x in leaves]
        part_vary = [next(leaf_vary) for _ in leaves] if vary is not None else None
        matches = [
            i
            for i, arg in enumerate(args)
            if i not in batch
            and i not in kept
            and in_trees[i] == tree
            and shapes == [shape_of(x) for x in jax.tree.leaves(arg)]
            and (
                part_vary is None
                # A container's structure is evidence enough (a state reset to zeros).
                or not jax.tree_util.treedef_is_leaf(tree)
                or all(
                    set(spec_axes(s)) & manual <= v
                    for s, v in zip(_spec_leaves(in_specs[i]), part_vary)
                )
            )
        ]
        if len(matches) > 1:
            ambiguous.update(matches)
        sources.append(matches[0] if matches else None)
        specs.append(in_specs[matches[0]] if matches else jax.tree.map(lambda _: P(), part))
    packed = tuple(specs) if isinstance(out, tuple) else specs[0]
    return OutputLayout(packed, tuple(sources), frozenset(ambiguous))


def _describe(path: str, k: int, many: bool) -> str:
    where = f"output {k}" if many else "the output"
    return f"{where} [{path}]" if path else where


def check_reduced(
    out: Any,
    out_specs: Any,
    vary: Sequence[frozenset[str]],
    sizes: dict[str, int],
    where: str,
) -> None:
    """Raises if an output laid out as replicated along a manual axis may vary along it.

    Args:
      out: the body's outputs (shapes).
      out_specs: their ``PartitionSpec`` tree.
      vary: per output leaf, the manual axes it may vary along (`varying_axes`).
      sizes: manual axis -> size (axes of size 1 cannot vary).
      where: the stack, for the message (``"data_parallel(axis='data')"``).
    """
    parts = top_level(out)
    spec_parts = top_level(out_specs) if isinstance(out, tuple) else (out_specs,)
    leaf_vary = iter(vary)
    bad: list[str] = []
    axes_seen: set[str] = set()
    for k, (part, spec_tree) in enumerate(zip(parts, spec_parts)):
        for (path, _), spec in zip(leaves_with_paths(part), _spec_leaves(spec_tree)):
            v = {a for a in next(leaf_vary) if sizes.get(a, 1) > 1} - set(spec_axes(spec))
            if v:
                axes_seen |= v
                names = ", ".join(repr(a) for a in sorted(v))
                bad.append(f"{_describe(path, k, len(parts) > 1)}  (varies along {names})")
    if not bad:
        return
    axes = ", ".join(repr(a) for a in sorted(axes_seen))
    axis = sorted(axes_seen)[0]
    raise PlanError(
        f"{where}: {count(len(bad), 'output leaf', 'output leaves')} differ"
        f"{'s' if len(bad) == 1 else ''} between replicas along {axes}, but outputs are "
        f"replicated:\n{bullets(bad)}\n"
        "Each replica computes its own value and nothing in the step reduces it (decided "
        "from the traced program, before it ran: no argument was donated). Reduce in the "
        f"step: grads = tx.pmean(grads, {axis!r}) before the update, and "
        f"tx.pmean(loss, {axis!r}) for metrics; gather per-example values with tx.all_gather "
        "(and the values of a layer whose devices hold different models, such as an "
        "ensemble's members)."
    )


def check_stray_shards(
    out: Any,
    out_specs: Any,
    vary: Sequence[frozenset[str]],
    local_in: Sequence[Any],
    local_specs: Sequence[Any],
    batch: frozenset[int],
    where: str,
) -> None:
    """Raises for an output left replicated that varies across replicas with a shard's shape:
    a shard of split state returned where its layout cannot follow it."""
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
        one = len(stray) == 1
        raise PlanError(
            f"{where}: {count(len(stray), 'output leaf', 'output leaves')} of the step "
            f"{'varies' if one else 'vary'} between devices and {'has' if one else 'have'} the "
            f"shape of a shard of split state, returned where no layout follows "
            f"{'it' if one else 'them'}:\n{bullets(stray)}\n"
            "If it is state: an output takes a state argument's split layout only when it is "
            "a top-level output with the argument's structure (return `state, metrics`, not "
            "`{'state': state}`). If it is a per-device value (a metric, a loss) whose shape "
            "only matches a shard's, reduce it in the step (tx.pmean, tx.psum), or gather it "
            "with tx.all_gather."
        )
