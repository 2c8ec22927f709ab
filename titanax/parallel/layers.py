"""``tx.stack_layers`` and ``tx.unstack_layers``: per-layer parameter trees to one stacked tree and back.

A model written layer by layer (as Hugging Face models are) keeps its parameters as a
list of trees, one per layer: ``params["layers"][i]["attn"]["wq"]``. `tx.pipeline`
takes them stacked instead: one tree whose leaves have a leading layer dimension, row
``s`` for stage ``s``; ``lax.scan`` over layers takes the same layout. These two
functions convert between the layouts, so that a user's model, optimizer and
checkpoints can keep their own format around a pipelined step.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from titanax._util import bullets, count, shape_of
from titanax.errors import LayerError

__all__ = ["stack_layers", "unstack_layers"]

T = TypeVar("T")

_NUMBERS = (bool, int, float, complex)  # Python numbers: stacked as 0-d arrays
_HOST = (np.ndarray, np.generic)  # numpy arrays and scalars: stacked on the host
_SHORT = 240  # characters of a tree structure shown in an error


def stack_layers(layers: Sequence[T], /) -> T:
    """Stacks per-layer parameter trees on a new leading dimension.

    Every layer must have the same tree structure and, leaf by leaf, the same shape
    and dtype. A leaf of shape ``s`` in each of ``n`` layers becomes one leaf of shape
    ``(n, *s)`` whose row ``i`` is layer ``i``'s. This is the layout ``tx.pipeline``
    takes for ``stage_params`` (one row per stage, in model-stage order) and the one
    ``lax.scan`` over layers takes.

    What the leaves may be:

    * jax Arrays, and tracers inside ``jax.jit``: stacked with ``jnp.stack``;
    * numpy arrays and numpy scalars: stacked with ``np.stack``, so they stay on the
      host (a model loaded from a checkpoint is not copied whole onto one device;
      ``tx.pipeline`` places the stacked rows on their stages);
    * Python numbers are 0-d arrays: ``n`` of them become an array of shape ``(n,)``
      of JAX's default dtype (``float`` -> ``float32``), and ``unstack_layers`` gives
      back 0-d arrays, not Python numbers. A number must have the same type in every
      layer;
    * ``None`` is, as everywhere in JAX, an empty subtree and not a leaf: a layer
      without a bias (``{"w": w, "b": None}``) stacks to ``{"w": ws, "b": None}``, and
      ``b`` must then be ``None`` in every layer;
    * anything else (a string, an activation function) is an error: keep settings
      out of the parameter tree and close over them in the model instead.

    Args:
      layers: a list or tuple of ``n >= 1`` trees, one per layer.

    Returns:
      One tree of the layers' structure whose leaves have shape ``(n, *leaf.shape)``.

    Raises:
      LayerError: ``layers`` is not a list or tuple, or is empty; a layer's tree
        structure differs from layer 0's (the first such layer is named, with the
        paths only one of them has); leaves whose shape or dtype differ from layer
        0's (every one is listed by path, e.g. ``layers[3]['attn']['wq']``); a leaf
        that is not an array or a number.

    Examples:
      >>> import jax, jax.numpy as jnp, titanax as tx
      >>> layers = [{"w": jnp.ones((4, 3)), "b": jnp.zeros(3)} for _ in range(2)]
      >>> jax.tree.map(jnp.shape, tx.stack_layers(layers))
      {'b': (2, 3), 'w': (2, 4, 3)}
      >>> layers[1]["w"] = jnp.ones((4, 5))
      >>> tx.stack_layers(layers)
      Traceback (most recent call last):
      ...
      titanax.errors.LayerError: stack_layers: 1 leaf differs in shape or dtype from layer 0:
        * layers[1]['w']: shape (4, 5) vs (4, 3) in layers[0]
      Every layer's leaf must have layer 0's shape and dtype to be stacked: ...
    """
    _check_sequence(layers)
    first = jax.tree_util.tree_flatten_with_path(layers[0])
    structure: Any = first[1]  # PyTreeDef's stub has no __eq__ for mypy
    flat = [first[0]]
    for i, layer in enumerate(layers[1:], start=1):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(layer)
        if treedef != structure:
            raise _structure_error(i, first, (leaves, treedef))
        flat.append(leaves)

    bad, wrong = [], []
    for i, leaves in enumerate(flat):
        for (path, x), (_, x0) in zip(leaves, flat[0]):
            where = f"layers[{i}]{jax.tree_util.keystr(path)}"
            if not _is_leaf_value(x):
                wrong.append(f"{where}: {type(x).__name__}")
            elif i and _is_leaf_value(x0):
                (s, d), (s0, d0) = _shape_dtype(x), _shape_dtype(x0)
                if s != s0:
                    bad.append(f"{where}: shape {s} vs {s0} in layers[0]")
                elif d != d0:
                    bad.append(f"{where}: dtype {d} vs {d0} in layers[0]")
    if wrong:
        raise LayerError(
            f"stack_layers: {count(len(wrong), 'leaf is', 'leaves are')} neither an array "
            f"nor a number:\n{bullets(wrong)}\n"
            "Stack only parameters: convert other array types with np.asarray, and keep "
            "settings out of the parameter tree (close over them in the model)."
        )
    if bad:
        raise LayerError(
            f"stack_layers: {count(len(bad), 'leaf differs', 'leaves differ')} in shape or "
            f"dtype from layer 0:\n{bullets(bad)}\n"
            "Every layer's leaf must have layer 0's shape and dtype to be stacked: cast "
            "(x.astype) or pad the odd ones, or stack layers of different shapes as separate "
            "groups."
        )

    stacked = [_stack([leaves[j][1] for leaves in flat]) for j in range(len(flat[0]))]
    return jax.tree.unflatten(structure, stacked)


def unstack_layers(tree: T, /, n: int | None = None) -> list[T]:
    """Splits a stacked tree into its layers: the inverse of `stack_layers`.

    Every leaf must have the same leading dimension ``n``; layer ``i`` is the tree of
    the leaves' rows ``i`` (``leaf[i]``). It works on what ``tx.pipeline`` returns
    (the gradient of ``stage_params``, a jax Array laid out along the stage axis),
    on arrays laid out along an ``Explicit`` mesh axis on their leading dimension
    (they are gathered along it first, as indexing them requires), on numpy arrays
    (the rows are views) and inside ``jax.jit``.

    Args:
      tree: a tree whose leaves all have the same leading dimension ``n``.
      n: the number of layers expected; checked when given. A tree without leaves
        needs it and unstacks to ``n`` copies of its structure.

    Returns:
      A list of ``n`` trees of ``tree``'s structure whose leaves have shape
      ``leaf.shape[1:]``.

    Raises:
      LayerError: a 0-d leaf (every one is listed by path); leaves with different
        leading dimensions (the paths of each size are listed); ``n`` given and
        different from the leading dimension, or not a non-negative integer; a tree
        without leaves and no ``n``.

    Examples:
      >>> import jax, jax.numpy as jnp, titanax as tx
      >>> stacked = {"w": jnp.ones((2, 4, 3)), "b": jnp.zeros((2, 3))}
      >>> [jax.tree.map(jnp.shape, layer) for layer in tx.unstack_layers(stacked)]
      [{'b': (3,), 'w': (4, 3)}, {'b': (3,), 'w': (4, 3)}]
      >>> tx.unstack_layers(stacked, n=4)
      Traceback (most recent call last):
      ...
      titanax.errors.LayerError: unstack_layers(n=4): the leaves have 2 rows, not 4:
        * tree['b']  shape (2, 3)
        * tree['w']  shape (2, 4, 3)
      ...
    """
    if n is not None:
        n = _check_count(n)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    where = [f"tree{jax.tree_util.keystr(path)}" for path, _ in leaves]
    shapes = [shape_of(x) for _, x in leaves]

    scalars = [f"{w}  {type(x).__name__}" for w, s, (_, x) in zip(where, shapes, leaves) if not s]
    if scalars:
        raise LayerError(
            f"unstack_layers: {count(len(scalars), 'leaf is', 'leaves are')} 0-d and "
            f"{'has' if len(scalars) == 1 else 'have'} no layer dimension:\n{bullets(scalars)}\n"
            "Unstack only the stacked part of the tree, e.g. "
            "tx.unstack_layers(grads['layers']), not the whole parameter tree."
        )
    rows = {s[0] for s in shapes}
    if len(rows) > 1:
        by_rows = {r: [w for w, s in zip(where, shapes) if s[0] == r] for r in sorted(rows)}
        lines = [f"{r} rows: {_some(ws)}" for r, ws in by_rows.items()]
        raise LayerError(
            "unstack_layers: the leaves' leading dimensions differ, so the tree is not one "
            f"stack of layers:\n{bullets(lines)}\n"
            "Unstack each stacked part on its own (e.g. tx.unstack_layers(grads['layers'])), "
            "or reshape leaves stacked as (stages, layers per stage, ...) to one layer "
            "dimension first."
        )
    if not rows:
        if n is None:
            raise LayerError(
                "unstack_layers: the tree has no array leaves, so its number of layers is "
                "unknown: pass n."
            )
        return [jax.tree.unflatten(treedef, []) for _ in range(n)]
    (found,) = rows
    if n is not None and n != found:
        lines = [f"{w}  shape {s}" for w, s in zip(where, shapes)]
        raise LayerError(
            f"unstack_layers(n={n}): the leaves have {found} rows, not {n}:\n{bullets(lines)}\n"
            f"Pass n={found}, or check which tree is passed: stacked stage parameters have "
            "one row per stage (stages * virtual_stages)."
        )
    columns = [_rows(x, found) for _, x in leaves]
    return [jax.tree.unflatten(treedef, [c[i] for c in columns]) for i in range(found)]


def _check_sequence(layers: Any) -> None:
    if isinstance(layers, (list, tuple)):
        if not layers:
            raise LayerError(
                "stack_layers: got no layers; an empty list has no tree structure to stack. "
                "Pass at least one layer."
            )
        return
    if isinstance(layers, Mapping):
        hint = (
            "For layers kept in a dict keyed by index (Flax's {'0': ..., '1': ...}), pass "
            "[layers[k] for k in sorted(layers, key=int)]."
        )
    elif isinstance(layers, (jax.Array, np.ndarray)):
        hint = "It looks stacked already; unstack_layers is the inverse."
    else:
        hint = "Pass list(layers)."
    raise LayerError(
        f"stack_layers: layers must be a list or tuple of per-layer trees; got type "
        f"{type(layers).__name__}. {hint}"
    )


def _check_count(n: Any) -> int:
    try:
        value = operator.index(n)
    except TypeError:
        value = -1
    if isinstance(n, bool) or value < 0:
        raise LayerError(f"unstack_layers: n must be a non-negative integer; got {n!r}.")
    return value


def _structure_error(i: int, first: tuple, other: tuple) -> LayerError:
    """Layer ``i``'s structure differs from layer 0's: the paths only one has, both structures."""
    paths0 = [jax.tree_util.keystr(p) for p, _ in first[0]]
    paths = [jax.tree_util.keystr(p) for p, _ in other[0]]
    lines = []
    if only0 := [p for p in paths0 if p not in set(paths)]:
        lines.append(f"only in layers[0]: {_some(only0)}")
    if only := [p for p in paths if p not in set(paths0)]:
        lines.append(f"only in layers[{i}]: {_some(only)}")
    lines += [f"layers[0]: {_short(first[1])}", f"layers[{i}]: {_short(other[1])}"]
    return LayerError(
        f"stack_layers: layers[{i}] has a different tree structure from layers[0]:\n"
        f"{bullets(lines)}\n"
        "Every layer needs the same keys and nesting (a parameter that is None must be None "
        "in every layer). Layers of different kinds (dense and mixture-of-experts blocks) "
        "cannot share one stack: stack each kind separately."
    )


def _short(treedef: Any) -> str:
    text = str(treedef)
    return text if len(text) <= _SHORT else text[: _SHORT - 3] + "..."


def _some(items: list[str], limit: int = 4) -> str:
    """``a, b, c`` or ``a, b, c, d (and 3 more)``."""
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _is_leaf_value(x: Any) -> bool:
    return isinstance(x, (jax.Array, *_HOST, *_NUMBERS))


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], str]:
    """The shape, and the dtype (a Python number's type name: ``1`` and ``1.0`` differ)."""
    if isinstance(x, _NUMBERS):
        return (), type(x).__name__
    return tuple(x.shape), str(x.dtype)


def _stack(column: list[Any]) -> Any:
    if all(isinstance(x, _HOST) for x in column):
        return np.stack(column)
    return jnp.stack(column)


def _rows(x: Any, n: int) -> list[Any]:
    """``[x[0], ..., x[n-1]]``; an Explicit-axis layout of the leading dim is gathered first.

    Indexing a leading dimension laid out along an ``Explicit`` mesh axis is a
    ``ShardingTypeError`` (eager: an out sharding is needed; under jit, slicing a sharded
    dimension is not implemented; measured on jax 0.10.2), so the array is resharded
    with that dimension whole, once per leaf. Every row comes back whole along the axis
    anyway, so nothing more is gathered than the rows need. Auto axes index as they are.
    """
    if isinstance(x, jax.Array):
        sharding = jax.typeof(x).sharding
        if isinstance(sharding, NamedSharding) and _explicit_lead(sharding):
            spec = PartitionSpec(None, *sharding.spec[1:])
            x = jax.sharding.reshard(x, sharding.update(spec=spec))
    return [x[i, ...] for i in range(n)]  # numpy: a 0-d view, not a numpy scalar


def _explicit_lead(sharding: NamedSharding) -> bool:
    """Whether the leading dimension is laid out along an ``Explicit`` mesh axis."""
    if not sharding.spec or sharding.spec[0] is None:
        return False
    lead = sharding.spec[0]
    names = lead if isinstance(lead, tuple) else (lead,)
    mesh = sharding.mesh
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    return any(types.get(name) == AxisType.Explicit for name in names)
