"""``titanax launch``: N local processes on loopback, their output prefixed by rank.

When a process fails, the others are stopped within a bounded time (SIGTERM,
then SIGKILL after a grace period, to their whole process groups): nothing is
left behind and nothing hangs. The exit code is the first failure's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from titanax.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

__all__ = ["launch", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _pump(rank: int, stream: IO[str], out: IO[str], lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            out.write(f"[{rank}] {line}" if line.endswith("\n") else f"[{rank}] {line}\n")
            out.flush()


def launch(
    script: str,
    args: Sequence[str] = (),
    *,
    nproc: int,
    devices_per_process: int | None = None,
    port: int | None = None,
    grace_s: float = 10.0,
    out: IO[str] | None = None,
) -> int:
    """Runs ``python SCRIPT ARGS`` as ``nproc`` processes joined on 127.0.0.1.

    Each process gets ``TITANAX_COORDINATOR``, ``TITANAX_NUM_PROCESSES`` and
    ``TITANAX_PROCESS_ID`` (read by ``tx.distributed.initialize()``) and, with
    ``devices_per_process``, that many simulated CPU devices.

    Returns:
      0 when every process succeeds; otherwise the first failure's exit code
      (``128 + signal`` for a process killed by a signal).
    """
    out = out or sys.stdout
    port = port or free_port()
    lock = threading.Lock()
    procs: list[subprocess.Popen[str]] = []
    pumps = []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(
            {
                ENV_COORDINATOR: f"127.0.0.1:{port}",
                ENV_NUM_PROCESSES: str(nproc),
                ENV_PROCESS_ID: str(rank),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if devices_per_process:
            env.update({"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices_per_process)})
        proc = subprocess.Popen(
            [sys.executable, script, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        procs.append(proc)
        with lock:
            out.write(f"[launch] rank {rank}: pid {proc.pid}\n")
            out.flush()
        pump = threading.Thread(target=_pump, args=(rank, proc.stdout, out, lock), daemon=True)
        pump.start()
        pumps.append(pump)

    start = time.monotonic()
    failure: tuple[int, int] | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]  # poll every process, every time
            failure = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failure is not None or all(c == 0 for c in codes):
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        failure = failure or (-1, -signal.SIGINT)
    if failure is not None:
        rank, code = failure
        who = "interrupted" if rank < 0 else f"process {rank} {_describe(code)}"
        with lock:
            out.write(
                f"[launch] DistributedError: {who} after {time.monotonic() - start:.1f} s; "
                f"stopping the other processes (SIGTERM, then SIGKILL after {grace_s:.0f} s).\n"
            )
            out.flush()
        _stop(procs, grace_s)
    for pump in pumps:
        pump.join(timeout=5)
    if failure is None:
        return 0
    code = failure[1]
    return 128 - code if code < 0 else code


def _signal_group(p: subprocess.Popen[str], sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs: Sequence[subprocess.Popen[str]], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        _signal_group(p, signal.SIGKILL)  # the process and anything it started
        p.wait()
