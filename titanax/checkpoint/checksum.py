"""Checksums of an array's global value, whatever its layout, computed where it lies.

A restore may lay an array out on another mesh, in another number of processes, than
the save did, and no process holds all of a large array. So the checksum is a function
of the global value alone that each device can compute on its own block and that adds
up exactly: the sum, modulo 2**32, over every 32-bit word ``w`` of the value at flat
position ``p`` (row-major, over the value's words) of ``fmix32(w + p * 0x9E3779B9)``,
MurmurHash3's finalizer. Integer sums are exact in any order, so the devices' partial
sums and XLA's reduction order do not matter. ``fmix32`` is a bijection, so a change to
any one word always changes the checksum; changes to several words, or words moved to
other positions (a misplaced block), go unnoticed with probability 2**-32.

Each distinct block is summed once: replicas of a block (along mesh axes that the spec
does not name) add zero, so a replicated state costs no more than a sharded one. The
sum runs on the devices as one small program per leaf layout, cached like any jitted
function; in a multi-process run it is a collective, called by every process.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["ALGORITHM", "checksums"]

ALGORITHM = "fmix32-sum"  # recorded in the metadata; a new algorithm gets a new name

_U32 = jnp.uint32
_GOLDEN = 0x9E3779B9


def checksums(arrays: Sequence[Any]) -> list[int]:
    """The checksum of each array (a ``jax.Array`` or a numpy array) as a Python int.

    Every device computes its blocks' share at once; one transfer brings the results.
    """
    sums = [_dispatch(x) for x in arrays]
    return [int(s) for s in jax.device_get(sums)]


def _dispatch(x: Any) -> Any:
    if math.prod(np.shape(x)) == 0:
        return 0
    if not isinstance(x, jax.Array):
        return _host(np.asarray(x))
    sharding = x.sharding
    if isinstance(sharding, NamedSharding) and _divides(x.shape, sharding):
        return _sharded(sharding.mesh, _full_spec(sharding.spec, x.ndim))(x)
    return _whole(x)  # one device, or a layout shard_map cannot take: the global value


def _host(x: np.ndarray) -> Any:
    """A numpy array on this process's first device, as words when JAX cannot hold its dtype
    (64-bit types with ``jax_enable_x64`` off): the same words `_words` takes from it."""
    if jax.dtypes.canonicalize_dtype(x.dtype) != x.dtype:
        x = np.ascontiguousarray(x)
        lanes = (2, 2) if x.dtype.kind == "c" else (2,)
        x = x.view(np.uint32).reshape(x.shape + lanes)
    return _whole(jax.device_put(x, jax.local_devices()[0]))


def _full_spec(spec: PartitionSpec, ndim: int) -> tuple[tuple[str, ...], ...]:
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    return tuple(() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries)


def _divides(shape: tuple[int, ...], sharding: NamedSharding) -> bool:
    mesh_shape = sharding.mesh.shape
    spec = _full_spec(sharding.spec, len(shape))
    return all(n % math.prod(mesh_shape[a] for a in axes) == 0 for n, axes in zip(shape, spec))


def _words(x: jax.Array) -> jax.Array:
    """The value as uint32 words: one per element of up to 32 bits (zero-extended), two per
    64-bit element (a trailing axis, little end first), real then imaginary for complex."""
    if x.dtype == jnp.bool_:
        return x.astype(_U32)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    info = jnp.finfo(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype)
    if info.bits == 64:
        return lax.bitcast_convert_type(x, _U32)
    unsigned = {2: jnp.uint2, 4: jnp.uint4, 8: jnp.uint8, 16: jnp.uint16, 32: _U32}[info.bits]
    return lax.bitcast_convert_type(x, unsigned).astype(_U32)


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * _U32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * _U32(0xC2B2AE35)
    return h ^ (h >> 16)


def _block_sum(x: jax.Array, offsets: Sequence[Any], shape: tuple[int, ...]) -> jax.Array:
    """The sum over a block of the value of global shape ``shape`` whose first element sits at
    ``offsets`` (one per axis of the value; words axes start at 0)."""
    w = _words(x)
    global_shape = shape + w.shape[x.ndim :]
    strides = [math.prod(global_shape[d + 1 :]) % 2**32 for d in range(w.ndim)]
    position = _U32(0)
    for d in range(w.ndim):
        index = lax.broadcasted_iota(_U32, w.shape, d)
        if d < len(offsets):
            index = index + offsets[d]
        position = position + index * _U32(strides[d])
    return jnp.sum(_fmix32(w + position * _U32(_GOLDEN)), dtype=_U32)


@jax.jit
def _whole(x: jax.Array) -> jax.Array:
    return _block_sum(x, [_U32(0)] * x.ndim, x.shape)


@functools.lru_cache(maxsize=256)
def _sharded(mesh: Any, spec: tuple[tuple[str, ...], ...]) -> Any:
    """A jitted sum for arrays laid out as ``spec`` on ``mesh``: each device sums its block at
    its global offset, replicas of a block add zero, and a ``psum`` adds the blocks."""
    named = {a for axes in spec for a in axes}
    replicated = [a for a in mesh.axis_names if a not in named and mesh.shape[a] > 1]

    def body(block: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        offsets = []
        for n, axes in zip(block.shape, spec):
            index = _U32(0)
            for a in axes:  # the first axis named is the major one
                index = index * _U32(mesh.shape[a]) + lax.axis_index(a).astype(_U32)
            offsets.append(index * _U32(n))
        first = jnp.bool_(True)
        for a in replicated:
            first = first & (lax.axis_index(a) == 0)
        mine = lax.cond(first, lambda b: _block_sum(b, offsets, shape), lambda b: _U32(0), block)
        return lax.psum(mine, tuple(mesh.axis_names))

    @jax.jit
    def run(x: jax.Array) -> jax.Array:
        f = jax.shard_map(
            functools.partial(body, shape=x.shape),
            mesh=mesh,
            in_specs=PartitionSpec(*[axes or None for axes in spec]),
            out_specs=PartitionSpec(),
            # The branches of the cond vary over different axes (the zero over none); the
            # psum over every axis makes the result replicated, which is all out_specs says.
            check_vma=False,
        )
        return f(x)

    return run
