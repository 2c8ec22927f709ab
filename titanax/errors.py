"""Errors Titanax raises for user mistakes.

Every error names what is at fault (argument, leaf path, axis) and how to fix
it. All subclass `TitanaxError`, itself a `ValueError`, so code
that already catches ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
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


class TitanaxError(ValueError):
    """Base class of every error Titanax raises for a user mistake."""


class MeshError(TitanaxError):
    """A device mesh that cannot be built: bad axis names or sizes."""


class RuleError(TitanaxError):
    """Sharding rules that do not fit the tree or the mesh."""


class PlanError(TitanaxError):
    """Transforms that cannot be combined, or arguments that do not fit the plan."""


class CollectiveError(TitanaxError):
    """A collective over an axis that no enclosing transform binds."""


class ScheduleError(TitanaxError):
    """A pipeline schedule that is invalid or does not fit the pipeline."""


class CheckpointError(TitanaxError):
    """A checkpoint that cannot be saved or restored as asked."""


class DistributedError(TitanaxError):
    """A multi-process set-up or run that failed."""


class DataError(TitanaxError):
    """Data that cannot be batched or a data position that cannot be resumed."""


class ConfigError(TitanaxError):
    """A configuration with an unknown key or a value of the wrong type."""


class LayerError(TitanaxError):
    """Per-layer parameter trees that cannot be stacked, or a tree that cannot be unstacked."""
