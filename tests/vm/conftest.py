"""Real-guest fixtures: the image (built once), an isolated runtime directory per test, a CLI runner, and a
check that every test leaves no VMM process and no runtime file behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from memvisor import proc
from memvisor.image import build
from memvisor.image.build import Image
from tests.vm.fleetlab import FleetLab

pytestmark = pytest.mark.vm
PR_SET_CHILD_SUBREAPER = 36
# A daemon's VMMs outlive it (a SIGKILLed daemon's are taken over by the next): orphaned, they become this
# process's children instead of init's, so the leak check below still sees them, and this process reaps them.
proc.prctl(PR_SET_CHILD_SUBREAPER, 1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def image() -> Image:
    return build.ensure()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test gets its own runtime root and config; afterwards nothing of it may remain."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("MEMVISOR_RUNTIME_DIR", str(run_dir))
    monkeypatch.setenv("MEMVISOR_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("MEMVISOR_KEEP_CONSOLE", str(tmp_path / "consoles"))
    monkeypatch.setenv("MEMVISOR_LOG_DIR", str(tmp_path / "logs"))  # consoles of failed sandboxes
    monkeypatch.setenv("MEMVISOR_SOCKET", str(tmp_path / "serve.sock"))  # a private daemon socket
    monkeypatch.setenv("MEMVISOR_IMAGE_STORE", str(tmp_path / "images"))  # users' images of this test only
    state_dir = tmp_path / "state"
    monkeypatch.setenv("MEMVISOR_STATE_DIR", str(state_dir))  # parked sandboxes of this test only
    # ... and their host key and ledger head, outside that directory (never the host's /etc/memvisor)
    monkeypatch.setenv("MEMVISOR_KEY_FILE", str(tmp_path / "keys" / "host.key"))
    monkeypatch.delenv("MEMVISOR_LEDGER_HEAD", raising=False)
    before = {p.pid for p in qemu_processes()}
    yield run_dir
    # A VMM this test left is a descendant of this process (in-process sandboxes, or a memvisor CLI or daemon
    # the test started); VMMs of anything else running on the host are not.
    leftover = [p for p in qemu_processes() if p.pid not in before and _descends_from_us(p)]
    for p in leftover:  # fail loudly, but do not leave them running for the next test
        p.kill()
    reap_orphans()
    assert not leftover, f"VMM processes left behind: {[p.pid for p in leftover]}"
    assert not run_dir.exists() or not any(run_dir.iterdir()), f"runtime files left: {list(run_dir.iterdir())}"
    # The state directory may keep its ledger; a sandbox's snapshot left there is a leak.
    parked = [p.name for p in state_dir.iterdir() if p.is_dir() and p.name not in ("templates", "lost")] \
        if state_dir.exists() else []
    assert not parked, f"parked sandboxes left in the state directory: {parked}"
    templates = [p.name for p in (state_dir / "templates").iterdir()] if (state_dir / "templates").exists() else []
    assert not templates, f"templates left in the state directory: {templates}"


def reap_orphans() -> None:
    """Reap the VMMs that became this process's children when their daemon died (PR_SET_CHILD_SUBREAPER), once
    they have exited; never a child that some Popen of this process will wait for (those are not VMMs)."""
    for p in psutil.Process().children():
        try:
            if p.name().startswith(("qemu-system", "memvisor-")) and p.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(p.pid, 0)
        except (psutil.Error, ChildProcessError):
            pass


def qemu_processes() -> list[psutil.Process]:
    """Running VMMs (a zombie is dead: once memvisor is SIGKILLed, its VMM is reaped by whoever inherits it)."""
    out = []
    for p in psutil.process_iter(["name", "status"]):
        if (p.info["name"] or "").startswith(("qemu-system", "memvisor-")) and p.info["status"] != "zombie":
            out.append(p)
    return out


def _descends_from_us(p: psutil.Process) -> bool:
    try:
        return os.getpid() in {a.pid for a in p.parents()}
    except psutil.Error:
        return False


Runner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def lab(image: Image, tmp_path: Path) -> Iterator[FleetLab]:
    """A one-machine fleet (tests/vm/fleetlab.py) for the test; closed after it, and no host may leave anything in
    its runtime directory."""
    fleet = FleetLab(tmp_path / "fleet")
    try:
        yield fleet
    finally:
        fleet.close()
    for node in fleet.nodes.values():
        left = list(node.runtime.iterdir()) if node.runtime.exists() else []
        assert not left, f"{node.name} left {left}"


def memvisor_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "memvisor", "-q", *args]


@pytest.fixture
def memvisor(image: Image) -> Runner:
    """Run the memvisor CLI to completion."""
    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(memvisor_argv(*args), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    return run


def report(stdout: str) -> dict[str, Any]:
    """The --json report: the last line of stdout."""
    parsed: dict[str, Any] = json.loads(stdout.rstrip("\n").rsplit("\n", 1)[-1])
    return parsed


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until predicate() is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def ps(runtime_env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    out = subprocess.run(memvisor_argv("ps", "--json"), capture_output=True, text=True, check=True,
                         env=runtime_env or dict(os.environ)).stdout
    states: list[dict[str, Any]] = json.loads(out)
    return states


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
