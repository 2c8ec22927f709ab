"""What a process launched by ``titanax launch`` tells the launcher: steps done, and its end.

The launcher stops a job in which some process makes no progress for ``--hang-timeout``
seconds, and one whose processes do not all end within ``--exit-timeout`` of the first.
Progress is what the process's Titanax steps report: every call of a `ParallelFunction`
adds one to `COUNTER.begun` when it begins and one to `COUNTER.ended` when it returns or
raises (two attribute increments on the call path: no device sync, no system call), so the
launcher also knows whether a process waits inside a step (a collective, a compile) or is
busy in its own code between steps. A daemon thread sends the counts when they change,
at most every `INTERVAL_S`, through the pipe the launcher names in ``TITANAX_PROGRESS_FD``
(``FD:LAUNCHER_PID``: a process the launcher did not start itself, which inherited the
variable, does not write to a file descriptor that means something else there);
when the script ends (``atexit``, before JAX's own shutdown waits for the other
processes), one last line says so, and whether an exception ended it.

The lines on the pipe::

    step E B        E calls of Titanax steps have ended so far, B have begun
    end ok          the script ended without an uncaught exception
    end NAME        it ended with an uncaught exception of type NAME
    stacks SIGUSR1  SIGUSR1 dumps its Python stacks (to stderr)

Nothing happens outside ``titanax launch`` (the variable is not set).
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import signal
import stat
import sys
import threading
import time
from typing import Any

__all__ = ["COUNTER", "ENV_PROGRESS_FD", "report_to_launcher"]

ENV_PROGRESS_FD = "TITANAX_PROGRESS_FD"
INTERVAL_S = 0.5  # how stale the launcher's count may be


class _Counter:
    __slots__ = ("begun", "ended")

    def __init__(self) -> None:
        self.begun = self.ended = 0


COUNTER = _Counter()  # counted by ParallelFunction.__call__
_state: dict[str, Any] = {}  # "fd" and "sent" once reporting has started


def report_to_launcher() -> bool:
    """Starts reporting progress to ``titanax launch``, when it launched this process.

    Called by `titanax.distributed.initialize`; calling it again does nothing. Also
    makes ``SIGUSR1`` dump every thread's Python stack to stderr (``faulthandler``), unless
    the process handles that signal itself: the launcher sends it to a process it finds
    stuck, before stopping the job, so the log shows where it was.

    Returns:
      Whether progress is reported (``TITANAX_PROGRESS_FD`` names a pipe to the launcher).
    """
    if "fd" in _state:
        return True
    try:
        fd_text, _, launcher = os.environ.pop(ENV_PROGRESS_FD).partition(":")
        fd = int(fd_text)
        if int(launcher) != os.getppid() or not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        os.set_blocking(fd, False)  # never wait for the launcher: a full pipe drops a line
        os.set_inheritable(fd, False)  # programs this process starts do not report
    except (KeyError, ValueError, OSError):
        return False
    _state.update(fd=fd, sent=None)
    if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        _send("stacks SIGUSR1\n")  # the launcher may ask for them
    threading.Thread(target=_report_steps, name="titanax-progress", daemon=True).start()
    atexit.register(_report_end)  # after JAX's own atexit: it runs before JAX shuts down
    return True


def _send(text: str) -> None:
    try:
        os.write(_state["fd"], text.encode())
    except OSError:  # the launcher is gone, or not reading: nothing to do about it
        pass


def _send_steps() -> None:
    counts = COUNTER.ended, COUNTER.begun
    if counts != _state["sent"]:
        _state["sent"] = counts
        _send(f"step {counts[0]} {counts[1]}\n")


def _report_steps() -> None:
    while True:
        _send_steps()
        time.sleep(INTERVAL_S)


def _report_end() -> None:
    _send_steps()
    error = getattr(sys, "last_value", None)  # set when an uncaught exception ends the script
    _send(f"end {type(error).__name__ if error is not None else 'ok'}\n")
