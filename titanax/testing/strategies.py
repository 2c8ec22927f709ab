"""Hypothesis strategies for meshes, layouts and pipeline schedules."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from titanax.errors import MeshError, RuleError, ScheduleError
from titanax.mesh import mesh as _make_mesh
from titanax.parallel import schedules as _schedules
from titanax.parallel.schedules import Schedule

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy


# --- hypothesis strategies ---------------------------------------------------------------------


def _strategies() -> Any:
    try:
        import hypothesis.strategies as st
    except ImportError as e:  # pragma: no cover - hypothesis is in the dev extra
        raise ImportError(
            "titanax.testing's strategies need hypothesis: pip install hypothesis "
            "(it is in titanax's dev extra)."
        ) from e
    return st


def _positive(where: str, name: str, value: Any, error: type[Exception]) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise error(f"{where}: {name} must be a positive int, got {value!r}.")
    return int(value)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def meshes(
    num_devices: int | None = None,
    *,
    axis_names: Sequence[str] = ("data", "model", "stage"),
    max_axes: int = 3,
) -> SearchStrategy[Mesh]:
    """A hypothesis strategy for meshes built with :func:`titanax.mesh`.

    A drawn mesh has the first ``k`` of ``axis_names`` (``1 <= k <= max_axes``),
    in that order, so the first name is always there. Each size divides what
    the sizes before it leave of ``num_devices``, so the sizes multiply to a
    divisor of ``num_devices``. A mesh smaller than all the devices uses the
    first devices of ``jax.devices()``. Hypothesis shrinks towards fewer axes
    and sizes of 1.

    Args:
      num_devices: the device count that the sizes divide; defaults to
        ``len(jax.devices())``, looked up when a mesh is drawn.
      axis_names: the axis names, in mesh order.
      max_axes: the most axes a mesh has.

    Returns:
      A ``SearchStrategy`` of :class:`jax.sharding.Mesh` with ``Auto`` axes (as `titanax.mesh` builds them).

    Raises:
      MeshError: ``axis_names`` empty, repeated or not strings, or
        ``num_devices`` or ``max_axes`` not a positive int; when a mesh is
        drawn, ``num_devices`` larger than the device count.
      ImportError: hypothesis is not installed.

    Examples:
      >>> import math
      >>> from hypothesis import given, settings
      >>> from titanax.testing import meshes
      >>> @settings(max_examples=10, deadline=None)
      ... @given(meshes(axis_names=("data", "model"), max_axes=2))
      ... def test_sizes(mesh):
      ...     assert mesh.axis_names[0] == "data"
      ...     assert 8 % math.prod(mesh.devices.shape) == 0
      >>> test_sizes()
    """
    where = "titanax.testing.meshes"
    names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
    if not names or len(set(names)) != len(names) or not all(isinstance(a, str) for a in names):
        raise MeshError(f"{where}: axis_names must be distinct strings, got {axis_names!r}.")
    n_max = None if num_devices is None else _positive(where, "num_devices", num_devices, MeshError)
    k_max = min(_positive(where, "max_axes", max_axes, MeshError), len(names))
    st = _strategies()

    @st.composite
    def draw_mesh(draw: Any) -> Mesh:
        available = len(jax.devices())
        n = available if n_max is None else n_max
        if n > available:
            raise MeshError(f"{where}: num_devices={n}, but there are only {available} devices.")
        k = draw(st.integers(1, k_max))
        sizes, left = [], n
        for _ in range(k):
            size = draw(st.sampled_from(_divisors(left)))
            sizes.append(size)
            left //= size
        used = math.prod(sizes)
        devices = None if used == available else jax.devices()[:used]
        return _make_mesh(devices, **dict(zip(names, sizes)))

    return draw_mesh()


def partition_specs(
    shape: Sequence[int], mesh: Mesh, *, axis_names: Sequence[str] | None = None
) -> SearchStrategy[PartitionSpec]:
    """A hypothesis strategy for ``PartitionSpec`` values that lay out ``shape`` on ``mesh``.

    Each mesh axis is used at most once, and each dimension is divisible by
    the product of the sizes of the axes that split it, so every drawn spec
    passes the checks of :class:`titanax.Rules`. Several axes may split one
    dimension (``P(("data", "model"))``); trailing ``None`` entries are
    dropped, so the fully replicated layout is ``P()``, which hypothesis
    shrinks towards.

    Args:
      shape: the array's shape.
      mesh: the mesh.
      axis_names: the mesh axes a spec may use; defaults to all of them.

    Returns:
      A ``SearchStrategy`` of :class:`jax.sharding.PartitionSpec`.

    Raises:
      RuleError: a shape that is not a sequence of non-negative ints, or an
        axis name that is not in the mesh.
      ImportError: hypothesis is not installed.

    Examples:
      >>> from hypothesis import given, settings
      >>> import titanax as tx
      >>> from titanax.testing import partition_specs
      >>> from titanax.parallel.rules import spec_problem
      >>> mesh = tx.mesh(data=4, model=2)
      >>> @settings(max_examples=10, deadline=None)
      ... @given(partition_specs((8, 6), mesh))
      ... def test_valid(spec):
      ...     assert spec_problem((8, 6), spec, mesh) is None
      >>> test_valid()
    """
    where = "titanax.testing.partition_specs"
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        dims = (-1,)
    if any(d < 0 for d in dims):
        raise RuleError(f"{where}: shape must be a sequence of non-negative ints, got {shape!r}.")
    axes = tuple(mesh.axis_names if axis_names is None else axis_names)
    unknown = [a for a in axes if a not in mesh.shape]
    if unknown:
        raise RuleError(
            f"{where}: axis {unknown[0]!r} is not in the mesh (axes: {', '.join(mesh.axis_names)})."
        )
    st = _strategies()

    @st.composite
    def draw_spec(draw: Any) -> PartitionSpec:
        split: list[list[str]] = [[] for _ in dims]
        parts = [1] * len(dims)
        for axis in draw(st.permutations(axes)):
            size = mesh.shape[axis]
            fits = [d for d, n in enumerate(dims) if n % (parts[d] * size) == 0]
            d = draw(st.sampled_from([None, *fits]))
            if d is not None:
                split[d].append(axis)
                parts[d] *= size
        entries: list[Any] = [None if not s else s[0] if len(s) == 1 else tuple(s) for s in split]
        while entries and entries[-1] is None:
            entries.pop()
        return PartitionSpec(*entries)

    return draw_spec()


def schedules(
    max_stages: int = 4,
    max_microbatches: int = 8,
    *,
    names: Sequence[str] = _schedules.NAMES,
    stages: int | None = None,
    max_virtual_stages: int = 3,
) -> SearchStrategy[Schedule]:
    """A hypothesis strategy for pipeline schedules, built with :func:`titanax.schedules.get`.

    Draws a name, a stage count (``1 .. max_stages``) and a microbatch count
    (``1 .. max_microbatches``). For ``"interleaved_1f1b"`` it also draws
    ``virtual_stages`` (``2 .. max_virtual_stages``) and a microbatch count
    that is a multiple of the stage count, as that schedule needs;
    ``"zero_bubble_v"`` holds two stages per device; the others hold one. Every drawn schedule is validated.

    Args:
      max_stages: the most devices along the pipeline axis.
      max_microbatches: the most microbatches.
      names: the schedules to draw from; defaults to all of them.
      stages: a fixed stage count (the size of your mesh's stage axis)
        instead of drawing one.
      max_virtual_stages: the most model stages per device for ``"interleaved_1f1b"``.

    Returns:
      A ``SearchStrategy`` of :class:`titanax.Schedule`.

    Raises:
      ScheduleError: an unknown name (the allowed ones are listed), a size
        that is not a positive int, ``max_virtual_stages < 2`` or fewer
        microbatches than stages with ``"interleaved_1f1b"`` among ``names``.
      ImportError: hypothesis is not installed.

    Examples:
      >>> from hypothesis import given, settings
      >>> from titanax.testing import schedules
      >>> @settings(max_examples=20, deadline=None)
      ... @given(schedules(max_stages=4, max_microbatches=8))
      ... def test_bubble(s):
      ...     assert s.validate() is s and 0 <= s.bubble_fraction < 1
      >>> test_bubble()
    """
    where = "titanax.testing.schedules"
    chosen = (names,) if isinstance(names, str) else tuple(names)
    bad = [n for n in chosen if n not in _schedules.NAMES]
    if bad or not chosen:
        allowed = ", ".join(repr(n) for n in _schedules.NAMES)
        raise ScheduleError(
            f"{where}: names must be some of {allowed}; got {bad[0] if bad else 'none'!r}."
        )
    m_max = _positive(where, "max_microbatches", max_microbatches, ScheduleError)
    if stages is None:
        p_max = _positive(where, "max_stages", max_stages, ScheduleError)
    else:
        p_max = _positive(where, "stages", stages, ScheduleError)
    v_max = _positive(where, "max_virtual_stages", max_virtual_stages, ScheduleError)
    if "interleaved_1f1b" in chosen:
        if v_max < 2:
            raise ScheduleError(
                f"{where}: 'interleaved_1f1b' needs max_virtual_stages >= 2, got {v_max}."
            )
        if stages is not None and m_max < stages:
            raise ScheduleError(
                f"{where}: 'interleaved_1f1b' needs at least stages={stages} microbatches, "
                f"but max_microbatches={m_max}."
            )
    st = _strategies()

    @st.composite
    def draw_schedule(draw: Any) -> Schedule:
        name = draw(st.sampled_from(chosen))
        interleaved = name == "interleaved_1f1b"
        top = min(p_max, m_max) if interleaved else p_max
        p = p_max if stages is not None else draw(st.integers(1, top))
        if interleaved:
            m = p * draw(st.integers(1, m_max // p))
            v = draw(st.integers(2, v_max))
        elif name == "zero_bubble_v":  # two stages per device, in a V
            m, v = draw(st.integers(1, m_max)), 2
        else:
            m, v = draw(st.integers(1, m_max)), 1
        return _schedules.get(name, stages=p, microbatches=m, virtual_stages=v)

    return draw_schedule()
