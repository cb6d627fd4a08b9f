"""Parking daemon sandboxes against real guests (docs/parking.md): a parked sandbox holds no host memory and
leaves no plaintext on disk; an exec resumes it with its processes, files, swapped pages, uptime and wall clock
as they were; a damaged, cut, swapped or older snapshot is refused and the sandbox stays parked; a daemon that
ends parks its sandboxes and the next one resumes them."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from memvisor.image.build import Image
from tests.vm.conftest import alive, qemu_processes
from tests.vm.test_service import Daemon, exec_api, start_daemon, stop_daemon

# A background process that keeps a counter in its own memory (written to a file as it goes) and a marker in RAM.
COUNTER = """
import os, sys, time
marker = sys.argv[1].encode() * 64
i = 0
while True:
    i += 1
    with open("/tmp/count.new", "w") as f:
        f.write(str(i))
    os.rename("/tmp/count.new", "/tmp/count")
    time.sleep(0.1)
"""
# 32 MiB of random data in tmpfs, then a short-lived hog that pushes much of it out to swap.
SETUP = """
set -e
head -c 33554432 /dev/urandom > /tmp/data
sha256sum /tmp/data | cut -d' ' -f1 > /tmp/data.sum
python3 -c 'b = bytearray(160 << 20); b[::4096] = b"x" * len(b[::4096])'
echo swap $(awk 'NR > 1 {used += $4} END {print used + 0}' /proc/swaps)
"""
LOOK = ("echo pid $(cat /tmp/pid); kill -0 $(cat /tmp/pid) && echo alive; echo count $(cat /tmp/count); "
        "echo uptime $(cut -d' ' -f1 /proc/uptime); echo clock $(date +%s)")
CHECK = LOOK + "; echo sum $(sha256sum /tmp/data | cut -d' ' -f1) $(cat /tmp/data.sum)"


def fields(out: bytes) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in out.decode().splitlines() if line.split()}


def run(api: httpx.Client, key: str, script: str, root: bool = True) -> tuple[bytes, dict[str, Any]]:
    out, err, end = exec_api(api, key, {"argv": ["sh", "-c", script], "root": root})
    assert end.get("exit_code") == 0, (out, err, end)
    return out, end


@pytest.fixture
def parking_daemon(image: Image, tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path, "--on-exit", "stop")
    try:
        yield d
    finally:
        stop_daemon(d)


def create(api: httpx.Client, name: str) -> dict[str, Any]:
    made = api.post("/v1/sandboxes", json={"name": name, "policy": {
        "vm": {"memory_mib": 192}, "swap": {"size_mib": 256, "mode": "authenticated"}}})
    assert made.status_code == 201, made.text
    info: dict[str, Any] = made.json()
    return info


def start_workload(api: httpx.Client, key: str, marker: str) -> int:
    """Start the counter and the data; returns the KiB the guest has in swap after the hog pushed pages out."""
    run(api, key, f"python3 -c '{COUNTER}' {marker} </dev/null >/dev/null 2>&1 & echo $! > /tmp/pid")
    return int(fields(run(api, key, SETUP)[0])["swap"][0])


def park(api: httpx.Client, key: str) -> dict[str, Any]:
    r = api.post(f"/v1/sandboxes/{key}/park", json={})
    assert r.status_code == 200, r.text
    info: dict[str, Any] = r.json()
    assert info["state"] == "parked" and info["vmm_pid"] is None and info["snapshot_bytes"] > 0
    return info


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                if path.is_file() and not path.is_symlink():
                    yield path


def test_park_and_resume_ten_times_keeps_the_guest_as_it_was(parking_daemon: Daemon, tmp_path: Path) -> None:
    marker = secrets.token_hex(16)
    with parking_daemon.unix() as api:
        made = create(api, "parked-1")
        key, vmm_pid = made["id"], made["vmm_pid"]
        swapped = start_workload(api, key, marker)
        assert swapped > 8192, f"only {swapped} KiB in swap: the data is not partly swapped out"
        out, _ = run(api, key, LOOK)  # not reading the data: its swapped pages stay in swap until parked
        before = fields(out)
        assert "alive" in before, before
        pid = before["pid"][0]
        count, uptime = int(before["count"][0]), float(before["uptime"][0])
        for cycle in range(10):
            info = park(api, key)
            assert not alive(vmm_pid)
            assert not [p for p in qemu_processes() if str(key) in " ".join(p.cmdline())], "a VMM still runs"
            if cycle == 0:
                # Nothing the guest held in RAM is on the host's disk in the clear: not in the sealed snapshot,
                # the kept disks, or anything else of memvisor's.
                needle = marker.encode()
                roots = (Path(os.environ["MEMVISOR_STATE_DIR"]), Path(os.environ["MEMVISOR_RUNTIME_DIR"]))
                scanned = list(files_under(*roots))
                assert any(p.name == "vm.snap" for p in scanned)
                for path in scanned:
                    assert needle not in path.read_bytes(), f"the guest's marker is in {path}"
                time.sleep(5)  # the guest's clock stands still while parked: the resume must set it
            assert info["parks"] == cycle + 1
            asked = time.time()
            out, end = run(api, key, CHECK)  # resumes first
            answered = time.time()
            assert end["resume_seconds"] > 0
            now = fields(out)
            assert now["pid"][0] == pid and "alive" in now, now  # the same process, still running
            assert int(now["count"][0]) > count  # its counter went on from where it was
            assert now["sum"][0] == now["sum"][1]  # the data, swapped pages included, is intact
            assert float(now["uptime"][0]) > uptime  # not a reboot
            # The wall clock was set from the host's: within 2 s of the host's while the exec ran (unset, it
            # would lag by the time the sandbox was parked, 5 s or more on the first cycle).
            assert asked - 2 <= int(now["clock"][0]) <= answered + 2, (asked, now, answered)
            count, uptime = int(now["count"][0]), float(now["uptime"][0])
            listed = api.get(f"/v1/sandboxes/{key}").json()
            assert listed["state"] == "running" and alive(listed["vmm_pid"])
            vmm_pid = listed["vmm_pid"]
            assert listed["last_resume_seconds"] > 0 and listed["parked_at"] is None
        assert api.delete(f"/v1/sandboxes/{key}").status_code == 200
    assert not any(p.is_dir() for p in Path(os.environ["MEMVISOR_STATE_DIR"]).iterdir())


def test_a_park_while_a_command_runs_is_refused(parking_daemon: Daemon) -> None:
    with parking_daemon.unix() as api:
        key = create(api, "busy")["id"]
        done = threading.Thread(target=lambda: exec_api(api, key, {"argv": ["sleep", "4"]}))
        done.start()
        time.sleep(1.5)
        r = api.post(f"/v1/sandboxes/{key}/park", json={})
        assert r.status_code == 409 and "runs 1 command" in r.json()["detail"], r.text
        done.join()
        assert api.get(f"/v1/sandboxes/{key}").json()["state"] == "running"
        api.delete(f"/v1/sandboxes/{key}")


def refused(api: httpx.Client, key: str, words: str) -> str:
    """Resume `key`, which must be refused (409) with `words` (a regex) in the answer, and stay parked with its
    problem listed; no VMM may be left. Returns the answer's detail."""
    before = {p.pid for p in qemu_processes()}
    r = api.post(f"/v1/sandboxes/{key}/resume", json={})
    assert r.status_code == 409 and re.search(words, r.json()["detail"]), r.text
    listed = api.get(f"/v1/sandboxes/{key}").json()
    assert listed["state"] == "parked", listed
    assert {p.pid for p in qemu_processes()} <= before, "a refused resume left a VMM running"
    detail: str = r.json()["detail"]
    return detail


def test_tampered_snapshots_are_refused_and_stay_parked(parking_daemon: Daemon) -> None:
    state = Path(os.environ["MEMVISOR_STATE_DIR"])
    with parking_daemon.unix() as api:
        a, b = create(api, "tamper-a")["id"], create(api, "tamper-b")["id"]
        run(api, a, "echo one > /tmp/mark")
        park(api, a)
        park(api, b)
        snap = state / a / "vm.snap"
        good = snap.read_bytes()

        flipped = bytearray(good)
        flipped[len(good) // 2] ^= 0x01
        snap.write_bytes(flipped)
        refused(api, a, "failed authentication")
        snap.write_bytes(good[: len(good) - 100_000])
        refused(api, a, "vm.snap is [0-9]+ bytes, not the [0-9]+ recorded")
        shutil.copyfile(state / b / "vm.snap", snap)  # another sandbox's snapshot
        refused(api, a, "failed authentication|bytes, not the [0-9]+ recorded")
        snap.write_bytes(good)

        older = state.parent / "older"  # generation N, kept aside; the sandbox runs and is parked again (N + 1)
        shutil.copytree(state / a, older)
        out, _ = run(api, a, "cat /tmp/mark; echo two > /tmp/mark")
        assert out == b"one\n"
        park(api, a)
        shutil.rmtree(state / a)
        shutil.copytree(older, state / a)
        refused(api, a, "generation")
        r = api.delete(f"/v1/sandboxes/{a}")  # a sandbox whose snapshot is lost can still be deleted
        assert r.status_code == 200
        out, _ = run(api, b, "echo fine")  # the other one was never touched
        assert out == b"fine\n"
        api.delete(f"/v1/sandboxes/{b}")
        shutil.rmtree(older)


def test_a_daemon_that_ends_parks_its_sandboxes_and_the_next_resumes_them(image: Image, tmp_path: Path) -> None:
    first = start_daemon(tmp_path, "--on-exit", "park")
    pids: dict[str, str] = {}
    try:
        with first.unix() as api:
            for name in ("keep-1", "keep-2"):
                key = create(api, name)["id"]
                run(api, key, f"echo {name} > /tmp/name; sleep 100000 </dev/null >/dev/null 2>&1 & echo $! > /tmp/pid")
                pids[name] = run(api, key, "cat /tmp/pid")[0].decode().strip()
            vmms = [s["vmm_pid"] for s in api.get("/v1/sandboxes").json()]
    finally:
        err = stop_daemon(first)
    assert err.count("parking sandbox") == 2, err
    assert not any(alive(p) for p in vmms)
    second = start_daemon(tmp_path)
    try:
        with second.unix() as api:
            listed = {s["name"]: s for s in api.get("/v1/sandboxes").json()}
            assert sorted(listed) == ["keep-1", "keep-2"]
            assert all(s["state"] == "parked" and s["snapshot_bytes"] > 0 for s in listed.values())
            for name, info in listed.items():
                out, end = run(api, name, "cat /tmp/name; cat /tmp/pid; kill -0 $(cat /tmp/pid) && echo alive")
                assert out.decode().split() == [name, pids[name], "alive"] and end["resume_seconds"] > 0
                assert api.delete(f"/v1/sandboxes/{info['id']}").status_code == 200
    finally:
        stop_daemon(second)


def test_the_sdk_parks_and_an_exec_resumes(image: Image) -> None:
    """Without the daemon: LiveSandbox.park() and an exec that resumes it; `memvisor ps` lists it as parked."""
    from memvisor.sdk import Sandbox
    from tests.vm.conftest import ps

    with Sandbox(memory_mib=192).start() as box:
        assert box.exec(["sh", "-c", "echo kept > /tmp/f"]).exit_code == 0
        box.park()
        assert box.parked
        [listed] = [s for s in ps() if s["id"] == box.id]
        assert listed["state"] == "parked" and listed["snapshot_bytes"] > 0
        result = box.exec(["cat", "/tmp/f"])
        assert (result.exit_code, result.stdout) == (0, b"kept\n") and not box.parked
        assert [s["state"] for s in ps() if s["id"] == box.id] == ["running"]
    assert not any(p.is_dir() for p in Path(os.environ["MEMVISOR_STATE_DIR"]).iterdir())


def test_an_idle_sandbox_is_parked_by_itself_and_the_metrics_say_so(parking_daemon: Daemon) -> None:
    with parking_daemon.unix() as api:
        made = api.post("/v1/sandboxes", json={"name": "idler", "policy": {
            "vm": {"memory_mib": 192, "park_after_idle_s": 3}}})
        assert made.status_code == 201, made.text
        key = made.json()["id"]
        run(api, key, "echo here > /tmp/f")
        deadline = time.monotonic() + 60
        while api.get(f"/v1/sandboxes/{key}").json()["state"] != "parked":
            assert time.monotonic() < deadline, "an idle sandbox with park_after_idle_s = 3 was not parked"
            time.sleep(0.5)
        assert not alive(made.json()["vmm_pid"])
        metrics = api.get("/metrics").text
        assert "memvisor_parked_sandboxes 1.0" in metrics
        assert f'memvisor_parked_snapshot_bytes{{sandbox="{key}"}}' in metrics
        out, end = run(api, key, "cat /tmp/f")
        assert out == b"here\n" and end["resume_seconds"] > 0
        api.delete(f"/v1/sandboxes/{key}")


def test_a_sandbox_that_does_not_fit_parks_the_least_recently_used_idle_one(image: Image, tmp_path: Path) -> None:
    """Budget 1200 MiB: a running 192 MiB guest leaves no room for a 1000 MiB floor (test_supervisor.py), so the
    newcomer parks it; resuming it then needs the room back, and the newcomer, idle now, is parked for it."""
    d = start_daemon(tmp_path, "--budget", "1200", "--on-exit", "stop")
    try:
        with d.unix() as api:
            first = create(api, "first")["id"]
            run(api, first, "echo kept > /tmp/f")
            big = api.post("/v1/sandboxes", json={"name": "big", "policy": {
                "vm": {"memory_mib": 1024, "floor_mib": 1000}}})
            assert big.status_code == 201, big.text
            second = big.json()["id"]
            assert api.get(f"/v1/sandboxes/{first}").json()["state"] == "parked"
            out, end = run(api, first, "cat /tmp/f")
            assert out == b"kept\n" and end["resume_seconds"] > 0
            assert api.get(f"/v1/sandboxes/{second}").json()["state"] == "parked"
            for key in (first, second):
                assert api.delete(f"/v1/sandboxes/{key}").status_code == 200
    finally:
        stop_daemon(d)


def test_a_memctl_sandbox_parks_with_its_ram_in_a_sealed_stream_of_its_own(parking_daemon: Daemon) -> None:
    """memctl's guest RAM is a shared memfd that QEMU's stream skips: memvisor carries it (ram.snap), sealed."""
    marker = secrets.token_hex(16)
    with parking_daemon.unix() as api:
        made = api.post("/v1/sandboxes", json={"name": "memctl", "policy": {
            "vm": {"memory_mib": 192}, "memctl": {"enable": True}}})
        assert made.status_code == 201, made.text
        key = made.json()["id"]
        run(api, key, f"python3 -c '{COUNTER}' {marker} </dev/null >/dev/null 2>&1 & echo $! > /tmp/pid; "
                      "head -c 33554432 /dev/urandom > /tmp/data; sha256sum /tmp/data | cut -d' ' -f1 > /tmp/data.sum")
        before = fields(run(api, key, LOOK)[0])
        park(api, key)
        folder = Path(os.environ["MEMVISOR_STATE_DIR"]) / key
        assert (folder / "ram.snap").stat().st_size > 32 << 20  # the data file lives in guest RAM (tmpfs)
        for path in files_under(Path(os.environ["MEMVISOR_STATE_DIR"]), Path(os.environ["MEMVISOR_RUNTIME_DIR"])):
            assert marker.encode() not in path.read_bytes(), f"the guest's marker is in {path}"
        out, end = run(api, key, CHECK)
        now = fields(out)
        assert end["resume_seconds"] > 0 and now["pid"] == before["pid"] and "alive" in now, now
        assert int(now["count"][0]) > int(before["count"][0]) and now["sum"][0] == now["sum"][1]
        assert api.delete(f"/v1/sandboxes/{key}").status_code == 200
