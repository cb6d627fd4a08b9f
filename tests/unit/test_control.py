"""The supervisor's control law on figures (no VM): the floor, pressure, pacing, hysteresis and the backoff after
a deflation. tests/unit/data/squeeze_192.json holds STATS recorded from a real guest (tests/vm/test_supervisor.py
checks the same behaviour on live guests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memvisor.service import control, need
from memvisor.service.control import Control, Figures, decide

MIB = 1 << 20
DATA = Path(__file__).parent / "data"


def stats(uptime: float, available_mib: int, stall_us: int = 0, avg10: float = 0.0) -> dict[str, Any]:
    return {"uptime": uptime, "meminfo": {"MemAvailable": available_mib * 1024}, "psi": {"some_avg10": avg10},
            "reclaim": {"stall_us": stall_us}}


def near(target: int, limit: int) -> bool:
    """A squeeze ends within MIN_STEP above its limit (itself MIN_STEP above the floor)."""
    return limit <= target < limit + control.MIN_STEP


def run(c: Control, reports: list[dict[str, Any]], start: float = 0.0, actual: int | None = None) -> list[int]:
    """One tick a second per report; targets applied as the supervisor does. Returns the targets."""
    out = []
    for i, body in enumerate(reports):
        c.target_bytes, c.reason = decide(c, Figures.of(body), actual, False, start + i)
        out.append(c.target_bytes)
    return out


def test_an_idle_guest_is_squeezed_ever_more_gently_and_never_below_its_need() -> None:
    c = Control("a", 1024 * MIB, 0, 300 * MIB, 1024 * MIB)
    targets = run(c, [stats(10 + i, 500) for i in range(120)])
    steps = [a - b for a, b in zip(targets, targets[1:], strict=False) if a != b]
    assert min(targets) >= 300 * MIB and near(targets[-1], 300 * MIB + control.MIN_STEP)  # to its need, not below
    assert steps[0] == int(control.SHRINK * 1024 * MIB)  # far from the floor: the largest step
    assert steps == sorted(steps, reverse=True) and steps[-1] < steps[0] / 2  # slower as it nears the floor
    assert len(set(targets[-30:])) == 1  # then it settles: no oscillation on steady figures


def test_a_need_that_grows_raises_the_target_at_once() -> None:
    c = Control("a", 256 * MIB, 0, 100 * MIB, 100 * MIB)
    c.need_bytes = 140 * MIB  # the guest's unreclaimable memory grew
    target, reason = decide(c, Figures.of(stats(5, 30)), None, False, 0.0)
    assert target == 140 * MIB + control.MIN_STEP and "needs 140 MiB" in reason
    assert Control("b", 256 * MIB, 180 * MIB, 100 * MIB, 256 * MIB).floor_bytes == 180 * MIB  # the policy's floor


def test_fresh_pressure_gets_memory_back_in_the_tick_that_sees_it_and_counts_once() -> None:
    c = Control("a", 256 * MIB, 0, 96 * MIB, 128 * MIB)
    run(c, [stats(10, 10, stall_us=0, avg10=5.0)])  # neither idle nor pressed
    # 400 ms of stall in the 1 s since the last report: pressed.
    target, reason = decide(c, Figures.of(stats(11, 60, stall_us=400_000, avg10=8.0)), None, False, 1.0)
    assert target == 128 * MIB + 64 * MIB and "pressure" in reason
    c.target_bytes = target
    # The same report seen again (no new one yet) grows nothing, though its average still says 8%.
    assert decide(c, Figures.of(stats(11, 60, stall_us=400_000, avg10=8.0)), None, False, 2.0)[0] == target


def test_after_pressure_the_squeeze_holds_then_stops_above_where_the_guest_was_pressed() -> None:
    c = Control("a", 256 * MIB, 0, 96 * MIB, 168 * MIB)
    squeezed = run(c, [stats(1, 40)])[0]  # idle: squeezed (to ~160 MiB)
    assert squeezed < 168 * MIB
    targets = run(c, [stats(2, 4, stall_us=500_000)], start=1)  # pressed right after: grown by 64 MiB
    assert targets == [squeezed + 64 * MIB]
    # Idle from then on: nothing moves for HOLD_S, then the squeeze stops at the pressed target + GROW/2, not at 96.
    idle = [stats(3 + i, 100, stall_us=500_000) for i in range(200)]
    targets = run(c, idle, start=2)
    held = int(control.HOLD_S) - 1
    assert targets[:held] == [squeezed + 64 * MIB] * held
    limit = squeezed + 32 * MIB
    assert min(targets) >= limit and near(targets[-1], limit)
    # Much later the remembered pressure is forgotten and the floor is the limit again.
    late = run(c, [stats(1000 + i, 100, stall_us=500_000) for i in range(120)], start=2 + control.REMEMBER_S)
    assert near(late[-1], 96 * MIB + control.MIN_STEP)


def test_pressure_without_a_squeeze_before_it_does_not_limit_the_next_squeeze() -> None:
    c = Control("a", 256 * MIB, 0, 96 * MIB, 192 * MIB)  # not squeezed lately: the workload grew
    run(c, [stats(1, 10, avg10=5.0), stats(2, 4, stall_us=500_000)])
    targets = run(c, [stats(3 + i, 100, stall_us=500_000) for i in range(200)], start=2)
    assert near(targets[-1], 96 * MIB + control.MIN_STEP)


def test_a_squeezed_guest_with_little_available_memory_but_no_stall_is_still_idle() -> None:
    c = Control("a", 192 * MIB, 0, 98 * MIB, 168 * MIB)
    targets = run(c, [stats(i, 6, stall_us=1000 * i) for i in range(1, 60)])  # 6 MiB available, 0.1% stall
    assert near(targets[-1], 98 * MIB + control.MIN_STEP)  # its cold pages go to its swap, down to its need


def test_a_floor_that_wobbles_by_less_than_a_step_moves_nothing() -> None:
    c = Control("a", 192 * MIB, 0, 98 * MIB, 192 * MIB)
    run(c, [stats(i, 6) for i in range(1, 40)])
    settled = c.target_bytes
    for i, wobble in enumerate([1, -1, 2, -2, 3, 0] * 20):  # the guest's figures move by a few MiB
        c.observe_need(100.0 + i, 98 * MIB + wobble * MIB)
        assert run(c, [stats(100 + i, 6)], start=100 + i) == [settled] or i == 0
        settled = c.target_bytes  # at most one move: up to the most it needed, then still


def test_figures_between_the_thresholds_move_nothing() -> None:
    c = Control("a", 256 * MIB, 0, 96 * MIB, 150 * MIB)
    # 5% stall: not pressed, not idle.
    targets = run(c, [stats(i, 10, stall_us=50_000 * i, avg10=5.0) for i in range(1, 60)])
    assert set(targets) == {150 * MIB}


def test_a_deflation_on_oom_gives_memory_back_and_backs_off() -> None:
    c = Control("a", 192 * MIB, 0, 90 * MIB, 100 * MIB)
    decide(c, Figures.of(stats(1, 30)), 100 * MIB, False, 0.0)  # the balloon is where it was asked to be
    target, reason = decide(c, Figures.of(stats(2, 30)), 103 * MIB, False, 1.0)  # it gave 3 MiB back on its own
    assert target == 103 * MIB + 48 * MIB and "deflated its balloon" in reason and c.deflations == 1
    c.target_bytes = target
    # Idle figures during the backoff squeeze nothing.
    assert decide(c, Figures.of(stats(30, 100)), target, False, 30.0)[0] == target
    # An `actual` that lags behind a lower target while the balloon inflates is not a deflation.
    c2 = Control("b", 192 * MIB, 0, 90 * MIB, 120 * MIB)
    decide(c2, Figures.of(stats(1, 30)), 150 * MIB, False, 0.0)
    decide(c2, Figures.of(stats(2, 30)), 140 * MIB, False, 1.0)
    assert c2.deflations == 0


def test_garbage_figures_are_neither_idle_nor_pressed() -> None:
    c = Control("a", 256 * MIB, 0, 96 * MIB, 200 * MIB)
    body = {"uptime": float("nan"), "meminfo": {"MemAvailable": "lots"}, "psi": {"some_avg10": 500},
            "reclaim": {"stall_us": -1}}
    assert decide(c, Figures.of(body), None, False, 0.0)[0] == 200 * MIB
    assert decide(c, Figures.of({}), None, False, 1.0)[0] == 200 * MIB


def test_the_guests_need_from_its_figures_and_the_estimate() -> None:
    reclaim = {"boot_memtotal_kib": 145204, "unreclaimable_kib": 31452, "watermark_kib": 1811}
    measured = need.from_guest(192 * MIB, reclaim)
    assert measured is not None
    assert measured == (192 * MIB - 145204 * 1024) + (31452 + 1811) * 1024 + need.MARGIN
    assert need.from_guest(192 * MIB, {"unreclaimable_kib": 1}) is None  # incomplete: the estimate stands
    assert need.from_guest(192 * MIB, {**reclaim, "boot_memtotal_kib": 10**9}) is None  # more than it has
    assert need.from_guest(192 * MIB, {**reclaim, "unreclaimable_kib": 10**9}) == 192 * MIB  # capped: not squeezed


def test_recorded_squeeze_of_a_real_guest_stays_above_what_it_reported() -> None:
    """STATS a 192 MiB guest (512 MiB authenticated swap, 25% zram, a 75 MiB heap it reads) sent while it was
    squeezed: replayed through the law, the target never goes below the need computed from each report."""
    recorded = json.loads((DATA / "squeeze_192.json").read_text())
    c = Control("a", 192 * MIB, 0, 0, 192 * MIB)
    targets = []
    for body in recorded["reports"]:
        now = float(body["uptime"])  # one decision per report, at the guest's pace
        measured = need.from_guest(c.max_bytes, body["reclaim"])
        assert measured is not None
        c.observe_need(now, measured)
        target, reason = decide(c, Figures.of(body), None, False, now)
        c.target_bytes = target
        targets.append(target)
        assert target >= measured, (now, target // MIB, measured // MIB, reason)
    # The workload's figures are steady after its heap is built: the target comes down once, then stays.
    assert targets[-1] < 120 * MIB and all(b <= a for a, b in zip(targets, targets[1:], strict=False))
