"""``tx.moe``: top-k routing with a capacity, token exchange, combine and auxiliary losses.

A mixture-of-experts layer inside `titanax.expert_parallel` reads::

    logits = x @ params["router"]                            # (tokens, experts)
    routing = tx.moe.route(logits, k=2, capacity_factor=1.25)
    xs = tx.moe.dispatch(x, routing, axis="expert")          # (local experts, slots, d)
    ys = experts(params["experts"], xs)                      # the local experts, batched
    y = tx.moe.combine(ys, routing, axis="expert")           # (tokens, d)

Capacity and priority follow GShard (Lepikhin et al. 2020, section 2.2) and Switch
(Fedus et al. 2021, section 2.1): each device's tokens form a group; expert ``e`` takes at
most ``capacity = ceil(tokens * k * capacity_factor / experts)`` of the group's
assignments. Slots are given choice-major, then in token order: every token's first
choice is placed before any second choice (GShard's top-2 rule: a second choice never
displaces a first choice), and within one choice rank, earlier tokens first (the
Switch/GShard "position in expert" cumulative sum). Assignments past the capacity are
dropped: that expert contributes nothing to the token (its residual carries it), and
`Routing.dropped` counts them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from titanax._util import leaves_with_paths
from titanax.errors import CollectiveError
from titanax.parallel import collectives as cx
from titanax.parallel.rules import Rules, spec_axes

__all__ = [
    "Routing",
    "route",
    "dispatch",
    "combine",
    "load_balancing_loss",
    "z_loss",
    "reduce_gradients",
    "ragged_supported",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Where each token's top-k assignments go: what `route` returns (a pytree).

    Attributes:
      experts: ``int32[tokens, k]``: the chosen experts, best first.
      gates: ``float[tokens, k]``: their router probabilities renormalized over the k
        chosen experts (they sum to 1 per token, dropped assignments included).
      position: ``int32[tokens, k]``: the slot of each assignment in its expert's buffer.
      kept: ``bool[tokens, k]``: whether the assignment fits the capacity.
      dropped: ``int32[]``: the number of assignments dropped on this device (a metric:
        ``tx.psum`` it over the batch axes for the global count).
      capacity: slots per expert per device (static).
      num_experts: the number of experts ``E`` (static).
    """

    experts: jax.Array
    gates: jax.Array
    position: jax.Array
    kept: jax.Array
    dropped: jax.Array
    capacity: int = dataclasses.field(metadata=dict(static=True))
    num_experts: int = dataclasses.field(metadata=dict(static=True))


def _check_logits(fn: str, logits: Any) -> None:
    if getattr(logits, "ndim", None) != 2:
        raise CollectiveError(
            f"tx.moe.{fn}: logits must have shape (tokens, experts), got "
            f"{getattr(logits, 'shape', type(logits).__name__)}. Flatten the batch and "
            "sequence dimensions first: logits.reshape(-1, logits.shape[-1])."
        )


def route(logits: jax.Array, *, k: int, capacity_factor: float | None) -> Routing:
    """Top-k routing of ``logits`` with a capacity per expert (GShard/Switch).

    Each token picks the ``k`` experts of largest router probability
    (``softmax(logits)``); its gates are those probabilities divided by their sum over
    the ``k``. Expert ``e`` takes at most ``capacity = ceil(tokens * k * capacity_factor
    / experts)`` assignments, filled choice-major then in token order (see the module
    docstring); the rest are dropped and counted. ``capacity_factor=None`` drops
    nothing: ``capacity = tokens`` (a token picks ``k`` distinct experts, so no expert
    can receive more than ``tokens`` assignments).

    Args:
      logits: ``float[tokens, experts]``, this device's tokens.
      k: experts per token, ``1 <= k <= experts``.
      capacity_factor: slots per expert relative to a perfectly balanced load, ``> 0``;
        ``None`` for no dropping.

    Returns:
      A `Routing`.

    Raises:
      CollectiveError: logits not 2-D, ``k`` out of range, a ``capacity_factor`` that
        is not positive.

    Examples:
      >>> import jax.numpy as jnp, titanax as tx
      >>> logits = jnp.array([[2.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
      >>> r = tx.moe.route(logits, k=1, capacity_factor=1.0)   # capacity ceil(3/3) = 1
      >>> r.experts[:, 0], r.kept[:, 0], int(r.dropped)
      (Array([0, 0, 1], dtype=int32), Array([ True, False,  True], dtype=bool), 1)
    """
    _check_logits("route", logits)
    tokens, experts = logits.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts:
        raise CollectiveError(
            f"tx.moe.route: k={k!r} must be an int between 1 and the number of experts, "
            f"{experts} (logits shape {logits.shape}). Use k <= {experts}, or add experts."
        )
    if capacity_factor is None:
        capacity = tokens
    elif isinstance(capacity_factor, bool) or not capacity_factor > 0:
        raise CollectiveError(
            f"tx.moe.route: capacity_factor={capacity_factor!r} must be > 0 (1.0: slots for "
            "a perfectly balanced load), or None for no dropping."
        )
    else:
        capacity = math.ceil(tokens * k * capacity_factor / experts)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, chosen = jax.lax.top_k(probs, k)
    gates = (top / jnp.sum(top, axis=-1, keepdims=True)).astype(logits.dtype)
    chosen = chosen.astype(jnp.int32)
    # Position in expert: choice-major, then token order (GShard's top-2 priority).
    onehot = jax.nn.one_hot(chosen.T.reshape(-1), experts, dtype=jnp.int32)  # (k*T, E)
    before = jnp.cumsum(onehot, axis=0) - onehot
    position = jnp.sum(before * onehot, axis=-1).reshape(k, tokens).T
    kept = position < capacity
    dropped = jnp.sum(~kept).astype(jnp.int32)
    return Routing(chosen, gates, position.astype(jnp.int32), kept, dropped, capacity, experts)


def _groups(fn: str, routing: Routing, axis: str | None) -> int:
    """The size of ``axis`` (1 for ``None``), checked against the number of experts."""
    if axis is None:
        return 1
    size = cx.axis_size(axis)
    if routing.num_experts % size:
        raise CollectiveError(
            f"tx.moe.{fn}(axis={axis!r}): {routing.num_experts} experts cannot be split "
            f"over the {size} devices of {axis!r}. Make the number of experts a multiple of "
            f"{size}, or change the mesh."
        )
    return size


def dispatch(
    x: jax.Array, routing: Routing, *, axis: str | None, ragged: bool | None = False
) -> jax.Array:
    """Sends each token to the device holding each of its experts: one ``all_to_all``.

    Each device writes its tokens into a buffer of ``capacity`` slots per expert
    (``(experts, capacity, d)``, zeros where no token is), and one ``all_to_all`` over
    ``axis`` gives each device the slots of the experts it holds, from every device.

    Args:
      x: ``[tokens, d]``, this device's tokens (the ones ``routing`` was computed for).
      routing: from `route`.
      axis: the expert axis (bound by `titanax.expert_parallel`), or ``None`` when every
        expert is local (no communication).
      ragged: ``True`` sends only the filled slots, with ``jax.lax.ragged_all_to_all``
        (plus two small integer ``all_to_all`` of the counts and offsets): the bytes on
        the wire follow the tokens, not the capacity, and the result is the same. Only
        where the backend has it (`ragged_supported`); ``None``: ragged there, padded
        elsewhere; ``False`` (default): the padded exchange.

    Returns:
      ``[experts / N, N * capacity, d]`` (``N`` the size of ``axis``): for each local
      expert, the ``capacity`` slots of device 0 of the axis, then device 1's, and so on.

    Raises:
      CollectiveError: ``axis`` not bound, the number of experts not divisible by its
        size, or ``ragged=True`` on a backend without ``ragged_all_to_all``.

    Examples:
      >>> import jax.numpy as jnp, titanax as tx
      >>> x = jnp.arange(6.0).reshape(3, 2)                     # 3 tokens, d = 2
      >>> r = tx.moe.route(jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), k=1,
      ...                  capacity_factor=None)                # capacity 3
      >>> tx.moe.dispatch(x, r, axis=None)        # expert 0: tokens 0 and 2; expert 1: token 1
      Array([[[0., 1.],
              [4., 5.],
              [0., 0.]],
      <BLANKLINE>
             [[2., 3.],
              [0., 0.],
              [0., 0.]]], dtype=float32)
      >>> tx.moe.combine(2 * tx.moe.dispatch(x, r, axis=None), r, axis=None)  # gates: 1
      Array([[ 0.,  2.],
             [ 4.,  6.],
             [ 8., 10.]], dtype=float32)
    """
    n = _groups("dispatch", routing, axis)
    e, c = routing.num_experts, routing.capacity
    tokens, d = x.shape
    slot = jnp.where(routing.kept, routing.position, c)  # dropped: out of range
    rows = jnp.broadcast_to(x[:, None, :], (tokens, routing.experts.shape[1], d))
    buf = jnp.zeros((e, c, d), x.dtype).at[routing.experts, slot].add(rows, mode="drop")
    if axis is None:
        return buf
    if _use_ragged("dispatch", ragged):
        return _ragged_dispatch(buf, routing, axis, n)
    buf = buf.reshape(n, e // n, c, d)
    got = cx.all_to_all(buf, axis, 0, 0, tiled=True)  # dim 0: now the source device
    return got.transpose(1, 0, 2, 3).reshape(e // n, n * c, d)


def combine(
    y: jax.Array, routing: Routing, *, axis: str | None, ragged: bool | None = False
) -> jax.Array:
    """Brings the experts' outputs back to their tokens (one ``all_to_all``), weighted.

    The inverse exchange of `dispatch`; then each token's output is the sum over its
    kept assignments of ``gate * expert output`` (a dropped assignment adds nothing).

    Args:
      y: ``[experts / N, N * capacity, d_out]``, the local experts' outputs for the slots
        `dispatch` returned.
      routing: from `route`, the same as given to `dispatch`.
      axis: the expert axis, or ``None`` when every expert is local.
      ragged: as for `dispatch` (give both the same).

    Returns:
      ``[tokens, d_out]``.

    Raises:
      CollectiveError: ``axis`` not bound, or the number of experts not divisible by its
        size.
    """
    n = _groups("combine", routing, axis)
    e, c = routing.num_experts, routing.capacity
    d = y.shape[-1]
    if axis is not None and _use_ragged("combine", ragged):
        y = _ragged_combine(y, routing, axis, n)
    elif axis is not None:
        y = y.reshape(e // n, n, c, d).transpose(1, 0, 2, 3)
        y = cx.all_to_all(y, axis, 0, 0, tiled=True).reshape(e, c, d)
    slot = jnp.where(routing.kept, routing.position, 0)
    out = y[routing.experts, slot]  # (tokens, k, d)
    weight = jnp.where(routing.kept, routing.gates, 0).astype(y.dtype)
    return jnp.einsum("tk,tkd->td", weight, out)


def load_balancing_loss(logits: jax.Array, routing: Routing) -> jax.Array:
    """The Switch Transformer auxiliary loss, ``E * sum_e f_e * P_e``.

    Fedus et al. 2021 (Switch Transformers, eq. 4-6): ``f_e`` is the fraction of the
    routing assignments that go to expert ``e``, ``P_e`` the mean over tokens of the
    router probability of ``e``. With ``k > 1``, ``f_e`` counts all ``k`` choices of
    every token and divides by ``tokens * k`` (for ``k = 1`` this is Switch's top-1
    fraction), before capacity dropping, as in Switch's implementation. It is 1 for a
    perfectly balanced router, and only ``P_e`` carries a gradient.

    Args:
      logits: ``float[tokens, experts]``, as given to `route`.
      routing: what `route` returned for them.

    Returns:
      A float32 scalar (this device's tokens: ``tx.pmean`` it as a metric).

    Examples:
      >>> import jax.numpy as jnp, titanax as tx
      >>> logits = jnp.zeros((4, 2)).at[:, 0].set(1.0)      # every token prefers expert 0
      >>> loss = tx.moe.load_balancing_loss(logits, tx.moe.route(logits, k=1, capacity_factor=None))
      >>> round(float(loss), 4)                              # 2 * (1 * 0.7311 + 0 * 0.2689)
      1.4621
    """
    _check_logits("load_balancing_loss", logits)
    tokens, experts = logits.shape
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    assigned = jax.nn.one_hot(routing.experts, experts, dtype=jnp.float32).sum(axis=(0, 1))
    f = assigned / (tokens * routing.experts.shape[1])
    return experts * jnp.sum(f * jnp.mean(probs, axis=0))


def z_loss(logits: jax.Array) -> jax.Array:
    """The router z-loss of ST-MoE (Zoph et al. 2022, eq. 5): ``mean(logsumexp(logits)^2)``.

    It keeps the router's logits small, for numerical stability.

    Examples:
      >>> import jax.numpy as jnp, titanax as tx
      >>> round(float(tx.moe.z_loss(jnp.zeros((3, 4)))), 4)    # log(4)^2
      1.9218
    """
    _check_logits("z_loss", logits)
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.square(lse))


def reduce_gradients(
    grads: Any, rules: Rules, *, axis: str = "expert", data_axes: str | Sequence[str] = ()
) -> Any:
    """The gradient of the global mean loss, from each device's gradient of its local loss.

    Inside `titanax.expert_parallel`, a replicated leaf's gradient is per replica: it
    needs ``tx.pmean`` over ``axis`` and ``data_axes``. An expert leaf (matched by
    ``rules`` with a spec naming ``axis``) is different on each device of ``axis``, and
    its gradient already holds every device's contribution (the backward
    ``all_to_all`` brought them, summed over ``axis``): it is divided by the size of
    ``axis`` (the local losses are means) and averaged over ``data_axes`` only. Under
    `fully_sharded`, reduce over ``data`` with ``tx.scatter_grads`` first and pass no
    ``data_axes``.

    Args:
      grads: gradients of the parameters (paths as in the parameter tree: the rules
        should match them, e.g. ``r"experts/"``).
      rules: the rules given to `titanax.expert_parallel`.
      axis: the expert axis.
      data_axes: the other axes the batch is split along (``"data"``), if any.

    Returns:
      ``grads`` reduced, with each leaf laid out like its parameter.

    Raises:
      CollectiveError: ``axis`` or one of ``data_axes`` not bound by a manual transform.
    """
    data = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
    size = cx.axis_size(axis)
    flat = leaves_with_paths(grads)

    def one(path: str, g: Any) -> Any:
        spec = rules.spec_for(path) if jnp.ndim(g) else None
        if spec is not None and axis in spec_axes(spec):
            return (cx.pmean(g, data) if data else g) / size
        return cx.pmean(g, (*data, axis))

    out = [one(p, g) for p, g in flat]
    return jax.tree.unflatten(jax.tree.structure(grads), out)


def ragged_supported() -> bool:
    """Whether the default backend runs ``jax.lax.ragged_all_to_all``.

    XLA:CPU does not implement it (jax 0.10.2: the program lowers, and compiling it
    fails with ``UNIMPLEMENTED``); XLA's GPU and TPU backends do. On CPU, `dispatch`
    and `combine` therefore use the padded exchange.
    """
    return jax.default_backend() in ("gpu", "tpu")


def _use_ragged(fn: str, ragged: bool | None) -> bool:
    if ragged is None:
        return ragged_supported()
    if ragged and not ragged_supported():
        raise CollectiveError(
            f"tx.moe.{fn}(ragged=True): the {jax.default_backend()!r} backend has no "
            "ragged_all_to_all (XLA:CPU: UNIMPLEMENTED, jax 0.10.2). Pass ragged=None to "
            "use it only where the backend has it, or ragged=False (the padded exchange)."
        )
    return bool(ragged)


def _exclusive(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


class _Ragged:
    """Counts and offsets of the ragged exchange, from the routing (shared by both ways).

    The sender packs its filled slots expert by expert (expert ``e``'s ``filled[e]``
    slots at ``start[e]``), so the rows for device ``j`` (its ``E / N`` experts) are one
    contiguous chunk. A receiver's buffer holds the chunks of devices ``0 .. N-1`` in
    order, each expert by expert.
    """

    def __init__(self, routing: Routing, axis: str, n: int):
        e, c = routing.num_experts, routing.capacity
        onehot = jax.nn.one_hot(routing.experts, e, dtype=jnp.int32) * routing.kept[..., None]
        self.filled = jnp.minimum(onehot.sum((0, 1)), c)  # (E,) rows sent per expert
        self.start = _exclusive(self.filled)  # (E,) where expert e's rows begin
        per_dev = self.filled.reshape(n, e // n)
        self.send = per_dev.sum(1)  # (N,) rows for each device
        self.send_at = _exclusive(self.send)
        got = cx.all_to_all(per_dev, axis, 0, 0, tiled=True)  # (N sources, E / N)
        self.got = got
        self.recv = got.sum(1)  # (N,) rows from each device
        self.recv_at = _exclusive(self.recv)
        # Where my chunk lands on each receiver (their recv_at[me]); where a returned
        # chunk lands on its origin (its send_at[me]).
        self.out_at = cx.all_to_all(self.recv_at, axis, 0, 0, tiled=True)
        self.back_at = cx.all_to_all(self.send_at, axis, 0, 0, tiled=True)
        self.rows = min(routing.experts.size, e * c)  # a sender's rows, at most
        self.n, self.local, self.c = n, e // n, c

    def received(self) -> tuple[jax.Array, jax.Array]:
        """For each padded slot (local expert, source, position): its row in the receive
        buffer, and whether it is filled."""
        inner = _exclusive(self.got, axis=1)  # (N, E/N): an expert's rows within a chunk
        p = jnp.arange(self.c)
        row = self.recv_at[None, :, None] + inner.T[:, :, None] + p  # (E/N, N, C)
        return row, p < self.got.T[:, :, None]


def _ragged_exchange(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    axis: str,
) -> jax.Array:
    """``jax.lax.ragged_all_to_all`` over ``axis`` (one place, replaceable in tests)."""
    cx._check("ragged_all_to_all", axis)
    return jax.lax.ragged_all_to_all(
        operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=axis
    )


def _ragged_dispatch(buf: jax.Array, routing: Routing, axis: str, n: int) -> jax.Array:
    r = _Ragged(routing, axis, n)
    e, c, d = buf.shape
    # Pack the filled slots: slot (e, p) with p < filled[e] goes to row start[e] + p.
    p = jnp.arange(c)
    dest = jnp.where(p < r.filled[:, None], r.start[:, None] + p, r.rows)  # (E, C)
    packed = jnp.zeros((r.rows, d), buf.dtype).at[dest].set(buf, mode="drop")
    out = jnp.zeros((n * r.rows, d), buf.dtype)
    got = _ragged_exchange(packed, out, r.send_at, r.send, r.out_at, r.recv, axis)
    row, filled = r.received()
    slots = jnp.where(filled[..., None], got[jnp.where(filled, row, 0)], 0)
    return slots.reshape(r.local, n * c, d)


def _ragged_combine(y: jax.Array, routing: Routing, axis: str, n: int) -> jax.Array:
    r = _Ragged(routing, axis, n)
    d = y.shape[-1]
    row, filled = r.received()
    slots = y.reshape(r.local, n, r.c, d)
    packed = jnp.zeros((n * r.rows, d), y.dtype)
    packed = packed.at[jnp.where(filled, row, n * r.rows)].set(slots, mode="drop")
    out = jnp.zeros((r.rows, d), y.dtype)
    back = _ragged_exchange(packed, out, r.recv_at, r.recv, r.back_at, r.send, axis)
    p = jnp.arange(r.c)
    src = jnp.where(p < r.filled[:, None], r.start[:, None] + p, 0)  # (E, C)
    return jnp.where((p < r.filled[:, None])[..., None], back[src], 0)
