"""Runtime directories and the stale sweep."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from memvisor.errors import MemvisorError
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
        state.vmm_name = f"memvisor-{sandbox_id}"
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


def fake_vmm(tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    """`sleep` under the sandbox's process name (a VMM's comm is its -name process=)."""
    exe = tmp_path / name
    exe.symlink_to(subprocess.run(["which", "sleep"], capture_output=True, text=True).stdout.strip())
    return subprocess.Popen([str(exe), "600"])


def test_dead_owner_is_swept_and_its_vmm_killed(tmp_path: Path) -> None:
    fake = fake_vmm(tmp_path, "memvisor-stale")
    try:
        pid, started = dead_pid()
        path = make("stale", pid, started, vmm=fake)
        assert runtime.sweep() == ["stale"]
        assert not path.exists()
        assert fake.wait(timeout=10) == -9
    finally:
        fake.kill()
        fake.wait()


def test_a_planted_state_cannot_make_memvisor_signal_another_process() -> None:
    fake_vmm = subprocess.Popen(["sleep", "600"])  # someone else's process, not a VMM
    try:
        pid, started = dead_pid()
        path = make("stale", pid, started, vmm=fake_vmm)
        assert runtime.sweep() == ["stale"]
        assert not path.exists()
        assert fake_vmm.poll() is None  # not signalled: its name is not the sandbox's VMM's
    finally:
        fake_vmm.kill()
        fake_vmm.wait()


def test_a_runtime_root_of_someone_else_is_refused_and_our_own_is_tightened(runtime_root: Path) -> None:
    runtime.create("first")
    runtime_root.chmod(0o777)  # ours, but open: tightened
    runtime.sweep()
    assert runtime_root.stat().st_mode & 0o777 == 0o700
    os.chown(runtime_root, 65534, 65534)  # someone else's: refused
    try:
        with pytest.raises(MemvisorError, match="is not memvisor's own"):
            runtime.sweep()
    finally:
        os.chown(runtime_root, os.geteuid(), os.getegid())
    with pytest.raises(MemvisorError, match="is not 1-32 of"):
        runtime.create("../escape")


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
