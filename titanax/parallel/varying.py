"""Which values of a traced body vary along manual mesh axes: a dataflow analysis.

The bodies of manual transforms run with ``check_vma=False`` (per-replica gradients, the
user reduces), so JAX does not track which values differ between replicas. Titanax
decides it from the program instead of from the numbers of one call (DESIGN.md, "Checks
by type, not by value"): an output that is returned replicated but may still vary along
a manual axis is a forgotten reduction, and a shard of the new state is told from a
reduced metric of the same shape.

The analysis gives every value of the body's jaxpr the set of manual axes it may vary
along:

* inputs split along an axis vary along it; replicated inputs and constants do not;
* ``psum``, ``pmax``, ``pmin`` and ``all_gather`` over an axis make the result invariant
  along it (unless they reduce within ``axis_index_groups``);
* ``axis_index``, ``ppermute``, ``psum_scatter``, ``all_to_all`` (and any other
  primitive that names an axis) make it vary along that axis;
* host callbacks (``pure_callback``, ``io_callback``), stateful random numbers
  (``rng_uniform``), infeed and other equations with side effects vary along every
  manual axis, whatever their inputs;
* every other primitive varies along the union of its inputs' axes;
* nested jaxprs are followed: calls (``jit``, ``remat``, ``custom_jvp``/``custom_vjp``),
  ``cond`` (branches joined, plus the axes of the index: devices may take different
  branches), ``scan`` and ``while`` (carries iterated to a fixed point, plus the axes of
  a ``while`` predicate: devices may run different trip counts), nested ``shard_map``
  (its own manual axes are dropped at its outputs, which are whole arrays).

Along the way it finds the collectives that devices may not all reach: one over an axis
inside a ``cond`` (``lax.cond``, ``lax.switch``) whose predicate may differ along that
axis, or inside a ``while`` whose predicate may. The devices that take the other branch
(or stop iterating) never join it, and the program hangs (measured on XLA:CPU, jax
0.10.2: ``psum``, ``all_gather`` and ``ppermute`` each wait forever in their rendezvous;
NCCL collectives do the same). Each is reported as a `Divergence`.

It is sound: where it cannot see (an unknown primitive with inner jaxprs), outputs vary
along every axis its inputs vary along and every axis any collective inside names.
Values it calls invariant are equal on every device; a property test
(``tests/unit/test_varying.py``) checks this on random programs against real values.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from jax._src import source_info_util  # where an equation was traced (no public API)
from jax.extend import core

__all__ = ["Divergence", "varying_axes"]

Axes = frozenset[str]
_NONE: Axes = frozenset()
# Results equal on every member of the named axes.
_REDUCE = {"psum", "pmax", "pmin", "all_gather", "psum_invariant", "all_gather_invariant"}
# Results that need not be equal on the devices whatever the inputs: host callbacks,
# stateful random numbers, infeed (and any other equation with side effects).
_DEVICE_LOCAL = {"pure_callback", "io_callback", "rng_uniform", "infeed"}
# Calls: the inner jaxpr takes the equation's inputs and gives its outputs.
_CALL_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
# Primitives that name an axis without communicating over it.
_LOCAL = {"axis_index", "pvary", "pbroadcast"}
_TITANAX = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Divergence(NamedTuple):
    """A collective that the devices of ``axes`` may not all reach."""

    primitive: str  # the collective, e.g. "psum"
    axes: Axes  # the axes it names along which the predicate may differ
    construct: str  # "cond" (lax.cond, lax.switch) or "while" (lax.while_loop, fori_loop)
    where: str  # the user's line that called the collective, e.g. "train.py:41 (step)"


def _where(eqn: core.JaxprEqn) -> str:
    """The innermost frame of the equation's traceback outside JAX and Titanax."""
    for frame in source_info_util.user_frames(eqn.source_info.traceback):
        if not os.path.abspath(frame.file_name).startswith(_TITANAX + os.sep):
            return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"
    return source_info_util.summarize(eqn.source_info)


def _communicating(jaxpr: core.Jaxpr) -> Iterator[tuple[core.JaxprEqn, Axes]]:
    """Every equation of ``jaxpr`` (inner jaxprs included) that communicates over axes."""
    for eqn in jaxpr.eqns:
        if (names := _names(eqn)) and eqn.primitive.name not in _LOCAL:
            yield eqn, names
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from _communicating(sub)


def _names(eqn: core.JaxprEqn) -> Axes:
    """The axis names an equation's parameters mention (``axes``, ``axis_name``)."""
    found: set[str] = set()
    for key in ("axes", "axis_name"):
        value = eqn.params.get(key)
        for a in (value,) if isinstance(value, str) else value or ():
            if isinstance(a, str):
                found.add(a)
    return frozenset(found)


def _open(j: Any) -> core.Jaxpr | None:
    if isinstance(j, core.ClosedJaxpr):
        return j.jaxpr
    return j if isinstance(j, core.Jaxpr) else None


def _sub_jaxprs(value: Any) -> Iterator[core.Jaxpr]:
    """Every jaxpr inside a parameter value (tuples of branches included)."""
    if (j := _open(value)) is not None:
        yield j
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _side_effects(eqn: core.JaxprEqn) -> bool:
    """Whether an equation has effects other than naming axes (collectives carry a
    ``NamedAxisEffect``, jax 0.10.2; JAX exports no class to test it with)."""
    return any(type(e).__name__ != "NamedAxisEffect" for e in eqn.effects)


def _sub_jaxprs_of(params: dict[str, Any]) -> list[core.Jaxpr]:
    return [j for v in params.values() for j in _sub_jaxprs(v)]


def _mentioned(jaxpr: core.Jaxpr) -> Axes:
    """Every axis any equation of ``jaxpr`` (or of its inner jaxprs) names."""
    out: set[str] = set()
    for eqn in jaxpr.eqns:
        out |= _names(eqn)
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                out |= _mentioned(sub)
    return frozenset(out)


class _Analysis:
    def __init__(self, every: Axes) -> None:
        self.every = every  # the manual axes a device-local result varies along
        self.memo: dict[tuple[int, tuple[Axes, ...]], list[Axes]] = {}
        self.keep: list[core.Jaxpr] = []  # memo keys are ids: keep the jaxprs alive
        self.divergent: dict[tuple[int, Axes], Divergence] = {}

    def diverge(self, construct: str, predicate: Axes, inner: Sequence[core.Jaxpr]) -> None:
        """Records the collectives in ``inner`` over axes along which ``predicate`` varies."""
        if not predicate:
            return
        for jaxpr in inner:
            for eqn, names in _communicating(jaxpr):
                if hit := names & predicate:
                    self.divergent.setdefault(
                        (id(eqn), hit),
                        Divergence(eqn.primitive.name, hit, construct, _where(eqn)),
                    )

    def run(self, jaxpr: core.Jaxpr, inputs: Sequence[Axes]) -> list[Axes]:
        key = (id(jaxpr), tuple(inputs))
        if key in self.memo:
            return self.memo[key]
        env: dict[Any, Axes] = dict(zip(jaxpr.invars, inputs))

        def read(v: Any) -> Axes:
            return _NONE if isinstance(v, core.Literal) else env.get(v, _NONE)

        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [read(v) for v in eqn.invars])
            env.update(zip(eqn.outvars, outs))
        result = [read(v) for v in jaxpr.outvars]
        self.memo[key] = result
        self.keep.append(jaxpr)
        return result

    def equation(self, eqn: core.JaxprEqn, ins: list[Axes]) -> list[Axes]:
        name, params, n = eqn.primitive.name, eqn.params, len(eqn.outvars)
        union = _NONE.union(*ins)
        if name in _DEVICE_LOCAL or (n and _side_effects(eqn) and not _sub_jaxprs_of(params)):
            return [union | self.every] * n
        if name in _REDUCE and params.get("axis_index_groups") is None:
            names = _names(eqn)
            return [v - names for v in ins] if len(ins) == n else [union - names] * n
        if name == "cond":
            index, ops = ins[0], ins[1:]
            self.diverge("cond", index, [b.jaxpr for b in params["branches"]])
            branches = [self.run(b.jaxpr, ops) for b in params["branches"]]
            return [index.union(*outs) for outs in zip(*branches)]
        if name == "while":
            return self.while_loop(eqn, ins)
        if name == "scan":
            return self.scan(eqn, ins)
        if name == "shard_map":
            inner = _open(params["jaxpr"])
            own = frozenset(params.get("manual_axes", ())) | _mentioned_specs(params)
            if inner is not None and len(inner.invars) == len(ins):
                return [v - own for v in self.run(inner, ins)]
        if not _sub_jaxprs_of(params):
            return [union | _names(eqn)] * n  # a collective not listed above varies
        for key in _CALL_KEYS:
            inner = _open(params.get(key))
            if inner is not None and len(inner.invars) == len(ins):
                outs = self.run(inner, ins)
                if len(outs) == n:
                    return outs
        # A higher-order primitive this pass does not know: everything it could carry.
        hidden = _NONE.union(*(_mentioned(j) for v in params.values() for j in _sub_jaxprs(v)))
        return [union | hidden | _names(eqn)] * n

    def while_loop(self, eqn: core.JaxprEqn, ins: list[Axes]) -> list[Axes]:
        nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        cond_consts, body_consts, carry = ins[:nc], ins[nc : nc + nb], list(ins[nc + nb :])
        cond, body = eqn.params["cond_jaxpr"].jaxpr, eqn.params["body_jaxpr"].jaxpr
        while True:
            (pred,) = self.run(cond, [*cond_consts, *carry])
            out = self.run(body, [*body_consts, *carry])
            new = [c | o | pred for c, o in zip(carry, out)]
            if new == carry:
                self.diverge("while", pred, [cond, body])
                return carry
            carry = new

    def scan(self, eqn: core.JaxprEqn, ins: list[Axes]) -> list[Axes]:
        nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
        consts, carry, xs = ins[:nc], list(ins[nc : nc + nk]), ins[nc + nk :]
        body = eqn.params["jaxpr"].jaxpr
        while True:
            out = self.run(body, [*consts, *carry, *xs])
            new = [c | o for c, o in zip(carry, out[:nk])]
            if new == carry:
                break
            carry = new
        # With at least one iteration the final carry is the last body output, computed
        # from carries within the fixed point; with none it is the initial carry.
        final = out[:nk] if eqn.params.get("length", 0) >= 1 else carry
        return [*final, *out[nk:]]


def _mentioned_specs(params: dict[str, Any]) -> Axes:
    """The axes a nested ``shard_map``'s specs name (its own manual axes)."""
    out: set[str] = set()
    for key in ("in_specs", "out_specs", "in_names", "out_names"):
        for spec in params.get(key) or ():
            for entry in spec.values() if isinstance(spec, dict) else spec or ():
                names = (entry,) if isinstance(entry, str) else entry or ()
                out |= {a for a in names if isinstance(a, str)}
    return frozenset(out)


def varying_axes(
    jaxpr: core.Jaxpr,
    inputs: Sequence[Axes],
    every: Axes | None = None,
    divergent: list[Divergence] | None = None,
) -> list[Axes]:
    """The manual axes each output of ``jaxpr`` may vary along, given those of its inputs.

    Args:
      jaxpr: the body of a manual transform, traced inside its ``shard_map``.
      inputs: per input variable of ``jaxpr``, the manual axes it varies along.
      every: every manual axis (of size > 1): what a host callback's or a stateful
        random result varies along. Defaults to the axes of the inputs and those any
        equation names.

      divergent: a list to extend with the collectives the devices may not all reach
        (`Divergence`), in the order found.

    Returns:
      Per output variable, a superset of the axes along which its per-device values
      can differ: an axis missing from it is one the output is equal along.
    """
    if every is None:
        every = _NONE.union(*inputs) | _mentioned(jaxpr)
    analysis = _Analysis(every)
    out = analysis.run(jaxpr, list(inputs))
    if divergent is not None:
        divergent.extend(analysis.divergent.values())
    return out
