"""``tx.context_parallel``: the sequence of every batch split along a mesh axis.

Causal attention makes later tokens more expensive than earlier ones (a token attends to
every token before it), so a contiguous split would give the last device of the axis
``2N - 1`` times the attention work of the first. The transform therefore cuts the
sequence into ``2N`` chunks and gives device ``i`` chunks ``i`` and ``2N - 1 - i`` (the
"zig-zag" layout of ring attention): every device then holds the same number of
(query, key) pairs under a causal mask. The user passes the tokens in their own order;
`context_positions` gives each device the global positions of the tokens it holds (for
RoPE and for masks), and `context_gather` returns per-token values in the user's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, overload

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from titanax._util import leaves_with_paths
from titanax.errors import CollectiveError, PlanError
from titanax.extend import (
    ArgInfo,
    Layer,
    LayoutHook,
    ParallelFunction,
    PrepareHook,
    TraceInfo,
    apply_layer,
    replicate,
    split_batch,
)
from titanax.parallel import collectives as cx

__all__ = ["context_parallel", "context_positions", "context_gather", "chunk_order"]

TRANSFORM = "context_parallel"


def chunk_order(size: int) -> tuple[int, ...]:
    """The chunks of the sequence, in the order the devices of the axis hold them.

    The sequence is cut into ``2 * size`` equal chunks; device ``i`` holds chunk ``i``
    then chunk ``2 * size - 1 - i``.

    Examples:
      >>> chunk_order(4)
      (0, 7, 1, 6, 2, 5, 3, 4)
    """
    return tuple(c for i in range(size) for c in (i, 2 * size - 1 - i))


def _dest(chunk: int, size: int) -> int:
    """The device of the axis that holds ``chunk`` in the balanced layout."""
    return chunk if chunk < size else 2 * size - 1 - chunk


def _check_bound(fn: str, axis: str) -> int:
    """Raises unless ``axis`` is bound by `context_parallel`; returns its size."""
    cx._check(fn, axis)
    bound = {b.name: b for b in cx.bound_axes()}
    b = bound.get(axis)
    if b is None or b.transform != TRANSFORM:
        by = f"by tx.{b.transform}" if b is not None else "by a jax.shard_map or jax.vmap"
        raise CollectiveError(
            f"tx.{fn}: axis {axis!r} is bound {by}, not by tx.context_parallel, so the "
            "sequence is not laid out as this function assumes (device i holds chunks i "
            f"and 2N-1-i). Wrap the step with tx.context_parallel(axis={axis!r})."
        )
    return b.size


def context_positions(seq_local: int, *, axis: str = "seq") -> jax.Array:
    """The global positions of the tokens this device holds along its sequence dimension.

    Inside `context_parallel`, a device holds chunks ``i`` and ``2N - 1 - i`` of the
    sequence (``N`` the axis size, ``i`` this device's index), not a contiguous slice.
    Compute RoPE angles, position embeddings and masks from these positions, never from
    ``jnp.arange(seq_local)``.

    Args:
      seq_local: the local sequence length (``x.shape[seq_dim]`` inside the body).
      axis: the mesh axis of the `context_parallel` transform.

    Returns:
      An ``int32`` array of shape ``(seq_local,)``.

    Raises:
      CollectiveError: ``axis`` is not bound by `context_parallel`.
      PlanError: ``seq_local`` is odd (the transform always gives an even length).

    Examples:
      >>> import jax.numpy as jnp, titanax as tx
      >>> @tx.context_parallel(axis="seq", mesh=tx.mesh(seq=8))
      ... def positions(tokens):
      ...     pos = tx.context_positions(tokens.shape[1], axis="seq")
      ...     return tx.context_gather(pos[None], axis="seq", dim=1)
      >>> positions(jnp.zeros((1, 16)))
      Array([[ 0,  1,  2,  3,  4,  5,  6,  7,  8,  9, 10, 11, 12, 13, 14, 15]], dtype=int32)
    """
    size = _check_bound("context_positions", axis)
    if seq_local % 2:
        raise PlanError(
            f"tx.context_positions(axis={axis!r}): seq_local={seq_local} is odd; a device "
            "holds two equal chunks of the sequence. Pass x.shape[seq_dim] of a batch leaf."
        )
    c = seq_local // 2
    i = cx.axis_index(axis)
    first = i * c + jnp.arange(c, dtype=jnp.int32)
    second = (2 * size - 1 - i) * c + jnp.arange(c, dtype=jnp.int32)
    return jnp.concatenate([first, second]).astype(jnp.int32)


def context_gather(x: Any, *, axis: str = "seq", dim: int = 1) -> Any:
    """Gathers per-token values along ``axis`` into the whole sequence, in the user's order.

    ``tx.all_gather(x, axis, axis=dim, tiled=True)`` would return the chunks in the
    balanced order of `chunk_order`; this returns them as the user passed the tokens. The
    result is the same on every device of ``axis``, so the step may return it.

    Args:
      x: an array or a pytree of arrays, each with the local sequence on dimension ``dim``.
      axis: the mesh axis of the `context_parallel` transform.
      dim: the sequence dimension of ``x``.

    Returns:
      ``x`` with dimension ``dim`` the whole sequence, in token order.

    Raises:
      CollectiveError: ``axis`` is not bound by `context_parallel`.
    """
    size = _check_bound("context_gather", axis)
    order = chunk_order(size)
    back = [order.index(c) for c in range(2 * size)]

    def one(v: jax.Array) -> jax.Array:
        whole = cx.all_gather(v, axis, axis=dim, tiled=True)
        shape = whole.shape
        chunks = whole.reshape(*shape[:dim], 2 * size, shape[dim] // (2 * size), *shape[dim + 1 :])
        return jnp.take(chunks, jnp.asarray(back), axis=dim).reshape(shape)

    return jax.tree.map(one, x)


def _balance(x: jax.Array, axis: str, size: int, dim: int) -> jax.Array:
    """A contiguous shard (chunks ``2i``, ``2i + 1``) to the balanced one (``i``, ``2N-1-i``).

    Two ``ppermute`` of half a shard: device ``i`` sends chunk ``2i + h`` to the device
    that holds it. Each device receives one even and one odd chunk; which one goes first
    depends on its parity.
    """
    if size == 1:
        return x
    halves = jnp.split(x, 2, axis=dim)
    got = []
    for h, half in enumerate(halves):
        perm = [(i, _dest(2 * i + h, size)) for i in range(size)]
        # An identity exchange (h=0 for N=2) stays local.
        got.append(half if all(a == b for a, b in perm) else cx.ppermute(half, axis, perm))
    even = cx.axis_index(axis) % 2 == 0
    first = jnp.where(even, got[0], got[1])
    second = jnp.where(even, got[1], got[0])
    return jnp.concatenate([first, second], axis=dim)


def _layout(axis: str, seq_dim: int) -> LayoutHook:
    """Batches split on ``seq_dim`` along ``axis`` (two chunks a device); the rest replicated."""
    fix = (
        "Pad the sequence to a multiple of 2 x the axis size (two chunks per device, for the "
        "causal load balance), set seq_dim= to the sequence dimension, or pass non-batch "
        "arguments outside batch_argnums."
    )

    def layout(arg: Any, info: ArgInfo) -> Any:
        if not info.is_own_batch:
            return replicate(arg)
        return split_batch(arg, info, dim=seq_dim, chunks=2, fix=fix)

    return layout


def _prepare(axis: str, seq_dim: int) -> PrepareHook:
    """Every batch leaf moved from the contiguous split to the balanced layout, inside the
    program, before the body sees it."""

    def prepare(args: tuple[Any, ...], trace: TraceInfo) -> tuple[Any, ...]:
        size = trace.mesh.shape[axis]
        for i in sorted(trace.own_batch):
            for path, spec in zip(
                (p for p, _ in leaves_with_paths(trace.args[i])),
                jax.tree.leaves(trace.specs[i], is_leaf=lambda s: isinstance(s, PartitionSpec)),
            ):
                if spec[seq_dim] != axis:  # another layer splits the sequence dimension too
                    raise PlanError(
                        f"context_parallel(axis={axis!r}, seq_dim={seq_dim}): dimension "
                        f"{seq_dim} of argument {i}{f' [{path}]' if path else ''} is laid out "
                        f"{spec[seq_dim]!r}, "
                        f"split by another layer too. The balanced layout needs the sequence "
                        f"split along {axis!r} alone: give the other layer another dimension "
                        "(data_parallel splits dimension 0: use seq_dim >= 1)."
                    )
        return tuple(
            jax.tree.map(lambda x: _balance(x, axis, size, seq_dim), a)
            if i in trace.own_batch
            else a
            for i, a in enumerate(args)
        )

    return prepare


@overload
def context_parallel(
    step: None = None,
    /,
    *,
    axis: str = "seq",
    mesh: Mesh | None = None,
    batch_argnums: int | Sequence[int] = (-1,),
    seq_dim: int = 1,
) -> Callable[[Callable[..., Any]], ParallelFunction]: ...


@overload
def context_parallel(
    step: Callable[..., Any],
    /,
    *,
    axis: str = "seq",
    mesh: Mesh | None = None,
    batch_argnums: int | Sequence[int] = (-1,),
    seq_dim: int = 1,
) -> ParallelFunction: ...


def context_parallel(
    step: Callable[..., Any] | None = None,
    /,
    *,
    axis: str = "seq",
    mesh: Mesh | None = None,
    batch_argnums: int | Sequence[int] = (-1,),
    seq_dim: int = 1,
) -> ParallelFunction | Callable[[Callable[..., Any]], ParallelFunction]:
    """Splits the sequence of every batch argument along the mesh axis ``axis``.

    Every leaf of a batch argument is cut on dimension ``seq_dim`` into ``2N`` equal
    chunks (``N`` the size of ``axis``) and device ``i`` receives chunks ``i`` and
    ``2N - 1 - i``, in that order: under a causal mask every device then does the same
    attention work. All batch leaves (tokens, targets, masks) get the same layout, so
    per-token values stay aligned. Every other argument is replicated along ``axis``.

    The body sees local chunks, like `data_parallel`'s replicas: use
    `tx.ring_attention` or `tx.ulysses_attention` for attention across the whole
    sequence, `tx.context_positions` for the global positions of the local tokens (RoPE,
    masks), and `tx.context_gather` to return per-token values in the user's token
    order. **You** reduce gradients and metrics (``tx.pmean(grads, "seq")``, with
    ``("data", "seq")`` under `data_parallel` too); a replicated output that may still
    differ along ``axis`` is a `PlanError`, as for any manual axis.

    The balanced layout costs one exchange of the batch per step (two ``ppermute`` of
    half a shard per batch leaf, inside the program): small for token ids.

    Args:
      step: the step function; omit it to use ``context_parallel(...)`` as a decorator.
      axis: the mesh axis to split the sequence over.
      mesh: the mesh; defaults to one given to another transform of the stack, or set
        with ``jax.set_mesh``.
      batch_argnums: positions of the batch arguments (negative counts from the end).
      seq_dim: the sequence dimension of every batch leaf (1 for ``(batch, seq, ...)``).

    Returns:
      A `ParallelFunction`.

    Raises:
      PlanError: a bad ``axis``, ``mesh``, ``batch_argnums`` or ``seq_dim``; at call time,
        a batch leaf without dimension ``seq_dim`` or whose length there does not divide
        by ``2N``, or replicated outputs that may differ along ``axis``.

    Examples:
      >>> import jax, jax.numpy as jnp, titanax as tx
      >>> mesh = tx.mesh(data=2, seq=4)
      >>> @tx.data_parallel(axis="data", mesh=mesh)
      ... @tx.context_parallel(axis="seq")
      ... def mean_token(w, tokens):                    # tokens: (batch, seq)
      ...     local = jnp.mean(tokens * w)
      ...     return tx.pmean(local, ("data", "seq"))
      >>> float(mean_token(2.0, jnp.arange(32.0).reshape(2, 16)))
      31.0
    """
    if not isinstance(seq_dim, int) or isinstance(seq_dim, bool) or seq_dim < 0:
        raise PlanError(
            f"context_parallel(axis={axis!r}): seq_dim must be a non-negative int (the "
            f"sequence dimension of every batch leaf, e.g. 1 for (batch, seq, ...)), got "
            f"{seq_dim!r}."
        )
    layer = Layer(
        transform=TRANSFORM,
        axis=axis,
        manual=True,
        layout=_layout(axis, seq_dim),
        mesh=mesh,
        batch_argnums=batch_argnums,
        donate=True,
        prepare=_prepare(axis, seq_dim),
    )
    return apply_layer(step, layer)
