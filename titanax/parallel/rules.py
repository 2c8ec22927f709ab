"""``tx.Rules``: leaf paths to ``PartitionSpec``s, checked against a mesh."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from titanax._util import (
    Report,
    bullets,
    count,
    format_bytes,
    leaves_with_paths,
    nbytes,
    shape_of,
    table,
)
from titanax.errors import RuleError

__all__ = [
    "Rules",
    "megatron_mlp",
    "megatron_attention",
    "llama",
    "gpt2",
    "bert",
    "spec_problem",
    "spec_axes",
    "bytes_per_device",
]


def spec_axes(spec: PartitionSpec) -> list[str]:
    """Mesh axis names a spec mentions, in order (``P(('a', 'b'), None, 'c')`` -> a, b, c)."""
    out: list[str] = []
    for entry in spec:
        if entry is None:
            continue
        out.extend((entry,) if isinstance(entry, str) else entry)
    return out


def _entry_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def spec_problem(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh | None) -> str | None:
    """Why ``spec`` cannot lay out an array of ``shape`` on ``mesh``, or ``None`` if it can."""
    if len(spec) > len(shape):
        return (
            f"spec {spec} has {count(len(spec), 'entry', 'entries')} but the leaf has "
            f"{count(len(shape), 'dimension')}"
        )
    names = spec_axes(spec)
    twice = sorted({a for a in names if names.count(a) > 1})
    if twice:
        return f"spec {spec} uses axis {twice[0]!r} more than once"
    if mesh is None:
        return None
    unknown = [a for a in names if a not in mesh.shape]
    if unknown:
        return (
            f"spec {spec} names axis {unknown[0]!r}, which is not in the mesh "
            f"(axes: {', '.join(mesh.axis_names)})"
        )
    for dim, entry in enumerate(spec):
        axes = _entry_axes(entry)
        parts = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % parts:
            sizes = " x ".join(f"{a!r}={mesh.shape[a]}" for a in axes)
            return f"dimension {dim} (size {shape[dim]}) is not divisible by {sizes}" + (
                f" = {parts}" if len(axes) > 1 else ""
            )
    return None


def bytes_per_device(shape: tuple[int, ...], dtype: Any, spec: PartitionSpec, mesh: Mesh) -> int:
    """Bytes one device holds of an array laid out by ``spec``."""
    parts = math.prod(mesh.shape[a] for a in spec_axes(spec))
    return nbytes(shape, dtype) // parts


class Rules:
    """Ordered rules from leaf paths to ``PartitionSpec``s.

    A leaf's path is its keys joined by ``/`` (``"params/h/0/mlp/up/kernel"``).
    It takes the spec of the first rule whose pattern ``re.search``-es the
    path. Because optimizer state paths end with the parameter's path
    (``"opt_state/0/mu/h/0/mlp/up/kernel"``), a rule anchored with ``$``
    lays out a parameter and its optimizer moments alike. Scalars are always
    replicated. A non-scalar leaf that no rule matches is an error: rules are
    strict, end them with ``(r".*", P())`` to replicate everything else.

    Args:
      *rules: ``(pattern, PartitionSpec)`` pairs, tried in order.
      notes: lines that say what the rules decided and why (a ready-made set
        explains a choice the user should know of); `explain` prints them
        under its table. They do not change any spec, nor ``==``.
      axis_sizes: the mesh axis sizes the rules were written for, when their
        choice depends on them (``{"model": 4}``); `specs` with a mesh
        whose sizes differ is an error rather than a layout built for
        another mesh.

    Raises:
      RuleError: a rule that is not a ``(str, PartitionSpec)`` pair, a
        pattern that is not a valid regular expression, or an axis size
        that is not a positive int.

    Examples:
      >>> import jax.numpy as jnp, titanax as tx
      >>> from jax.sharding import PartitionSpec as P
      >>> rules = tx.Rules(
      ...     (r"up/kernel$", P(None, "model")),
      ...     (r"down/kernel$", P("model", None)),
      ...     (r".*", P()),
      ... )
      >>> params = {"up": {"kernel": jnp.zeros((16, 64))},
      ...           "down": {"kernel": jnp.zeros((64, 16)), "bias": jnp.zeros(16)}}
      >>> rules.specs(params)["down"]["kernel"]
      P('model', None)
      >>> rules.explain(params, tx.mesh(data=2, model=4))
      path         shape     spec              bytes/device
      down/bias    (16,)     P()               64 B
      down/kernel  (64, 16)  P('model', None)  1.0 KiB
      up/kernel    (16, 64)  P(None, 'model')  1.0 KiB
    """

    def __init__(
        self,
        *rules: tuple[str, PartitionSpec],
        notes: Sequence[str] = (),
        axis_sizes: Mapping[str, int] | None = None,
    ):
        checked = []
        for i, rule in enumerate(rules):
            if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)):
                raise RuleError(
                    f"tx.Rules: rule {i} must be a (pattern, PartitionSpec) pair, got {rule!r}. "
                    'Write e.g. (r"mlp/up/kernel$", P(None, "model")).'
                )
            pattern, spec = rule
            if not isinstance(spec, PartitionSpec):
                raise RuleError(
                    f"tx.Rules: rule {i} ({pattern!r}) has spec {spec!r}, which is not a "
                    "PartitionSpec. Write P(...) from jax.sharding.PartitionSpec; P() replicates."
                )
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise RuleError(
                    f"tx.Rules: rule {i} pattern {pattern!r} is not a valid regular expression: {e}."
                ) from None
            checked.append((compiled, spec))
        self._rules: tuple[tuple[re.Pattern[str], PartitionSpec], ...] = tuple(checked)
        if isinstance(notes, str):
            notes = (notes,)
        self.notes: tuple[str, ...] = tuple(dict.fromkeys(str(n) for n in notes))
        sizes = dict(axis_sizes or {})
        for name, size in sizes.items():
            if not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
                raise RuleError(
                    f"tx.Rules: axis_sizes[{name!r}] must be a positive int, got {size!r}."
                )
        self.axis_sizes: dict[str, int] = sizes

    def __iter__(self) -> Iterator[tuple[str, PartitionSpec]]:
        return ((p.pattern, s) for p, s in self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return "Rules(" + ", ".join(f"({p!r}, {s})" for p, s in self) + ")"

    def __add__(self, other: Rules) -> Rules:
        """The rules of ``self``, then those of ``other`` (first match still wins).

        Notes and axis sizes are kept from both; two different sizes for one axis
        are an error.
        """
        if not isinstance(other, Rules):
            return NotImplemented
        for name in self.axis_sizes.keys() & other.axis_sizes.keys():
            if self.axis_sizes[name] != other.axis_sizes[name]:
                raise RuleError(
                    f"tx.Rules: cannot add rules written for {name}={self.axis_sizes[name]} "
                    f"to rules written for {name}={other.axis_sizes[name]}: build both for "
                    "the mesh you run on."
                )
        return Rules(
            *self,
            *other,
            notes=self.notes + other.notes,
            axis_sizes={**self.axis_sizes, **other.axis_sizes},
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rules) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def spec_for(self, path: str) -> PartitionSpec | None:
        """The spec of the first rule matching ``path``, or ``None``."""
        for pattern, spec in self._rules:
            if pattern.search(path):
                return spec
        return None

    def specs(
        self,
        tree: Any,
        mesh: Mesh | None = None,
        *,
        where: str = "tx.Rules",
        what: str = "the tree",
    ) -> Any:
        """The ``PartitionSpec`` of every leaf of ``tree``, as a tree of the same structure.

        Args:
          tree: a pytree of arrays (or anything with a shape).
          mesh: when given, the specs are checked against it: every axis
            named exists, and every sharded dimension divides evenly.
          where: who asks, for error messages (e.g. ``"tensor_parallel(axis='model')"``).
          what: which tree, for error messages (e.g. ``"argument 0 (state)"``).

        Raises:
          RuleError: listing every leaf that matches no rule, and every leaf
            whose spec does not fit its shape or the mesh.
        """
        if mesh is not None:
            self._check_axis_sizes(mesh, where)
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        unmatched, misfits, out = [], [], []
        for (path, leaf), _ in zip(leaves_with_paths(tree), leaves):
            shape = shape_of(leaf)
            spec = PartitionSpec() if not shape else self.spec_for(path)
            if spec is None:
                unmatched.append((path, shape))
                spec = PartitionSpec()
            elif problem := spec_problem(shape, spec, mesh):
                misfits.append(f"{path}  shape {shape}: {problem}")
            out.append(spec)
        if unmatched or misfits:
            message = self._message(where, what, unmatched, misfits, mesh)
            if self.notes:  # a ready-made set's notes often say what to change
                message += "\nNotes of these rules:\n" + bullets(list(self.notes), len(self.notes))
            raise RuleError(message)
        return jax.tree_util.tree_unflatten(treedef, out)

    def _check_axis_sizes(self, mesh: Mesh, where: str) -> None:
        wrong = [
            f"{name}={size} (the mesh has {name}={mesh.shape[name]})"
            for name, size in self.axis_sizes.items()
            if name in mesh.shape and mesh.shape[name] != size
        ]
        if wrong:
            name = next(
                n
                for n in self.axis_sizes
                if mesh.shape.get(n, self.axis_sizes[n]) != self.axis_sizes[n]
            )
            raise RuleError(
                f"{where}: these rules were built for {', '.join(wrong)}, and their layout "
                f"depends on that size. Build them for this mesh (the ready-made sets take "
                f'axis_size=mesh.shape["{name}"]).'
            )

    @staticmethod
    def _message(
        where: str,
        what: str,
        unmatched: list[tuple[str, tuple[int, ...]]],
        misfits: list[str],
        mesh: Mesh | None,
    ) -> str:
        parts = []
        if unmatched:
            n = len(unmatched)
            width = max(len(p) for p, _ in unmatched)
            last = unmatched[0][0].rsplit("/", 2)[-2:]
            example = "/".join(last)
            parts.append(
                f"{where}: {count(n, 'leaf', 'leaves')} of {what} match{'' if n > 1 else 'es'} "
                "no rule:\n"
                + bullets([f"{p.ljust(width)}  shape {s}" for p, s in unmatched])
                + f'\nAdd a rule for {"them" if n > 1 else "it"}, e.g. (r"{example}$", P()), '
                'or end the rules with (r".*", P()).'
            )
        if misfits:
            n = len(misfits)
            fixes = ["Change the rule's spec"]
            if any("not divisible" in m for m in misfits) and mesh is not None:
                sizes = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
                fixes += [f"the mesh axis sizes ({sizes})", "pad the array"]
            if any("not in the mesh" in m for m in misfits):
                fixes.append("build the mesh with that axis")
            fix = ", or ".join(fixes) + "."
            parts.append(
                f"{where}: the spec of {count(n, 'leaf', 'leaves')} of {what} does not fit:\n"
                + bullets(misfits)
                + f"\n{fix}"
            )
        return "\n".join(parts)

    def explain(self, tree: Any, mesh: Mesh) -> Report:
        """A table of every leaf's path, shape, spec and bytes per device.

        Raises:
          RuleError: as `specs`.
        """
        specs = jax.tree_util.tree_leaves(
            self.specs(tree, mesh), is_leaf=lambda s: isinstance(s, PartitionSpec)
        )
        report = layout_table(leaves_with_paths(tree), specs, mesh)
        if not self.notes:
            return report
        return Report(report + "\nnotes:\n" + bullets(list(self.notes), limit=len(self.notes)))


def layout_table(
    paths_leaves: list[tuple[str, Any]], specs: list[PartitionSpec], mesh: Mesh
) -> Report:
    """The layout table of `Rules.explain` (shared with ``ParallelFunction.explain``)."""
    rows = []
    for (path, leaf), spec in zip(paths_leaves, specs):
        shape = shape_of(leaf)
        dtype = getattr(leaf, "dtype", None)  # a default would copy every array to the host
        dtype = np.asarray(leaf).dtype if dtype is None else dtype
        rows.append(
            (path, str(shape), repr(spec), format_bytes(bytes_per_device(shape, dtype, spec, mesh)))
        )
    return Report(table(("path", "shape", "spec", "bytes/device"), rows))


def megatron_mlp(
    up: str = r"mlp/(up|fc1|c_fc|wi)",
    down: str = r"mlp/(down|fc2|c_proj|wo)",
    *,
    axis: str = "model",
) -> Rules:
    """Rules for a Megatron MLP: ``up`` column-parallel, ``down`` row-parallel.

    Kernels are stored ``(d_in, d_out)`` (as in Flax's ``Dense``). ``up``'s
    kernel and bias are split on the hidden dimension, ``down``'s kernel on
    its input (the same hidden dimension) and its bias replicated, so the
    hidden activation stays sharded between the two matmuls.

    Communication per block: one all-reduce of the ``(batch, ..., d_model)``
    activation over ``axis`` in the forward pass (after ``down``), one of its
    gradient in the backward pass (before ``up``); no weight is ever gathered.

    Args:
      up: pattern of the up-projection's path, without ``/kernel`` or ``/bias``.
      down: pattern of the down-projection's path.
      axis: the tensor-parallel mesh axis.

    Examples:
      >>> import titanax as tx
      >>> rules = tx.rules.megatron_mlp()
      >>> rules.spec_for("h/0/mlp/up/kernel"), rules.spec_for("h/0/mlp/down/kernel")
      (P(None, 'model'), P('model', None))
      >>> rules.spec_for("h/0/mlp/down/bias")
      P()
    """
    return Rules(
        (rf"{up}/kernel$", PartitionSpec(None, axis)),
        (rf"{up}/bias$", PartitionSpec(axis)),
        (rf"{down}/kernel$", PartitionSpec(axis, None)),
        (rf"{down}/bias$", PartitionSpec()),
    )


def megatron_attention(
    qkv: str = r"attn/(q|k|v|query|key|value)",
    out: str = r"attn/(o|out|proj|c_proj)",
    *,
    fused: str = r"attn/(qkv|c_attn)",
    axis: str = "model",
) -> Rules:
    """Rules for Megatron attention: heads split over ``axis``.

    Separate ``q``, ``k``, ``v`` projections with ``(d_model, heads * head_dim)``
    kernels are column-parallel (``P(None, axis)``): contiguous columns are
    whole heads, so each device computes attention for ``heads / n`` heads
    with no communication. A fused projection must be stored
    ``(d_model, 3, heads * head_dim)`` so that the split falls on heads, not
    across q, k and v: its kernel is ``P(None, None, axis)``, its bias
    ``P(None, axis)``. The output projection is row-parallel.

    Communication per block: one all-reduce of the ``(batch, seq, d_model)``
    activation in the forward pass (after the output projection), one of its
    gradient in the backward pass. ``heads`` must divide by the axis size.

    Args:
      qkv: pattern of the separate q, k, v projections' paths.
      out: pattern of the output projection's path.
      fused: pattern of a fused qkv projection's path.
      axis: the tensor-parallel mesh axis.

    Examples:
      >>> import titanax as tx
      >>> rules = tx.rules.megatron_attention()
      >>> rules.spec_for("h/0/attn/q/kernel"), rules.spec_for("h/0/attn/proj/kernel")
      (P(None, 'model'), P('model', None))
      >>> rules.spec_for("h/0/attn/qkv/kernel")
      P(None, None, 'model')
    """
    return Rules(
        (rf"{fused}/kernel$", PartitionSpec(None, None, axis)),
        (rf"{fused}/bias$", PartitionSpec(None, axis)),
        (rf"{qkv}/kernel$", PartitionSpec(None, axis)),
        (rf"{qkv}/bias$", PartitionSpec(axis)),
        (rf"{out}/kernel$", PartitionSpec(axis, None)),
        (rf"{out}/bias$", PartitionSpec()),
    )


# The Hugging Face rule sets live in their own module; re-exported here so that users write
# tx.rules.llama(...). Imported last: model_rules imports Rules from this module.
from titanax.parallel.model_rules import bert, gpt2, llama  # noqa: E402
