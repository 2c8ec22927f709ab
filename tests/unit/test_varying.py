"""varying_axes: the manual axes each output of a ``shard_map`` body may vary along.

Its one promise is soundness: an axis missing from an output's verdict is an axis along which
the output's real per-device values agree. The property test draws small programs (arithmetic,
collectives, loops, conditionals, nested jit / remat / custom rules, gradients), compiles each
once on the 8 simulated devices, runs it with its inputs split in up to 16 ways and compares the
verdicts with the values. The hand-written tests pin the precise verdicts that a training step
relies on, and check them against the values too.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from titanax.parallel.varying import varying_axes

N = 8  # every value of a drawn program is a float32[N] on each device

# name: (mesh shape, mesh axes, manual axes); the axes that are not manual stay Auto
MESHES = {
    "2x4": ((2, 4), ("a", "b"), ("a", "b")),
    "2x4, only a manual": ((2, 4), ("a", "b"), ("a",)),
    "2x2x2": ((2, 2, 2), ("a", "b", "c"), ("a", "b", "c")),
}


@functools.cache
def _mesh(name: str) -> tuple[jax.sharding.Mesh, tuple[str, ...]]:
    shape, names, manual = MESHES[name]
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names)), manual


def _input(mesh: jax.sharding.Mesh, split: tuple[str, ...], seed: int) -> np.ndarray:
    """A global input whose elements are all distinct, so that its shards really differ."""
    size = N * math.prod(mesh.shape[a] for a in split)
    values = np.linspace(-2.0, 2.0, size, dtype=np.float32) + 0.01 * seed
    return np.random.default_rng(seed).permutation(values)


def _agree(values: np.ndarray, axis: int) -> bool:
    first = np.take(values, [0], axis=axis)
    scale = float(np.max(np.abs(values[np.isfinite(values)]), initial=1.0))
    # A tolerance: the devices of a reduction may sum in different orders.
    return bool(np.allclose(values, first, rtol=1e-5, atol=1e-5 * scale, equal_nan=True))


def _differ(outs: Sequence[jax.Array], sizes: dict[str, int]) -> list[frozenset[str]]:
    """Per output (each device's value stacked along a leading dimension, manual axes in
    order): the manual axes along which the devices' values differ."""
    actual = []
    for out in outs:
        values = np.asarray(out).reshape(*sizes.values(), *out.shape[1:])
        actual.append(frozenset(a for k, a in enumerate(sizes) if not _agree(values, k)))
    return actual


def _trace(smap: Callable[..., Any], body: Callable[..., Any], args: Sequence[Any]) -> Any:
    """The jaxpr of ``body`` as traced inside the shard_map, as a manual transform sees it."""
    traced: dict[str, Any] = {}

    def trace_body(*xs: Any) -> Any:
        traced["jaxpr"] = jax.make_jaxpr(body)(*xs)
        return body(*xs)

    jax.eval_shape(smap(trace_body, out_specs=P()), *args)
    return traced["jaxpr"].jaxpr


def _stacked(body: Callable[..., Sequence[Any]]) -> Callable[..., list[Any]]:
    return lambda *xs: [jnp.asarray(o)[None] for o in body(*xs)]


def analyse(
    mesh_name: str, body: Callable[..., Sequence[Any]], splits: Sequence[tuple[str, ...]]
) -> tuple[list[frozenset[str]], list[frozenset[str]], Any]:
    """Per output of ``body``: the verdict of varying_axes, the manual axes along which its
    real per-device values differ, and the jaxpr that was analysed.

    Input ``k`` is split along the manual axes ``splits[k]`` (``()``: replicated, ``P()``).
    """
    mesh, manual = _mesh(mesh_name)
    args = [_input(mesh, split, k) for k, split in enumerate(splits)]
    smap = functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=tuple(P(split) if split else P() for split in splits),
        axis_names=set(manual),
        check_vma=False,
    )
    jaxpr = _trace(smap, body, args)
    verdict = varying_axes(jaxpr, [frozenset(split) for split in splits])
    outs = jax.jit(smap(_stacked(body), out_specs=P(manual)))(*args)
    return list(verdict), _differ(outs, {a: mesh.shape[a] for a in manual}), jaxpr


def verdicts(
    body: Callable[..., Sequence[Any]], *splits: tuple[str, ...], mesh: str = "2x4"
) -> list[frozenset[str]]:
    """The verdict per output, after checking that it is sound on the real values."""
    verdict, actual, jaxpr = analyse(mesh, body, splits)
    assert len(verdict) == len(actual)
    wrong = [(k, sorted(a - v)) for k, (v, a) in enumerate(zip(verdict, actual)) if not a <= v]
    assert not wrong, f"outputs (index, axes) called invariant but varying: {wrong}\n{jaxpr}"
    return verdict


# ---------------------------------------------------------------------------------------------
# Random programs. A program is a tuple of ops run over a pool of float32[N] values (the inputs
# first); each op appends its results to the pool. Operands are pool indices taken modulo the
# pool's length, so that any drawn index is valid. The ops are named tuples: hypothesis prints a
# failing program as a readable expression.


class Ctx(NamedTuple):
    sizes: dict[str, int]  # manual axis -> size
    t: Any = None  # the iteration counter inside a loop body


def _get(pool: Sequence[Any], i: int) -> Any:
    return pool[i % len(pool)]


def _last(pool: Sequence[Any], n: int) -> list[Any]:
    """The last ``n`` values of the pool (wrapping around when it holds fewer)."""
    return [_get(pool, len(pool) - n + k) for k in range(n)]


def run(prog: tuple[Any, ...], pool: Sequence[Any], ctx: Ctx) -> list[Any]:
    pool = list(pool)
    for op in prog:
        pool.extend(op.apply(pool, ctx))
    return pool


class Arith(NamedTuple):
    fn: str  # "add", "mul", "sin", "where"
    x: int
    y: int
    z: int

    def apply(self, pool, ctx):
        x, y, z = (_get(pool, i) for i in (self.x, self.y, self.z))
        return [
            {
                "add": lambda: x + y,
                "mul": lambda: x * jnp.tanh(y),  # tanh: loops do not overflow
                "sin": lambda: jnp.sin(x),
                "where": lambda: jnp.where(x > 0, y, z),
            }[self.fn]()
        ]


class Const(NamedTuple):
    value: float
    ramp: bool  # value * arange(N) rather than a constant fill

    def apply(self, pool, ctx):
        if self.ramp:
            return [self.value * jnp.arange(N, dtype=jnp.float32)]
        return [jnp.full(N, self.value, jnp.float32)]


class Reduce(NamedTuple):
    fn: str  # "psum", "pmean", "pmax", "pmin"
    x: int
    axes: tuple[str, ...]

    def apply(self, pool, ctx):
        return [getattr(lax, self.fn)(_get(pool, self.x), self.axes)]


class Gather(NamedTuple):
    x: int
    axes: tuple[str, ...]

    def apply(self, pool, ctx):
        whole = lax.all_gather(_get(pool, self.x), self.axes, tiled=True).reshape(-1, N)
        weights = jnp.arange(1, whole.shape[0] + 1, dtype=jnp.float32)
        return [weights @ whole]  # back to float32[N], each device's block counted differently


class Scatter(NamedTuple):
    x: int
    axes: tuple[str, ...]

    def apply(self, pool, ctx):
        part = lax.psum_scatter(_get(pool, self.x), self.axes, tiled=True)
        return [jnp.tile(part, N // part.shape[0])]


class Permute(NamedTuple):
    x: int
    axis: str
    shift: int
    total: bool  # else the first device receives nothing (zeros)

    def apply(self, pool, ctx):
        n = ctx.sizes[self.axis]
        perm = [(j, (j + self.shift) % n) for j in range(n)]
        return [lax.ppermute(_get(pool, self.x), self.axis, perm if self.total else perm[1:])]


class AllToAll(NamedTuple):
    x: int
    axis: str

    def apply(self, pool, ctx):
        x = _get(pool, self.x).reshape(ctx.sizes[self.axis], -1)
        return [lax.all_to_all(x, self.axis, 0, 0, tiled=True).reshape(N)]


class AxisIndex(NamedTuple):
    x: int
    axes: tuple[str, ...]

    def apply(self, pool, ctx):
        return [_get(pool, self.x) + lax.axis_index(self.axes).astype(jnp.float32)]


class Late(NamedTuple):
    """Inside a loop body: x from iteration ``start`` on, y before."""

    start: int
    x: int
    y: int

    def apply(self, pool, ctx):
        return [jnp.where(ctx.t >= self.start, _get(pool, self.x), _get(pool, self.y))]


class Scan(NamedTuple):
    """lax.scan; the body's pool is the carries, this step's x, then the outer pool."""

    carries: tuple[int, ...]
    xs: int
    body: tuple[Any, ...]
    outs: tuple[int, ...]  # the new carries, indices into the body's pool
    ys: int
    length: int

    def apply(self, pool, ctx):
        init = tuple(_get(pool, i) for i in self.carries)
        xs = jnp.stack([jnp.roll(_get(pool, self.xs), k) for k in range(self.length)])

        def step(carry, tx):
            t, x = tx
            inner = run(self.body, [*carry, x, *pool], ctx._replace(t=t))
            return tuple(_get(inner, i) for i in self.outs), _get(inner, self.ys)

        carry, ys = lax.scan(step, init, (jnp.arange(self.length), xs))
        return [*carry, ys.sum(0)]


def _uniform(v: Any, ctx: Ctx) -> Any:
    """The largest of ``v`` over every manual axis: a branch index or trip count that is the
    same on every device, so that the collectives of the branches or the body line up (pmax
    has no derivative, and an index needs none)."""
    return lax.pmax(lax.stop_gradient(v), tuple(ctx.sizes))


class Fori(NamedTuple):
    """lax.fori_loop up to ``trips``, or, when ``dynamic`` is a pool index, up to a trip count
    (0..trips) read from that value (a while loop): on each device, or made ``uniform``."""

    carries: tuple[int, ...]
    trips: int
    dynamic: int | None
    uniform: bool
    body: tuple[Any, ...]
    outs: tuple[int, ...]

    def apply(self, pool, ctx):
        init = tuple(_get(pool, i) for i in self.carries)
        hi: Any = self.trips
        if self.dynamic is not None:
            v = jnp.floor(jnp.abs(_get(pool, self.dynamic)[0]) * 2)
            v = _uniform(v, ctx) if self.uniform else v
            hi = jnp.clip(v, 0, self.trips).astype(jnp.int32)

        def step(t, carry):
            inner = run(self.body, [*carry, *pool], ctx._replace(t=t))
            return tuple(_get(inner, i) for i in self.outs)

        return list(lax.fori_loop(0, hi, step, init))


class While(NamedTuple):
    """lax.while_loop while carry ``test`` is below ``limit`` (at most 4 trips); the test on
    each device, or made ``uniform``."""

    carries: tuple[int, ...]
    test: int
    limit: float
    uniform: bool
    body: tuple[Any, ...]
    outs: tuple[int, ...]

    def apply(self, pool, ctx):
        init = tuple(_get(pool, i) for i in self.carries)

        def cond(state):
            t, carry = state
            v = _get(carry, self.test)[0]
            return (t < 4) & ((_uniform(v, ctx) if self.uniform else v) < self.limit)

        def step(state):
            t, carry = state
            inner = run(self.body, [*carry, *pool], ctx._replace(t=t))
            return t + 1, tuple(_get(inner, i) for i in self.outs)

        return list(lax.while_loop(cond, step, (0, init))[1])


class Cond(NamedTuple):
    """lax.cond on ``index[0] > 0`` (two branches) or lax.switch on ``|index[0]| * 2``; the
    index on each device, or made ``uniform``."""

    index: int
    uniform: bool
    branches: tuple[tuple[Any, ...], ...]
    n_out: int

    def apply(self, pool, ctx):
        v = _get(pool, self.index)[0]
        v = _uniform(v, ctx) if self.uniform else v
        fns = [lambda prog=prog: _last(run(prog, pool, ctx), self.n_out) for prog in self.branches]
        if len(fns) == 2:
            return list(lax.cond(v > 0, *fns))
        return list(lax.switch(jnp.floor(jnp.abs(v) * 2).astype(jnp.int32), fns))


def _custom_jvp(f):
    g = jax.custom_jvp(f)
    g.defjvp(lambda primals, tangents: jax.jvp(f, primals, tangents))
    return g


def _custom_vjp(f):
    g = jax.custom_vjp(f)
    g.defvjp(lambda *a: (f(*a), a), lambda a, ct: jax.vjp(f, *a)[1](ct))
    return g


WRAPPERS = {
    "jit": jax.jit,
    "remat": jax.checkpoint,
    "custom_jvp": _custom_jvp,
    "custom_vjp": _custom_vjp,
}


class Call(NamedTuple):
    """A sub-program on ``args`` (no closure) under jit, remat, custom_jvp or custom_vjp."""

    kind: str
    args: tuple[int, ...]
    body: tuple[Any, ...]
    n_out: int

    def apply(self, pool, ctx):
        inner = ctx._replace(t=None)
        f = lambda *a: tuple(_last(run(self.body, a, inner), self.n_out))
        return list(WRAPPERS[self.kind](f)(*(_get(pool, i) for i in self.args)))


class Grad(NamedTuple):
    """jax.grad (or value_and_grad) of the sum of a sub-program's last value, taken with
    respect to pool value ``wrt``, which is last in the sub-program's pool."""

    wrt: int
    body: tuple[Any, ...]
    with_value: bool

    def apply(self, pool, ctx):
        loss = lambda w: run(self.body, [*pool, w], ctx)[-1].sum()
        w = _get(pool, self.wrt)
        if self.with_value:
            value, grad = jax.value_and_grad(loss)(w)
            return [grad, jnp.broadcast_to(value, (N,))]
        return [jax.grad(loss)(w)]


_index = st.integers(0, 15)


def _axis_sets(axes: tuple[str, ...]) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(st.sampled_from(axes), min_size=1, max_size=len(axes), unique=True).map(tuple)


def _carries() -> st.SearchStrategy[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Initial carries, and the new carries as body-pool indices: often a permutation of the
    old carries (a swap), else any value of the body (a fresh one, a step's x, a closure)."""

    def outs(n: int) -> st.SearchStrategy[tuple[int, ...]]:
        return st.one_of(
            st.permutations(range(n)).map(tuple),
            st.lists(_index, min_size=n, max_size=n).map(tuple),
        )

    carries = st.lists(_index, min_size=1, max_size=3).map(tuple)
    return carries.flatmap(lambda c: st.tuples(st.just(c), outs(len(c))))


@functools.cache
def programs(
    axes: tuple[str, ...],
    depth: int,
    loop: bool = False,
    differentiable: bool = False,
    divergent: bool = False,
) -> st.SearchStrategy[tuple[Any, ...]]:
    """Up to 5 ops at the top, 3 in a sub-program, 2 in a sub-sub-program (nesting depth 2).

    ``loop``: inside a loop body (Late may gate on the counter). ``differentiable``: inside a
    gradient (no pmax / pmin, no while loop). ``divergent``: devices may run it a different
    number of times (a branch, a while body), so no collectives: they would wait forever.
    """
    reductions = ["psum", "pmean"] + ([] if differentiable else ["pmax", "pmin"])
    ops = [
        st.builds(Arith, st.sampled_from(["add", "mul", "sin", "where"]), _index, _index, _index),
        st.builds(Const, st.sampled_from([0.0, 1.0, -0.5]), st.booleans()),
        st.builds(AxisIndex, _index, _axis_sets(axes)),
    ]
    if not divergent:
        ops += [
            st.builds(Reduce, st.sampled_from(reductions), _index, _axis_sets(axes)),
            st.builds(Gather, _index, _axis_sets(axes)),
            st.builds(Scatter, _index, _axis_sets(axes)),
            st.builds(Permute, _index, st.sampled_from(axes), st.integers(0, 3), st.booleans()),
            st.builds(AllToAll, _index, st.sampled_from(axes)),
        ]
    if loop:
        ops.append(st.builds(Late, st.integers(1, 3), _index, _index))
    if depth < 2:
        flags = (axes, depth + 1, loop, differentiable, divergent)
        ops += [
            _scans(*flags),
            _foris(*flags),
            _conds(*flags),
            _calls(*flags),
            _grads(*flags),
        ]
        if not differentiable:
            ops.append(_whiles(*flags))
    most = (6, 3, 2)[depth]
    return st.lists(st.one_of(ops), min_size=1 if depth == 0 else 0, max_size=most).map(tuple)


@st.composite
def _scans(draw, axes, depth, loop, differentiable, divergent):
    carries, outs = draw(_carries())
    body = draw(programs(axes, depth, True, differentiable, divergent))
    return Scan(carries, draw(_index), body, outs, draw(_index), draw(st.integers(1, 4)))


def _uniformity(draw, divergent: bool) -> bool:
    return not divergent and draw(st.booleans())


@st.composite
def _foris(draw, axes, depth, loop, differentiable, divergent):
    carries, outs = draw(_carries())
    dynamic = None if differentiable else draw(st.none() | _index)
    uniform = dynamic is not None and _uniformity(draw, divergent)
    divergent = divergent or (dynamic is not None and not uniform)
    body = draw(programs(axes, depth, True, differentiable, divergent))
    return Fori(carries, draw(st.integers(0, 4)), dynamic, uniform, body, outs)


@st.composite
def _whiles(draw, axes, depth, loop, differentiable, divergent):
    carries, outs = draw(_carries())
    uniform = _uniformity(draw, divergent)
    body = draw(programs(axes, depth, True, differentiable, not uniform))
    limit = draw(st.sampled_from([0.0, 1.0, 3.0]))
    return While(carries, draw(_index), limit, uniform, body, outs)


@st.composite
def _conds(draw, axes, depth, loop, differentiable, divergent):
    uniform = _uniformity(draw, divergent)
    branch = programs(axes, depth, loop, differentiable, not uniform)
    branches = draw(st.lists(branch, min_size=2, max_size=3).map(tuple))
    return Cond(draw(_index), uniform, branches, draw(st.integers(1, 2)))


@st.composite
def _calls(draw, axes, depth, loop, differentiable, divergent):
    kind = draw(st.sampled_from(sorted(WRAPPERS)))
    args = draw(st.lists(_index, min_size=1, max_size=3).map(tuple))
    body = draw(programs(axes, depth, False, differentiable, divergent))
    return Call(kind, args, body, draw(st.integers(1, 2)))


@st.composite
def _grads(draw, axes, depth, loop, differentiable, divergent):
    body = draw(programs(axes, depth, loop, True, divergent))
    return Grad(draw(_index), body, draw(st.booleans()))


class Case(NamedTuple):
    mesh: str
    inputs: int
    program: tuple[Any, ...]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    mesh = draw(st.sampled_from(sorted(MESHES)))
    inputs = draw(st.integers(2, 3))
    return Case(mesh, inputs, draw(programs(MESHES[mesh][2], depth=0)))


def _assignments(manual: tuple[str, ...], inputs: int) -> list[tuple[tuple[str, ...], ...]]:
    """Up to 16 ways to split the inputs: each replicated, along one axis, or along all."""
    options = [(), *((a,) for a in manual)] + ([manual] if len(manual) > 1 else [])
    every = list(itertools.product(options, repeat=inputs))
    return every[:: -(-len(every) // 16)]


def _split_input(sizes: dict[str, int], split: tuple[str, ...], seed: int) -> np.ndarray:
    """An input for ``in_specs=P(manual)`` whose device blocks are distinct along the axes of
    ``split`` and equal along the others: split along ``split``, replicated along the rest."""
    shape = [size if a in split else 1 for a, size in sizes.items()] + [N]
    values = np.linspace(-2.0, 2.0, math.prod(shape), dtype=np.float32) + 0.01 * seed
    blocks = np.random.default_rng(seed).permutation(values).reshape(shape)
    return np.broadcast_to(blocks, (*sizes.values(), N)).reshape(-1)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases())
def test_never_calls_a_varying_value_invariant(case: Case):
    # Every input is passed split along all manual axes, so that one jaxpr and one compiled
    # program serve every assignment: which axes an input varies along is then a matter of
    # its data (equal blocks along the axes it is replicated along).
    mesh, manual = _mesh(case.mesh)
    sizes = {a: mesh.shape[a] for a in manual}
    body = lambda *xs: run(case.program, xs, Ctx(sizes))  # every value of the pool is an output
    smap = functools.partial(
        jax.shard_map, mesh=mesh, in_specs=P(manual), axis_names=set(manual), check_vma=False
    )
    shapes = [jax.ShapeDtypeStruct((N * math.prod(sizes.values()),), jnp.float32)] * case.inputs
    jaxpr = _trace(smap, body, shapes)
    per_device = jax.jit(smap(_stacked(body), out_specs=P(manual)))
    wrong = []
    for splits in _assignments(manual, case.inputs):
        verdict = varying_axes(jaxpr, [frozenset(split) for split in splits])
        outs = per_device(*(_split_input(sizes, split, k) for k, split in enumerate(splits)))
        wrong += [
            f"inputs split along {splits}: pool value {k} varies along {sorted(a - v)} "
            f"but the verdict is {sorted(v)}"
            for k, (v, a) in enumerate(zip(verdict, _differ(outs, sizes)))
            if not a <= v
        ]
    assert not wrong, "\n".join(wrong[:10]) + f"\n{jaxpr}"


# ---------------------------------------------------------------------------------------------
# The precise cases. Each verdict is also checked against the real values (``verdicts``).

A, B, AB, NONE = {"a"}, {"b"}, {"a", "b"}, set()


def test_inputs_and_constants():
    body = lambda x, y, z: (x, y, z, jnp.ones(3), jnp.arange(4.0) * 2.0, y * 3.0 + 1.0)
    assert verdicts(body, ("a",), (), ("b", "a")) == [A, NONE, AB, NONE, NONE, NONE]
    assert verdicts(body, ("a",), (), (), mesh="2x4, only a manual") == [A] + [NONE] * 5


@pytest.mark.parametrize(
    "reduce",
    [
        lax.psum,
        lax.pmean,
        lax.pmax,
        lax.pmin,
        lambda x, axes: lax.all_gather(x, axes, tiled=True),
        lambda x, axes: lax.all_gather(x, axes),
    ],
    ids=["psum", "pmean", "pmax", "pmin", "all_gather_tiled", "all_gather"],
)
def test_reductions_make_invariant_along_their_axes(reduce):
    body = lambda x, y: (reduce(x, "a"), reduce(x, "b"), reduce(x, ("a", "b")), reduce(y, "a"))
    assert verdicts(body, ("a", "b"), ()) == [B, A, NONE, NONE]
    body = lambda x: (reduce(x, "a"), reduce(x, ("a", "b")))
    assert verdicts(body, ("a", "b"), mesh="2x2x2") == [B, NONE]
    assert verdicts(body, ("b", "c"), mesh="2x2x2") == [{"b", "c"}, {"c"}]


def test_collectives_that_vary():
    def body(x, y):
        return (
            y + lax.axis_index("b"),
            y + lax.axis_index(("a", "b")),
            lax.ppermute(x, "a", [(0, 1), (1, 0)]),
            lax.ppermute(y, "b", [(0, 1)]),  # not total: devices 0, 2, 3 receive zeros
            lax.psum_scatter(y, "b", tiled=True),
            lax.all_to_all(y.reshape(4, 2), "b", 0, 0, tiled=True),
            lax.psum_scatter(x, "b", tiled=True),
        )

    assert verdicts(body, ("a",), ()) == [B, AB, A, B, B, B, AB]


def _swap(x, y, length):
    def step(carry, _):
        u, v = carry
        return (v, u), None

    return lax.scan(step, (x, y), None, length=length)[0]


def test_scan_carry_that_swaps_varies():
    # Known bug of the first implementation: it read the body once, so the replicated
    # carry looked invariant although it holds the varying value every other iteration.
    assert verdicts(lambda x, y: _swap(y, x, 3), ("a",), ()) == [A, A]
    assert verdicts(lambda x, y: _swap(x, y, 2), ("a",), ()) == [A, A]


def test_scan_carry_fed_late():
    def body(x, y):
        def step(carry, t):
            u, v, w = carry
            u = jnp.where(t >= 2, u + lax.axis_index("b"), u)  # from the third iteration
            v = jnp.where(t >= 3, x, v)  # a varying closure, from the fourth
            w = w + lax.psum(x, ("a", "b"))  # a reduction: stays invariant
            return (u, v, w), None

        return lax.scan(step, (y, y, y), jnp.arange(4))[0]

    assert verdicts(body, ("a",), ()) == [B, A, NONE]


def test_scan_that_stays_invariant():
    def body(x, y):
        def step(carry, t):
            u, v = carry
            return (v * 0.5 + lax.pmean(x, "a"), jnp.sin(u) + t), u + lax.pmax(x, "a")

        (u, v), ys = lax.scan(step, (y, y * 2), jnp.arange(3.0))
        return u, v, ys

    assert verdicts(body, ("a",), ()) == [NONE, NONE, NONE]


def test_cond_and_switch():
    def body(x, y):
        flag = x[0] > 0
        return (
            lax.cond(flag, lambda: jnp.ones(8), lambda: jnp.zeros(8)),  # varying predicate
            lax.cond(y[0] > 0, lambda: y + 1, lambda: y * 2),  # all invariant
            lax.cond(y[0] > 0, lambda: y + lax.axis_index("b"), lambda: y),  # a branch varies
            lax.switch(jnp.argmax(x) % 3, [lambda: y, lambda: y + 1, lambda: -y]),
            lax.switch(jnp.argmax(y) % 3, [lambda: y, lambda: x, lambda: -y]),
        )

    assert verdicts(body, ("a",), ()) == [A, NONE, B, A, A]


def test_while_loops():
    def body(x, y):
        up_to = lambda n, v: lax.fori_loop(0, n, lambda i, c: c + 1.0, v)
        return (
            up_to((jnp.abs(x[0]) * 2).astype(jnp.int32), y),  # trip count varies along a
            up_to((jnp.abs(y[0]) * 2).astype(jnp.int32), y),  # the same on every device
            lax.fori_loop(0, y[0].astype(jnp.int32) + 3, lambda i, c: c + lax.axis_index("b"), y),
            lax.while_loop(lambda c: c[0] < 3.0, lambda c: c + jnp.abs(x[0]) + 0.5, y),
            lax.while_loop(lambda c: c[0] < 3.0, lambda c: c + lax.psum(x, "a") ** 2 + 1, y),
        )

    assert verdicts(body, ("a",), ()) == [A, NONE, B, A, NONE]


@pytest.mark.parametrize(
    "wrap",
    [jax.jit, jax.checkpoint, _custom_jvp, _custom_vjp, lambda f: jax.jit(jax.checkpoint(f))],
    ids=["jit", "remat", "custom_jvp", "custom_vjp", "jit_of_remat"],
)
def test_nested_bodies_are_followed(wrap):
    inner = wrap(lambda x, y: (lax.psum(x, "a"), y * 2.0, x + y, y + lax.axis_index("b")))
    assert verdicts(inner, ("a",), ()) == [NONE, NONE, A, B]


def _loss(w, batch):
    return jnp.mean(jnp.tanh(batch * w) ** 2)


@pytest.mark.parametrize("mesh", ["2x4", "2x4, only a manual"])
def test_gradient_step(mesh):
    def body(w, batch):
        loss, grads = jax.value_and_grad(_loss)(w, batch)
        mean = lax.pmean(grads, "a")
        return grads, loss, mean, w - 0.1 * mean, lax.pmean(loss, "a")

    assert verdicts(body, (), ("a",), mesh=mesh) == [A, A, NONE, NONE, NONE]


def test_gradient_of_gathered_shards():
    # ZeRO-3: the parameters are split along a, gathered for the loss, the gradient reduced
    # and scattered back to the shards, so it varies along a again (and along b: the batch).
    def body(shard, batch):
        loss = lambda s: _loss(lax.all_gather(s, "a", tiled=True), jnp.tile(batch, 2))
        grads = jax.grad(loss)(shard)
        return grads, lax.psum_scatter(jax.grad(_loss)(batch, batch), "a", tiled=True)

    assert verdicts(body, ("a",), ("b",)) == [AB, AB]
