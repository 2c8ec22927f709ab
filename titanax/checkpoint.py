"""``tx.checkpoint``: Orbax checkpoints that restore onto any mesh.

Orbax does the storage (tensorstore, atomic commits, async saves); Titanax adds
what a parallel training run needs around it: the mesh a checkpoint was written
on, a description of every leaf so that a mismatched restore is a clear
`CheckpointError` rather than a deep traceback, JSON metadata
for the data position, and restores that lay every array out as ``like`` says,
whatever mesh it was saved from. Nothing is pickled: loading never runs code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from titanax._util import bullets, count, leaves_with_paths, shape_of
from titanax.errors import CheckpointError

__all__ = ["Manager", "abstract"]

FORMAT = "titanax-checkpoint"
VERSION = 1


def abstract(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with their shardings) for a tree of arrays.

    A restore target that allocates nothing: ``mngr.restore(like=tx.checkpoint.abstract(state))``.
    """

    def one(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


def _mesh_info(tree: Any) -> dict[str, Any] | None:
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            m = sharding.mesh
            return {
                "axis_names": list(m.axis_names),
                "axis_sizes": [int(m.shape[a]) for a in m.axis_names],
                "axis_types": [str(t).split(".")[-1] for t in m.axis_types],
            }
    return None


def _describe(tree: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for path, leaf in leaves_with_paths(tree):
        sharding = getattr(leaf, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else None
        out[path] = {
            "shape": list(shape_of(leaf)),
            "dtype": str(np.dtype(leaf.dtype)),
            "spec": None if spec is None else repr(spec),
        }
    return out


class Manager:
    """Saves and restores training states with Orbax, onto any mesh.

    Args:
      directory: where checkpoints go (one sub-directory per step).
      max_to_keep: keep only the newest this many checkpoints (``None``: all).
      async_save: write in the background while training goes on; ``wait()``
        blocks until every pending save is on disk.

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp, optax, titanax as tx
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = tx.mesh(data=8)
      >>> state = tx.TrainState.create({"w": jnp.arange(16.0)}, optax.sgd(0.1))
      >>> state = jax.device_put(state, NamedSharding(mesh, P()))
      >>> mngr = tx.checkpoint.Manager(tempfile.mkdtemp())
      >>> mngr.save(10, state, extra={"data": {"epoch": 1, "position": 3}})
      >>> mngr.wait(); mngr.all_steps()
      [10]
      >>> other = tx.mesh(devices=jax.devices()[:2], data=2)  # a different mesh
      >>> like = jax.device_put(state, NamedSharding(other, P()))
      >>> restored = mngr.restore(like=like)
      >>> restored.params["w"].sharding.mesh.shape["data"], mngr.extra()["data"]["position"]
      (2, 3)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int | None = None,
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(
                f"tx.checkpoint.Manager: {self.directory} is a file, not a directory. "
                "Pass a directory for the checkpoints."
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self._orbax = ocp.CheckpointManager(self.directory, options=options)

    def __repr__(self) -> str:
        return f"Manager({self.directory!r}, steps={self.all_steps()})"

    def save(self, step: int, state: Any, *, extra: Mapping[str, Any] | None = None) -> None:
        """Saves ``state`` (any pytree of arrays) at ``step``, with JSON-able ``extra``.

        With ``async_save`` it returns once the arrays are copied off the
        devices; writing goes on in the background.

        Raises:
          CheckpointError: a step that already exists, or ``extra`` that is not
            JSON-able.
        """
        if step in self.all_steps():
            raise CheckpointError(
                f"tx.checkpoint: step {step} already exists in {self.directory}. Save under a "
                "new step, or delete the old checkpoint first."
            )
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": int(step),
            "mesh": _mesh_info(state),
            "process_count": jax.process_count(),
            "leaves": _describe(state),
        }
        try:
            import json

            json.dumps(dict(extra or {}))
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"tx.checkpoint: extra must be JSON-able (numbers, strings, lists, dicts): {e}. "
                "Convert arrays with .tolist() or int(...)."
            ) from None
        self._orbax.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                titanax=ocp.args.JsonSave(meta),
                extra=ocp.args.JsonSave(dict(extra or {})),
            ),
        )

    def wait(self) -> None:
        """Blocks until every pending save is on disk."""
        self._orbax.wait_until_finished()

    def is_saving(self) -> bool:
        """Whether an asynchronous save is still being written."""
        return bool(self._orbax.is_saving_in_progress())

    def all_steps(self) -> list[int]:
        """The steps with a finished checkpoint, oldest first."""
        return sorted(int(s) for s in self._orbax.all_steps())

    def latest_step(self) -> int | None:
        """The newest finished step, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(
                    f"tx.checkpoint: no checkpoint in {self.directory} (it holds "
                    f"{_listing(self.directory)}). Save one first, or check the directory."
                )
            return steps[-1]
        if step not in steps:
            raise CheckpointError(
                f"tx.checkpoint: no checkpoint for step {step} in {self.directory}; "
                f"the steps there are {steps or 'none'}."
            )
        return step

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """What Titanax recorded at save time: mesh, process count and every leaf's
        path, shape, dtype and spec (JSON, read without touching the arrays).

        Raises:
          CheckpointError: no such step, or a directory Orbax wrote that is not a
            Titanax checkpoint.
        """
        step = self._step(step)
        path = os.path.join(self.directory, str(step), "titanax")
        if not os.path.isdir(path):
            raise CheckpointError(
                f"tx.checkpoint: {os.path.join(self.directory, str(step))} is not a Titanax "
                "checkpoint (it has no 'titanax' metadata). Restore it with Orbax directly, "
                "or point the Manager at a directory Titanax wrote."
            )
        meta = self._orbax.restore(step, args=ocp.args.Composite(titanax=ocp.args.JsonRestore()))
        data = dict(meta.titanax)
        if data.get("format") != FORMAT:
            raise CheckpointError(f"tx.checkpoint: {path} does not hold Titanax metadata.")
        return data

    def extra(self, step: int | None = None) -> dict[str, Any]:
        """The ``extra`` JSON saved with a step (the newest by default)."""
        step = self._step(step)
        self.metadata(step)  # a Titanax checkpoint?
        got = self._orbax.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        return dict(got.extra or {})

    def restore(self, step: int | None = None, *, like: Any) -> Any:
        """Restores a step (the newest by default) laid out as ``like``.

        ``like`` is a state of the same structure: placed arrays, or
        ``jax.ShapeDtypeStruct`` leaves with shardings (`abstract`). Every
        array comes back with the sharding of its ``like`` leaf, whatever the
        mesh it was saved from: a state saved under ``data=4, model=2``
        restores under ``data=2, model=4``, ``data=8`` or one device.

        Raises:
          CheckpointError: no such step, not a Titanax checkpoint, a ``like``
            leaf without a sharding, or a tree that does not match: every
            missing, unexpected and mis-shaped leaf is listed.
        """
        step = self._step(step)
        saved = self.metadata(step)["leaves"]
        target = abstract(like)
        self._check(step, saved, target)
        got = self._orbax.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return got.state

    def _check(self, step: int, saved: dict[str, Any], target: Any) -> None:
        wanted = {
            path: {"shape": list(x.shape), "dtype": str(np.dtype(x.dtype)), "sharding": x.sharding}
            for path, x in leaves_with_paths(target)
        }
        missing = sorted(set(wanted) - set(saved))
        unexpected = sorted(set(saved) - set(wanted))
        misfit = [
            f"{p}: saved {saved[p]['dtype']}{tuple(saved[p]['shape'])}, like has "
            f"{wanted[p]['dtype']}{tuple(wanted[p]['shape'])}"
            for p in sorted(set(saved) & set(wanted))
            if (saved[p]["shape"], saved[p]["dtype"]) != (wanted[p]["shape"], wanted[p]["dtype"])
        ]
        unplaced = sorted(p for p, w in wanted.items() if w["sharding"] is None)
        parts = []
        if missing:
            parts.append(
                f"{count(len(missing), 'leaf', 'leaves')} of `like` not in the "
                f"checkpoint:\n{bullets(missing)}"
            )
        if unexpected:
            parts.append(
                f"{count(len(unexpected), 'leaf', 'leaves')} in the checkpoint not in "
                f"`like`:\n{bullets(unexpected)}"
            )
        if misfit:
            parts.append(
                f"{count(len(misfit), 'leaf', 'leaves')} with another shape or "
                f"dtype:\n{bullets(misfit)}"
            )
        if parts:
            raise CheckpointError(
                f"tx.checkpoint: step {step} in {self.directory} does not match `like`.\n"
                + "\n".join(parts)
                + "\nRestore into a state built like the saved one (same model and optimizer)."
            )
        if unplaced:
            raise CheckpointError(
                f"tx.checkpoint: {count(len(unplaced), 'leaf', 'leaves')} of `like` carry no "
                f"sharding, so there is nowhere to restore them:\n{bullets(unplaced)}\n"
                "Pass placed arrays (e.g. ParallelFunction.place) or jax.ShapeDtypeStruct "
                "leaves with sharding=."
            )

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        self._orbax.close()

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _listing(directory: str) -> str:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return "nothing: it does not exist"
    if not names:
        return "nothing"
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
