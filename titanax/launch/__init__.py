"""The ``titanax`` command: ``titanax launch`` and friends."""
