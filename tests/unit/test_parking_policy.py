"""The daemon's parking decisions without guests: which sandbox is parked to make room, and when an idle one is
parked (memvisor/service/registry.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from memvisor import policy as pol
from memvisor.service.registry import Entry, Registry
from memvisor.service.supervisor import AdmissionRefused


class FakeSupervisor:
    """Room for `room` more sandboxes; a release (a park) makes one more."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.admitted: list[str] = []

    def admit(self, sandbox_id: str, *_: Any, wait_s: float = 60.0) -> None:
        if self.room < 1:
            raise AdmissionRefused(f"no room for {sandbox_id}")
        self.room -= 1
        self.admitted.append(sandbox_id)

    def release(self, _sandbox_id: str) -> None:
        self.room += 1

    def close(self) -> None:
        pass


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MEMVISOR_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("MEMVISOR_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "run").mkdir(mode=0o700)
    sup = FakeSupervisor(0)
    reg = Registry(lambda: None, sup)  # type: ignore[arg-type, return-value]
    reg._idle_stop.set()  # these tests call park_idle themselves
    parked: list[str] = []

    def park(key: str, unused_since: float | None = None) -> Entry:
        entry = reg.get(key)
        entry.state, entry.vm = "parked", None
        sup.release(key)
        parked.append(key)
        return entry

    monkeypatch.setattr(reg, "park", park)
    yield reg, sup, parked


def add(reg: Registry, key: str, used_ago: float, commands: int = 0, idle_s: int | None = None) -> Entry:
    vm = SimpleNamespace(session=SimpleNamespace(commands=dict.fromkeys(range(commands))))
    policy = pol.merge(("t", {"park_after_idle_s": idle_s} if idle_s is not None else {}))
    entry = Entry(key, key, policy, vm, state="running")  # type: ignore[arg-type]
    entry.used = time.monotonic() - used_ago
    reg._entries[key] = entry
    return entry


def test_room_is_made_by_parking_the_least_recently_used_idle_sandbox(registry: Any) -> None:
    reg, sup, parked = registry
    add(reg, "busy", used_ago=1000, commands=1)  # the coldest, but a command runs in it: never parked
    add(reg, "cold", used_ago=500)
    add(reg, "warm", used_ago=10)
    reg._admit("new", pol.DEFAULT)
    assert parked == ["cold"] and sup.admitted == ["new"]
    reg._admit("newer", pol.DEFAULT)
    assert parked == ["cold", "warm"] and sup.admitted == ["new", "newer"]


def test_with_nothing_idle_left_admission_refuses(registry: Any) -> None:
    reg, _, parked = registry
    reg.admit_wait_s = 0.5
    add(reg, "busy", used_ago=1000, commands=2)
    began = time.monotonic()
    with pytest.raises(AdmissionRefused):
        reg._admit("new", pol.DEFAULT)
    assert parked == [] and time.monotonic() - began >= 0.5  # it waited for the commands to end


def test_admission_waits_for_a_busy_sandbox_to_become_idle_and_parks_it(registry: Any) -> None:
    reg, sup, parked = registry
    busy = add(reg, "busy", used_ago=1000, commands=1)
    threading.Timer(0.3, busy.vm.session.commands.clear).start()  # type: ignore[union-attr]
    reg._admit("new", pol.DEFAULT)
    assert parked == ["busy"] and sup.admitted == ["new"]


def test_idle_sandboxes_are_parked_after_their_own_or_the_daemons_time(registry: Any) -> None:
    reg, _, parked = registry
    reg.park_after_idle_s = 60
    add(reg, "default-idle", used_ago=61)  # the daemon's 60 s passed
    add(reg, "default-fresh", used_ago=30)
    add(reg, "own-short", used_ago=6, idle_s=5)
    add(reg, "own-never", used_ago=10_000, idle_s=0)
    add(reg, "running-a-command", used_ago=10_000, commands=1)
    reg.park_idle()
    assert sorted(parked) == ["default-idle", "own-short"]
