"""Writing a transform: the public API the built-in transforms are written with.

A transform is a `Layer` applied to a step with `apply_layer`. The layer names the mesh
axis it owns, whether the body sees per-device values along it (``manual=True``, as in
``tx.data_parallel``) or global arrays that XLA partitions (``manual=False``, as in
``tx.tensor_parallel``), and how it lays out each argument (its ``layout`` hook, told
about the argument by an `ArgInfo`). Layers applied to one step merge into one
``jax.jit(jax.shard_map(...))`` program, whatever transforms they come from; the
checks every built-in transform gets (outputs that still differ along a manual axis,
donation, deleted inputs, a mesh without the axis) apply to a new layer as they are.

Two optional hooks run while the body is traced, told about the call by a `TraceInfo`:
``enter`` (a context, for helpers called inside the body that need to know the plan)
and ``prepare`` (moves the arguments inside the program before the body sees them).

``tx.data_parallel``, ``tx.fully_sharded``, ``tx.tensor_parallel``,
``tx.context_parallel`` and ``tx.expert_parallel`` are each one `Layer`. See
docs/writing_a_transform.md for a worked example.
"""

from titanax.parallel.collectives import BoundAxis, bound_axes
from titanax.parallel.function import ParallelFunction, apply_layer
from titanax.parallel.layer import (
    ArgInfo,
    EnterHook,
    Layer,
    LayoutHook,
    PrepareHook,
    TraceInfo,
    replicate,
    split_batch,
)

__all__ = [
    "Layer",
    "apply_layer",
    "ArgInfo",
    "TraceInfo",
    "LayoutHook",
    "EnterHook",
    "PrepareHook",
    "split_batch",
    "replicate",
    "bound_axes",
    "BoundAxis",
    "ParallelFunction",
]
