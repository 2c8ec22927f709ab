"""``titanax launch``: N local processes on loopback, their output prefixed by rank.

The job ends as a whole: nothing is left behind and nothing hangs.

* A process that fails (a non-zero exit, a signal) stops the others at once.
* A signal that would end the launcher (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, ...)
  stops every process first. If the launcher is killed outright (SIGKILL), the kernel
  kills the processes it started (Linux: ``PR_SET_PDEATHSIG``).
* When one process ends, the others must end within ``exit_timeout_s``: every
  collective needs every process, so one that finished early (fewer batches) leaves the
  others waiting in a collective, and JAX's own shutdown only gives up after minutes.
* A process that completes no step for ``hang_timeout_s`` (counted from the first step
  any process completes) stops the job; the launcher names it, and asks it for its Python
  stack first. Steps are what `titanax.distributed.progress` reports.

Stopping sends SIGTERM (SIGINT when the launcher got SIGINT) to each process group, then
SIGKILL after ``grace_s``; a second signal to the launcher sends SIGKILL at once.

Output: one thread reads every process's output and writes what one read returns at
once, so the lines a process writes together (a message, up to 4 KiB, the size a pipe
keeps whole) are never split by another process's. JAX's ``[Gloo] Rank N is connected``
messages are dropped. Progress bars (text redrawn after ``\\r``, as tqdm does) show from
process 0 only (all processes with ``all_progress``): redrawn in place on a terminal,
otherwise one line every `STATUS_EVERY_S` seconds (`titanax.launch.output`), and the bar's last state.
"""

from __future__ import annotations

import math
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from titanax.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, port_taken
from titanax.distributed.progress import ENV_PROGRESS_FD
from titanax.errors import DistributedError
from titanax.launch.output import Output

__all__ = ["launch", "free_port"]

_SILENT_S = 5.0  # after every process has exited: an output still open (a grandchild) but quiet
_DUMP_WAIT_S = 1.0  # for the stacks of stuck processes (SIGUSR1) to arrive
# Run first in each process (``python -c``): the kernel sends it SIGKILL when the launcher
# dies (PR_SET_PDEATHSIG survives exec), then it becomes ``python SCRIPT ARGS``. Not a
# preexec_fn: that forks the launcher with its threads (JAX's, inside a test) and runs
# Python in the child, where a lock another thread held stays held.
_DIE_WITH_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"  # 1: PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]): os._exit(1)\n"  # the launcher died already
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)
# Signals whose default action ends a process, and that another process may send.
_ENDING = "SIGHUP SIGINT SIGQUIT SIGTERM SIGUSR1 SIGUSR2 SIGALRM SIGXCPU SIGVTALRM SIGPROF".split()


def free_port() -> int:
    """A TCP port P such that P and P + 1 are free now on this machine: the job's
    coordinator listens on P and Titanax's start-up check on P + 1."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 65535 and port_taken(port) is None and port_taken(port + 1) is None:
            return port
    raise DistributedError("titanax launch: found no two free consecutive ports; pass --port.")


def launch(
    script: str,
    args: Sequence[str] = (),
    *,
    nproc: int,
    devices_per_process: int | None = None,
    port: int | None = None,
    grace_s: float = 10.0,
    exit_timeout_s: float = 45.0,
    hang_timeout_s: float | None = 600.0,
    all_progress: bool = False,
    out: IO[str] | None = None,
) -> int:
    """Runs ``python SCRIPT ARGS`` as ``nproc`` processes joined on 127.0.0.1.

    Each process gets ``TITANAX_COORDINATOR``, ``TITANAX_NUM_PROCESSES`` and
    ``TITANAX_PROCESS_ID`` (read by ``tx.distributed.initialize()``), the pipe its steps
    are reported on, and, with ``devices_per_process``, that many simulated CPU devices.

    Args:
      script, args: what every process runs.
      nproc: the number of processes.
      devices_per_process: simulated CPU devices in each process.
      port: the coordinator's port (``port + 1`` must be free too); default: a free pair.
      grace_s: between SIGTERM and SIGKILL when stopping the processes.
      exit_timeout_s: once a process has ended, how long the others may run on.
      hang_timeout_s: stop the job when a process completes no step for this long, from
        the first step any process completes; ``None``: never.
      all_progress: show every process's progress bars, not process 0's only.
      out: where the output goes (default: ``sys.stdout``).

    Returns:
      0 when every process succeeds. Otherwise the first failed process's exit code
      (``128 + signal`` for a process killed by a signal), ``128 + signal`` when a signal
      ended the launcher, and 1 when the launcher stopped a job that hung or whose
      processes did not end together.

    Raises:
      DistributedError: arguments that cannot work (a port in use, a missing script).
    """
    _check(script, nproc, devices_per_process, port, grace_s, exit_timeout_s, hang_timeout_s)
    port = port or free_port()
    output = Output(out or sys.stdout, nproc, all_progress)
    with _Signals() as signals:
        ranks: list[_Rank] = []
        try:
            for rank in range(nproc):
                ranks.append(_Rank.start(rank, script, args, nproc, port, devices_per_process))
        except BaseException:
            for r in ranks:
                _signal_group(r.proc, signal.SIGKILL)
            raise
        for r in ranks:
            output.launch(f"rank {r.rank}: pid {r.proc.pid}")
        return _Job(ranks, output, signals, grace_s, exit_timeout_s, hang_timeout_s).run()


def _check(
    script: str,
    nproc: int,
    devices: int | None,
    port: int | None,
    grace_s: float,
    exit_timeout_s: float,
    hang_timeout_s: float | None,
) -> None:
    problems = []
    if nproc < 1:
        problems.append(f"--nproc {nproc}: start at least 1 process")
    if devices is not None and devices < 1:
        problems.append(f"--devices-per-process {devices}: give each process 1 device or more")
    if grace_s < 0 or exit_timeout_s <= 0 or (hang_timeout_s is not None and hang_timeout_s <= 0):
        problems.append(
            f"--grace {grace_s:g}, --exit-timeout {exit_timeout_s:g}, --hang-timeout "
            f"{hang_timeout_s or 0:g}: timeouts are seconds above 0 (--grace may be 0; "
            "--hang-timeout 0 turns the check off)"
        )
    if not os.path.exists(script):
        problems.append(
            f"SCRIPT {script!r} does not exist (titanax launch's options go before SCRIPT, the "
            "script's own after it)"
        )
    if port is not None:
        if not 1 <= port <= 65534:
            problems.append(
                f"--port {port}: choose a port in 1 .. 65534 (the next one is used too)"
            )
        else:
            for p, role in ((port, "JAX's coordinator"), (port + 1, "Titanax's start-up check")):
                if taken := port_taken(p):
                    problems.append(
                        f"--port {port}: port {p}, for {role}, is in use ({taken}); the job needs "
                        f"ports {port} and {port + 1} free. Choose another --port, or leave it "
                        "out to get a free pair"
                    )
    if problems:
        raise DistributedError("titanax launch: " + "; ".join(problems) + ".")


class _Rank:
    """One launched process: its output, its progress reports, and what is known of it."""

    def __init__(self, rank: int, proc: subprocess.Popen[bytes], progress_fd: int):
        self.rank, self.proc, self.progress_fd = rank, proc, progress_fd
        self.steps = 0  # calls of Titanax steps ended
        self.inside = False  # a call has begun and not ended: it waits in a step
        self.last_step_at: float | None = None
        self.ended_at: float | None = None  # its script ended (reported) or it exited 0
        self.ended = ""  # how, in words
        self.dumps_stacks = False  # it dumps its Python stacks on SIGUSR1
        self.progress_text = ""

    @classmethod
    def start(
        cls, rank: int, script: str, args: Sequence[str], nproc: int, port: int, devices: int | None
    ) -> _Rank:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env.update(
            {
                ENV_COORDINATOR: f"127.0.0.1:{port}",
                ENV_NUM_PROCESSES: str(nproc),
                ENV_PROCESS_ID: str(rank),
                ENV_PROGRESS_FD: f"{write_fd}:{os.getpid()}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if devices:
            env.update({"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)})
        command = [sys.executable, script, *args]
        if sys.platform.startswith("linux"):  # killed by the kernel if the launcher dies
            command[1:1] = ["-c", _DIE_WITH_LAUNCHER, str(os.getpid())]
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped with what it started
            pass_fds=(write_fd,),
        )
        os.close(write_fd)
        return cls(rank, proc, read_fd)

    def read_progress(self, data: bytes, now: float) -> None:
        self.progress_text += data.decode(errors="replace")
        *lines, self.progress_text = self.progress_text.split("\n")
        for line in lines:
            kind, _, value = line.partition(" ")
            if kind == "step" and re.fullmatch(r"\d+ \d+", value):
                ended, begun = map(int, value.split())
                if ended != self.steps:
                    self.steps, self.last_step_at = ended, now
                self.inside = begun > ended
            elif kind == "end" and self.ended_at is None:
                self.ended_at = now
                self.ended = (
                    "finished its script"
                    if value == "ok"
                    else f"ended with an uncaught {value} (its traceback is above)"
                )
            elif kind == "stacks":
                self.dumps_stacks = True

    def position(self, now: float) -> str:
        where = f"inside step {self.steps + 1}" if self.inside else "in its own code"
        if self.last_step_at is None:
            return f"pid {self.proc.pid}, no step completed, {where}"
        ago = now - self.last_step_at
        return f"pid {self.proc.pid}, {self.steps} steps, the last {ago:.1f} s ago, {where}"


class _Signals:
    """Signals that would end the launcher, recorded instead (main thread only)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for name in _ENDING:
                sig = getattr(signal, name, None)
                if sig is None:
                    continue
                # Ignored (nohup), or the caller's own handler: left as they are.
                if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                    self._old[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: Any) -> None:
        self.received.append(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Job:
    """The launcher's loop: reads output and progress, watches the processes, stops them."""

    def __init__(
        self,
        ranks: list[_Rank],
        output: Output,
        signals: _Signals,
        grace_s: float,
        exit_timeout_s: float,
        hang_timeout_s: float | None,
    ):
        self.ranks, self.output, self.signals = ranks, output, signals
        self.grace_s, self.exit_timeout_s, self.hang_timeout_s = (
            grace_s,
            exit_timeout_s,
            hang_timeout_s,
        )
        self.start = time.monotonic()
        self.selector = selectors.DefaultSelector()
        for r in ranks:
            assert r.proc.stdout is not None
            self.selector.register(r.proc.stdout.fileno(), selectors.EVENT_READ, (r, "out"))
            self.selector.register(r.progress_fd, selectors.EVENT_READ, (r, "progress"))

    def run(self) -> int:
        code: int | None = None
        stop_with: int = signal.SIGTERM
        try:
            while code is None:
                self.pump(0.05)
                code, stop_with = self.verdict(time.monotonic())
        except BaseException:  # the launcher's own failure: still nothing left behind
            for r in self.ranks:
                _signal_group(r.proc, signal.SIGKILL)
            raise
        if code:
            self.stop(stop_with)
        self.drain()
        return code

    def pump(self, timeout: float) -> bool:
        """Reads what is there (waiting up to ``timeout``); whether anything came."""
        events = self.selector.select(timeout)
        now = time.monotonic()
        for key, _ in events:
            rank, kind = key.data
            data = os.read(key.fd, 65536)
            if not data:
                self.selector.unregister(key.fd)
                if kind == "progress":
                    os.close(key.fd)
            if kind == "out":
                self.output.feed(rank.rank, data, now)
            elif data:
                rank.read_progress(data, now)
        return bool(events)

    def verdict(self, now: float) -> tuple[int | None, int]:
        """``(exit code, signal to stop the others with)`` once the job is over, else None."""
        if self.signals.received:
            sig = self.signals.received[0]
            self.fail(
                f"titanax launch received {signal.Signals(sig).name} after {self.elapsed(now)}"
            )
            return 128 + sig, (signal.SIGINT if sig == signal.SIGINT else signal.SIGTERM)
        codes = [r.proc.poll() for r in self.ranks]
        for r, c in zip(self.ranks, codes):
            if c not in (None, 0):
                self.fail(f"process {r.rank} {_describe(c)} after {self.elapsed(now)}")
                return (128 - c if c < 0 else c), signal.SIGTERM
            if c == 0 and r.ended_at is None:
                r.ended_at, r.ended = now, "exited with code 0"
        if all(c == 0 for c in codes):
            return 0, signal.SIGTERM
        if ended := [r.ended_at for r in self.ranks if r.ended_at is not None]:
            if now - min(ended) > self.exit_timeout_s:
                self.fail(self.early_end(now))
                return 1, signal.SIGTERM
        elif self.hang_timeout_s is not None and (stuck := self.stuck(now)):
            self.fail(stuck)
            return 1, signal.SIGTERM
        return None, signal.SIGTERM

    def early_end(self, now: float) -> str:
        done = "; ".join(
            f"process {r.rank} {r.ended} at {r.ended_at - self.start:.1f} s"
            for r in self.ranks
            if r.ended_at is not None
        )
        running = "; ".join(
            f"process {r.rank} ("
            + ("its script ended, but it did not exit" if r.ended_at else r.position(now))
            + ")"
            for r in self.ranks
            if r.proc.poll() is None
        )
        return (
            f"{done}; still running {self.exit_timeout_s:g} s later: {running}. Every "
            "collective needs every process, so one that ends early leaves the others waiting "
            "in one: give every process the same number of steps (the same number of batches: "
            "split the data evenly and drop the remainder, as tx.data.Loader does), or raise "
            f"--exit-timeout (now {self.exit_timeout_s:g} s) if a process has more to do alone "
            "at the end"
        )

    def stuck(self, now: float) -> str | None:
        """The message when some process has made no progress for ``hang_timeout_s``."""
        reported = [r.last_step_at for r in self.ranks if r.last_step_at is not None]
        if not reported:
            return None  # the clock starts at the first step any process completes
        armed = min(reported)
        idle = {r.rank: now - max(r.last_step_at or armed, armed) for r in self.ranks}
        if max(idle.values()) <= (limit := self.hang_timeout_s or math.inf):
            return None
        # Stuck: those busy in their own code, the furthest behind of them; the others wait
        # for them inside a step (or are ahead). All inside a step: a collective that never
        # completes, or a compile that takes longer than the limit.
        outside = [r for r in self.ranks if not r.inside]
        fewest = min(r.steps for r in outside or self.ranks)
        stuck = [r for r in outside or self.ranks if r.steps == fewest]
        waiting = [r for r in self.ranks if r not in stuck]
        text = f"no step completed for {limit:g} s (--hang-timeout): stuck: " + "; ".join(
            f"process {r.rank} ({r.position(now)})" for r in stuck
        )
        if waiting:
            text += f"; waiting for {'it' if len(stuck) == 1 else 'them'}: " + "; ".join(
                f"process {r.rank} ({r.position(now)})" for r in waiting
            )
        dumped = [r for r in stuck if r.dumps_stacks and r.proc.poll() is None]
        for r in dumped:
            _signal_group(r.proc, signal.SIGUSR1, group=False)
        if dumped:
            text += ". The Python stacks of " + ", ".join(f"process {r.rank}" for r in dumped)
            text += " follow (SIGUSR1)"
        text += (
            ". A process that loads data, evaluates, saves or compiles for longer than this "
            "between two steps needs a larger --hang-timeout"
        )
        return text

    def fail(self, why: str) -> None:
        self.output.launch(
            f"DistributedError: {why}. Stopping every process (SIGTERM, then SIGKILL after "
            f"{self.grace_s:g} s)."
        )
        if "(SIGUSR1)" in why:
            deadline = time.monotonic() + _DUMP_WAIT_S
            while time.monotonic() < deadline:
                self.pump(0.05)

    def elapsed(self, now: float) -> str:
        return f"{now - self.start:.1f} s"

    def stop(self, first: int) -> None:
        """``first`` to every process group, SIGKILL after the grace (or a second signal)."""
        seen = len(self.signals.received)
        for r in self.ranks:
            if r.proc.poll() is None:
                _signal_group(r.proc, first)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and len(self.signals.received) <= seen:
            if all(r.proc.poll() is not None for r in self.ranks):
                break
            self.pump(0.05)
        for r in self.ranks:
            _signal_group(r.proc, signal.SIGKILL)  # the process and anything it started
            r.proc.wait()

    def drain(self) -> None:
        """Reads every output to its end (or until it has been quiet for ``_SILENT_S``)."""
        quiet_since = time.monotonic()
        while self.selector.get_map() and time.monotonic() - quiet_since < _SILENT_S:
            if self.pump(0.1):
                quiet_since = time.monotonic()
        for key in list(self.selector.get_map().values()):
            self.selector.unregister(key.fd)
            if key.data[1] == "progress":
                os.close(key.fd)
        for r in self.ranks:
            self.output.feed(r.rank, b"", time.monotonic())  # what is left, and a pending bar
            if r.proc.stdout is not None:
                r.proc.stdout.close()
        self.selector.close()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _signal_group(p: subprocess.Popen[bytes], sig: int, group: bool = True) -> None:
    try:
        (os.killpg if group else os.kill)(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
