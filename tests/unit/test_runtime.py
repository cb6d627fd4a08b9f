"""Runtime directories and the stale sweep."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from memvisor.host import runtime


@pytest.fixture(autouse=True)
def runtime_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEMVISOR_RUNTIME_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


def make(sandbox_id: str, owner: int, owner_started: float, vmm: subprocess.Popen[bytes] | None = None) -> Path:
    path = runtime.create(sandbox_id)
    state = runtime.SandboxState(id=sandbox_id, owner_pid=owner, owner_started=owner_started, created=time.time(),
                                 runtime_dir=str(path), policy={}, summary="")
    if vmm is not None:
        state.vmm_pid = vmm.pid
        state.vmm_started = runtime.process_start_time(vmm.pid)
    runtime.write_state(state)
    return path


def dead_pid() -> tuple[int, float]:
    p = subprocess.Popen(["sleep", "0"])
    started = runtime.process_start_time(p.pid) or 0.0
    p.wait()
    return p.pid, started


def test_live_owner_is_kept() -> None:
    me = os.getpid()
    path = make("live", me, runtime.process_start_time(me) or 0.0)
    assert runtime.sweep() == []
    assert path.exists()
    assert [s.id for s in runtime.live()] == ["live"]


def test_dead_owner_is_swept_and_its_vmm_killed() -> None:
    fake_vmm = subprocess.Popen(["sleep", "600"])
    try:
        pid, started = dead_pid()
        path = make("stale", pid, started, vmm=fake_vmm)
        assert runtime.sweep() == ["stale"]
        assert not path.exists()
        assert fake_vmm.wait(timeout=10) == -9
    finally:
        fake_vmm.kill()
        fake_vmm.wait()


def test_reused_pid_does_not_keep_a_directory() -> None:
    me = os.getpid()
    path = make("reused", me, (runtime.process_start_time(me) or 0.0) - 1000)
    assert runtime.sweep() == ["reused"]
    assert not path.exists()


def test_directory_without_state(runtime_root: Path) -> None:
    young = runtime.create("young")
    old = runtime.create("old")
    past = time.time() - runtime.ORPHAN_GRACE_S - 5
    os.utime(old, (past, past))
    assert runtime.sweep() == ["old"]
    assert young.exists() and not old.exists()


def test_runtime_dir_is_private() -> None:
    path = runtime.create("private")
    assert path.stat().st_mode & 0o777 == 0o700
