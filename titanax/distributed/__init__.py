"""``tx.distributed``: several processes on JAX's own distributed runtime.

``initialize()`` is a thin layer over ``jax.distributed.initialize``: it reads
Titanax's environment variables (set by ``titanax launch``) or lets JAX detect
SLURM, Open MPI and Kubernetes; on CPU it selects gloo for collectives; it
passes the two timeouts that keep a failure from hanging a job; and it turns
JAX's start-up failures into `DistributedError`s that say
what was seen and what to do. With one process, no call is needed at all.

On a step's first call for new arguments, `check_first_call` makes sure that every
process holds a share of the mesh and passes batches of the same shapes (and the same
other arguments): both would otherwise fail deep in JAX or compute a wrong result.

Environment (what ``titanax launch`` sets for each process):

| variable | meaning |
|---|---|
| ``TITANAX_COORDINATOR`` | ``host:port`` of process 0's coordinator |
| ``TITANAX_NUM_PROCESSES`` | the number of processes |
| ``TITANAX_PROCESS_ID`` | this process's index, ``0 .. N - 1`` |
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Any

import jax

from titanax.distributed import progress
from titanax.distributed.agreement import (  # noqa: F401 (_describe: for tests)
    _describe,
    _settings,
    agree,
    check_first_call,
    check_mesh,
)
from titanax.errors import DistributedError

__all__ = [
    "initialize",
    "is_initialized",
    "process_index",
    "process_count",
    "is_main_process",
    "check_first_call",
    "check_mesh",
    "agree",
]

ENV_COORDINATOR = "TITANAX_COORDINATOR"
ENV_NUM_PROCESSES = "TITANAX_NUM_PROCESSES"
ENV_PROCESS_ID = "TITANAX_PROCESS_ID"


def _cluster_detected() -> bool:
    """Whether JAX would detect a cluster (SLURM, Open MPI, Kubernetes, TPU pods) by itself."""
    try:
        from jax._src import clusters  # JAX keeps its detectors here

        return any(c.is_env_present() for c in clusters.ClusterEnv._cluster_types)
    except Exception:  # a JAX without these internals: fall back on the common variables
        return any(v in os.environ for v in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"))


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:
        return False


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"tx.distributed: {name}={value!r} is not an integer.") from None


def is_initialized() -> bool:
    """Whether this process has joined a multi-process runtime."""
    return bool(jax.distributed.is_initialized())


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
    heartbeat_s: int = 100,
    check_timeout_s: float = 300,
    local_device_ids: Any = None,
) -> bool:
    """Joins the processes of a multi-process job; a no-op for one process.

    Arguments left out are read from ``TITANAX_COORDINATOR``,
    ``TITANAX_NUM_PROCESSES`` and ``TITANAX_PROCESS_ID``; when there is no
    coordinator either way, JAX's own cluster detection (SLURM, Open MPI,
    Kubernetes) is used if it finds a cluster, and otherwise nothing happens.
    Call it first, before anything runs on a device.

    Args:
      coordinator: ``host:port`` of process 0, where the coordinator listens.
      num_processes: how many processes take part.
      process_id: this process's index.
      timeout_s: how long start-up waits for every process to join; a process
        that never comes makes the others fail after it, not hang.
      heartbeat_s: a process silent for this long is declared dead, and every
        other process is stopped: JAX terminates them with a message naming
        the failure, rather than letting them wait in a collective forever.
      check_timeout_s: how long the first call of a step (for each new argument
        structure) waits for every other process to reach it, to compare argument
        shapes; a process that never comes is a `DistributedError`, not a hang.
      local_device_ids: restrict this process to these local devices.

    Returns:
      ``True`` when a multi-process runtime was started; ``False`` for one process.

    Raises:
      DistributedError: called twice, called after JAX started its backend,
        inconsistent arguments, or a coordinator that could not be reached
        (or processes that did not all join) within ``timeout_s``.

    Examples:
      >>> import titanax as tx
      >>> tx.distributed.initialize()   # one process, no environment: nothing to do
      False
    """
    progress.report_to_launcher()  # under `titanax launch`: steps done, and the script's end
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    num_processes = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _int_env(ENV_PROCESS_ID)
    if coordinator is None and num_processes in (None, 1) and not _cluster_detected():
        return False
    seen = f"coordinator={coordinator!r}, num_processes={num_processes}, process_id={process_id}"
    if is_initialized():
        raise DistributedError(
            f"tx.distributed.initialize: already initialized ({seen}); call it once, at start-up."
        )
    if coordinator is not None and (num_processes is None or process_id is None):
        raise DistributedError(
            f"tx.distributed.initialize ({seen}): with a coordinator, give num_processes and "
            f"process_id too (or set {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})."
        )
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise DistributedError(
            f"tx.distributed.initialize ({seen}): process_id must be in 0 .. {num_processes - 1}."
        )
    if _backend_started():
        raise DistributedError(
            f"tx.distributed.initialize ({seen}): JAX has already started its backend, so this "
            "process can no longer join others. Call tx.distributed.initialize() first, before "
            "any computation, jax.devices() or tx.mesh()."
        )
    if coordinator is not None:
        _preflight(coordinator, int(num_processes or 1), int(process_id or 0), timeout_s)
    # CPU devices talk across processes through gloo (GPUs use NCCL regardless).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=heartbeat_s,
        )
    except Exception as e:  # JAX raises several kinds here; all mean start-up failed
        raise DistributedError(
            f"tx.distributed.initialize ({seen}): the processes could not connect within "
            f"{timeout_s} s: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            "Check that process 0 runs and listens at the coordinator address, that every "
            "process got the same coordinator and num_processes, and that all of them started."
        ) from e
    _settings["check_timeout_s"] = float(check_timeout_s)
    return True


def _preflight(coordinator: str, num_processes: int, process_id: int, timeout_s: float) -> None:
    """Checks, before JAX connects, that every process can reach process 0 and agrees on the count.

    JAX's runtime ends a process that cannot join (a fatal abort in C++); this
    handshake on the next port (``coordinator port + 1``) turns the usual
    start-up mistakes into a `DistributedError` that can be read and caught. Process 0
    also checks that it can listen on both ports: JAX's coordinator crashes the process
    (SIGSEGV, measured on jax 0.10.2) when its port is taken.
    """
    host, _, port_text = coordinator.rpartition(":")
    seen = f"coordinator={coordinator!r}, num_processes={num_processes}, process_id={process_id}"
    try:
        port = int(port_text) + 1
    except ValueError:
        raise DistributedError(
            f"tx.distributed.initialize ({seen}): the coordinator must be "
            "'host:port', e.g. '10.0.0.1:1234'."
        ) from None
    deadline = time.monotonic() + timeout_s
    if process_id == 0:
        _gather(port, num_processes, deadline, seen, timeout_s)
        return
    while True:
        try:
            conn = socket.create_connection((host or "127.0.0.1", port), timeout=1.0)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"tx.distributed.initialize ({seen}): the coordinator {host}:{port - 1} (and "
                    f"its start-up check on port {port}) could not be reached within {timeout_s} "
                    f"s ({e}). Start process 0 first, check the address and the firewall."
                ) from None
            time.sleep(0.2)
    with conn:
        conn.sendall(f"{process_id} {num_processes}\n".encode())
        conn.settimeout(max(deadline - time.monotonic(), 1.0))
        try:
            reply = conn.makefile().readline().strip()
        except OSError:
            reply = ""
    if reply != "GO":
        reason = reply.removeprefix("FAIL ") or "process 0 did not answer in time"
        raise DistributedError(f"tx.distributed.initialize ({seen}): start-up failed: {reason}")


def _gather(port: int, num_processes: int, deadline: float, seen: str, timeout_s: float) -> None:
    """Process 0's side of the start-up check: wait for every other process, then answer."""
    joined: dict[int, socket.socket] = {}
    problems = []
    if taken := port_taken(port - 1):
        # Tell the processes that come within a few seconds; the others time out.
        deadline = min(deadline, time.monotonic() + 5)
        problems.append(
            f"process 0 cannot listen on the coordinator port {port - 1} ({taken}): another "
            "program (or an earlier job that is still running) holds it. Choose another "
            "coordinator port, with the next one free too"
        )
    try:
        server = socket.create_server(("", port), reuse_port=False)
    except OSError as e:
        raise DistributedError(
            f"tx.distributed.initialize ({seen}): process 0 cannot listen on port {port} for "
            f"Titanax's start-up check ({port_taken(port) or e}). Titanax uses the coordinator "
            "port and the next one: choose a coordinator port whose next port is free too."
        ) from None
    with server:
        while len(joined) < num_processes - 1 and time.monotonic() < deadline:
            server.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                conn, _ = server.accept()
                conn.settimeout(5.0)
                pid_text, count_text = conn.makefile().readline().split()
            except (OSError, ValueError):
                continue
            pid, count = int(pid_text), int(count_text)
            if count != num_processes:
                problems.append(f"process {pid} was started with num_processes={count}")
            if pid in joined or pid == 0:
                problems.append(f"two processes claim process_id={pid}")
            joined[pid] = conn
        missing = sorted(set(range(1, num_processes)) - set(joined))
        if missing:
            problems.append(
                f"{len(joined) + 1} of {num_processes} processes joined within {timeout_s} s; "
                f"process_id {', '.join(map(str, missing))} never came. Start all "
                f"{num_processes} processes, or pass the number actually started"
            )
        answer = ("FAIL " + "; ".join(problems)) if problems else "GO"
        for conn in joined.values():
            with conn:
                try:
                    conn.sendall((answer + "\n").encode())
                except OSError:
                    pass
    if problems:
        raise DistributedError(f"tx.distributed.initialize ({seen}): " + "; ".join(problems) + ".")


def port_taken(port: int) -> str | None:
    """Why nothing could listen on ``port`` now (on every address, as JAX's coordinator
    does), e.g. ``'[Errno 98] Address already in use'``; ``None`` when the port is free."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this machine: IPv4 alone
            continue
        with probe:
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too
            probe.setsockopt(
                socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
            )  # as gRPC: TIME_WAIT is fine
            try:
                probe.bind((address, port))
            except OSError as e:
                if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):  # IPv6 turned off
                    continue
                return str(e)
        return None
    return None


def process_index() -> int:
    """This process's index (0 with one process)."""
    return jax.process_index()


def process_count() -> int:
    """The number of processes (1 with one process)."""
    return jax.process_count()


def is_main_process() -> bool:
    """Whether this is process 0: the one that logs and writes reports."""
    return jax.process_index() == 0
