"""Optimizer transforms that need whole leaves: refused when a ``fully_sharded`` step updates shards.

Under ``fully_sharded`` the optimizer updates this device's shards. A transform that combines
elements across a leaf (a trust ratio, factored moments, a block RMS) or across leaves (a
global norm, an inner product) computes, on shards, another update than on whole leaves, and
nothing fails. ``fully_sharded`` refuses the transforms registered here when it traces a step
whose state has a split leaf. It finds them two ways:

* by the **type of a node of the optimizer state** (``FactoredState`` of Adafactor), in any
  state argument: this also covers a state passed without its optimizer,
  ``step(params, opt_state, batch)``;
* by the **functions reachable from a** ``tx.TrainState``'s **optimizer** (its closures, the
  transforms a ``chain`` holds, a ``MultiSteps``' inner optimizer): the only way to see the
  stateless transforms, whose state is optax's shared ``EmptyState``
  (``scale_by_trust_ratio``, ``clip_by_global_norm``). A function matches by its code object,
  so every instance of a transform is recognized, whatever its hyperparameters, and nothing is
  recognized by name.

Neither way sees inside an optimizer built in the body, or one whose closures hide it (an
object with ``__slots__``): the detection is a safety net for the transforms it knows, not a
proof that the others are exact.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from titanax._util import bullets, count, path_str
from titanax.errors import PlanError
from titanax.state import TrainState

__all__ = ["register_whole_leaf_transform", "refuse_whole_leaf_transforms"]

_TRUST = (
    "scales each leaf's update by the ratio of the parameter's norm to the update's norm "
    "(You et al. 2017, 2019), so on a shard by the shard's norms"
)
_GLOBAL = "divides every update by the norm of all the updates, so on shards by this device's norm"

# (dotted names of the transforms and state types, why it needs whole leaves, the exact
# replacement or None). Names are resolved when a step is first checked; one that this
# optax lacks is skipped. Found by reading optax 0.2.8 and measured in
# tests/unit/test_fully_sharded_optim.py (each one: another update on shards).
_BUILTIN: tuple[tuple[tuple[str, ...], str, str | None], ...] = (
    (
        ("optax.scale_by_trust_ratio", "optax.lamb", "optax.lars", "optax.fromage"),
        _TRUST,
        "Use tx.lamb, tx.lars or tx.scale_by_trust_ratio: the same update, with each leaf's "
        "norms summed over {axis!r}",
    ),
    (("optax.clip_by_global_norm",), _GLOBAL, "Use tx.clip_by_global_norm"),
    (
        ("optax.normalize_by_update_norm", "optax.contrib.normalize"),
        _GLOBAL,
        "Use tx.normalize_by_update_norm",
    ),
    (
        ("optax.scale_by_factored_rms", "optax.FactoredState", "optax.adafactor"),
        "estimates each leaf's second moment from its squared gradients' means over rows and "
        "over columns (Shazeer and Stern 2018)",
        None,
    ),
    (("optax.clip_by_block_rms",), "clips each leaf's update by the update's RMS", None),
    (
        ("optax.scale_by_param_block_rms", "optax.scale_by_param_block_norm"),
        "scales each leaf's update by its parameter's RMS or norm",
        None,
    ),
    (
        ("optax.adaptive_grad_clip",),
        "clips by unit-wise norms of the gradient and the parameter over all but the last "
        "dimension",
        None,
    ),
    (("optax.centralize",), "subtracts each leaf's mean over all but its first dimension", None),
    (
        ("optax.scale_by_sm3", "optax.ScaleBySM3State", "optax.sm3"),
        "keeps one accumulator per dimension, the maxima over the other dimensions of a leaf",
        None,
    ),
    (
        ("optax.scale_by_novograd", "optax.ScaleByNovogradState", "optax.novograd"),
        "normalizes by each leaf's gradient norm",
        None,
    ),
    (
        ("optax.scale_by_distance_over_gradients",),
        "takes each leaf's step from its distance to its initial value and its gradient norms",
        None,
    ),
    (
        (
            "optax.scale_by_polyak",
            "optax.polyak_sgd",
            "optax.scale_by_lbfgs",
            "optax.ScaleByLBFGSState",
            "optax.lbfgs",
            "optax.scale_by_backtracking_linesearch",
            "optax.ScaleByBacktrackingLinesearchState",
            "optax.scale_by_zoom_linesearch",
            "optax.ScaleByZoomLinesearchState",
        ),
        "takes its step from norms or inner products over all the leaves",
        None,
    ),
    (
        ("optax.apply_if_finite", "optax.ApplyIfFiniteState", "optax.skip_not_finite"),
        "decides from every element of every leaf whether the update is finite, so each device "
        "from its own shards",
        None,
    ),
    (
        ("optax.skip_large_updates",),
        "decides from the norm of all the updates whether to skip",
        None,
    ),
    (
        ("optax.zero_nans", "optax.ZeroNansState"),
        "records for each leaf whether any element is NaN, so each device for its own shard",
        None,
    ),
    (
        ("optax.add_noise", "optax.AddNoiseState", "optax.noisy_sgd"),
        "draws each leaf's noise from one key, so every device the same noise for its shard",
        None,
    ),
    (
        ("optax.contrib.scale_by_muon", "optax.contrib.MuonState", "optax.contrib.muon"),
        "orthogonalizes each matrix's update (Newton-Schulz iterations over the whole matrix)",
        None,
    ),
    (
        ("optax.contrib.scale_by_galore", "optax.contrib.GaLoreState", "optax.contrib.galore"),
        "projects each matrix's gradient on its top singular vectors",
        None,
    ),
    (
        (
            "optax.contrib.dog",
            "optax.contrib.DoGState",
            "optax.contrib.dowg",
            "optax.contrib.DoWGState",
            "optax.contrib.prodigy",
            "optax.contrib.ProdigyState",
            "optax.contrib.mechanize",
            "optax.contrib.MechanicState",
            "optax.contrib.momo",
            "optax.contrib.MomoState",
            "optax.contrib.momo_adam",
            "optax.contrib.MomoAdamState",
            "optax.contrib.dadapt_adamw",
            "optax.contrib.DAdaptAdamWState",
        ),
        "takes its step size from norms or inner products over all the leaves",
        None,
    ),
    (
        (
            "optax.contrib.differentially_private_aggregate",
            "optax.contrib.DifferentiallyPrivateAggregateState",
            "optax.contrib.dpsgd",
        ),
        "clips each example's gradient by its norm over all the leaves, and draws noise from "
        "one key",
        None,
    ),
)


@dataclasses.dataclass(frozen=True, eq=False)
class _Entry:
    kinds: tuple[tuple[str, Any], ...]  # (the name shown, a state type or a function)
    why: str
    fix: str | None


_USER: list[_Entry] = []


def register_whole_leaf_transform(
    kind: type | Callable[..., Any],
    /,
    *,
    why: str,
    fix: str | None = None,
    name: str | None = None,
) -> None:
    """Declare that an optimizer transform needs whole leaves, so that ``tx.fully_sharded``
    refuses it, with a `PlanError`, in a step whose state has a split leaf.

    ``kind`` is how ``fully_sharded`` recognizes the transform:

    * a **state type** (a ``NamedTuple`` that the transform's ``init`` returns): found as a
      node of any state argument, also without the optimizer;
    * a **function**: the transform's factory or its ``update``, found among the functions
      reachable from a ``tx.TrainState``'s optimizer (by code object: every instance, whatever
      its hyperparameters). Stateless transforms, whose state is optax's ``EmptyState``, can
      only be found this way.

    Titanax registers the optax transforms it knows (trust ratios, factored moments, global
    norms, Muon, ...); see the guide's "Optimizers on shards".

    Args:
      kind: the state type or the function.
      why: what the transform combines, for the error message ("scales each leaf's update
        by the leaf's norm").
      fix: the remedy, if there is one besides ``tx.data_parallel`` ("use my_exact_version").
      name: the name shown; defaults to ``kind``'s module and name.

    Raises:
      PlanError: ``kind`` is neither a type nor a function.

    Examples:
      >>> from typing import NamedTuple
      >>> import titanax as tx
      >>> class RowNormState(NamedTuple):     # the state of a transform of your own
      ...     count: int
      >>> tx.register_whole_leaf_transform(RowNormState, why="normalizes each row of a leaf")
    """
    if not isinstance(kind, type) and not callable(kind):
        raise PlanError(
            "tx.register_whole_leaf_transform: kind must be a state type or a function (the "
            f"transform's factory or update), got {type(kind).__name__} {kind!r}."
        )
    shown = name or f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', kind)}"
    _USER[:] = [e for e in _USER if e.kinds[0][1] is not kind]  # registering again replaces
    _USER.append(_Entry(((shown, kind),), why, fix))


def _resolve(dotted: str) -> Any:
    module, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None


@functools.cache
def _builtin() -> tuple[_Entry, ...]:
    entries = []
    for names, why, fix in _BUILTIN:
        kinds = tuple((n, k) for n in names if (k := _resolve(n)) is not None)
        if kinds:
            entries.append(_Entry(kinds, why, fix))
    return tuple(entries)


def _codes(fn: Callable[..., Any]) -> set[types.CodeType]:
    """The code of ``fn`` and of every function defined inside it (its ``update_fn``)."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    out: set[types.CodeType] = set()
    stack = [code] if code is not None else []
    while stack:
        c = stack.pop()
        if c not in out:
            out.add(c)
            stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return out


_ATOMS = (str, bytes, int, float, complex, type(None), type, types.ModuleType, np.ndarray)


def _reachable(root: Any, budget: int = 20_000) -> Iterator[Any]:
    """Every object reachable from ``root`` through closures, defaults, ``functools.partial``,
    bound methods, containers and instance attributes (``MultiSteps._opt``)."""
    seen: set[int] = set()
    stack = [root]
    while stack and budget > 0:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _ATOMS) or isinstance(obj, jax.Array):
            continue
        seen.add(id(obj))
        budget -= 1
        yield obj
        if isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    stack.append(cell.cell_contents)
                except ValueError:  # a cell not yet filled
                    pass
            stack.extend(obj.__defaults__ or ())
            stack.extend((obj.__kwdefaults__ or {}).values())
        elif isinstance(obj, types.MethodType):
            stack += [obj.__func__, obj.__self__]
        elif isinstance(obj, functools.partial):
            stack += [obj.func, *obj.args, *obj.keywords.values()]
        elif isinstance(obj, (tuple, list, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
        if (wrapped := getattr(obj, "__wrapped__", None)) is not None:
            stack.append(wrapped)


def _found(
    entries: Sequence[_Entry], states: Sequence[tuple[int, Any]]
) -> list[tuple[_Entry, str, str]]:
    """``(entry, the name shown, where)`` for every registered kind in ``states``: state
    types among their nodes, functions reachable from their ``TrainState``s' optimizers."""
    kinds = {k: (e, n) for e in entries for n, k in e.kinds if isinstance(k, type)}
    codes = {
        c: (e, n) for e in entries for n, k in e.kinds if not isinstance(k, type) for c in _codes(k)
    }
    state_types = tuple(kinds)
    out: list[tuple[_Entry, str, str]] = []
    for position, tree in states:
        flat = jax.tree_util.tree_flatten_with_path

        def at(path: Any, position: int = position) -> str:
            return f"argument {position}" + (f": {path_str(path)}" if path else "")

        for path, node in flat(tree, is_leaf=lambda x: isinstance(x, state_types))[0]:
            if isinstance(node, state_types):
                entry, shown = next(v for t, v in kinds.items() if isinstance(node, t))
                out.append((entry, shown, f"{type(node).__name__} at {at(path)}"))
        for path, node in flat(tree, is_leaf=lambda x: isinstance(x, TrainState))[0]:
            if not isinstance(node, TrainState):
                continue
            for obj in _reachable(node.optimizer):
                code = getattr(obj, "__code__", None)
                hit = codes.get(code) if isinstance(code, types.CodeType) else None
                if hit is None and isinstance(obj, state_types):
                    hit = next(v for t, v in kinds.items() if isinstance(obj, t))
                if hit is not None:
                    out.append((*hit, f"in the optimizer of {at(path)}"))
    return out


def refuse_whole_leaf_transforms(
    where: str, axis: str, states: Sequence[tuple[int, Any]], split: Sequence[str]
) -> None:
    """Raise a `PlanError` if ``states`` (``(position, tree)`` of the state arguments, with
    their optimizers) hold a registered transform while ``split`` (the paths of the leaves
    stored split along ``axis``) is not empty."""
    if not split:
        return
    found = _found((*_builtin(), *_USER), states)
    if not found:
        return
    # per entry, ordered sets: the transforms found in an optimizer, the state types, the places
    lines: dict[_Entry, tuple[dict[str, None], dict[str, None], dict[str, None]]] = {}
    for entry, shown, at in found:
        fns, state_types, places = lines.setdefault(entry, ({}, {}, {}))
        (fns if at.startswith("in the optimizer") else state_types)[shown] = None
        places[at] = None
    items = []
    for entry, (fns, state_types, places) in lines.items():
        fix = f". {entry.fix.format(axis=axis)}" if entry.fix else ""
        items.append(f"{', '.join(fns or state_types)} ({'; '.join(places)}): {entry.why}{fix}.")
    example = ", ".join(split[:2]) + (", ..." if len(split) > 2 else "")
    many = len(lines) > 1
    raise PlanError(
        f"{where}: the optimizer updates this device's shards of "
        f"{count(len(split), 'leaf', 'leaves')} split along {axis!r} ({example}), but "
        f"{count(len(lines), 'transform')} in it combine{'' if many else 's'} elements across "
        f"a leaf or across leaves: on shards {'they' if many else 'it'} would compute another "
        "update than on whole leaves, and nothing would fail.\n"
        + bullets(items)
        + f"\n{'Or' if any(e.fix for e in lines) else 'Instead,'} train with tx.data_parallel, "
        "which updates whole leaves; shard='optimizer' (ZeRO-1) updates shards too."
    )
