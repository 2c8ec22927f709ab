"""`Manager`: save and restore training states with Orbax, checked, onto any mesh."""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from titanax._util import bullets, count, leaves_with_paths
from titanax.checkpoint import checksum as _checksum
from titanax.checkpoint import leaves as _leaves
from titanax.errors import CheckpointError, TitanaxError

__all__ = ["Manager"]

FORMAT = "titanax-checkpoint"
# 2: every leaf has a kind and a checksum; Python scalars and strings are kept in the
# metadata; extra has a checksum. Titanax reads 1 (no checksums to verify) and 2.
VERSION = 2


class Manager:
    """Saves and restores training states with Orbax, onto any mesh.

    Every save records each leaf's path, shape, dtype, spec and a checksum of its value;
    every restore checks ``like`` against them before reading and the values after.
    Steps only go forward, a step still being written is not listed, and a damaged or
    corrupt step is a `CheckpointError` that names it and the step to fall back to.

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

      Python scalars and strings are leaves like any other:

      >>> mngr.save(20, {"w": state.params["w"], "epoch": 3, "run": "lr-0.1"}); mngr.wait()
      >>> got = mngr.restore(20, like={"w": like.params["w"], "epoch": 0, "run": ""})
      >>> got["epoch"], got["run"]
      (3, 'lr-0.1')

      Steps only go forward; to go back, delete the newer steps first:

      >>> mngr.save(15, state)
      Traceback (most recent call last):
      ...
      titanax.errors.CheckpointError: tx.checkpoint: cannot save step 15 in ...: steps only go forward, and the newest there is 20 (steps there: 10, 20). Save under a step after 20, or, to roll back, delete the newer steps first: mngr.delete(20).
      >>> mngr.delete(20); mngr.save(15, state); mngr.wait(); mngr.all_steps()
      [10, 15]
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
        self._async = async_save
        self._in_flight: set[int] = set()  # saved asynchronously, maybe not finished

    def __repr__(self) -> str:
        return f"Manager({self.directory!r}, steps={self.all_steps()})"

    def save(self, step: int, state: Any, *, extra: Mapping[str, Any] | None = None) -> None:
        """Saves ``state`` at ``step``, with JSON-able ``extra`` (e.g. the data position).

        ``state`` is a pytree of arrays (``jax.Array``, numpy), numpy scalars, and Python
        ``int``, ``float``, ``bool`` or ``str`` (kept exactly, restored with their type).
        Steps only go forward: ``step`` must be after every step saved so far. With
        ``async_save`` it returns once the arrays are copied off the devices and their
        checksums computed; writing goes on in the background, and the step is listed
        once it is on disk. Every process calls it (the checksums and Orbax's save are
        collectives).

        Raises:
          CheckpointError: a step that is not an int after the newest step (that one
            included), a leaf that cannot be saved, or ``extra`` that is not JSON-able.
        """
        step = self._check_step(step, "save")
        newest = max((int(s) for s in self._orbax.all_steps()), default=None)  # in flight too
        if newest is not None and step <= newest:
            if step == newest:
                raise CheckpointError(
                    f"tx.checkpoint: step {step} already exists in {self.directory}. Save "
                    f"under a step after {step}, or delete it first: mngr.delete({step})."
                )
            later = sorted(int(s) for s in self._orbax.all_steps() if s >= step)
            raise CheckpointError(
                f"tx.checkpoint: cannot save step {step} in {self.directory}: steps only go "
                f"forward, and the newest there is {newest} (steps there: "
                f"{_steps_text(self._orbax.all_steps())}). Save under a step after {newest}, "
                f"or, to roll back, delete the newer steps first: "
                + "; ".join(f"mngr.delete({s})" for s in later)
                + "."
            )
        extra = dict(extra or {})
        try:
            extra_checksum = _leaves.json_checksum(extra)
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"tx.checkpoint: extra must be JSON-able (numbers, strings, lists, dicts): {e}. "
                "Convert arrays with .tolist() or int(...)."
            ) from None
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "mesh": _leaves.mesh_info(state),
            "process_count": jax.process_count(),
            "checksum": _checksum.ALGORITHM,
            "extra_checksum": extra_checksum,
            "leaves": _leaves.describe(state, f"save(step={step})"),
        }
        arrays = jax.tree.map(lambda x: None if _leaves.value_kind(x) else x, state)
        # force=True: whether to save is decided here (every call saves, in order), never by
        # an Orbax save-decision policy; without it, Orbax's save returns False and writes
        # nothing for a step at or below its newest (measured on orbax-checkpoint 0.12.8).
        saved = self._orbax.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays),
                titanax=ocp.args.JsonSave(meta),
                extra=ocp.args.JsonSave(extra),
            ),
            force=True,
        )
        if not saved:
            raise CheckpointError(
                f"tx.checkpoint: Orbax declined to save step {step} in {self.directory} (its "
                "CheckpointManager.save returned False) and nothing was written. Check that "
                "the directory is writable, and report this as a Titanax bug."
            )
        # Orbax's save waits for the previous one, so only this step can be unfinished.
        self._in_flight = {step} if self._async else set()

    def wait(self) -> None:
        """Blocks until every pending save is on disk."""
        self._orbax.wait_until_finished()
        self._in_flight = set()

    def is_saving(self) -> bool:
        """Whether an asynchronous save is still being written."""
        return bool(self._orbax.is_saving_in_progress())

    def _unfinished(self) -> set[int]:
        if self._in_flight and not self._orbax.is_saving_in_progress():
            self._in_flight = set()
        return self._in_flight

    def all_steps(self) -> list[int]:
        """The steps with a finished checkpoint, oldest first (a step still being
        written asynchronously is listed once it is on disk)."""
        unfinished = self._unfinished()
        return sorted(int(s) for s in self._orbax.all_steps() if s not in unfinished)

    def latest_step(self) -> int | None:
        """The newest finished step, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def delete(self, step: int) -> None:
        """Deletes a finished step: the way to roll back before saving an earlier step.

        Raises:
          CheckpointError: no such step, or one still being written.
        """
        self._orbax.delete(self._step(self._check_step(step, "delete"), "delete"))

    def _check_step(self, step: Any, what: str) -> int:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise CheckpointError(
                f"tx.checkpoint: {what}(step={step!r}): a step is an int >= 0 (the training "
                f"step); got {type(step).__name__} {step!r}."
            )
        return int(step)

    def _step(self, step: int | None, what: str = "restore") -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(
                    f"tx.checkpoint: no checkpoint in {self.directory} (it holds "
                    f"{_listing(self.directory)}). Save one first, or check the directory."
                )
            return steps[-1]
        step = self._check_step(step, what)
        if step in self._unfinished():
            raise CheckpointError(
                f"tx.checkpoint: step {step} in {self.directory} is still being written (an "
                f"asynchronous save); call mngr.wait() first. Finished steps: "
                f"{_steps_text(steps)}."
            )
        if step not in steps:
            raise CheckpointError(
                f"tx.checkpoint: no checkpoint for step {step} in {self.directory}; "
                f"the steps there are {steps or 'none'}."
            )
        return step

    def _fallback(self, step: int) -> str:
        """How to go on without ``step``: restore the step before it."""
        steps = self.all_steps()
        earlier = [s for s in steps if s < step]
        if earlier:
            return (
                f"Restore the previous step instead: mngr.restore({earlier[-1]}, like=...) "
                f"(steps there: {_steps_text(steps)})."
            )
        others = [s for s in steps if s != step]
        if others:
            return (
                f"There is no earlier step; the others are {_steps_text(others)}: "
                f"mngr.restore({others[0]}, like=...)."
            )
        return "It is the only step there: nothing to fall back to."

    def _damaged(self, step: int, part: str, error: BaseException) -> CheckpointError:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        first = first if len(first) <= 300 else first[:300] + "..."
        return CheckpointError(
            f"tx.checkpoint: step {step} in {self.directory} cannot be read: its {part} "
            f"files are missing or damaged ({type(error).__name__}: {first}). "
            + self._fallback(step)
        )

    def _read(self, step: int, part: str, **items: Any) -> Any:
        """Orbax's restore of some items of a step; a failure to read is a damaged step."""
        try:
            return self._orbax.restore(step, args=ocp.args.Composite(**items))
        except (TitanaxError, jax.errors.JaxRuntimeError, MemoryError):
            raise  # a user's mistake, or the devices' (out of memory): not the files
        except Exception as e:  # tensorstore: ValueError, Exception; files: OSError, JSON...
            raise self._damaged(step, part, e) from e

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """What Titanax recorded at save time: mesh, process count and every leaf's
        path, kind, shape, dtype, spec and checksum (JSON, read without the arrays).

        Raises:
          CheckpointError: no such step, a step still being written, a directory Orbax
            wrote that is not a Titanax checkpoint, or damaged metadata.
        """
        step = self._step(step, "metadata")
        path = os.path.join(self.directory, str(step), "titanax")
        if not os.path.isdir(path):
            raise CheckpointError(
                f"tx.checkpoint: {os.path.join(self.directory, str(step))} is not a Titanax "
                "checkpoint (it has no 'titanax' metadata). Restore it with Orbax directly, "
                "or point the Manager at a directory Titanax wrote. If Titanax wrote it, the "
                "metadata was deleted: " + self._fallback(step)
            )
        data = self._read(step, "metadata", titanax=ocp.args.JsonRestore()).titanax
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(
                f"tx.checkpoint: {path} does not hold Titanax metadata (it is missing or "
                "damaged). " + self._fallback(step)
            )
        if data.get("version", 1) > VERSION:
            raise CheckpointError(
                f"tx.checkpoint: step {step} in {self.directory} was written by a newer "
                f"Titanax (format version {data['version']}; this one reads up to {VERSION}). "
                "Upgrade Titanax to restore it."
            )
        return dict(data)

    def extra(self, step: int | None = None) -> dict[str, Any]:
        """The ``extra`` JSON saved with a step (the newest by default), checked against
        its checksum.

        Raises:
          CheckpointError: as `metadata`, or an ``extra`` changed since the save.
        """
        step = self._step(step, "extra")
        meta = self.metadata(step)
        got = dict(self._read(step, "extra", extra=ocp.args.JsonRestore()).extra or {})
        want = meta.get("extra_checksum")
        if want is not None and _leaves.json_checksum(got) != want:
            raise CheckpointError(
                f"tx.checkpoint: step {step} in {self.directory} is corrupt: its extra (e.g. "
                "the data position) does not match the checksum recorded when it was saved. "
                + self._fallback(step)
            )
        return got

    def restore(self, step: int | None = None, *, like: Any, verify: bool = True) -> Any:
        """Restores a step (the newest by default) laid out as ``like``.

        ``like`` is a state of the same structure: placed arrays, or
        ``jax.ShapeDtypeStruct`` leaves with shardings (`abstract`). Every
        array comes back with the sharding of its ``like`` leaf, whatever the
        mesh it was saved from: a state saved under ``data=4, model=2``
        restores under ``data=2, model=4``, ``data=8`` or one device. Python
        scalars and strings come back from the metadata with their type (their
        ``like`` leaf only says which type).

        Every leaf's value is checked against the checksum recorded at save time
        (one pass over the arrays on their devices; see the checkpoints guide for
        its cost). ``verify=False`` skips the check: for a step known to be
        damaged, to read what is left of it.

        Raises:
          CheckpointError: no such step, a step still being written, not a Titanax
            checkpoint, a ``like`` leaf without a sharding, a tree that does not
            match (every missing, unexpected and mis-shaped leaf is listed),
            missing or damaged files, or values that do not match their checksums
            (every such leaf is listed); the last two say which step to restore
            instead.
        """
        step = self._step(step)
        saved = self.metadata(step)["leaves"]
        target = _leaves.abstract(like)
        self._check(step, saved, target)
        arrays = jax.tree.map(lambda x: None if _leaves.value_kind(x) else x, target)
        got = self._read(step, "array", state=ocp.args.StandardRestore(arrays)).state
        restored = iter(jax.tree.leaves(got))
        paths, out, to_verify = [], [], []
        for path, x in leaves_with_paths(target):
            entry = saved[path]
            if _leaves.value_kind(x) is not None:
                try:
                    out.append(_leaves.decode(entry))
                except (KeyError, TypeError, ValueError):  # edited past reading, verify or not
                    out.append(None)
                    paths.append(path)
                    continue
                if verify and _leaves.text_checksum(entry) != entry["checksum"]:
                    paths.append(path)
            else:
                out.append(next(restored))
                if verify and "checksum" in entry:  # Titanax 1 recorded none
                    to_verify.append((path, out[-1], entry["checksum"]))
        sums = _checksum.checksums([x for _, x, _ in to_verify])
        paths += [path for (path, _, want), got_sum in zip(to_verify, sums) if got_sum != want]
        if paths:
            raise CheckpointError(
                f"tx.checkpoint: step {step} in {self.directory} is corrupt: "
                f"{count(len(paths), 'leaf does', 'leaves do')} not match the checksum "
                f"recorded when it was saved:\n{bullets(sorted(paths))}\nIts files changed "
                "after the save (a bad disk, an interrupted copy). "
                + self._fallback(step)
                + " To load it anyway, pass verify=False."
            )
        return jax.tree.unflatten(jax.tree.structure(target), out)

    def _check(self, step: int, saved: dict[str, Any], target: Any) -> None:
        wanted = {path: _leaves.target_entry(x) for path, x in leaves_with_paths(target)}
        missing = sorted(set(wanted) - set(saved))
        unexpected = sorted(set(saved) - set(wanted))
        misfit = [
            f"{p}: saved {_leaves.signature(saved[p])}, like has {_leaves.signature(wanted[p])}"
            for p in sorted(set(saved) & set(wanted))
            if _leaves.signature(saved[p]) != _leaves.signature(wanted[p])
        ]
        unplaced = sorted(
            p for p, w in wanted.items() if w["kind"] == "array" and w["sharding"] is None
        )
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
        self._in_flight = set()

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _steps_text(steps: Any) -> str:
    return ", ".join(str(s) for s in sorted(int(s) for s in steps)) or "none"


def _listing(directory: str) -> str:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return "nothing: it does not exist"
    if not names:
        return "nothing"
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
