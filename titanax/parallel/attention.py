"""Exact softmax attention over a sequence split by `context_parallel`: ring and Ulysses.

Both take ``q, k, v`` of shape ``(batch, seq_local, heads, head_dim)`` as each device
holds them inside ``tx.context_parallel`` (chunks ``i`` and ``2N - 1 - i`` of the
sequence on device ``i``), and return what ``jax.nn.dot_product_attention`` returns for
the local queries on the whole sequence. ``k`` and ``v`` may have fewer heads than ``q``
(grouped-query attention: ``heads % kv_heads == 0``).

* `ring_attention`: the K/V blocks travel around the ring (``N - 1`` ``ppermute`` steps),
  each device folds every block into an online (log-sum-exp) softmax accumulated in
  float32, and never holds more than two K/V blocks. Under the causal mask, the balanced
  layout lets every device skip the same blocks: at step ``s > 0`` a device computes
  either all its queries against the first half of the visiting block, or its second
  half of queries against the whole block (``lax.cond`` on its index), so every device
  computes ``2N + 1`` half-blocks (of ``seq_local / 2`` squared) in all. The backward
  pass is a second ring (a custom VJP), which recomputes each block's probabilities from
  the saved log-sum-exp and sends ``dK, dV`` around with the blocks.
* `ulysses_attention`: ``all_to_all`` from sequence-split to head-split, local exact
  attention on the whole sequence with ``heads / N`` heads, and ``all_to_all`` back.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from titanax.errors import PlanError
from titanax.parallel import collectives as cx
from titanax.parallel.context_parallel import _check_bound

__all__ = ["ring_attention", "ulysses_attention"]

F32 = jnp.float32


def _check_qkv(fn: str, q: Any, k: Any, v: Any) -> tuple[int, int]:
    """Checks the shapes of ``q, k, v``; returns ``(heads, kv_heads)``."""
    shapes = {"q": jnp.shape(q), "k": jnp.shape(k), "v": jnp.shape(v)}
    bad = [f"{n} has shape {s}" for n, s in shapes.items() if len(s) != 4]
    if bad:
        raise PlanError(
            f"tx.{fn}: q, k and v must be (batch, seq_local, heads, head_dim); "
            + ", ".join(bad)
            + "."
        )
    (b, t, h, d), ks, vs = shapes["q"], shapes["k"], shapes["v"]
    if ks != vs:
        raise PlanError(f"tx.{fn}: k and v must have the same shape; k {ks}, v {vs}.")
    if (ks[0], ks[1], ks[3]) != (b, t, d):
        raise PlanError(
            f"tx.{fn}: k {ks} does not fit q {shapes['q']}: batch, seq_local and head_dim "
            "must be equal (only the number of heads may differ)."
        )
    if h % ks[2]:
        raise PlanError(
            f"tx.{fn}: q has {h} heads and k, v have {ks[2]}: grouped-query attention "
            "needs heads to be a multiple of kv_heads."
        )
    return h, ks[2]


# -- counting blocks (for tests: the load balance is counted, not assumed) -----------------

_COUNTER: contextvars.ContextVar[dict[int, float] | None] = contextvars.ContextVar(
    "titanax_ring_blocks", default=None
)


@contextlib.contextmanager
def count_blocks() -> Iterator[dict[int, float]]:
    """Counts, per device of the axis, the half-blocks ``ring_attention`` computes.

    Programs traced inside the ``with`` block report at run time, from each block's
    shape, how many ``(seq_local/2) x (seq_local/2)`` score blocks every device computed
    (internal: for the load-balance test; it adds a host callback per block).
    """
    counts: dict[int, float] = {}
    token = _COUNTER.set(counts)
    try:
        yield counts
    finally:
        _COUNTER.reset(token)


def _record(axis: str, tq: int, tk: int, half: int) -> None:
    counts = _COUNTER.get()
    if counts is None:
        return

    def add(i: Any, n: float = tq * tk / half**2) -> None:
        counts[int(i)] = counts.get(int(i), 0.0) + n

    jax.debug.callback(add, cx.axis_index(axis))


# -- one block: scores of some queries against some keys --------------------------------


def _scores(q: jax.Array, k: jax.Array, scale: float, mask: jax.Array | None) -> jax.Array:
    """``(B, Hk, G, Tq, Tk)`` float32 scores of grouped ``q (B,Tq,Hk,G,D)``, ``k (B,Tk,Hk,D)``."""
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=F32) * scale
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _fwd_block(carry: tuple[jax.Array, ...], q: Any, k: Any, v: Any, scale: float, mask: Any):
    """Folds one block into the running ``(acc, max, total)`` of the rows of ``q``."""
    acc, m, total = carry  # (B,Tq,Hk,G,D) f32, (B,Hk,G,Tq) f32 twice
    s = _scores(q, k, scale, mask)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    total = total * corr + p.sum(-1)
    pv = jnp.einsum("bhgqk,bkhd->bqhgd", p, v, preferred_element_type=F32)
    acc = acc * jnp.moveaxis(corr, -1, 1)[..., None] + pv
    return acc, m_new, total


def _bwd_block(q: Any, k: Any, v: Any, do: Any, lse: Any, delta: Any, scale: float, mask: Any):
    """``(dq, dk, dv)`` of one block, from the saved log-sum-exp (float32)."""
    p = jnp.exp(_scores(q, k, scale, mask) - lse[..., None])
    dv = jnp.einsum("bhgqk,bqhgd->bkhd", p, do, preferred_element_type=F32)
    dp = jnp.einsum("bqhgd,bkhd->bhgqk", do, v, preferred_element_type=F32)
    ds = p * (dp - delta[..., None])
    dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, k, preferred_element_type=F32) * scale
    dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, q, preferred_element_type=F32) * scale
    return dq, dk, dv


def _rows(x: jax.Array, lo: int, hi: int, dim: int) -> jax.Array:
    return jax.lax.slice_in_dim(x, lo, hi, axis=dim)


def _set_rows(x: jax.Array, lo: int, y: jax.Array, dim: int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, y, lo, axis=dim)


# -- the ring --------------------------------------------------------------------------
#
# Device i holds query chunks (i, 2N-1-i) and, at step s, the K/V chunks of device
# j = i - s (mod N): (j, 2N-1-j). Under the causal mask, step 0 is the diagonal (Q0 x K0
# lower-triangular, Q1 x K0 full, Q1 x K1 lower-triangular; Q0 x K1 hidden); at s > 0
# either j < i (all queries see K0 and none sees K1) or j > i (Q1 sees all of K, Q0 none).
# Step 0 and step N-1 are written out, steps 1..N-2 are one `fori_loop`: the program
# does not grow with N, and the block of the next step is in flight while this one is
# computed.


def _masks(c: int) -> tuple[jax.Array, jax.Array]:
    tril = jnp.tril(jnp.ones((c, c), bool))
    return tril, jnp.concatenate([jnp.ones((c, c), bool), tril], axis=1)


def _ring_steps(
    axis: str,
    size: int,
    causal: bool,
    c: int,
    state: Any,
    block: Any,
    send_after: Any = None,
) -> Any:
    """Runs the ring: ``block(state, kv, qlo, qhi, klo, khi, mask) -> state`` for the
    parts each step computes; ``kv`` is the visiting block (a tuple travelling with
    ``ppermute``); ``send_after(state) -> state`` runs after each step (the backward
    pass sends its ``dK, dV`` there)."""
    t = 2 * c
    perm = [(j, (j + 1) % size) for j in range(size)]
    send_after = send_after or (lambda st: st)
    tril, half_mask = _masks(c) if causal else (None, None)

    def visit(step: Any, state: Any, kv: Any) -> Any:
        if not causal:
            return block(state, kv, 0, t, 0, t, None)
        i = cx.axis_index(axis)
        earlier = (i - step) % size < i  # the visiting block is of an earlier device
        return jax.lax.cond(
            earlier,
            lambda st, kv: block(st, kv, 0, t, 0, c, None),  # all queries x K0
            lambda st, kv: block(st, kv, c, t, 0, t, None),  # Q1 x all keys
            state,
            kv,
        )

    kv = state[0]
    nxt = cx.ppermute(kv, axis, perm) if size > 1 else kv
    if causal:
        state = block(state, kv, 0, c, 0, c, tril)
        state = block(state, kv, c, t, 0, t, half_mask)
    else:
        state = block(state, kv, 0, t, 0, t, None)
    state = send_after(state)
    if size == 1:
        return state

    def middle(step: Any, carry: Any) -> Any:
        state, kv = carry
        nxt = cx.ppermute(kv, axis, perm)
        return send_after(visit(step, (kv, *state[1:]), kv)), nxt

    state, kv = jax.lax.fori_loop(1, size - 1, middle, ((nxt, *state[1:]), nxt))
    return send_after(visit(size - 1, (kv, *state[1:]), kv))


def _ring_fwd_impl(q, k, v, axis: str, size: int, causal: bool, scale: float):
    b, t, hk, g, d = q.shape
    c = t // 2
    acc = jnp.zeros((b, t, hk, g, d), F32)
    m = jnp.full((b, hk, g, t), -jnp.inf, F32)
    total = jnp.zeros((b, hk, g, t), F32)

    def block(state, kv, qlo, qhi, klo, khi, mask):
        _record(axis, qhi - qlo, khi - klo, c)
        kb, vb = kv
        part = tuple(_rows(x, qlo, qhi, 1 if n == 0 else 3) for n, x in enumerate(state[1:]))
        part = _fwd_block(part, q[:, qlo:qhi], kb[:, klo:khi], vb[:, klo:khi], scale, mask)
        new = (
            _set_rows(x, qlo, y, 1 if n == 0 else 3)
            for n, (x, y) in enumerate(zip(state[1:], part))
        )
        return (kv, *new)

    _, acc, m, total = _ring_steps(axis, size, causal, c, ((k, v), acc, m, total), block)
    out = acc / jnp.moveaxis(total, -1, 1)[..., None]
    return out, m + jnp.log(total)


def _ring_bwd_impl(q, k, v, out, lse, do, axis: str, size: int, causal: bool, scale: float):
    c = q.shape[1] // 2
    delta = jnp.moveaxis(jnp.sum(do.astype(F32) * out.astype(F32), -1), 1, -1)  # (B,Hk,G,T)
    perm = [(j, (j + 1) % size) for j in range(size)]
    zeros = lambda x: jnp.zeros(x.shape, F32)  # noqa: E731

    def block(state, kv, qlo, qhi, klo, khi, mask):
        _record(axis, qhi - qlo, khi - klo, c)
        _, dq, dk, dv = state
        kb, vb = kv[0], kv[1]
        gq, gk, gv = _bwd_block(
            q[:, qlo:qhi],
            kb[:, klo:khi],
            vb[:, klo:khi],
            do[:, qlo:qhi],
            lse[..., qlo:qhi],
            delta[..., qlo:qhi],
            scale,
            mask,
        )
        dq = _set_rows(dq, qlo, _rows(dq, qlo, qhi, 1) + gq, 1)
        dk = _set_rows(dk, klo, _rows(dk, klo, khi, 1) + gk, 1)
        dv = _set_rows(dv, klo, _rows(dv, klo, khi, 1) + gv, 1)
        return kv, dq, dk, dv

    def send(state):  # dK, dV of the visiting block go on with it, and home after the last
        kv, dq, dk, dv = state
        return (kv, dq, *cx.ppermute((dk, dv), axis, perm)) if size > 1 else state

    # K and V travel stacked in one array here: as two, their exchanges would be the very
    # ppermutes of the forward pass, which XLA merges (CSE, jaxlib 0.10.2, even through an
    # optimization_barrier), keeping the forward's received block alive until the backward.
    state = (jnp.stack([k, v]), zeros(q), zeros(k), zeros(v))
    _, dq, dk, dv = _ring_steps(axis, size, causal, c, state, block, send)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _ring(q, k, v, axis: str, size: int, causal: bool, scale: float):
    return _ring_fwd_impl(q, k, v, axis, size, causal, scale)[0].astype(q.dtype)


def _ring_fwd(q, k, v, axis, size, causal, scale):
    out, lse = _ring_fwd_impl(q, k, v, axis, size, causal, scale)
    out = out.astype(q.dtype)
    return out, (q, k, v, out, lse)


def _ring_bwd(axis, size, causal, scale, res, do):
    q, k, v, out, lse = res
    dq, dk, dv = _ring_bwd_impl(q, k, v, out, lse, do, axis, size, causal, scale)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis: str = "seq",
    causal: bool = True,
    scale: float | None = None,
) -> jax.Array:
    """Exact attention over the whole sequence, K/V blocks passed around the ring of ``axis``.

    Call it inside `tx.context_parallel` on the local ``q, k, v``. Each device keeps its
    queries; the K/V blocks visit every device in ``N - 1`` ``ppermute`` steps (``N`` the
    size of ``axis``), and each block is folded into an online softmax (running maximum
    and sum, float32). No device ever holds more than two K/V blocks (its current one and
    the next, in flight), nor more than one block of scores. Under ``causal=True`` the
    blocks, or half-blocks, that the mask hides entirely are not computed, and with the
    balanced layout of `context_parallel` every device computes the same number
    (``2N + 1`` blocks of ``seq_local / 2`` queries by ``seq_local / 2`` keys).

    The gradient is a second ring pass (a custom VJP): each block's probabilities are
    recomputed from the saved log-sum-exp, and the block's ``dK, dV`` travel with it and
    come home after the last step.

    Communication per device, with ``kv`` the bytes of the local ``k`` and ``v``:
    forward ``(N - 1) * kv``; backward ``(N - 1) * kv`` plus ``N`` times the float32
    ``dK, dV``.

    Args:
      q: ``(batch, seq_local, heads, head_dim)``, the local queries.
      k: ``(batch, seq_local, kv_heads, head_dim)``; ``heads % kv_heads == 0``.
      v: like ``k``.
      axis: the mesh axis of the `context_parallel` transform.
      causal: mask every key after the query (by global position).
      scale: multiplies the scores; default ``1 / sqrt(head_dim)``.

    Returns:
      ``(batch, seq_local, heads, head_dim)`` in the dtype of ``q``: what
      ``jax.nn.dot_product_attention`` gives these queries on the whole sequence.

    Raises:
      CollectiveError: ``axis`` is not bound by `context_parallel`.
      PlanError: shapes that do not fit (named), or an odd ``seq_local``.

    Examples:
      >>> import jax, jax.numpy as jnp, titanax as tx
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 32, 4, 8))
      >>> @tx.context_parallel(axis="seq", mesh=tx.mesh(seq=8), batch_argnums=(0, 1, 2))
      ... def attend(q, k, v):
      ...     out = tx.ring_attention(q, k, v, axis="seq", causal=True)
      ...     return tx.context_gather(out, axis="seq")
      >>> ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
      >>> bool(jnp.allclose(attend(q, k, v), ref, atol=1e-5))
      True
    """
    size = _check_bound("ring_attention", axis)
    h, hk = _check_qkv("ring_attention", q, k, v)
    b, t, _, d = q.shape
    if t % 2:
        raise PlanError(
            f"tx.ring_attention(axis={axis!r}): q, k, v have an odd seq_local ({t}); inside "
            "tx.context_parallel every device holds two equal chunks of the sequence."
        )
    scale = float(1.0 / np.sqrt(d)) if scale is None else float(scale)
    qg = q.reshape(b, t, hk, h // hk, d)
    out = _ring(qg, k, v, axis, size, bool(causal), scale)
    return out.reshape(b, t, h, d)


def ulysses_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis: str = "seq",
    causal: bool = True,
    scale: float | None = None,
) -> jax.Array:
    """Exact attention over the whole sequence, heads split across ``axis`` (DeepSpeed-Ulysses).

    Call it inside `tx.context_parallel` on the local ``q, k, v``. One ``all_to_all``
    each turns ``q``, ``k`` and ``v`` from sequence-split to head-split (every device
    then holds the whole sequence for ``heads / N`` heads), attention is computed locally
    (``jax.nn.dot_product_attention``, causal by global position: the balanced layout
    is put back in token order first), and one ``all_to_all`` returns the output to
    sequence-split. Four ``all_to_all`` of the local ``q, k, v, out`` forward, four
    backward; the local scores are ``1/N`` of the whole score matrix.

    Args:
      q: ``(batch, seq_local, heads, head_dim)``; ``heads`` must divide by the axis size.
      k: ``(batch, seq_local, kv_heads, head_dim)``; ``kv_heads`` must divide by the axis
        size and divide ``heads``.
      v: like ``k``.
      axis: the mesh axis of the `context_parallel` transform.
      causal: mask every key after the query (by global position).
      scale: multiplies the scores; default ``1 / sqrt(head_dim)``.

    Returns:
      ``(batch, seq_local, heads, head_dim)``: what ``jax.nn.dot_product_attention``
      gives these queries on the whole sequence.

    Raises:
      CollectiveError: ``axis`` is not bound by `context_parallel`.
      PlanError: shapes that do not fit, or heads (of ``q``, or of ``k`` and ``v``) not
        divisible by the axis size.

    Examples:
      >>> import jax, jax.numpy as jnp, titanax as tx
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 32, 8, 8))
      >>> @tx.context_parallel(axis="seq", mesh=tx.mesh(seq=8), batch_argnums=(0, 1, 2))
      ... def attend(q, k, v):
      ...     out = tx.ulysses_attention(q, k, v, axis="seq", causal=True)
      ...     return tx.context_gather(out, axis="seq")
      >>> ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
      >>> bool(jnp.allclose(attend(q, k, v), ref, atol=1e-5))
      True
    """
    size = _check_bound("ulysses_attention", axis)
    h, hk = _check_qkv("ulysses_attention", q, k, v)
    bad = [
        f"{n} {'has' if n == 'q' else 'have'} {x} heads"
        for n, x in (("q", h), ("k and v", hk))
        if x % size
    ]
    if bad:
        raise PlanError(
            f"tx.ulysses_attention(axis={axis!r}): {' and '.join(bad)}, not divisible by the "
            f"axis size {size}: Ulysses splits heads across the axis. Use tx.ring_attention "
            "(no limit on heads), or a smaller axis."
        )

    def to_heads(x: jax.Array) -> jax.Array:  # (B, T, H, D) -> (B, N*T, H/N, D)
        return cx.all_to_all(x, axis, 2, 1, tiled=True)

    qh, kh, vh = to_heads(q), to_heads(k), to_heads(v)
    mask = None
    if causal and size > 1:
        # The gathered sequence holds the chunks in the balanced order: mask by global
        # position (computed from an iota; reordering the sequence instead cost a third
        # score-sized buffer at N=2 on XLA:CPU, jaxlib 0.10.2).
        pos = _gathered_positions(qh.shape[1], size)
        mask = (pos[:, None] >= pos[None, :])[None, None]
    out = jax.nn.dot_product_attention(
        qh, kh, vh, scale=scale, mask=mask, is_causal=bool(causal) and mask is None
    )
    return cx.all_to_all(out, axis, 1, 2, tiled=True)


def _gathered_positions(seq: int, size: int) -> jax.Array:
    """The global positions of a whole sequence gathered in device order from the balanced
    layout (device ``d`` holds chunks ``d`` and ``2N - 1 - d``)."""
    c = seq // (2 * size)
    p = jnp.arange(seq, dtype=jnp.int32)
    device, within = p // (2 * c), p % (2 * c)
    chunk = jnp.where(within < c, device, 2 * size - 1 - device)
    return chunk * c + within % c
