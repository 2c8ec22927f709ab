"""``ParallelFunction``: a plan compiled once (per argument structure, see `entry`) as
``jax.jit(jax.shard_map(body, axis_names=manual_axes, ...))``, and called.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
from jax._src.array import ArrayImpl
from jax.sharding import PartitionSpec

from titanax._util import Report, bullets, leaves_with_paths, shape_of
from titanax.distributed.progress import COUNTER as _PROGRESS
from titanax.errors import DistributedError, PlanError
from titanax.parallel import hlo
from titanax.parallel.collectives import bound_axes
from titanax.parallel.entry import Entry, OtherShapes, dtype_of
from titanax.parallel.outputs import top_level
from titanax.parallel.plan import Layer, Plan, _spec_leaves, context_mesh
from titanax.parallel.rules import layout_table

__all__ = ["ParallelFunction", "apply_layer"]

P = PartitionSpec


# What every concrete jax.Array is (jax pinned < 0.11); named here, not made with
# jnp.zeros, so that importing titanax does not start a backend.
_ARRAY = ArrayImpl


class ParallelFunction:
    """A step function with a parallel plan: what every Titanax transform returns.

    Call it like the function it wraps. The first call for an argument
    structure lays out the arguments, traces the function once, checks the
    traced program and compiles ``jax.jit(jax.shard_map(...))``; later calls
    are a cache lookup and one compiled call. Wrapping it with another
    transform merges the plans; the result is still one program.

    It composes with JAX and Python as a jitted function does: call it inside
    your own ``jax.jit`` or under ``jax.grad`` (the arrays are then traced and
    laid out by the program's shardings; nothing is donated), pass arguments
    by keyword (bound to their positions by the function's signature), or
    decorate a method (``self`` is bound as a constant of the program, like a
    closure; positions in ``batch_argnums`` do not count it).

    Arrays it returns are laid out on an ``Auto`` view of the mesh (same
    devices and axis names): they work in ordinary JAX code (``jax.jit``,
    eager indexing, third-party models) whatever the mesh's axis types.

    Attributes:
      fun: the wrapped step function.
      plan: the merged `Plan`.
    """

    def __init__(self, fun: Callable[..., Any], plan: Plan):
        if isinstance(fun, ParallelFunction):
            raise TypeError(
                "wrap ParallelFunction.fun, not the ParallelFunction"
            )  # internal misuse
        self.fun = fun
        self.plan = plan
        self._cache: dict[Any, Entry] = {}  # by structure, shapes and dtypes
        self._recent: dict[Any, Entry] = {}  # by structure: the steady-state lookup
        self._attr: str | None = None  # the attribute name, when defined in a class
        functools.update_wrapper(self, fun)

    def with_layer(self, layer: Layer) -> ParallelFunction:
        """The same function under one more transform (used by the transforms)."""
        return ParallelFunction(self.fun, self.plan.add(layer))

    def __repr__(self) -> str:
        stack = " + ".join(layer.describe() for layer in self.plan.layers)
        return f"<ParallelFunction {getattr(self.fun, '__name__', self.fun)!r}: {stack}>"

    # -- methods: ``@tx.data_parallel`` on a ``def step(self, state, batch)`` ---------------

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        name = self._attr or getattr(self.fun, "__name__", "step")
        cache = getattr(obj, "__dict__", None)
        if cache is None:
            raise PlanError(
                f"{self!r} is a method of {type(obj).__name__}, whose instances have no "
                "__dict__ (__slots__) to keep the compiled program in, so every call would "
                "compile again. Define the step as a function, or give the class a __dict__."
            )
        # Kept under a private name, so every lookup comes back here and checks that the
        # cached step is bound to this very object (a copy.copy of obj shares its __dict__
        # entries, and must not run with the original's self).
        key = f"_titanax_bound_{name}"
        bound = cache.get(key)
        if isinstance(bound, ParallelFunction) and bound.fun.args[0] is obj:  # type: ignore[attr-defined]
            return bound
        bound = ParallelFunction(functools.partial(self.fun, obj), self.plan)
        functools.update_wrapper(bound, self.fun)
        bound._attr = name
        cache[key] = bound
        return bound

    # -- calls ---------------------------------------------------------------------------

    def _key(self, treedef: Any) -> Any:
        # The context mesh is part of the key even when the plan has its own: a call
        # under another `jax.set_mesh` is then checked again (a PlanError), not run.
        return treedef, context_mesh()

    def _entry(self, args: tuple[Any, ...]) -> Entry:
        """The compiled entry for the structure, shapes and dtypes of ``args``."""
        leaves, treedef = jax.tree.flatten(args)
        key = self._key(treedef)
        full = (key, tuple((shape_of(x), dtype_of(x)) for x in leaves))
        entry = self._cache.get(full)
        if entry is None:
            entry = self._cache[full] = Entry(self, args)
        self._recent[key] = entry
        return entry

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Keyword arguments moved to their positions by the function's signature.

        The call becomes the positional call it stands for: parameters up to the last one
        given, with defaults only for the gaps (``step(w, batch=x)`` is ``step(w, x)``, so
        ``batch_argnums=(-1,)`` names the same argument either way).
        """
        name = getattr(self.fun, "__name__", "the step")
        try:
            sig = inspect.signature(self.fun)
            bound = sig.bind(*args, **kwargs)
        except (TypeError, ValueError) as e:
            raise PlanError(f"{name}: the arguments do not fit its signature: {e}.") from None
        positional = [
            p
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        named = {p.name for p in positional}
        other = sorted(k for k in bound.arguments if k not in named)
        if other:
            raise PlanError(
                f"{name}: keyword arguments are placed by their position in the signature, "
                f"but {', '.join(other)} has none (keyword-only or **kwargs). Make them "
                "positional parameters, or bind constants with functools.partial before "
                "applying the transform."
            )
        last = max(k for k, p in enumerate(positional) if p.name in bound.arguments)
        return tuple(
            bound.arguments[p.name] if p.name in bound.arguments else p.default
            for p in positional[: last + 1]
        )

    def _check_not_nested(self) -> None:
        """Raises when called inside another Titanax step that binds one of our axes."""
        outer = {b.name: b for b in bound_axes()}
        clash = [lay for lay in self.plan.layers if lay.axis in outer]
        if clash:
            lay = clash[0]
            raise PlanError(
                f"{lay.describe()}: {self!r} is called inside another Titanax step whose "
                f"tx.{outer[lay.axis].transform} already binds axis {lay.axis!r}. Transforms "
                "compose by wrapping, not by calling one step inside another: call the inner "
                f"function itself (`{getattr(self.fun, '__name__', 'step')}.fun`), or wrap it "
                "with the outer transform."
            )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Progress, for `titanax launch --hang-timeout`: calls begun and ended (two integer
        # increments and a frame, about 0.1 us; no device sync).
        _PROGRESS.begun += 1
        try:
            return self._call(args, kwargs)
        finally:
            _PROGRESS.ended += 1

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs:
            args = self._bind(args, kwargs)
        leaves, treedef = jax.tree.flatten(args)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            # Inside the user's jax.jit / jax.grad: one more jit in their trace.
            self._check_not_nested()
            return self._entry(args).jitted(*args)
        # Steady state: one flatten, one dict lookup, one compiled call. Host arrays
        # (numpy batches) are placed by jit itself, as its in_shardings say.
        entry = self._recent.get(self._key(treedef))
        ids = {id(x) for x in leaves}
        if (
            entry is not None
            and not entry.multiprocess
            and len(ids) == len(leaves)
            and ids.isdisjoint(entry.const_ids)
            # A donated (deleted) array must not reach the executable: jaxlib 0.10.2 logs
            # "Buffer has been deleted or donated" and then crashes the process (SIGSEGV).
            # (`type(x) is`, not isinstance: the jax.Array ABC check costs ~1 us a leaf.)
            and not any(type(x) is _ARRAY and x.is_deleted() for x in leaves)
        ):
            try:
                return entry.jitted(*args)
            except OtherShapes:
                pass  # shapes or dtypes of another entry: found below
            except (ValueError, RuntimeError):
                # Look for the cheap causes; anything else is the user's error, re-raised.
                entry.check_inputs(args, self.fun)
                if entry.fits(leaves) and not entry.misplaced(args):
                    raise
        entry = self._entry(args)
        entry.check_inputs(args, self.fun)
        jitted = entry.jitted  # traced and checked: nothing is donated before this passes
        placed = entry.place(entry.unalias(args), for_jit=True)
        try:
            return jitted(*placed)
        except jax.errors.JaxRuntimeError as e:
            if not entry.multiprocess:
                raise
            raise DistributedError(
                f"process {jax.process_index()} of {jax.process_count()}: a step of "
                f"{getattr(self.fun, '__name__', 'the function')} failed while communicating "
                f"with the other processes; one of them has probably died ({e}). Restart the job "
                "from the newest checkpoint."
            ) from e

    def place(self, *args: Any) -> tuple[Any, ...]:
        """The arguments placed on the mesh as the plan lays them out.

        Arrays already laid out as planned are returned as they are (no copy).

        Raises:
          PlanError, RuleError: arguments that do not fit the plan.
        """
        return self._entry(args).place(args)

    def lower(self, *args: Any) -> jax.stages.Lowered:
        """Lowers the program for these arguments (``jax.stages.Lowered``)."""
        jitted = self._entry(args).jitted  # first: tracing may lay out more inputs (claims)
        return jitted.lower(*self.place(*args))

    def specs(self, *args: Any) -> tuple[Any, Any]:
        """The ``PartitionSpec`` trees of the inputs and outputs for these arguments."""
        entry = self._entry(args)
        out_specs = entry.out_specs  # first: tracing may lay out more inputs (claims)
        return entry.in_specs, out_specs

    def explain(self, *args: Any) -> Report:
        """The layout of every input and output leaf, and the collectives the
        compiled program contains (kind, mesh axes, bytes).

        Where the program as written moves 16-bit floats over manual axes
        (``tx.pmean`` of bfloat16, ``tx.gather_params(..., dtype=jnp.bfloat16)``),
        those collectives are listed a second time as written, before XLA
        compiles them: XLA:CPU reduces bfloat16 and float16 in float32 (its
        ``AllReducePromotion``) where a GPU or TPU build keeps them 16-bit.
        """
        in_specs, out_specs = self.specs(*args)
        entry = self._entry(args)
        lowered = self.lower(*args)
        compiled = lowered.compile()
        out_avals = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), compiled.out_info
        )
        rows: list[tuple[str, Any]] = []
        specs: list[PartitionSpec] = []
        for name, arg, spec in zip(entry.names, args, in_specs):
            rows += [
                (f"{name.split(' ', 2)[-1].strip('()') or name}/{p}".rstrip("/"), x)
                for p, x in leaves_with_paths(arg)
            ]
            specs += _spec_leaves(spec)
        for k, (part, spec) in enumerate(zip(top_level(out_avals), top_level(out_specs))):
            rows += [(f"out{k}/{p}".rstrip("/"), x) for p, x in leaves_with_paths(part)]
            specs += _spec_leaves(spec)
        stack = " + ".join(layer.describe() for layer in self.plan.layers)
        mesh = ", ".join(f"{k}={v}" for k, v in entry.mesh.shape.items())
        manual = ", ".join(sorted(self.plan.manual_axes)) or "none"
        notes = [f"{lay.describe()}: {n}" for lay in self.plan.layers for n in lay.notes]
        text = (
            f"{stack} on mesh ({mesh}); manual axes: {manual}\n\n"
            + ("notes:\n" + bullets(notes, len(notes)) + "\n\n" if notes else "")
            + layout_table(rows, specs, entry.mesh)
            + "\n\n"
            + hlo.collectives_table(hlo.collectives(compiled.as_text() or "", entry.mesh))
        )
        written = hlo.collectives(lowered.as_text(dialect="hlo"), entry.mesh)
        if any(shape.startswith(("bf16", "f16")) for c in written for shape in c.shapes):
            text += (
                "\n\nAs written (manual axes, before XLA compiles; XLA:CPU may reduce 16-bit "
                "floats in float32, a GPU or TPU build keeps them):\n"
                + hlo.collectives_table(written)
            )
        return Report(text)


def apply_layer(step: Callable[..., Any] | None, layer: Layer) -> Any:
    """Applies one more `Layer` of plan to ``step``: the way every transform is made.

    A plain function becomes a `ParallelFunction` with a one-layer plan; a
    `ParallelFunction` (another transform's result) gets ``layer`` added to its plan,
    so a stack of transforms is one program. Two layers of a stack never share an
    axis, and all their meshes must be the same.

    Args:
      step: the function to wrap, a `ParallelFunction`, or ``None`` for a decorator.
      layer: the `Layer`.

    Returns:
      A `ParallelFunction`, or, when ``step`` is ``None``, a decorator returning one.

    Raises:
      PlanError: ``step`` is not callable; ``layer`` claims an axis another layer of
        the stack owns, or names a different mesh.

    Examples:
      >>> import jax.numpy as jnp, titanax as tx
      >>> from titanax.extend import Layer, apply_layer, replicate, split_batch
      >>> def layout(arg, info):
      ...     return split_batch(arg, info) if info.is_own_batch else replicate(arg)
      >>> layer = Layer(transform="replicas", axis="data", manual=True, layout=layout,
      ...               mesh=tx.mesh(data=8))
      >>> @apply_layer(None, layer)
      ... def mean(x):
      ...     return tx.pmean(jnp.mean(x), "data")
      >>> float(mean(jnp.arange(16.0)))
      7.5
    """
    if not isinstance(layer, Layer):
        raise PlanError(
            f"apply_layer: layer must be a titanax.extend.Layer, got {type(layer).__name__}."
        )

    def wrap(f: Callable[..., Any]) -> ParallelFunction:
        if isinstance(f, ParallelFunction):
            return f.with_layer(layer)
        if not callable(f):
            raise PlanError(f"{layer.describe()}: expected a function to wrap, got {f!r}.")
        return ParallelFunction(f, Plan.of((layer,)))

    return wrap if step is None else wrap(step)
