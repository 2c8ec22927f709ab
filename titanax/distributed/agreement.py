"""First-call agreement of the processes of a job: the mesh holds an equal share of every
process's devices, and every process passes batches of the same local shapes (and the same
other arguments). Both would otherwise fail deep in JAX or compute a wrong result.

Compared through JAX's distributed key-value store, each read bounded by ``check_timeout_s``
(`titanax.distributed.initialize`), so a dead or stalled peer is an error, never a hang.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax

from titanax._util import bullets, leaves_with_paths, shape_of
from titanax.errors import DistributedError

__all__ = ["check_first_call", "check_mesh", "agree"]

_settings: dict[str, float] = {"check_timeout_s": 300.0}  # set by initialize()
_calls: Counter[str] = Counter()  # first calls per step function: the store's keys never repeat


def check_first_call(
    fun: Callable[..., Any],
    mesh: Any,
    args: Sequence[Any],
    batch: frozenset[int],
    names: Sequence[str],
) -> None:
    """Checks, on every process, that a step's first call for new arguments can run.

    `ParallelFunction` calls it when it builds the program for an argument structure;
    later calls are not checked. The mesh must hold an equal share of every process's
    devices; the local shapes and dtypes of the batch leaves, and the structure, shapes
    and dtypes of the other arguments, must be the same on every process (compared
    through JAX's key-value store within ``check_timeout_s``, see `initialize`).

    Raises:
      DistributedError: what differs (processes, leaves, shapes), or a missing process.
    """
    if jax.process_count() == 1:
        return
    what = f"step {_name(fun)!r}"
    check_mesh(mesh, what=what)
    store = _Store.connect()
    if store is None:  # a multi-process runtime that jax.distributed did not start
        return
    site = f"{getattr(fun, '__module__', None)}.{_name(fun)}"
    _calls[site] += 1  # every process builds its entries in the same order
    agree(
        *_describe(args, batch, names),
        store=store,
        key=f"titanax/first_call/{site}/{_calls[site]}",
        process=jax.process_index(),
        processes=jax.process_count(),
        timeout_s=_settings["check_timeout_s"],
        what=what,
    )


def check_mesh(
    mesh: Any,
    *,
    what: str = "the step",
    devices: Sequence[Any] | None = None,
    processes: int | None = None,
) -> None:
    """Raises unless every process holds the same number (one or more) of ``mesh``'s devices.

    Every process runs the step and passes its own rows of each batch: a process with no
    device in the mesh has nowhere to put them (JAX's ``make_array_from_process_local_data``
    fails with ``StopIteration`` there while the others run on alone), and unequal shares
    split the rows unevenly. ``devices`` and ``processes`` default to JAX's.
    """
    processes = jax.process_count() if processes is None else processes
    held = Counter(d.process_index for d in mesh.devices.flat)
    shares = {p: held[p] for p in range(processes)}
    if len(set(shares.values())) == 1:
        return
    devices = jax.devices() if devices is None else devices
    size = mesh.devices.size
    left_out = "; ".join(
        f"process {p} (devices {_spans([d.id for d in devices if d.process_index == p])})"
        for p, n in shares.items()
        if n == 0
    )
    head = (
        f"the mesh holds none of the devices of {left_out}, but every process runs the step"
        if left_out
        else "the processes hold different numbers of the mesh's devices"
    )
    k = f" (here K = {size // processes}: {size} devices in all)" if size % processes == 0 else ""
    raise DistributedError(
        f"{what} on mesh ({', '.join(f'{a}={n}' for a, n in mesh.shape.items())}): {head} "
        "and passes its own rows of each batch. Mesh devices per process: "
        f"{_by_value({p: str(n) for p, n in shares.items()})}.\nBuild the mesh over every "
        "process's devices: tx.mesh(data=-1, ...) or tx.mesh(devices=jax.devices(), ...); "
        f"jax.devices() lists the {len(devices)} devices of all {processes} processes, process "
        f"0's first, so a prefix such as jax.devices()[:{size}] leaves processes out. Under "
        f"`titanax launch`, give each process its share with --devices-per-process K{k}."
    )


def agree(
    batch: dict[str, str],
    other: dict[str, str],
    *,
    store: Any,
    key: str,
    process: int,
    processes: int,
    timeout_s: float,
    what: str = "the step",
) -> None:
    """Compares what each process passed to a step (``{leaf: "shape dtype"}`` of the batch
    arguments, and of the others) through a key-value ``store``.

    Each process writes its facts under ``key`` (unique to the step and the call: a key is
    written once); process 0 reads them all and writes a verdict that the others read, so
    every process raises the same error. The other arguments travel as a digest unless
    they differ. ``store`` has ``set(key, value)``, ``delete(key)`` and ``get(key,
    timeout_s)``, which returns ``None`` when the time runs out: no read waits longer.

    Raises:
      DistributedError: facts that differ between processes, or a process missing.
    """
    text = json.dumps(other)
    mine = {"batch": batch, "other": hashlib.sha256(text.encode()).hexdigest()}
    store.set(f"{key}/other/{process}", text)  # read only where the digests differ
    store.set(f"{key}/batch/{process}", json.dumps(mine))
    if process == 0:
        verdict = _judge(mine, other, store, key, processes, timeout_s, what)
        store.set(f"{key}/verdict", verdict)
    elif store.get(f"{key}/batch/0", timeout_s) is None:
        verdict = _missing(what, [0], processes, timeout_s)
    else:  # process 0 answers within timeout_s of its arrival ("" when all agree)
        answer = store.get(f"{key}/verdict", timeout_s)
        verdict = _missing(what, [0], processes, timeout_s) if answer is None else answer
    if verdict:
        raise DistributedError(verdict)


def _judge(
    mine: dict[str, Any],
    other: dict[str, str],
    store: Any,
    key: str,
    processes: int,
    timeout_s: float,
    what: str,
) -> str:
    """Process 0's side of `agree`: the error message, or ``""`` when all agree."""
    deadline = time.monotonic() + timeout_s
    docs, missing = {0: mine}, []
    for p in range(1, processes):
        text = store.get(f"{key}/batch/{p}", max(deadline - time.monotonic(), 0.001))
        if text is None:
            missing.append(p)
        else:
            docs[p] = json.loads(text)
    if missing:
        return _missing(what, missing, processes, timeout_s)
    problems = []
    if batch := _differences({p: d["batch"] for p, d in docs.items()}):
        problems.append(
            f"{what}: the processes passed batches of different shapes to its first call with "
            f"these arguments:\n{bullets(batch)}\nEach process passes its own rows of every "
            "batch argument, and every process must pass as many (global batch / process "
            "count): a process with other shapes compiles another global shape, and the step "
            "computes a wrong result without an error. Give each process an equal share of "
            "the global batch: split it evenly over the processes and drop or pad a last "
            "partial batch (drop_remainder; tx.data.Loader does both)."
        )
    full = {mine["other"]: other}  # one full description per distinct digest
    for p, d in docs.items():
        if d["other"] not in full:
            full[d["other"]] = json.loads(store.get(f"{key}/other/{p}", timeout_s) or "{}")
    if len(full) > 1:
        rest = _differences({p: full[d["other"]] for p, d in docs.items()})
        problems.append(
            f"{what}: the processes passed different non-batch arguments to its first call "
            f"with these arguments:\n{bullets(rest)}\nArguments that are not batches (the "
            "state, constants) must have the same structure, shapes and dtypes on every "
            "process: build them the same way everywhere, or declare an argument that holds "
            "each process's own rows a batch (batch_argnums)."
        )
    for p in range(processes):
        store.delete(f"{key}/other/{p}")
        if p:
            store.delete(f"{key}/batch/{p}")
    return "\n".join(problems)


def _missing(what: str, missing: list[int], processes: int, timeout_s: float) -> str:
    return (
        f"{what}: {_processes(missing)} (of {processes}) did not reach its first call with "
        f"these arguments within {timeout_s:g} s, so the arguments could not be compared. "
        "A process that died, is busy elsewhere, or passes argument shapes it has already "
        "compiled (a last partial batch on some processes only) never comes. Call the step "
        "(and its .place, .lower, .explain) on every process, with the same argument shapes; "
        "if one is only slower, raise check_timeout_s in tx.distributed.initialize(...)."
    )


def _describe(
    args: Sequence[Any], batch: frozenset[int], names: Sequence[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """``{leaf: "shape dtype"}`` of the batch arguments and of the others."""
    facts: tuple[dict[str, str], dict[str, str]] = ({}, {})
    for i, arg in enumerate(args):
        for path, x in leaves_with_paths(arg):
            text = f"{shape_of(x)} {getattr(x, 'dtype', None) or type(x).__name__}"
            if i in batch and isinstance(x, jax.Array):
                text += " (a global jax.Array)"  # not this process's rows: its shape is global
            facts[i not in batch][f"{names[i]} [{path}]" if path else names[i]] = text
    return facts


def _differences(docs: dict[int, dict[str, str]]) -> list[str]:
    """One line per leaf that differs between processes, with each process's value."""
    labels = dict.fromkeys(label for doc in docs.values() for label in doc)
    seen = ({p: doc.get(label, "absent") for p, doc in docs.items()} for label in labels)
    return [f"{k}: {_by_value(v)}" for k, v in zip(labels, seen) if len(set(v.values())) > 1]


def _by_value(values: dict[int, str]) -> str:
    """``{0: "a", 1: "b", 2: "a"}`` -> ``'processes 0, 2: a; process 1: b'``."""
    groups: dict[str, list[int]] = {}
    for p, v in values.items():
        groups.setdefault(v, []).append(p)
    return "; ".join(f"{_processes(ps)}: {v}" for v, ps in groups.items())


def _processes(ps: Sequence[int]) -> str:
    return f"process{'es' if len(ps) > 1 else ''} {_spans(ps)}"


def _spans(numbers: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 5]`` -> ``'0-3, 5'``."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def _name(fun: Callable[..., Any]) -> str:
    # Not repr(fun): it holds an address, which differs between processes.
    return getattr(fun, "__qualname__", None) or type(fun).__qualname__


class _Store:
    """JAX's distributed key-value store, every read bounded in time.

    Private JAX, measured on jax 0.10.2: ``jax._src.distributed.global_state.client``, the
    coordination-service client that ``jax.distributed.initialize`` creates (JAX keeps
    compiled programs and checkpoint barriers in its store). ``blocking_key_value_get(key,
    timeout_in_ms)`` raises ``JaxRuntimeError("DEADLINE_EXCEEDED: ...")`` when the time
    runs out; ``key_value_set`` refuses to overwrite a key (``ALREADY_EXISTS``), so no
    value read is a stale one. JAX's public ``jax.experimental.multihost_utils``
    (``assert_equal``, ``process_allgather``) runs device collectives instead: they need
    the same shapes on every process, which is what is checked, and wait without a bound
    for a process that never comes.
    """

    def __init__(self, client: Any):
        self.client = client

    @classmethod
    def connect(cls) -> _Store | None:
        from jax._src import distributed as jax_distributed

        client = jax_distributed.global_state.client
        return None if client is None else cls(client)

    def set(self, key: str, value: str) -> None:
        self.client.key_value_set(key, value)

    def get(self, key: str, timeout_s: float) -> str | None:
        try:
            return str(self.client.blocking_key_value_get(key, max(int(timeout_s * 1000), 1)))
        except jax.errors.JaxRuntimeError as e:
            if str(e).startswith("DEADLINE_EXCEEDED"):
                return None
            raise DistributedError(
                f"tx.distributed: JAX's coordinator (in process 0) could not be asked for "
                f"{key!r}; process 0 has probably died ({str(e).splitlines()[0]})."
            ) from e

    def delete(self, key: str) -> None:
        self.client.key_value_delete(key)
