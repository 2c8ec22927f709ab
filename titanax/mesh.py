"""``tx.mesh``: a named grid of devices, validated, in host-aware order."""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from titanax.errors import MeshError

__all__ = ["mesh", "describe_devices", "host_order", "parse_axes"]

# The axis names XLA takes (measured on jax/jaxlib 0.10.2, CPU, each name in its own process:
# jit with NamedSharding, shard_map with psum, Explicit axes): any printable ASCII, the space,
# quotes and punctuation included, digits first or alone. A non-ASCII character aborts the
# process while compiling ("Check failed: absl::CUnescape ... Unknown escape sequence: \C"), a
# backslash or a control character does in some places and not others (segfaults on 'a\\',
# 'a\\0' and 'a\x12', not on 'a\\\\b' or 'a\x127'): all three are refused here.
_AXIS_NAME = re.compile(r"[ -\[\]-~]+")


def describe_devices(devices: Sequence[jax.Device]) -> str:
    """A short description of a device list, e.g. ``'8 devices (8 cpu) in 1 process'``."""
    kinds = collections.Counter(d.platform for d in devices)
    processes = len({d.process_index for d in devices})
    by_kind = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    s = "" if processes == 1 else "es"
    return f"{len(devices)} devices ({by_kind}) in {processes} process{s}"


def host_order(devices: Sequence[jax.Device]) -> list[jax.Device]:
    """Devices grouped by process, keeping their order within a process.

    Reshaped row-major into a mesh, this makes the first axis span processes
    and keeps the later axes within one host.
    """
    return sorted(devices, key=lambda d: d.process_index)


def _call(axes: dict[str, int]) -> str:
    return "tx.mesh(" + ", ".join(f"{k}={v}" for k, v in axes.items()) + ")"


def _suggest(axes: dict[str, int], n: int) -> str:
    """A corrected call for ``axes`` on ``n`` devices.

    The ``-1`` axis (or the first) takes the rest; every other axis gets the
    size nearest to the one asked for that still divides what is left.
    """
    wild = next((k for k, v in axes.items() if v == -1), next(iter(axes)))
    fixed, left = {}, n
    for name, size in axes.items():
        if name == wild:
            fixed[name] = -1
            continue
        divisors = [d for d in range(1, left + 1) if left % d == 0]
        best = min(divisors, key=lambda d: (abs(d - max(size, 1)), d))
        fixed[name], left = best, left // best
    return _call(fixed)


def parse_axes(spec: str | Sequence[str]) -> dict[str, int]:
    """Axis sizes from command-line text: ``"data=2,model=4"`` or ``["data=2", "model=4"]``.

    The result is what `mesh` takes as keywords: ``tx.mesh(**parse_axes(text))``,
    which checks the names and sizes against the devices.

    Raises:
      MeshError: an item that is not ``name=size``, a size that is not an integer,
        or an axis given twice (the first size is not silently replaced).

    Examples:
      >>> from titanax.mesh import parse_axes
      >>> parse_axes("data=-1,model=2")
      {'data': -1, 'model': 2}
      >>> parse_axes(["data=2", "data=4"])
      Traceback (most recent call last):
      ...
      titanax.errors.MeshError: axis 'data' is given twice (data=2, then data=4); give each axis once, e.g. data=4.
    """
    items = [i for i in spec.split(",") if i.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise MeshError(f"no axes given in {spec!r}; give name=size pairs, e.g. data=2,model=4.")
    axes: dict[str, int] = {}
    given: dict[str, str] = {}
    for item in items:
        name, sep, size = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise MeshError(f"axis {item!r} must look like name=size, e.g. data=2 (or data=-1).")
        if not re.fullmatch(r"-?[0-9]+", size):
            raise MeshError(
                f"axis {item!r}: the size must be an integer (-1: all remaining devices); "
                f"got {size!r}. Write e.g. {name}=2."
            )
        if name in axes:
            raise MeshError(
                f"axis {name!r} is given twice ({given[name]}, then {item.strip()}); give each "
                f"axis once, e.g. {item.strip()}."
            )
        axes[name], given[name] = int(size), item.strip()
    return axes


def mesh(devices: Sequence[jax.Device] | None = None, **axes: int) -> Mesh:
    """Builds a named device mesh with ``Auto`` axes.

    Axes are given in order, as keyword arguments ``name=size``. Sizes multiply
    to the number of devices; one size may be ``-1``, meaning "all remaining
    devices". Devices are ordered by process first, so that on several hosts
    the first axis spans the processes (put the data-parallel axis first) and
    the later axes stay within a host, where communication is fastest.

    Args:
      devices: the devices to use; defaults to ``jax.devices()``.
      **axes: axis name to size, in mesh order.

    Returns:
      A `jax.sharding.Mesh` whose axes are all ``AxisType.Auto``: layouts come from
      Titanax's transforms and rules, not from array types, so arrays laid out on it
      work in any JAX code (an ``Explicit`` axis in an array's type makes ordinary
      model code raise ``ShardingTypeError`` on a sharded contraction). Transforms
      accept meshes of any axis types and return arrays on the ``Auto`` view.

    Raises:
      MeshError: no axes, an empty axis name or one XLA cannot take (a character
        that is not printable ASCII, or a backslash), a size that is not a
        positive integer or ``-1``, more than one ``-1``, or sizes that do not
        multiply to the device count. The message shows the devices available
        and a corrected call.

    Examples:
      >>> import titanax as tx
      >>> m = tx.mesh(data=-1, model=2)          # on 8 devices
      >>> dict(m.shape)
      {'data': 4, 'model': 2}
      >>> tx.mesh(data=3, model=2)
      Traceback (most recent call last):
      ...
      titanax.errors.MeshError: tx.mesh(data=3, model=2): the axis sizes multiply to 6, but there are 8 devices (8 cpu) in 1 process. Sizes must multiply to 8; try tx.mesh(data=-1, model=2).
    """
    if devices is not None and not (
        isinstance(devices, (Sequence, np.ndarray))
        and all(isinstance(d, jax.Device) for d in np.ravel(np.asarray(devices, dtype=object)))
    ):
        raise MeshError(
            f"tx.mesh: devices must be a sequence of jax devices, got {devices!r}. "
            "Pass devices=jax.devices()[:n], or name the axes with keywords: tx.mesh(data=-1)."
        )
    devs = list(np.ravel(np.asarray(jax.devices() if devices is None else devices, dtype=object)))
    where = _call(axes)
    if not axes:
        raise MeshError(
            f"tx.mesh: no axes given. Name at least one, e.g. tx.mesh(data={len(devs)})."
        )
    if not devs:
        raise MeshError(
            f"{where}: devices is empty. Pass at least one device, e.g. "
            "devices=jax.devices()[:1], or leave devices out to use all of them."
        )
    if len(set(devs)) != len(devs):
        raise MeshError(f"{where}: the devices list holds a device more than once.")
    for name, size in axes.items():
        if not name.strip():
            raise MeshError(f"{where}: axis names must be non-empty; got {name!r}.")
        if not _AXIS_NAME.fullmatch(name):
            bad = list(dict.fromkeys(c for c in name if not _AXIS_NAME.fullmatch(c)))
            raise MeshError(
                f"{where}: axis name {name!r} has {', '.join(map(repr, bad))}, which XLA cannot "
                "take in an axis name (it aborts the process). Use printable ASCII: letters, "
                "digits, spaces and punctuation other than a backslash, e.g. 'data' or 'model_2'."
            )
        if (
            isinstance(size, bool)
            or not isinstance(size, (int, np.integer))
            or (size <= 0 and size != -1)
        ):
            raise MeshError(
                f"{where}: the size of axis {name!r} must be a positive integer or -1 "
                f"(all remaining devices); got {size!r}."
            )
    n = len(devs)
    wild = [k for k, v in axes.items() if v == -1]
    if len(wild) > 1:
        raise MeshError(
            f"{where}: only one axis may have size -1; {', '.join(map(repr, wild))} all do. "
            f"Give all but one a size, e.g. {_suggest(axes, n)}."
        )
    known = math.prod(v for v in axes.values() if v != -1)
    if wild and n % known:
        raise MeshError(
            f"{where}: the sized axes multiply to {known}, which does not divide the "
            f"{describe_devices(devs)}, so axis {wild[0]!r} cannot take the rest; "
            f"try {_suggest(axes, n)}."
        )
    if not wild and known != n:
        raise MeshError(
            f"{where}: the axis sizes multiply to {known}, but there are "
            f"{describe_devices(devs)}. Sizes must multiply to {n}; try {_suggest(axes, n)}."
        )
    shape = tuple(n // known if v == -1 else int(v) for v in axes.values())
    devs = host_order(devs)
    names = tuple(axes)
    types = (AxisType.Auto,) * len(names)
    if devices is None and jax.process_count() == 1:
        return jax.make_mesh(shape, names, axis_types=types)  # topology-aware order
    return Mesh(np.asarray(devs, dtype=object).reshape(shape), names, axis_types=types)
