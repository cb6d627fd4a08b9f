"""Parks that go wrong, against real guests (docs/parking.md): a state directory that fills during a park leaves
the sandbox running as it was (HTTP 507), and a later park with room succeeds; a daemon SIGKILLed while it writes
a snapshot leaves the VM to the next daemon, which undoes the park (the partial stream is never resumed: the VM
goes on), and one killed just after the commit leaves a complete snapshot that the next daemon resumes (its VMM,
paused since the save, is stopped). tests/vm/test_crash.py kills daemons at random points too."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from memvisor.image.build import Image
from tests.vm.conftest import alive
from tests.vm.test_park import create, run
from tests.vm.test_service import Daemon, start_daemon, stop_daemon

DATA = ("head -c 33554432 /dev/urandom > /tmp/data; sha256sum /tmp/data | cut -d' ' -f1 > /tmp/data.sum; "
        "sleep 100000 </dev/null >/dev/null 2>&1 & echo $! > /tmp/pid")
CHECK = "sha256sum /tmp/data | cut -d' ' -f1; cat /tmp/data.sum; kill -0 $(cat /tmp/pid) && echo alive"


def intact(api: httpx.Client, key: str) -> None:
    words = run(api, key, CHECK)[0].decode().split()
    assert len(words) == 3 and words[0] == words[1] and words[2] == "alive", words


def sandbox_dirs() -> list[str]:
    state = Path(os.environ["MEMVISOR_STATE_DIR"])
    return [p.name for p in state.iterdir() if p.is_dir()] if state.exists() else []


@pytest.fixture
def small_state_dir(image: Image) -> Iterator[Path]:
    """The test's state directory on a 16 MiB tmpfs: a 192 MiB guest's snapshot does not fit."""
    state = Path(os.environ["MEMVISOR_STATE_DIR"])
    state.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "memvisor-test", str(state)], check=True)
    try:
        yield state
    finally:
        subprocess.run(["umount", str(state)], check=True)


def test_a_state_directory_that_fills_during_a_park_leaves_the_sandbox_running(
        small_state_dir: Path, tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    try:
        with d.unix() as api:
            info = create(api, "full")
            key = info["id"]
            run(api, key, DATA)
            r = api.post(f"/v1/sandboxes/{key}/park", json={})
            assert r.status_code == 507 and "no space left" in r.text, r.text
            now = api.get(f"/v1/sandboxes/{key}").json()
            assert (now["state"], now["vmm_pid"], now["parks"]) == ("running", info["vmm_pid"], 0)
            assert sandbox_dirs() == [], "a failed park left its partial snapshot"
            intact(api, key)
            # With room again, the same sandbox parks and resumes: the failed park did not damage it.
            subprocess.run(["mount", "-o", "remount,size=1g", str(small_state_dir)], check=True)
            again = api.post(f"/v1/sandboxes/{key}/park", json={})
            assert again.status_code == 200, again.text
            assert not alive(info["vmm_pid"])
            intact(api, key)
            assert api.delete(f"/v1/sandboxes/{key}").status_code == 200
    finally:
        stop_daemon(d)


def kill_during_park(tmp_path: Path, ready: str) -> tuple[Daemon, dict[str, str]]:
    """Create a sandbox with data, park it, SIGKILL the daemon as soon as `ready(sandbox dir)` holds; returns the
    dead daemon and the sandbox's info."""
    d = start_daemon(tmp_path)
    with d.unix() as api:
        info = create(api, "cut")
        run(api, info["id"], DATA)
    folder = Path(os.environ["MEMVISOR_STATE_DIR"]) / info["id"]

    def park() -> None:
        with d.unix() as other:
            try:
                other.post(f"/v1/sandboxes/{info['id']}/park", json={})
            except httpx.HTTPError:
                pass  # the daemon is killed under it

    parking = threading.Thread(target=park)
    parking.start()
    deadline = time.monotonic() + 120
    while not (ready == "stream" and (folder / "vm.snap").exists() and (folder / "vm.snap").stat().st_size > 4 << 20
               or ready == "commit" and (folder / "meta.json").exists()):
        assert time.monotonic() < deadline and d.proc.poll() is None, f"the park never reached its {ready}"
        time.sleep(0.005)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.communicate(timeout=30)
    parking.join(timeout=60)
    # Before the commit the VMM must outlive its daemon; after it, the VMM may have quit already (as asked).
    assert ready == "commit" or alive(info["vmm_pid"]), "the VMM died with its daemon"
    return d, info


def test_a_daemon_killed_while_it_writes_a_snapshot_leaves_the_vm_running(image: Image, tmp_path: Path) -> None:
    _, info = kill_during_park(tmp_path, "stream")
    second = start_daemon(tmp_path)
    try:
        with second.unix() as api:
            [listed] = api.get("/v1/sandboxes").json()
            assert (listed["id"], listed["state"], listed["vmm_pid"]) == (info["id"], "running", info["vmm_pid"])
            assert not (Path(os.environ["MEMVISOR_STATE_DIR"]) / info["id"] / "vm.snap").exists()
            intact(api, info["id"])
            assert api.delete(f"/v1/sandboxes/{info['id']}").status_code == 200
        assert sandbox_dirs() == []
    finally:
        err = stop_daemon(second)
    assert "died while it was parking: running" in err, err


def test_a_daemon_killed_just_after_the_commit_leaves_a_snapshot_that_resumes(image: Image, tmp_path: Path) -> None:
    _, info = kill_during_park(tmp_path, "commit")
    second = start_daemon(tmp_path)
    try:
        with second.unix() as api:
            [listed] = api.get("/v1/sandboxes").json()
            assert (listed["id"], listed["state"]) == (info["id"], "parked")
            intact(api, info["id"])
            assert api.delete(f"/v1/sandboxes/{info['id']}").status_code == 200
        assert sandbox_dirs() == []
    finally:
        stop_daemon(second)
