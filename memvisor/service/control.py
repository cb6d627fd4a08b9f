"""The supervisor's control law for one sandbox: from the guest's figures and its balloon, the next balloon
target. Pure (no I/O, the clock passed in), so it is tested on recorded figures (tests/unit/test_control.py).

A target never goes below the guest's floor: the most of the policy's explicit floor and what the guest needs
(service/need.py). Within that:
- **Pressure gets memory back at once.** Fresh pressure (tasks stalled on memory for PRESSED_STALL of the time
  since the guest's previous report) grows the target by GROW of its size, within the tick that sees the report
  (the guest sends one as soon as pressure starts: guest/agent.py's PSI trigger). A report counts once: a
  decaying average of old pressure grows nothing. Stall is the measure, not MemAvailable: a squeezed guest has
  little available memory by design (its cold anonymous pages went to its swap), and that harms nobody.
- **A guest that had to deflate its balloon** (deflate-on-oom: its kernel took pages back instead of killing)
  gets what it took plus GROW, and is left alone for BACKOFF_S.
- **Idle guests are squeezed, ever more gently near their limit.** A guest that did not stall (under IDLE_STALL
  since its previous report, and in its 10 s average) gives a quarter of what lies between its target and its
  limit a tick, between MIN_STEP and SHRINK of its size: the squeeze slows as it nears what the guest cannot
  give, and goes on past its free memory into what its swap can take, never below its floor.
- **Hysteresis.** After a grow, no squeeze for HOLD_S. A guest pressed within BLAME_S of a squeeze was squeezed
  too far: for REMEMBER_S the limit of the squeeze is not its floor but the target it was pressed at plus half a
  GROW, so on steady figures the target settles instead of swinging between pressure and squeeze (pressure
  with no squeeze before it is the workload's own growth, and teaches nothing). Figures between the idle and
  pressed thresholds move nothing.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MIB = 1 << 20
PRESSED_STALL = 0.10  # share of time some guest task waited for memory since its last report: give memory back
IDLE_STALL = 0.01  # below this (and with spare memory) a guest counts as idle
GROW = 0.25  # of its memory, for a pressed guest
SHRINK = 0.03  # of its memory, the largest squeeze a tick (twice that while the host is short)
PACE = 4  # a squeeze takes at most 1/PACE of what lies between the target and its limit
MIN_STEP = 4 * MIB  # smaller changes are not worth a QMP call
HOLD_S = 30.0  # no squeeze this long after a grow
BACKOFF_S = 60.0  # ... and this long after the guest deflated its balloon to avoid an OOM kill
BLAME_S = 30.0  # pressure this soon after a squeeze is the squeeze's doing
REMEMBER_S = 600.0  # how long the target at which a squeeze pressed a guest limits the squeeze
DEFLATE_SLACK = MIB // 2  # the balloon's `actual` rising by more than this, unasked, is a deflation
HISTORY = 20
NEED_WINDOW_S = 60.0  # the floor is the most the guest needed in this long: it rises at once and falls slowly


@dataclass
class Control:
    """The supervisor's state for one sandbox (bytes; times on the monotonic clock)."""

    id: str
    max_bytes: int
    policy_floor_bytes: int  # the policy's explicit floor (0: none)
    need_bytes: int  # what the guest needs (service/need.py): its report, or the estimate until it reports
    target_bytes: int
    reason: str = "started at its maximum"
    need_measured: bool = False  # need_bytes comes from the guest's own figures (not the policy's estimate)
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    hold_until: float = 0.0  # no squeeze before this
    pressed_target: int = 0  # the target at which the guest last showed pressure (0: none remembered)
    pressed_at: float = -math.inf
    squeezed_at: float = -math.inf  # the last squeeze step decided
    deflations: int = 0  # times the guest deflated its balloon on OOM
    last_actual: int | None = None  # the balloon's `actual` at the previous tick
    last_report: tuple[float, int] | None = None  # (guest uptime, stall_us) of the last report judged
    last_share: float | None = None  # the stall it showed
    needs: deque[tuple[float, int]] = field(default_factory=deque)  # (time, need) the guest reported lately

    def observe_need(self, now: float, value: int) -> None:
        """A need computed from the guest's latest report: `need_bytes` becomes the most it needed in the last
        NEED_WINDOW_S, so its report-to-report wobble (a few MiB) moves no target."""
        self.needs.append((now, value))
        while self.needs and self.needs[0][0] < now - NEED_WINDOW_S:
            self.needs.popleft()
        self.need_bytes, self.need_measured = max(v for _, v in self.needs), True

    @property
    def floor_bytes(self) -> int:
        """What the supervisor never takes: the policy's floor or the guest's need, whichever is more."""
        return min(self.max_bytes, max(self.policy_floor_bytes, self.need_bytes))

    def squeeze_limit(self, now: float) -> int:
        """How far an idle squeeze may go now: MIN_STEP above the floor (so that a floor that moves by less than
        that, as a guest's figures do, moves nothing), or above the target the guest was last pressed at."""
        limit = self.floor_bytes + MIN_STEP
        if now - self.pressed_at < REMEMBER_S:
            limit = max(limit, self.pressed_target + int(GROW * self.max_bytes) // 2)
        return min(self.max_bytes, limit)

    def to_json(self) -> dict[str, Any]:
        return {"target_bytes": self.target_bytes, "floor_bytes": self.floor_bytes, "max_bytes": self.max_bytes,
                "need_bytes": self.need_bytes, "need_measured": self.need_measured,
                "policy_floor_bytes": self.policy_floor_bytes,
                "deflations": self.deflations, "reason": self.reason, "history": list(self.history)}


@dataclass(frozen=True)
class Figures:
    """What one tick knows of a guest: its last report, bounded (host/guestdata.py cleaned it) and read here."""

    uptime: float | None  # guest uptime of the report (None: no report yet)
    available: int  # MemAvailable, bytes
    stall_us: int | None  # cumulative memory stall (None: not reported)
    psi_avg10: float  # % in the last 10 s: the workload's (or the whole guest's)

    @classmethod
    def of(cls, stats: dict[str, Any]) -> Figures:
        def count(value: object) -> int | None:
            return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

        uptime = stats.get("uptime")
        meminfo = stats.get("meminfo") or {}
        psi_map = stats.get("psi") or {}
        # The workload's own stall when the guest reports it (not the balloon driver's reclaim), else the guest's.
        psi = psi_map.get("workload_some_avg10", psi_map.get("some_avg10", 0.0))
        return cls(uptime=float(uptime) if isinstance(uptime, int | float) and math.isfinite(uptime) else None,
                   available=(count(meminfo.get("MemAvailable")) or 0) * 1024,
                   stall_us=count((stats.get("reclaim") or {}).get("stall_us")),
                   psi_avg10=float(psi) if isinstance(psi, int | float) and 0 <= psi <= 100 else 0.0)


def stall_share(c: Control, f: Figures) -> float | None:
    """The share of time some guest task stalled on memory since the previous report judged; None if this
    report was judged already (or there is none)."""
    if f.uptime is None or (c.last_report is not None and f.uptime <= c.last_report[0]):
        return None
    previous, c.last_report = c.last_report, (f.uptime, f.stall_us or 0)
    if f.stall_us is None or previous is None or f.stall_us < previous[1]:
        return f.psi_avg10 / 100  # the first report, or a guest without the total: its 10 s average
    return min(1.0, (f.stall_us - previous[1]) / 1e6 / max(f.uptime - previous[0], 1e-3))


def decide(c: Control, f: Figures, actual: int | None, host_short: bool, now: float) -> tuple[int, str]:
    """The target this tick wants for `c`, and why: `c.target_bytes` itself when nothing should move. Updates
    `c`'s memory of pressure and deflations (not its target: the caller applies it)."""
    target = c.target_bytes
    deflated = actual is not None and c.last_actual is not None and actual > c.last_actual + DEFLATE_SLACK \
        and actual > target + DEFLATE_SLACK
    c.last_actual = actual
    if deflated:
        assert actual is not None
        c.deflations += 1
        c.hold_until = now + BACKOFF_S
        c.pressed_target, c.pressed_at = target, now
        grown = min(c.max_bytes, actual + int(GROW * c.max_bytes))
        return grown, (f"the guest deflated its balloon to {actual // MIB} MiB rather than OOM-kill: backing off "
                       f"for {BACKOFF_S:g} s")
    share = stall_share(c, f)
    if share is not None:
        c.last_share = share
    pressed = share is not None and share >= PRESSED_STALL
    floor = c.floor_bytes
    if pressed and target < c.max_bytes:
        assert share is not None
        c.hold_until = max(c.hold_until, now + HOLD_S)
        if now - c.squeezed_at < BLAME_S:
            c.pressed_target, c.pressed_at = target, now
        grown = min(c.max_bytes, max(floor, target + int(GROW * c.max_bytes)))
        return grown, (f"guest memory pressure (stalled {share:.0%} of the time, MemAvailable "
                       f"{f.available // MIB} MiB)")
    if target < floor:
        raised = min(c.max_bytes, floor + MIN_STEP)
        return raised, f"the guest needs {floor // MIB} MiB (what it cannot give back, and a margin)"
    idle = c.last_share is not None and c.last_share < IDLE_STALL and f.psi_avg10 < IDLE_STALL * 100
    if idle and now >= c.hold_until:
        limit = c.squeeze_limit(now)
        step = min(int(SHRINK * c.max_bytes * (2 if host_short else 1)), max(MIN_STEP, (target - limit) // PACE))
        shrunk = max(limit, target - step)
        if target - shrunk >= MIN_STEP:  # closer than that to its limit, a guest is left where it is
            c.squeezed_at = now
            why = "idle" + (", host short of memory or a sandbox waiting for room" if host_short else "")
            return shrunk, f"{why} (no memory stall; MemAvailable {f.available // MIB} MiB, limit {limit // MIB} MiB)"
    return target, c.reason


def over_budget(work: list[tuple[Control, int, int]], over: int, now: float) -> dict[str, int]:
    """Targets lowered to bring `over` bytes back inside the budget: from (control, wanted target, MemAvailable)
    rows, the guests with the most spare memory give first, those backing off after pressure last, and none
    below its floor (the budget is a hard limit: what a guest needs is never taken, the rest may be). Returns
    the lowered targets by sandbox id."""
    out: dict[str, int] = {}
    for c, target, _available in sorted(work, key=lambda w: (now < w[0].hold_until, -w[2])):
        if over <= 0:
            break
        give = min(over, target - c.floor_bytes)
        if give > 0:
            out[c.id] = target - give
            over -= give
    return out
