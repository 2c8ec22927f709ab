import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

import titanax as tx
from titanax.parallel.schedules import Action, from_actions
from titanax.testing import schedules

small = dict(stages=st.integers(1, 6), microbatches=st.integers(1, 12))


@settings(max_examples=60, deadline=None)
@given(**small)
def test_gpipe_and_1f1b_bubble_and_memory(stages, microbatches):
    p, m = stages, microbatches
    gpipe = tx.schedules.get("gpipe", stages=p, microbatches=m)
    one = tx.schedules.get("1f1b", stages=p, microbatches=m)
    expected = (p - 1) / (m + p - 1)
    assert gpipe.bubble_fraction == pytest.approx(expected)
    assert one.bubble_fraction == pytest.approx(expected)
    assert gpipe.peak_in_flight == (m,) * p
    assert max(one.peak_in_flight) <= p
    assert one.peak_in_flight == tuple(min(p - d, m) for d in range(p))


@settings(max_examples=40, deadline=None)
@given(stages=st.integers(1, 5), groups=st.integers(1, 4), virtual=st.integers(2, 4))
def test_interleaved_bubble(stages, groups, virtual):
    p, m, v = stages, stages * groups, virtual
    s = tx.schedules.get("interleaved_1f1b", stages=p, microbatches=m, virtual_stages=v)
    assert s.num_stages == p * v
    assert s.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))
    # every device holds its own v stages, round robin
    assert all(a.stage % p == d for d, acts in enumerate(s.actions) for a in acts)


@settings(max_examples=60, deadline=None)
@given(stages=st.integers(2, 6), microbatches=st.integers(1, 12))
def test_zero_bubble_beats_1f1b_with_its_memory(stages, microbatches):
    zb = tx.schedules.get("zero_bubble", stages=stages, microbatches=microbatches)
    one = tx.schedules.get("1f1b", stages=stages, microbatches=microbatches)
    assert zb.split_backward and not one.split_backward
    assert zb.bubble_fraction < one.bubble_fraction
    assert zb.peak_in_flight == one.peak_in_flight  # ZB-H1: no more activations than 1F1B


@settings(max_examples=60, deadline=None)
@given(s=schedules(max_stages=6, max_microbatches=12))  # all four names; v in 2..3 when interleaved
def test_tables_validate_and_run_each_microbatch_once(s):
    kinds = ("F", "B", "W") if s.split_backward else ("F", "B")
    assert s.split_backward == (s.name == "zero_bubble")
    done = [a for acts in s.actions for a in acts]
    assert len(done) == len(set(done)) == len(kinds) * s.microbatches * s.stages * s.virtual_stages
    # the lockstep table the executor runs holds the same actions, each after its dependencies
    when = {a: t for t, row in enumerate(s.ticks) for a in row if a is not None}
    assert set(when) == set(done)
    for a in done:
        for dep in s._deps(a):
            assert when[dep] < when[a]
    assert 0 <= s.tick_bubble_fraction < 1 and s.validate() is s


def test_render_and_png(tmp_path):
    s = tx.schedules.get("1f1b", stages=4, microbatches=8)
    text = s.render()
    assert text.splitlines()[3].startswith("device 3 | .  .  .  F0 B0 B0 F1")
    matplotlib = pytest.importorskip("matplotlib")
    assert matplotlib
    s.render_png(str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(name="1F1B", stages=4, microbatches=8),
            "schedule must be one of 'gpipe', '1f1b', 'interleaved_1f1b', 'zero_bubble'; got '1F1B'",
        ),
        (dict(name="1f1b", stages=0, microbatches=8), "stages must be a positive int, got 0"),
        (
            dict(name="gpipe", stages=4, microbatches=8, virtual_stages=2),
            "use 'interleaved_1f1b' for 2 stages per device",
        ),
        (
            dict(name="interleaved_1f1b", stages=4, microbatches=6, virtual_stages=2),
            "microbatches must be a multiple of 4 \\(and at least 4\\); got 6. Use microbatches=8",
        ),
        (
            dict(name="interleaved_1f1b", stages=4, microbatches=2, virtual_stages=2),
            "got 2. Use microbatches=4",
        ),
        (
            dict(name="interleaved_1f1b", stages=4, microbatches=8, virtual_stages=1),
            "needs virtual_stages >= 2",
        ),
    ],
)
def test_errors(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(tx.ScheduleError, match=match):
        tx.schedules.get(name, **kwargs)


def test_custom_schedules_are_validated():
    ok = from_actions(
        [[Action("F", 0, 0), Action("B", 0, 0)], [Action("F", 0, 1), Action("B", 0, 1)]],
        stages=2,
        microbatches=1,
    )
    assert ok.bubble_fraction == pytest.approx(0.5)
    with pytest.raises(tx.ScheduleError, match=r"B\(microbatch=0, stage=1\) runs 0 times"):
        from_actions(
            [[Action("F", 0, 0), Action("B", 0, 0)], [Action("F", 0, 1)]], stages=2, microbatches=1
        )
    with pytest.raises(tx.ScheduleError, match="comes before its F"):
        from_actions([[Action("B", 0, 0), Action("F", 0, 0)]], stages=1, microbatches=1)
    with pytest.raises(tx.ScheduleError, match="belongs on device 1"):
        from_actions(
            [[Action("F", 0, 1), Action("B", 0, 1)], [Action("F", 0, 0), Action("B", 0, 0)]],
            stages=2,
            microbatches=1,
        )
    # device 0 waits for B(0, stage 1) before running F(1) that device 1 needs first: deadlock
    with pytest.raises(tx.ScheduleError, match="deadlocks"):
        from_actions(
            [
                [Action("F", 0, 0), Action("B", 0, 0), Action("F", 1, 0), Action("B", 1, 0)],
                [Action("F", 1, 1), Action("F", 0, 1), Action("B", 0, 1), Action("B", 1, 1)],
            ],
            stages=2,
            microbatches=2,
        )


@pytest.mark.parametrize(
    "name, v, ideal, lockstep",
    [
        ("gpipe", 1, 105, 105),
        ("1f1b", 1, 105, 136),
        ("interleaved_1f1b", 2, 201, 260),
        ("zero_bubble", 1, 102, 102),
    ],
)
def test_lockstep_time_is_the_time_of_the_executed_ticks(name, v, ideal, lockstep):
    # DESIGN.md, "Pipeline time is lockstep time" (p=4, m=32): each tick costs its most
    # expensive action on any device.
    s = tx.schedules.get(name, stages=4, microbatches=32, virtual_stages=v)
    assert (s.total_time, s.lockstep_time) == (ideal, lockstep)
    by_hand = sum(max(s.cost(a.kind) for a in tick if a is not None) for tick in s.ticks)
    assert s.lockstep_time == by_hand
    busy = sum(s.cost(a.kind) for acts in s.actions for a in acts)
    assert s.lockstep_bubble_fraction == pytest.approx(1 - busy / (lockstep * 4))


def test_lockstep_time_is_never_below_the_ideal_and_gpipe_pays_nothing():
    for name, v in [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 1)]:
        for p in (2, 4, 8):
            for m in range(p, 8 * p + 1, p):
                s = tx.schedules.get(name, stages=p, microbatches=m, virtual_stages=v)
                assert s.lockstep_time >= s.total_time, (name, p, m)
                assert s.lockstep_bubble_fraction >= s.bubble_fraction - 1e-12
                if name == "gpipe":  # its ticks are all forwards or all backwards
                    assert s.lockstep_time == s.total_time
