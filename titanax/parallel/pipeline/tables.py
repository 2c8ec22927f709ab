"""A schedule's executed program compiled to the integer tables the executor runs.

The executor runs `Schedule.executed` (every backward as B then W) tick by tick.
Per tick, each device runs one action and sends at most one activation-shaped
message: an activation to the next stage's device, or an input gradient to the
previous stage's device. A message goes to the device on the right, on the left,
or stays on the device (ZB-V's turn, and the loss gradient of the last stage);
``ppermute`` carries one message per direction per tick.

Each device keeps three ring buffers, with slots given by interval allocation:

* ``msg``: received stage inputs (until W, which reads the input again) and
  output cotangents (until B);
* ``r``: residuals kept from F to B (none with ``remat``);
* ``s``: B's stash for W, from B to W.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from titanax.errors import ScheduleError
from titanax.parallel.schedules import Action, Schedule

__all__ = ["Tables", "compile_tables"]

IDLE, FWD, FWD_LAST, BWD, BWD_FIRST, WGT, BWD_WGT, BWD_FIRST_WGT = range(8)

_ROWS = ("kind", "microbatch", "chunk", "x_slot", "c_slot", "r_slot", "s_slot")
_RECV = ("from_left", "from_right", "keep")


@dataclasses.dataclass(frozen=True)
class Tables:
    """The executed program as per-tick, per-device integer tables (all ``(ticks, p)``).

    ``x_slot`` is the ``msg`` slot of the stage input (-1: the microbatch of ``x``,
    stage 0); ``c_slot`` of the output cotangent; ``r_slot`` and ``s_slot`` index
    the residual and stash buffers. After the tick, the value that arrived from
    the left neighbour goes to ``msg[from_left]``, from the right to
    ``msg[from_right]``, and the device's own message to ``msg[keep]`` (-1: none).
    ``right`` and ``left`` are the ``ppermute`` pairs the program uses (empty: no
    ``ppermute`` in that direction).
    """

    kind: np.ndarray
    microbatch: np.ndarray
    chunk: np.ndarray
    x_slot: np.ndarray
    c_slot: np.ndarray
    r_slot: np.ndarray
    s_slot: np.ndarray
    from_left: np.ndarray
    from_right: np.ndarray
    keep: np.ndarray
    slots: dict[str, int]
    right: tuple[tuple[int, int], ...]
    left: tuple[tuple[int, int], ...]

    @property
    def ticks(self) -> int:
        return int(self.kind.shape[0])

    def rows(self) -> dict[str, jax.Array]:
        """The tables as arrays, one row per tick (what ``lax.scan`` iterates over)."""
        return {k: jnp.asarray(getattr(self, k)) for k in (*_ROWS, *_RECV)}


def _allocate(intervals: list[tuple[int, int, Any]]) -> tuple[dict[Any, int], int]:
    """Slots for values written at the end of tick ``w`` and last read at tick ``r``."""
    free_at: list[int] = []  # per slot: the tick of its last read
    slot_of: dict[Any, int] = {}
    for w, r, key in sorted(intervals, key=lambda i: (i[0], i[1])):
        for k, last in enumerate(free_at):
            if last <= w:
                free_at[k] = r
                slot_of[key] = k
                break
        else:
            slot_of[key] = len(free_at)
            free_at.append(r)
    return slot_of, len(free_at)


def compile_tables(s: Schedule) -> Tables:
    """Compiles ``s.executed`` (B and W split) to the executor's integer tables.

    Raises:
      ScheduleError: a message between stages whose devices are not neighbours
        along the axis (only a hand-made placement can do this).
    """
    e = s.executed
    p, last = e.stages, e.num_stages - 1
    when = {a: t for t, row in enumerate(e.ticks) for a in row if a is not None}
    lives: dict[str, list[list[tuple[int, int, Any]]]] = {
        k: [[] for _ in range(p)] for k in ("msg", "r", "s")
    }
    for mb in range(e.microbatches):
        for st in range(e.num_stages):
            d = e.device_of(st)
            f, b = when[Action("F", mb, st)], when[Action("B", mb, st)]
            w = when.get(Action("W", mb, st), b)  # a whole backward is B and W at once
            if st > 0:  # the stage input: from the previous stage's F until W
                lives["msg"][d].append((when[Action("F", mb, st - 1)], w, ("x", mb, st)))
            made = f if st == last else when[Action("B", mb, st + 1)]
            lives["msg"][d].append((made, b, ("c", mb, st)))
            lives["r"][d].append((f, b, (mb, st)))
            lives["s"][d].append((b, w, (mb, st)))
    slot: dict[str, dict[Any, int]] = {k: {} for k in lives}
    sizes = dict.fromkeys(lives, 1)
    for k, per_device in lives.items():
        for intervals in per_device:
            got, n = _allocate(intervals)
            slot[k].update(got)
            sizes[k] = max(sizes[k], n)

    ticks = len(e.ticks)
    t = {k: np.zeros((ticks, p), np.int32) for k in _ROWS}
    recv = {k: np.full((ticks, p), -1, np.int32) for k in _RECV}
    pairs: dict[str, set[tuple[int, int]]] = {"right": set(), "left": set()}

    def send(tick: int, src: int, dst: int, value_slot: int) -> None:
        if dst == src:
            recv["keep"][tick, src] = value_slot
        elif dst == (src + 1) % p:
            recv["from_left"][tick, dst] = value_slot
            pairs["right"].add((src, dst))
        elif dst == (src - 1) % p:
            recv["from_right"][tick, dst] = value_slot
            pairs["left"].add((src, dst))
        else:
            raise ScheduleError(
                f"schedule {s.name!r}: device {src} sends to device {dst}, which is not its "
                "neighbour along the pipeline axis; place consecutive stages on neighbouring "
                "devices (placement 'loop' or 'v')."
            )

    for tick, row in enumerate(e.ticks):
        for d, a in enumerate(row):
            if a is None:
                continue
            mb, st = a.microbatch, a.stage
            if a.kind == "F":
                kind = FWD_LAST if st == last else FWD
                if st < last:
                    send(tick, d, e.device_of(st + 1), slot["msg"][("x", mb, st + 1)])
                else:  # the loss gradient stays here, as stage `last`'s output cotangent
                    send(tick, d, d, slot["msg"][("c", mb, st)])
            elif a.kind == "B":
                kind = BWD_FIRST if st == 0 else BWD
                if Action("W", mb, st) not in when:
                    kind = BWD_FIRST_WGT if st == 0 else BWD_WGT
                if st > 0:
                    send(tick, d, e.device_of(st - 1), slot["msg"][("c", mb, st - 1)])
            else:
                kind = WGT
            t["kind"][tick, d], t["microbatch"][tick, d] = kind, mb
            t["chunk"][tick, d] = e.chunk_of(st)
            t["x_slot"][tick, d] = slot["msg"][("x", mb, st)] if st > 0 else -1
            t["c_slot"][tick, d] = slot["msg"][("c", mb, st)]
            t["r_slot"][tick, d], t["s_slot"][tick, d] = slot["r"][(mb, st)], slot["s"][(mb, st)]
    return Tables(
        **t,
        **recv,
        slots=sizes,
        right=tuple(sorted(pairs["right"])),
        left=tuple(sorted(pairs["left"])),
    )
