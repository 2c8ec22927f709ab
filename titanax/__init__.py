"""Titanax: explicit, composable parallelism for JAX.

Declare a mesh, sharding rules and collectives; wrap a pure step function with
``data_parallel``, ``tensor_parallel`` or ``pipeline``; write your own loop.
"""

from titanax.errors import (
    CheckpointError,
    CollectiveError,
    DistributedError,
    MeshError,
    PlanError,
    RuleError,
    ScheduleError,
    TitanaxError,
)
from titanax.mesh import mesh
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
from titanax.parallel.data_parallel import data_parallel
from titanax.parallel.plan import ParallelFunction, Plan
from titanax.parallel.rules import Rules
from titanax.state import TrainState

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CollectiveError",
    "DistributedError",
    "MeshError",
    "ParallelFunction",
    "Plan",
    "PlanError",
    "RuleError",
    "Rules",
    "ScheduleError",
    "TitanaxError",
    "TrainState",
    "all_gather",
    "all_to_all",
    "axis_index",
    "axis_size",
    "data_parallel",
    "mesh",
    "pmax",
    "pmean",
    "ppermute",
    "psum",
    "psum_scatter",
]
