"""Pipeline schedules as data: per device, the ordered actions ``F``, ``B``, ``W``.

A `Schedule` is built in pure Python before anything is traced, so it can be
checked, measured and drawn without a model: `Schedule.validate`,
`Schedule.bubble_fraction`, `Schedule.peak_in_flight`,
`Schedule.render`. The pipeline executor replays `Schedule.executed` (every
backward split into ``B`` and ``W``) in one SPMD program, tick by tick.

Where model stage ``s`` lives is the schedule's ``placement``: ``"loop"`` puts it on
device ``s % stages``, so with ``virtual_stages = v`` device ``d`` holds stages
``d, d + p, ..., d + (v - 1) p`` (Megatron's interleaving); ``"v"`` (ZB-V, two stages
per device) puts stages ``d`` and ``2p - 1 - d`` on device ``d``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal, NamedTuple

from titanax.errors import ScheduleError

__all__ = ["Action", "Schedule", "get", "NAMES"]

Kind = Literal["F", "B", "W"]
Placement = Literal["loop", "v"]
NAMES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zero_bubble_v")
PLACEMENTS = ("loop", "v")
COST = {"F": 1, "B": 2, "W": 1}  # time units; B is 1 when W is split from it


class Action(NamedTuple):
    """One unit of pipeline work.

    Attributes:
      kind: ``"F"`` forward, ``"B"`` backward (input gradient, and the weight
        gradient unless split), ``"W"`` weight gradient (split schedules only).
      microbatch: the microbatch, ``0 .. microbatches - 1``.
      stage: the model stage, ``0 .. stages * virtual_stages - 1``.
    """

    kind: Kind
    microbatch: int
    stage: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: for each device, the ordered actions it performs.

    Attributes:
      name: a label (``"1f1b"``, or anything for a hand-made schedule).
      stages: devices along the pipeline axis (``p``).
      microbatches: microbatches per step (``m``).
      virtual_stages: model stages per device (``v``).
      actions: one tuple of `Action` per device, in execution order.
      placement: where model stages live: ``"loop"`` (stage ``s`` on device
        ``s % stages``) or ``"v"`` (``virtual_stages=2``; device ``d`` holds stages
        ``d`` and ``2 * stages - 1 - d``, as in ZB-V).

    Examples:
      >>> import titanax as tx
      >>> s = tx.schedules.get("1f1b", stages=2, microbatches=3)
      >>> [str(a) for a in s.actions[0]]
      ['F0', 'F1', 'B0', 'F2', 'B1', 'B2']
      >>> s.bubble_fraction  # (p - 1) / (m + p - 1)
      0.25
      >>> s.peak_in_flight
      (2, 1)
      >>> print(s.render())
      device 0 | F0 F1 .  .  B0 B0 F2 B1 B1 .  B2 B2
      device 1 | .  F0 B0 B0 F1 B1 B1 F2 B2 B2 .  .
    """

    name: str
    stages: int
    microbatches: int
    virtual_stages: int
    actions: tuple[tuple[Action, ...], ...]
    placement: Placement = "loop"

    @property
    def num_stages(self) -> int:
        """Model stages: ``stages * virtual_stages``."""
        return self.stages * self.virtual_stages

    @functools.cached_property
    def split_backward(self) -> bool:
        """Whether the backward is split into ``B`` (input gradient) and ``W`` (weight gradient)."""
        return any(a.kind == "W" for acts in self.actions for a in acts)

    def device_of(self, stage: int) -> int:
        """The device that holds model stage ``stage``, by the placement."""
        p = self.stages
        if self.placement == "v":
            return stage if stage < p else 2 * p - 1 - stage
        return stage % p

    def chunk_of(self, stage: int) -> int:
        """The device-local index of ``stage``'s parameters: ``stage // stages`` (both placements)."""
        return stage // self.stages

    def cost(self, kind: str) -> int:
        return 1 if (kind == "B" and self.split_backward) else COST[kind]

    @functools.cached_property
    def executed(self) -> Schedule:
        """The program the executor runs: this schedule, with the backward split where
        a whole one would stretch a tick.

        A split schedule (one with ``W`` actions) is returned as is, and so is one
        whose lockstep table already runs at its ideal time (GPipe: every tick holds
        only forwards or only backwards, so no tick waits on a slower action).
        Otherwise each device's ``B(mb, s)`` becomes the input gradient only,
        followed at once by ``W(mb, s)``, the weight gradient (1 time unit each
        instead of 2 for the whole backward). Same placement, same activations held.
        Keeping GPipe whole keeps its ``2 (m + p - 1)`` ticks (split: ``3m + 2(p - 1)``,
        3 units shorter in the lockstep model but with more ticks, and each tick costs
        a ``ppermute`` and a switch on the device).

        Examples:
          >>> import titanax as tx
          >>> s = tx.schedules.get("1f1b", stages=2, microbatches=2)
          >>> [str(a) for a in s.executed.actions[0]]
          ['F0', 'F1', 'B0', 'W0', 'B1', 'W1']
          >>> g = tx.schedules.get("gpipe", stages=2, microbatches=2)
          >>> g.executed is g
          True
        """
        if self.split_backward or _lockstep_time(self, _tick_table(self)) == self.total_time:
            return self
        rows = tuple(
            tuple(x for a in acts for x in ((a, a._replace(kind="W")) if a.kind == "B" else (a,)))
            for acts in self.actions
        )
        return dataclasses.replace(self, actions=rows)

    def validate(self) -> Schedule:
        """Checks the table and returns it.

        Raises:
          ScheduleError: an unknown placement, placement ``"v"`` without
            ``virtual_stages=2``, an action on the wrong device or out of range, a
            microbatch not run exactly once per stage, a backward before its
            forward, or an order that deadlocks across devices.
        """
        p, m, s_total = self.stages, self.microbatches, self.num_stages
        where = f"schedule {self.name!r} (stages={p}, microbatches={m}, virtual_stages={self.virtual_stages})"
        if self.placement not in PLACEMENTS:
            allowed = ", ".join(repr(x) for x in PLACEMENTS)
            raise ScheduleError(
                f"{where}: placement must be one of {allowed}; got {self.placement!r}."
            )
        if self.placement == "v" and self.virtual_stages != 2:
            raise ScheduleError(
                f"{where}: placement 'v' puts stages d and {2 * p - 1}-d on device d, so it "
                f"needs virtual_stages=2; got virtual_stages={self.virtual_stages}. Pass "
                "virtual_stages=2, or placement='loop' for round-robin stages."
            )
        if len(self.actions) != p:
            raise ScheduleError(f"{where}: has {len(self.actions)} device rows; expected {p}.")
        kinds = ("F", "B", "W") if self.split_backward else ("F", "B")
        seen: dict[Action, int] = {}
        problems = []
        for d, acts in enumerate(self.actions):
            for a in acts:
                if a.kind not in kinds or not (0 <= a.microbatch < m and 0 <= a.stage < s_total):
                    problems.append(f"device {d}: {a!r} is out of range")
                elif self.device_of(a.stage) != d:
                    problems.append(
                        f"device {d}: {a!r} belongs on device {self.device_of(a.stage)}"
                    )
                seen[a] = seen.get(a, 0) + 1
        for kind in kinds:
            for mb in range(m):
                for s in range(s_total):
                    n = seen.get(Action(kind, mb, s), 0)  # type: ignore[arg-type]
                    if n != 1:
                        problems.append(
                            f"{kind}(microbatch={mb}, stage={s}) runs {n} times, not once"
                        )
        for d, acts in enumerate(self.actions):
            position = {a: i for i, a in enumerate(acts)}
            for a in acts:
                need = {"B": "F", "W": "B"}.get(a.kind)
                if need and position.get(Action(need, a.microbatch, a.stage), -1) > position[a]:  # type: ignore[arg-type]
                    problems.append(f"device {d}: {a!r} comes before its {need}")
        if problems:
            shown = "\n".join(f"  * {x}" for x in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise ScheduleError(f"{where} is invalid:\n{shown}{more}")
        _ = self._timeline  # simulating raises on a deadlock; kept for total_time
        return self

    def _deps(self, a: Action) -> list[Action]:
        last = self.num_stages - 1
        if a.kind == "F":
            return [Action("F", a.microbatch, a.stage - 1)] if a.stage > 0 else []
        if a.kind == "B":
            deps = [Action("F", a.microbatch, a.stage)]
            return deps + ([Action("B", a.microbatch, a.stage + 1)] if a.stage < last else [])
        return [Action("B", a.microbatch, a.stage)]

    def _simulate(self, unit: bool) -> list[list[tuple[int, int, Action]]]:
        """Per device, ``(start, end, action)`` with costs (or one tick each when ``unit``).

        A result is usable from the end of the tick that produced it: the
        executor passes messages between ticks.
        """
        end: dict[Action, int] = {}
        nxt = [0] * self.stages
        free = [0] * self.stages
        out: list[list[tuple[int, int, Action]]] = [[] for _ in range(self.stages)]
        remaining = sum(len(a) for a in self.actions)
        while remaining:
            progressed = False
            for d, acts in enumerate(self.actions):
                while nxt[d] < len(acts):
                    a = acts[nxt[d]]
                    deps = self._deps(a)
                    if any(x not in end for x in deps):
                        break
                    start = max([free[d], *(end[x] for x in deps)])
                    stop = start + (1 if unit else self.cost(a.kind))
                    end[a], free[d] = stop, stop
                    out[d].append((start, stop, a))
                    nxt[d] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:
                stuck = ", ".join(
                    f"device {d} waits at {acts[nxt[d]]!r}"
                    for d, acts in enumerate(self.actions)
                    if nxt[d] < len(acts)
                )
                raise ScheduleError(
                    f"schedule {self.name!r} deadlocks: {stuck}. Each device must be able to "
                    "run its next action once the actions it depends on have run."
                )
        return out

    @functools.cached_property
    def _timeline(self) -> list[list[tuple[int, int, Action]]]:
        return self._simulate(unit=False)

    @functools.cached_property
    def ticks(self) -> tuple[tuple[Action | None, ...], ...]:
        """The lockstep table the executor runs: per tick, per device, an action of
        `executed` or ``None``; each action as early as its inputs allow."""
        return _tick_table(self.executed)

    @property
    def total_time(self) -> int:
        """Ideal length of the schedule as written, in time units (F=1, B=2, or B=1 and W=1
        when split), each device starting an action as soon as its inputs are ready."""
        return max((t[-1][1] for t in self._timeline if t), default=0)

    @property
    def bubble_fraction(self) -> float:
        """Ideal idle time over `total_time`, summed over devices."""
        total = self.total_time * self.stages
        busy = sum(stop - start for row in self._timeline for start, stop, _ in row)
        return (total - busy) / total if total else 0.0

    @property
    def tick_bubble_fraction(self) -> float:
        """Idle slots over all slots of `ticks` (equal to `lockstep_bubble_fraction` when
        every action of `executed` costs one unit, i.e. when it is split)."""
        slots = len(self.ticks) * self.stages
        return sum(a is None for row in self.ticks for a in row) / slots if slots else 0.0

    @property
    def lockstep_time(self) -> int:
        """The time of the program the executor really runs, in time units.

        The executor runs `ticks` one after another in one SPMD program, with a
        ``ppermute`` between ticks, so no device starts tick ``t + 1`` before its
        neighbours finish tick ``t``: each tick costs its most expensive action on any
        device. That is why it runs `executed`, with the backward split into B and W
        of 1 unit each wherever a whole one would stretch a tick: a tick that mixed a
        forward (1) on one device with a whole backward (2) on another would cost 2, and
        1F1B at ``stages=4, microbatches=32`` ran 136 units that way against its ideal
        105. Split, every tick costs 1, so this is ``len(ticks)``; and as every action
        of the split program ends no later than in the whole-backward timeline (by
        induction over the dependencies), it is never above `total_time`. A schedule
        kept whole (GPipe) runs at exactly `total_time`.

        Examples:
          >>> import titanax as tx
          >>> g = tx.schedules.get("gpipe", stages=4, microbatches=32)
          >>> s = tx.schedules.get("1f1b", stages=4, microbatches=32)
          >>> (g.total_time, g.lockstep_time), (s.total_time, s.lockstep_time)
          ((105, 105), (105, 102))
        """
        return _lockstep_time(self.executed, self.ticks)

    @property
    def lockstep_bubble_fraction(self) -> float:
        """The idle share of the executed program: ``1 - busy / (lockstep_time * stages)``,
        where ``busy`` is the time units of every action of `executed` on every device."""
        e = self.executed
        total = self.lockstep_time * self.stages
        busy = sum(e.cost(a.kind) for acts in e.actions for a in acts)
        return 1.0 - busy / total if total else 0.0

    @property
    def peak_in_flight(self) -> tuple[int, ...]:
        """Per device, the most microbatch activations held at once (from F to the last B or W)."""
        release = "W" if self.split_backward else "B"
        peaks = []
        for acts in self.actions:
            held = peak = 0
            for a in acts:
                held += (a.kind == "F") - (a.kind == release)
                peak = max(peak, held)
            peaks.append(peak)
        return tuple(peaks)

    def render(self) -> str:
        """The timeline as text: one row per device, one cell per time unit (``.`` is idle)."""
        width = 2 + len(str(self.microbatches - 1)) + (2 if self.virtual_stages > 1 else 0)
        rows = []
        for d, row in enumerate(self._timeline):
            cells = ["."] * self.total_time
            for start, stop, a in row:
                label = str(a) + (f"/{self.chunk_of(a.stage)}" if self.virtual_stages > 1 else "")
                for t in range(start, stop):
                    cells[t] = label
            rows.append(f"device {d} | " + " ".join(c.ljust(width - 1) for c in cells).rstrip())
        return "\n".join(rows)

    def render_png(self, path: str) -> None:
        """Draws the timeline to a PNG file (needs matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        colors = {"F": "#4c72b0", "B": "#dd8452", "W": "#55a868"}
        fig, ax = plt.subplots(figsize=(max(6, self.total_time * 0.25), 0.5 * self.stages + 1))
        for d, row in enumerate(self._timeline):
            for start, stop, a in row:
                ax.broken_barh([(start, stop - start)], (d - 0.4, 0.8), color=colors[a.kind])
                ax.text(
                    (start + stop) / 2,
                    d,
                    str(a.microbatch),
                    ha="center",
                    va="center",
                    color="white",
                    fontsize=7,
                )
        ax.set_yticks(range(self.stages), [f"device {d}" for d in range(self.stages)])
        ax.invert_yaxis()
        ax.set_xlabel("time (F=1, B=2; B=W=1 when split)")
        ax.set_title(
            f"{self.name}: p={self.stages}, m={self.microbatches}, "
            f"v={self.virtual_stages}, bubble {self.bubble_fraction:.3f}"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _tick_table(s: Schedule) -> tuple[tuple[Action | None, ...], ...]:
    """``s`` as a lockstep table: per tick, per device, an action or ``None``."""
    timeline = s._simulate(unit=True)
    total = max((t[-1][1] for t in timeline if t), default=0)
    table: list[list[Action | None]] = [[None] * s.stages for _ in range(total)]
    for d, row in enumerate(timeline):
        for start, _, a in row:
            table[start][d] = a
    return tuple(tuple(r) for r in table)


def _lockstep_time(s: Schedule, ticks: tuple[tuple[Action | None, ...], ...]) -> int:
    """Each tick costs its most expensive action on any device."""
    return sum(max((s.cost(a.kind) for a in row if a is not None), default=0) for row in ticks)


def _gpipe(p: int, m: int) -> list[list[Action]]:
    return [
        [Action("F", i, d) for i in range(m)] + [Action("B", i, d) for i in range(m)]
        for d in range(p)
    ]


def _one_f_one_b(p: int, m: int) -> list[list[Action]]:
    rows = []
    for d in range(p):
        warm = min(p - 1 - d, m)
        row = [Action("F", i, d) for i in range(warm)]
        for i in range(m - warm):
            row += [Action("F", warm + i, d), Action("B", i, d)]
        row += [Action("B", i, d) for i in range(m - warm, m)]
        rows.append(row)
    return rows


def _interleaved(p: int, m: int, v: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B: microbatches in groups of ``p``, chunk by chunk."""

    def fwd(k: int, d: int) -> Action:
        chunk = (k // p) % v
        return Action("F", (k // (p * v)) * p + k % p, chunk * p + d)

    def bwd(k: int, d: int) -> Action:
        chunk = v - 1 - (k // p) % v
        return Action("B", (k // (p * v)) * p + k % p, chunk * p + d)

    total = m * v
    rows = []
    for d in range(p):
        warm = min((p - d - 1) * 2 + (v - 1) * p, total)
        row = [fwd(k, d) for k in range(warm)]
        for i in range(total - warm):
            row += [fwd(warm + i, d), bwd(i, d)]
        row += [bwd(k, d) for k in range(total - warm, total)]
        rows.append(row)
    return rows


def _zero_bubble_h1(p: int, m: int) -> list[list[Action]]:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", Section 3.1, Figure 3).

    1F1B with the weight gradient W split from B. Device ``d`` runs 1F1B's ``p - d``
    warm-up forwards, then ``B_k, W_(k-d), F_(k+p-d)`` for ``k = 0, 1, ...``, then its
    last ``d`` W. Its W lags its B by ``d`` microbatches: a later device, whose B arrive
    sooner, runs each at once and leaves ``d`` W for the cool-down, where 1F1B idles.
    Every device holds at most ``p`` microbatches from F to W (1F1B's peak, on device 0).

    With F = B = W = 1 and ``m >= p`` each device idles ``p - 1`` units (a third of
    1F1B's ``3(p - 1)``): time ``3m + p - 1``. With ``m < p`` the pipeline never fills
    and the table takes ``2(m + p) - 1`` units, still below 1F1B's ``3(m + p - 1)``.
    """
    rows = []
    for d in range(p):
        warm = min(p - d, m)
        row = [Action("F", i, d) for i in range(warm)]
        for k in range(m):
            row.append(Action("B", k, d))
            row += [Action("W", k - d, d)] if k >= d else []
            row += [Action("F", k + warm, d)] if k + warm < m else []
        row += [Action("W", i, d) for i in range(max(m - d, 0), m)]
        rows.append(row)
    return rows


def _zero_bubble_v(p: int, m: int) -> list[list[Action]]:
    """ZB-V (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory", V-ZB; also
    in "Zero Bubble Pipeline Parallelism"): ``2p`` stage chunks, device ``d`` holding chunks
    ``d`` and ``2p - 1 - d`` (placement ``"v"``), B and W split, memory capped at 1F1B's.

    Built like the paper's generator, by simulating time (F = B = W = 1 per chunk): each
    tick a device runs a ready B (chunk 0 first: it ends the microbatch there, and its W
    frees memory), else a ready F while it holds fewer than ``2p`` chunk activations (1F1B's
    ``p`` whole stages; chunk 1 first, towards the loss), else its oldest pending W. That
    gives the paper's phases: warm-up forwards of chunk 0 then of both chunks, a steady
    state of F, B and W of both chunks at the memory cap, and a cool-down filled with W.

    Measured for ``p`` in 2, 3, 4, 8 and ``m = p`` or ``2p <= m <= 8p``: ``6m + p - 1``
    units, so each device idles ``p - 1`` half-stage units where ZB-H1 idles ``p - 1``
    whole ones. Some other sizes idle a few units more (``p = 8, m = 9``: 11; ``p = 6``: 7).
    With ``m < p`` the V never fills (``m = 1``: ``4p + 1``, the critical path).
    """
    last, limit, never = 2 * p - 1, 2 * p, 6 * m * p
    # per kind, stage and microbatch: the tick after which the result is usable
    end = {k: [[never] * m for _ in range(2 * p)] for k in ("F", "B")}
    rows: list[list[Action]] = [[] for _ in range(p)]
    ran = {k: [[0, 0] for _ in range(p)] for k in ("F", "B")}  # per device and chunk
    pending_w: list[list[Action]] = [[] for _ in range(p)]
    held = [0] * p

    def ready(kind: Kind, i: int, s: int, t: int) -> bool:
        if i >= m:
            return False
        if kind == "F":
            return s == 0 or end["F"][s - 1][i] <= t
        return end["F"][s][i] <= t and (s == last or end["B"][s + 1][i] <= t)

    t = 0
    while any(len(r) < 6 * m for r in rows):
        chosen: list[Action | None] = []
        for d in range(p):
            own = (d, last - d)  # its chunks 0 and 1
            order: list[tuple[Kind, int]] = [("B", 0), ("B", 1)]
            order += [("F", 1), ("F", 0)] if held[d] < limit else []
            go = [(k, c) for k, c in order if ready(k, ran[k][d][c], own[c], t)]
            if go:
                k, c = go[0]
                chosen.append(Action(k, ran[k][d][c], own[c]))
            else:
                chosen.append(pending_w[d][0] if pending_w[d] else None)
        if not any(chosen):  # then nothing can change; not seen for p <= 8, m <= 8p
            raise ScheduleError(
                f"schedule 'zero_bubble_v' (stages={p}, microbatches={m}) stalls at tick {t}; "
                "this is a bug in Titanax: please report it, and use 'zero_bubble' meanwhile."
            )
        for d, a in enumerate(chosen):
            if a is None:
                continue
            rows[d].append(a)
            if a.kind == "W":
                pending_w[d].pop(0)
                held[d] -= 1
                continue
            end[a.kind][a.stage][a.microbatch] = t + 1
            ran[a.kind][d][a.stage // p] += 1
            held[d] += a.kind == "F"
            if a.kind == "B":
                pending_w[d].append(a._replace(kind="W"))
        t += 1
    return rows


def get(name: str, *, stages: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """Builds and validates a named schedule.

    Args:
      name: one of ``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"``, ``"zero_bubble"``
        (ZB-H1), ``"zero_bubble_v"`` (ZB-V, placement ``"v"``).
      stages: devices along the pipeline axis (``p``).
      microbatches: microbatches per step (``m``).
      virtual_stages: model stages per device (``v``); ``interleaved_1f1b`` needs
        ``v >= 2``, ``zero_bubble_v`` exactly 2, the others 1.

    Returns:
      A validated `Schedule`.

    Raises:
      ScheduleError: an unknown name (the allowed ones are listed), sizes that
        are not positive integers, ``virtual_stages`` that the schedule does
        not support, or fewer microbatches than it needs.

    Examples:
      >>> import titanax as tx
      >>> gpipe = tx.schedules.get("gpipe", stages=4, microbatches=8)
      >>> one = tx.schedules.get("1f1b", stages=4, microbatches=8)
      >>> gpipe.bubble_fraction == one.bubble_fraction == 3 / 11
      True
      >>> gpipe.peak_in_flight[0], one.peak_in_flight[0]
      (8, 4)
      >>> tx.schedules.get("1F1B", stages=4, microbatches=8)
      Traceback (most recent call last):
      ...
      titanax.errors.ScheduleError: schedule must be one of 'gpipe', '1f1b', 'interleaved_1f1b', 'zero_bubble', 'zero_bubble_v'; got '1F1B'.
    """
    if name not in NAMES:
        allowed = ", ".join(repr(n) for n in NAMES)
        raise ScheduleError(f"schedule must be one of {allowed}; got {name!r}.")
    for arg, value in (
        ("stages", stages),
        ("microbatches", microbatches),
        ("virtual_stages", virtual_stages),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleError(f"schedule {name!r}: {arg} must be a positive int, got {value!r}.")
    p, m, v = stages, microbatches, virtual_stages
    placement: Placement = "loop"
    if name == "zero_bubble_v":
        if v != 2:
            raise ScheduleError(
                "schedule 'zero_bubble_v' holds two model stages per device, in a V: pass "
                f"virtual_stages=2; got virtual_stages={v}."
            )
        rows, placement = _zero_bubble_v(p, m), "v"
    elif name == "interleaved_1f1b":
        if v < 2:
            raise ScheduleError(
                f"schedule 'interleaved_1f1b' needs virtual_stages >= 2, got {v}; with one "
                "stage per device use '1f1b'."
            )
        if m < p or m % p:
            fix = max(p, -(-m // p) * p)
            raise ScheduleError(
                f"schedule 'interleaved_1f1b' runs microbatches in groups of stages={p}: "
                f"microbatches must be a multiple of {p} (and at least {p}); got {m}. "
                f"Use microbatches={fix}."
            )
        rows = _interleaved(p, m, v)
    else:
        if v != 1:
            other = "'zero_bubble_v'" if name == "zero_bubble" and v == 2 else "'interleaved_1f1b'"
            raise ScheduleError(
                f"schedule {name!r} holds one stage per device (virtual_stages=1), got "
                f"virtual_stages={v}; use {other} for {v} stages per device."
            )
        build = {"gpipe": _gpipe, "1f1b": _one_f_one_b, "zero_bubble": _zero_bubble_h1}[name]
        rows = build(p, m)
    return Schedule(name, p, m, v, tuple(tuple(r) for r in rows), placement).validate()


def from_actions(
    actions: Sequence[Sequence[Action]],
    *,
    stages: int,
    microbatches: int,
    virtual_stages: int = 1,
    name: str = "custom",
    placement: Placement = "loop",
) -> Schedule:
    """A validated user-made schedule from per-device action lists.

    ``placement`` says where model stages live: ``"loop"`` (stage ``s`` on device
    ``s % stages``) or ``"v"`` (``virtual_stages=2``: stages ``d`` and
    ``2 * stages - 1 - d`` on device ``d``).
    """
    return Schedule(
        name,
        stages,
        microbatches,
        virtual_stages,
        tuple(tuple(Action(*a) for a in row) for row in actions),
        placement,
    ).validate()
