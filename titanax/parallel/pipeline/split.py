"""A stage's backward split into B (input gradient) and W (weight gradient), computed once.

``jax.vjp`` gives one function for both gradients. The executor runs them in
different ticks (zero-bubble schedules defer W to fill the bubbles; the others
run W right after B, see `Schedule.executed`), and calling that function twice,
once per output, would compute the cotangents inside the stage twice: W of the
first layer needs the cotangent that flows back through every later layer.

So the VJP is traced to a jaxpr once and its equations are partitioned:

* B: the equations the input gradient needs;
* W: the equations only the weight gradient needs.

B also returns the *stash*: the values its equations (or the kept residuals, or
the output cotangent) computed that W reads. W starts from the stash instead of
recomputing them, so ``B + W`` runs each equation of the VJP exactly once, as
``jax.vjp`` would. This is the split of Qi et al. 2023 ("Zero Bubble Pipeline
Parallelism", section 2), done on the jaxpr instead of on an autograd graph.

Equations are the unit: a ``jit``-wrapped block inside the stage is inlined
first, but a ``custom_vjp`` or ``remat`` block needed by both gradients runs in B,
and W then reads its outputs from the stash.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jex

from titanax.errors import ScheduleError

__all__ = ["StageVJP", "replay"]

_CALLS = ("jit", "pjit", "closed_call", "core_call")  # inlined before partitioning


def _read(env: dict[Any, Any], v: Any) -> Any:
    return v.val if isinstance(v, jex.Literal) else env[v]


def _run(eqns: Sequence[Any], env: dict[Any, Any]) -> None:
    """Binds ``eqns`` in order, reading and writing ``env`` (``jax.core.eval_jaxpr``'s loop)."""
    for eqn in eqns:
        params = eqn.primitive.get_bind_params(eqn.params)
        out = eqn.primitive.bind(*(_read(env, v) for v in eqn.invars), **params)
        out = out if eqn.primitive.multiple_results else [out]
        env.update(zip(eqn.outvars, out))


def replay(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
    """Evaluates ``jaxpr`` with nested ``jit`` calls inlined (traced: flattens the jaxpr).

    Unlike ``jax.core.eval_jaxpr``, it does not re-enter the context each equation was
    traced in (its mesh), so a jaxpr traced outside a ``shard_map`` can run inside it.
    """
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _CALLS and "jaxpr" in eqn.params:
            inner = eqn.params["jaxpr"]
            inner_jaxpr, inner_consts = (
                (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (inner, ())
            )
            out = replay(inner_jaxpr, inner_consts, *(_read(env, v) for v in eqn.invars))
            env.update(zip(eqn.outvars, out))
        else:
            _run([eqn], env)
    return [_read(env, v) for v in jaxpr.outvars]


def _needed(eqns: Sequence[Any], targets: Sequence[Any]) -> list[bool]:
    """Per equation: whether computing ``targets`` needs it."""
    want = {v for v in targets if not isinstance(v, jex.Literal)}
    keep = [False] * len(eqns)
    for i in range(len(eqns) - 1, -1, -1):
        if any(v in want for v in eqns[i].outvars):
            keep[i] = True
            want.update(v for v in eqns[i].invars if not isinstance(v, jex.Literal))
    return keep


class StageVJP:
    """The forward of a stage with the residuals to keep, and its backward as B then W.

    Residuals that *are* the stage's parameters or its input are not stored (B
    and W take them from the parameters and the input buffer); constants of the
    stage function are kept once. ``saved`` are the shapes of the residuals kept
    per microbatch from F to B; ``stash`` the shapes kept from B to W.
    """

    def __init__(self, stage: Callable[[Any, Any], Any], params: Any, x: Any):
        self.stage = stage
        box: dict[str, Any] = {}

        def probe(pc: Any, xin: Any) -> Any:
            y, vjp_fn = jax.vjp(stage, pc, xin)
            closed, out_shape = jax.make_jaxpr(vjp_fn, return_shape=True)(y)
            res = list(closed.consts)
            kinds = self._classify(res, pc, xin)
            # One flat jaxpr over (residuals..., output cotangent...): nested jits inlined.
            n_res = len(res)

            def flat_vjp(*args: Any) -> list[Any]:
                return replay(closed.jaxpr, args[:n_res], *args[n_res:])

            flat = jax.make_jaxpr(flat_vjp)(*res, *jax.tree.leaves(y))
            box.update(
                jaxpr=flat.jaxpr,
                flat_consts=list(flat.consts),
                out_tree=jax.tree.structure(out_shape),
                kinds=kinds,
                consts={i: r for i, (r, k) in enumerate(zip(res, kinds)) if k[0] == "const"},
                n_res=n_res,
            )
            return [r for r, k in zip(res, kinds) if k[0] == "saved"]

        self.saved = jax.eval_shape(probe, params, x)
        self.kinds: list[tuple[str, int]] = box["kinds"]
        self.consts: dict[int, Any] = box["consts"]
        self.out_tree = box["out_tree"]
        jaxpr, n_res = box["jaxpr"], box["n_res"]
        self.jaxpr, self.flat_consts = jaxpr, box["flat_consts"]
        n_params = len(jax.tree.leaves(params))
        g_params, g_in = jaxpr.outvars[:n_params], jaxpr.outvars[n_params:]
        for_b = _needed(jaxpr.eqns, g_in)
        for_w = _needed(jaxpr.eqns, g_params)
        self.b_eqns = [e for e, b in zip(jaxpr.eqns, for_b) if b]
        self.w_eqns = [e for e, b, w in zip(jaxpr.eqns, for_b, for_w) if w and not b]
        # W re-reads the parameter, input and constant residuals itself; everything else
        # it reads (B's values, kept residuals, the output cotangent) is stashed by B.
        refetch = {
            v
            for v, k in zip(jaxpr.invars[:n_res], self.kinds)
            if k[0] in ("param", "input", "const")
        }
        refetch.update(jaxpr.constvars)
        w_defined = {v for e in self.w_eqns for v in e.outvars}
        reads = [v for e in self.w_eqns for v in e.invars] + list(g_params)
        stash: dict[Any, None] = {}
        for v in reads:
            if not isinstance(v, jex.Literal) and v not in w_defined and v not in refetch:
                stash[v] = None
        self.stash_vars = list(stash)
        self.stash = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in self.stash_vars]
        self.refetch = [v for v in jaxpr.invars[:n_res] if v in refetch]
        self.n_res, self.n_params = n_res, n_params

    @staticmethod
    def _classify(res: list[Any], pc: Any, xin: Any) -> list[tuple[str, int]]:
        params, inputs = jax.tree.leaves(pc), jax.tree.leaves(xin)
        kinds = []
        for r in res:
            kind = next((("param", i) for i, leaf in enumerate(params) if r is leaf), None)
            kind = kind or next((("input", i) for i, leaf in enumerate(inputs) if r is leaf), None)
            if kind is None and not isinstance(r, jax.core.Tracer):
                kind = ("const", -1)  # a constant of the stage function: the same every time
            kinds.append(kind or ("saved", -1))
        return kinds

    def forward(self, pc: Any, xin: Any) -> tuple[Any, list[Any]]:
        """``(stage output, residuals to keep until B)``."""
        y, vjp_fn = jax.vjp(self.stage, pc, xin)
        res = list(jax.make_jaxpr(vjp_fn)(y).consts)
        if self._classify(res, pc, xin) != self.kinds:
            raise ScheduleError(
                "pipeline: the stage function saved different residuals on two traces; "
                "use pipeline(..., remat=True), which keeps only stage inputs."
            )
        return y, [r for r, k in zip(res, self.kinds) if k[0] == "saved"]

    def _residuals(self, pc: Any, xin: Any, saved: Sequence[Any]) -> list[Any]:
        params, inputs, kept = jax.tree.leaves(pc), jax.tree.leaves(xin), iter(saved)
        pick = {
            "param": lambda i, _: params[i],
            "input": lambda i, _: inputs[i],
            "const": lambda _, n: self.consts[n],
            "saved": lambda i, _: next(kept),
        }
        return [pick[k](i, n) for n, (k, i) in enumerate(self.kinds)]

    def _env(self, res: Sequence[Any]) -> dict[Any, Any]:
        env: dict[Any, Any] = dict(zip(self.jaxpr.constvars, self.flat_consts))
        env.update(zip(self.jaxpr.invars[: self.n_res], res))
        return env

    def backward_input(
        self, pc: Any, xin: Any, saved: Sequence[Any] | None, g_out: Any
    ) -> tuple[Any, list[Any]]:
        """B: ``(input gradient, stash for W)``. ``saved=None`` recomputes the forward (remat)."""
        if saved is None:
            saved = self.forward(pc, xin)[1]
        env = self._env(self._residuals(pc, xin, saved))
        env.update(zip(self.jaxpr.invars[self.n_res :], jax.tree.leaves(g_out)))
        _run(self.b_eqns, env)
        g_in = [_read(env, v) for v in self.jaxpr.outvars[self.n_params :]]
        g_in_tree = jax.tree.unflatten(jax.tree.structure(xin), g_in)
        return g_in_tree, [env[v] for v in self.stash_vars]

    def backward_weight(self, pc: Any, xin: Any, stash: Sequence[Any]) -> Any:
        """W: the parameter gradient, from B's stash."""
        res = self._residuals(pc, xin, [None] * sum(k[0] == "saved" for k in self.kinds))
        env = self._env(res)
        env = {v: env[v] for v in (*self.jaxpr.constvars, *self.refetch)}
        env.update(zip(self.stash_vars, stash))
        _run(self.w_eqns, env)
        g = [_read(env, v) for v in self.jaxpr.outvars[: self.n_params]]
        return jax.tree.unflatten(jax.tree.structure(pc), g)
