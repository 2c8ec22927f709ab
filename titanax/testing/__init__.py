"""``titanax.testing``: helpers for testing your own parallel code.

- :func:`assert_matches_reference` runs a parallel step and its single-device
  reference on the same arguments, for one or several steps, and compares every
  output leaf.
- :func:`meshes`, :func:`partition_specs` and :func:`schedules` are `hypothesis
  <https://hypothesis.readthedocs.io>`_ strategies for property tests: meshes
  that fit the devices, layouts that fit a shape, and valid pipeline schedules.
  Hypothesis is imported when a strategy is built, so this module imports
  without it.
"""

from titanax.testing.reference import assert_matches_reference
from titanax.testing.strategies import meshes, partition_specs, schedules

__all__ = ["assert_matches_reference", "meshes", "partition_specs", "schedules"]
