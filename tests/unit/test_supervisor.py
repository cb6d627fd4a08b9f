"""The supervisor's decisions and admission control, without guests (tests/vm/test_service.py drives real
ones)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memvisor.errors import MemvisorError
from memvisor.service import supervisor as sup
from memvisor.service.control import Control

MIB = 1 << 20


class FakeVM:
    """A sandbox as the supervisor sees it: its last STATS (each tick a new report, `psi` % of it stalled)."""

    def __init__(self, available_mib: int, psi: float, rss_mib: int = 0) -> None:
        self.available_mib, self.psi, self.uptime, self.stall_us = available_mib, psi, 10.0, 0
        self.qmp_path = Path("/nonexistent")
        self.dir = None
        self.rss = rss_mib * MIB  # what the host would measure for its VMM

    @property
    def last_stats(self) -> dict[str, Any]:
        self.uptime += 1
        self.stall_us += int(self.psi * 10_000)
        return {"uptime": self.uptime, "meminfo": {"MemAvailable": self.available_mib * 1024},
                "psi": {"some_avg10": self.psi}, "reclaim": {"stall_us": self.stall_us}}


def admit(s: sup.Supervisor, sid: str, max_mib: int, floor_mib: int, wait_s: float = sup.ADMIT_WAIT_S) -> None:
    """Admit with `floor_mib` as the guest's need (no floor of the policy's own)."""
    s.admit(sid, max_mib * MIB, 0, floor_mib * MIB, wait_s=wait_s)


@pytest.fixture
def s(monkeypatch: pytest.MonkeyPatch) -> Iterator[sup.Supervisor]:
    applied: list[tuple[str, int]] = []
    monkeypatch.setattr(sup.Supervisor, "_loop", lambda self: None)  # ticks by hand

    def steer(self: sup.Supervisor, c: Control, vm: Any, target: int, reason: str) -> None:
        applied.append((c.id, target))
        c.target_bytes, c.reason = target, reason

    monkeypatch.setattr(sup.Supervisor, "_steer", steer)
    monkeypatch.setattr(sup.Supervisor, "_actual", lambda self, c, vm: None)
    monkeypatch.setattr(sup, "_rss", lambda vm: getattr(vm, "rss", 0))
    monkeypatch.setattr(sup, "_guest_rss", lambda vm: getattr(vm, "rss", 0))  # overhead: the default guess
    supervisor = sup.Supervisor(1000 * MIB)
    yield supervisor
    supervisor.close()


def test_admission_reserves_floors_and_vmm_overhead(s: sup.Supervisor) -> None:
    admit(s, "a", 512, 400)
    s.attach("a", FakeVM(0, 0.0, rss_mib=400))  # squeezed to its floor
    admit(s, "b", 512, 500, wait_s=0)  # 900 + 2 x 32 MiB of VMM overhead (the default guess) fits 1000
    with pytest.raises(sup.AdmissionRefused, match="reserve 900 MiB of the 1000 MiB budget, and each VMM costs"):
        admit(s, "c", 256, 64)
    s.release("b")
    admit(s, "c", 256, 64)


def test_idle_guests_shrink_to_their_floor_and_pressed_ones_grow(s: sup.Supervisor) -> None:
    admit(s, "idle", 256, 96)
    admit(s, "busy", 256, 96)
    idle, busy = FakeVM(150, 0.0), FakeVM(4, 30.0)
    s.attach("idle", idle)
    s.attach("busy", busy)
    s.tick()
    assert s.controls["idle"].target_bytes == 256 * MIB  # a newcomer is not squeezed at once: it is about to work
    for c in s.controls.values():
        c.hold_until = 0.0
    s.controls["busy"].target_bytes = 128 * MIB
    for _ in range(60):
        s.tick()
    idle_target = s.controls["idle"].target_bytes
    assert 100 * MIB <= idle_target < 104 * MIB and "idle" in s.controls["idle"].reason  # a step above its floor
    assert s.controls["busy"].target_bytes == 256 * MIB and "pressure" in s.controls["busy"].reason
    busy.last_stats["psi"]["some_avg10"] = 5.0  # between the thresholds: hold
    busy.last_stats["meminfo"]["MemAvailable"] = 40 * 1024
    s.tick()
    assert s.controls["busy"].target_bytes == 256 * MIB


def test_the_budget_is_kept_by_the_guests_with_the_most_spare_memory(s: sup.Supervisor) -> None:
    s.budget_bytes = 400 * MIB
    admit(s, "roomy", 256, 64)
    admit(s, "tight", 256, 64)
    s.attach("roomy", FakeVM(200, 5.0))  # neither idle nor pressed: only the budget moves it
    s.attach("tight", FakeVM(20, 5.0))
    for c in s.controls.values():  # say both grew to their maximum
        c.target_bytes = 256 * MIB
    s.tick()  # 2 x 256 + 2 x 32 MiB of VMM overhead is 176 over the 400 MiB budget
    assert s.controls["roomy"].target_bytes == 80 * MIB and "budget" in s.controls["roomy"].reason
    assert s.controls["tight"].target_bytes == 256 * MIB


def test_a_newcomer_starts_at_the_room_left_or_waits_for_it(s: sup.Supervisor) -> None:
    s.budget_bytes = 600 * MIB
    admit(s, "first", 256, 64)
    assert s.controls["first"].target_bytes == 256 * MIB
    first = FakeVM(30, 0.0, rss_mib=300)
    s.attach("first", first)
    admit(s, "second", 256, 64)  # 600 - 300 held - 32 of overhead = 268: room for its maximum
    assert s.controls["second"].target_bytes == 256 * MIB
    s.attach("second", FakeVM(30, 0.0, rss_mib=250))
    with pytest.raises(sup.AdmissionRefused, match="no room now .* hold 550 MiB of the 600 MiB budget"):
        admit(s, "third", 256, 64, wait_s=0)  # the floors fit, what the VMMs hold does not
    assert "third" not in s.controls

    def squeezed() -> None:  # the control loop makes room while the create waits
        time.sleep(0.5)
        first.rss = 100 * MIB
        s.tick()

    threading.Thread(target=squeezed).start()
    admit(s, "third", 256, 64, wait_s=10)
    third = s.controls["third"]
    assert third.target_bytes == 218 * MIB and "218 MiB left in the budget" in third.reason
    s.attach("third", FakeVM(30, 0.0))  # the start target is applied (through QMP) once the balloon driver is up
    assert third.target_bytes == 218 * MIB


def test_garbage_figures_from_a_guest_change_nothing(s: sup.Supervisor) -> None:
    admit(s, "x", 256, 64)
    vm = FakeVM(100, 0.0)
    vm.__class__ = type("Garbage", (FakeVM,), {"last_stats": {"meminfo": {"MemAvailable": "lots"},
                                                              "psi": {"some_avg10": float("nan")}}})
    s.attach("x", vm)
    s.tick()  # no exception; a guest that reports nothing usable is pressed at worst
    assert s.controls["x"].target_bytes >= 64 * MIB


def test_budget_parsing() -> None:
    assert sup.parse_budget("512") == 512 * MIB
    assert 0 < sup.parse_budget("50%") < sup.parse_budget("100%")
    for bad in ("0", "-5", "150%", "lots"):
        with pytest.raises(MemvisorError, match="is not a size"):
            sup.parse_budget(bad)


def test_host_pressure_reads_psi(tmp_path: Path) -> None:
    psi = tmp_path / "memory"
    psi.write_text("some avg10=12.50 avg60=3.00 avg300=1.00 total=1\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert sup.host_pressure(str(psi)) == 12.5
    assert sup.host_pressure(str(tmp_path / "missing")) == 0.0


def test_cgroup_usage_reads_v1_and_v2(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    (v1 / "memory/box").mkdir(parents=True)
    (v1 / "memory/box/memory.limit_in_bytes").write_text(str(1536 * MIB))
    (v1 / "memory/box/memory.usage_in_bytes").write_text(str(700 * MIB))
    (tmp_path / "self-v1").write_text("12:memory:/box\n3:cpu,cpuacct:/\n")
    assert sup.cgroup_usage(str(tmp_path / "self-v1"), str(v1)) == 700 * MIB
    (v1 / "memory/box/memory.stat").write_text(f"cache 1\ntotal_inactive_file {100 * MIB}\n")
    assert sup.cgroup_usage(str(tmp_path / "self-v1"), str(v1)) == 600 * MIB  # the working set
    (v2 / "box").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("memory\n")
    (v2 / "box/memory.max").write_text("max\n")
    (v2 / "box/memory.current").write_text(str(5 * MIB))
    (tmp_path / "self-v2").write_text("0::/box\n")
    assert sup.cgroup_usage(str(tmp_path / "self-v2"), str(v2)) is None  # no limit: not a budget's cgroup
    (v2 / "box/memory.max").write_text(str(64 * MIB))
    assert sup.cgroup_usage(str(tmp_path / "self-v2"), str(v2)) == 5 * MIB
