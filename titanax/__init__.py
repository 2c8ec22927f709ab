"""Titanax: explicit, composable parallelism for JAX.

Declare a mesh, sharding rules and collectives; wrap a pure step function with
``data_parallel``, ``tensor_parallel`` or ``pipeline``; write your own loop.
"""

import os as _os

# JAX's CPU client runs each device's share of a program on a pool of NPROC threads
# (default: the number of cores). When simulated CPU devices outnumber those threads,
# programs with collectives deadlock once a few steps are in flight (measured with 8
# devices on 2 cores, jax 0.10.2). Give the pool room unless the user chose a size.
# This only takes effect if Titanax is imported before JAX starts its backend.
_os.environ.setdefault("NPROC", str(max(32, _os.cpu_count() or 1)))

# ruff: noqa: E402
from titanax import (
    checkpoint,
    data,
    distributed,
    extend,
    metrics,
    moe,
    testing,
)  # tx.checkpoint.Manager, tx.data.Loader, ...
from titanax.errors import (
    CheckpointError,
    CollectiveError,
    ConfigError,
    DataError,
    DistributedError,
    LayerError,
    MeshError,
    PlanError,
    RuleError,
    ScheduleError,
    TitanaxError,
)
from titanax.mesh import mesh
from titanax.parallel import rules, schedules  # tx.rules.megatron_mlp, tx.schedules.get
from titanax.parallel.attention import ring_attention, ulysses_attention
from titanax.parallel.collectives import (
    all_gather,
    all_to_all,
    axis_index,
    axis_size,
    pmax,
    pmean,
    ppermute,
    psum,
    psum_scatter,
)
from titanax.parallel.context_parallel import context_gather, context_parallel, context_positions
from titanax.parallel.data_parallel import data_parallel
from titanax.parallel.expert_parallel import expert_parallel
from titanax.parallel.fully_sharded import (
    clip_by_global_norm,
    fully_sharded,
    gather_params,
    global_norm,
    lamb,
    lars,
    leaf_norms,
    normalize_by_update_norm,
    register_whole_leaf_transform,
    scale_by_trust_ratio,
    scatter_grads,
    shard_params,
)
from titanax.parallel.function import ParallelFunction
from titanax.parallel.layers import stack_layers, unstack_layers
from titanax.parallel.pipeline import pipeline
from titanax.parallel.plan import Plan
from titanax.parallel.rules import Rules
from titanax.parallel.schedules import Action, Schedule
from titanax.parallel.tensor_parallel import constrain, tensor_parallel
from titanax.state import TrainState

__version__ = "0.1.0"

__all__ = [
    # transforms and what they return
    "data_parallel",
    "tensor_parallel",
    "pipeline",
    "fully_sharded",
    "context_parallel",
    "expert_parallel",
    "ParallelFunction",
    "Plan",
    # meshes, layouts, schedules
    "mesh",
    "Rules",
    "rules",
    "constrain",
    "schedules",
    "Schedule",
    "Action",
    # per-layer parameter trees to the stacked layout of pipeline and scan, and back
    "stack_layers",
    "unstack_layers",
    # guarded collectives
    "psum",
    "pmean",
    "pmax",
    "all_gather",
    "psum_scatter",
    "ppermute",
    "all_to_all",
    "axis_index",
    "axis_size",
    # what a fully_sharded body writes
    "gather_params",
    "scatter_grads",
    "shard_params",
    "global_norm",
    "clip_by_global_norm",
    # optimizer transforms exact on shards, and those fully_sharded refuses
    "leaf_norms",
    "scale_by_trust_ratio",
    "lamb",
    "lars",
    "normalize_by_update_norm",
    "register_whole_leaf_transform",
    # what a context_parallel body writes
    "ring_attention",
    "ulysses_attention",
    "context_positions",
    "context_gather",
    # mixture of experts: routing, token exchange, auxiliary losses (tx.moe.route, ...)
    "moe",
    # state, checkpoints, data
    "TrainState",
    "checkpoint",
    "data",
    "distributed",
    "metrics",
    "testing",
    # writing a transform: titanax.extend.Layer and apply_layer
    "extend",
    # errors
    "TitanaxError",
    "MeshError",
    "RuleError",
    "PlanError",
    "CollectiveError",
    "ScheduleError",
    "CheckpointError",
    "DistributedError",
    "DataError",
    "ConfigError",
    "LayerError",
]
