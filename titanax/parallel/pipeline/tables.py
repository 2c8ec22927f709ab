"""A schedule compiled to the integer tables the executor runs, with buffer slots."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from titanax.parallel.schedules import Action, Kind, Schedule

__all__ = ["Tables", "compile_tables", "IDLE", "FWD", "FWD_LAST", "BWD", "BWD_FIRST", "WGT"]

IDLE, FWD, FWD_LAST, BWD, BWD_FIRST, WGT = range(6)


@dataclasses.dataclass(frozen=True)
class Tables:
    """A schedule compiled to per-tick, per-device integer tables (all ``(ticks, p)``)."""

    kind: np.ndarray
    microbatch: np.ndarray
    chunk: np.ndarray  # the device's local stage index: stage // p
    x_slot: np.ndarray  # buffer slot of the stage input (stages > 0)
    c_slot: np.ndarray  # buffer slot of the output cotangent
    r_slot: np.ndarray  # buffer slot of the saved residuals (F to the last B or W)
    recv_x: np.ndarray  # slot for the activation received after this tick, or -1
    recv_c: np.ndarray  # slot for the cotangent received after this tick, or -1
    slots: dict[str, int]  # buffer sizes: "x", "c", "r"

    def rows(self) -> dict[str, jax.Array]:
        names = ("kind", "microbatch", "chunk", "x_slot", "c_slot", "r_slot", "recv_x", "recv_c")
        return {k: jnp.asarray(getattr(self, k)) for k in names}


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
    """Turns the schedule's lockstep table into the executor's integer tables."""
    p, last = s.stages, s.num_stages - 1
    when = {a: t for t, row in enumerate(s.ticks) for a in row if a is not None}
    release: Kind = "W" if s.split_backward else "B"
    lives: dict[str, list[list[tuple[int, int, Any]]]] = {
        k: [[] for _ in range(p)] for k in ("x", "c", "r")
    }
    for mb in range(s.microbatches):
        for st in range(s.num_stages):
            d, end, key = st % p, when[Action(release, mb, st)], (mb, st)
            if st > 0:
                lives["x"][d].append((when[Action("F", mb, st - 1)], end, key))
            made = when[Action("F", mb, st)] if st == last else when[Action("B", mb, st + 1)]
            lives["c"][d].append((made, end, key))
            lives["r"][d].append((when[Action("F", mb, st)], end, key))
    slot: dict[str, dict[Any, int]] = {k: {} for k in lives}
    sizes = dict.fromkeys(lives, 1)
    for k, per_device in lives.items():
        for intervals in per_device:
            got, n = _allocate(intervals)
            slot[k].update(got)
            sizes[k] = max(sizes[k], n)
    ticks = len(s.ticks)
    t = {k: np.zeros((ticks, p), np.int32) for k in ("kind", "mb", "chunk", "x", "c", "r")}
    recv = {k: np.full((ticks, p), -1, np.int32) for k in ("x", "c")}
    for tick, row in enumerate(s.ticks):
        for d, a in enumerate(row):
            if a is None:
                continue
            key = (a.microbatch, a.stage)
            if a.kind == "F":
                kind = FWD_LAST if a.stage == last else FWD
                if a.stage < last:  # the next stage's device receives it after this tick
                    recv["x"][tick, (a.stage + 1) % p] = slot["x"][(a.microbatch, a.stage + 1)]
            elif a.kind == "B":
                kind = BWD_FIRST if a.stage == 0 else BWD
                if a.stage > 0:
                    recv["c"][tick, (a.stage - 1) % p] = slot["c"][(a.microbatch, a.stage - 1)]
            else:
                kind = WGT
            t["kind"][tick, d], t["mb"][tick, d] = kind, a.microbatch
            t["chunk"][tick, d] = a.stage // p
            t["x"][tick, d] = slot["x"].get(key, 0)
            t["c"][tick, d], t["r"][tick, d] = slot["c"][key], slot["r"][key]
    return Tables(
        t["kind"], t["mb"], t["chunk"], t["x"], t["c"], t["r"], recv["x"], recv["c"], sizes
    )
