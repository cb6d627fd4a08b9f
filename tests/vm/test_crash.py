"""A daemon killed at any instant loses nothing (docs/service.md, "A daemon that dies"): its VMMs run on, and the
next daemon on the same runtime directory takes each sandbox over, finishes or undoes what was half done (a park,
a resume), and reports what it cannot recover as `lost` with the reason, never as a silent 404. Real guests, real
SIGKILLs; the soak (`make soak-crash`, bench/crash_soak.py) repeats the first test at random instants."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from memvisor.image.build import Image
from tests.vm.conftest import alive, ps, wait_for
from tests.vm.test_service import Daemon, exec_api, start_daemon, stop_daemon

POLICY = {"vm": {"memory_mib": 160}, "swap": {"size_mib": 64}}
# A process that holds a marker in its own memory; the marker is also in tmpfs.
HOLDER = ("echo \"$1\" > /tmp/marker; python3 -c 'import sys, time; m = sys.argv[1] * 4096; time.sleep(1 << 20)' "
          "\"$1\" </dev/null >/dev/null 2>&1 & echo $! > /tmp/pid")
LOOK = "kill -0 $(cat /tmp/pid) && echo alive; cat /tmp/marker"


def create(api: httpx.Client, name: str) -> dict[str, Any]:
    made = api.post("/v1/sandboxes", json={"name": name, "policy": POLICY})
    assert made.status_code == 201, made.text
    info: dict[str, Any] = made.json()
    return info


def sh(api: httpx.Client, key: str, script: str, *args: str) -> list[str]:
    out, err, end = exec_api(api, key, {"argv": ["sh", "-c", script, "sh", *args], "root": True})
    assert end.get("exit_code") == 0, (out, err, end)
    return out.decode().split()


def background(fn: Any) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def kill(daemon: Daemon) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.communicate(timeout=30)


def crash_with_three(first: Daemon) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Three sandboxes on `first`: an idle one with a marker, one running a long command, one being parked with
    a marker; then the SIGKILL. Returns their infos (idle, busy, parking)."""
    with first.unix() as api:
        idle, busy, parking = (create(api, name) for name in ("idle", "busy", "parking"))
        for info in (idle, parking):
            sh(api, info["id"], HOLDER, f"marker-{info['id']}")

        def long_command() -> None:
            with first.unix() as other:
                try:
                    exec_api(other, busy["id"], {"argv": ["sh", "-c", "echo started; exec sleep 600"]})
                except httpx.HTTPError:
                    pass  # the daemon is killed under it

        def park() -> None:
            with first.unix() as other:
                try:
                    other.post(f"/v1/sandboxes/{parking['id']}/park", json={})
                except httpx.HTTPError:
                    pass

        threads = [background(long_command)]
        wait_for(lambda: "sleep" in " ".join(sh(api, busy["id"], "ps -o args")), 60, "the long command")
        threads.append(background(park))
        wait_for(lambda: api.get(f"/v1/sandboxes/{parking['id']}").json()["state"] == "parking", 60, "the park")
    time.sleep(0.3)  # into the park: the guest has quiesced or the stream is being written
    kill(first)
    for thread in threads:
        thread.join(timeout=60)
    assert alive(idle["vmm_pid"]) and alive(busy["vmm_pid"]), "the VMMs died with their daemon"
    # The swap file is an O_TMPFILE in the runtime directory: no name, and still held by the VMM.
    swap = Path(os.environ["MEMVISOR_RUNTIME_DIR"]) / idle["id"] / "swap.img"
    held = [(os.readlink(f), f.stat()) for f in Path(f"/proc/{idle['vmm_pid']}/fd").iterdir()]
    assert not swap.exists() and any(link.startswith(str(swap.parent) + "/#") and link.endswith(" (deleted)")
                                     and st.st_size == 64 << 20 for link, st in held), held
    # No other command sweeps a daemon's sandboxes: they wait, running, for the next daemon.
    orphans = {s["id"]: s["state"] for s in ps()}
    assert orphans[idle["id"]] == orphans[busy["id"]] == "running (no daemon)", orphans
    return idle, busy, parking


def test_a_killed_daemon_loses_no_sandbox(image: Image, tmp_path: Path) -> None:
    """Three sandboxes: an idle one holding memory, one running a command, one being parked; SIGKILL. The next
    daemon lists all three: the idle one answers with its memory intact (same VMM), the command is reported ended
    by the crash (and is gone from the guest), the one being parked is running or parked (or lost, with the
    reason)."""
    first = start_daemon(tmp_path)
    try:
        idle, busy, parking = crash_with_three(first)
    finally:
        if first.proc.poll() is None:  # the test failed before its kill: end it as any test ends its daemon
            stop_daemon(first)

    second = start_daemon(tmp_path)
    try:
        with second.unix() as api:
            listed = {s["name"]: s for s in api.get("/v1/sandboxes").json()}
            assert set(listed) == {"idle", "busy", "parking"}, listed
            assert listed["idle"]["state"] == "running" and listed["idle"]["vmm_pid"] == idle["vmm_pid"]
            assert listed["idle"]["recovered"]["ended"] == []
            looked = sh(api, idle["id"], LOOK)
            assert looked[:2] == ["alive", f"marker-{idle['id']}"], looked
            assert listed["busy"]["state"] == "running"
            assert [row[1] for row in listed["busy"]["recovered"]["ended"]] == ["sh"], listed["busy"]
            assert "sleep" not in " ".join(sh(api, busy["id"], "ps -o args")), "the crash's command still runs"
            state = listed["parking"]["state"]
            assert state in ("running", "parked", "lost"), listed["parking"]
            if state == "lost":
                assert listed["parking"]["lost"], listed["parking"]
            else:  # running on, or resumed from its complete snapshot: its memory is intact either way
                assert sh(api, parking["id"], LOOK)[:2] == ["alive", f"marker-{parking['id']}"]
            for name in listed:
                assert api.delete(f"/v1/sandboxes/{listed[name]['id']}").status_code == 200
    finally:
        err = stop_daemon(second)
    assert "left by a daemon that died" in err, err


def test_a_resume_killed_at_any_step_leaves_the_sandbox_intact_or_lost(image: Image, tmp_path: Path) -> None:
    """A parked sandbox, resumed by an exec; the daemon SIGKILLed after each delay of a loop. The next daemon has
    it running (the new VMM had run the guest: taken over) or parked on its intact snapshot (it had not), never
    parked without a snapshot; either way the next exec finds its memory."""
    current = [start_daemon(tmp_path)]  # whichever daemon runs now: stopped at the end, whatever happened
    try:
        with current[0].unix() as api:
            info = create(api, "resumed")
            key = info["id"]
            sh(api, key, HOLDER, "kept")
            assert api.post(f"/v1/sandboxes/{key}/park", json={}).status_code == 200
        seen = []
        for delay in (0.05, 0.4, 0.9, 1.6):
            daemon = current[0]
            with daemon.unix() as api:
                assert api.get(f"/v1/sandboxes/{key}").json()["state"] == "parked"

                def resume(d: Daemon = daemon) -> None:
                    with d.unix() as other:
                        try:
                            other.post(f"/v1/sandboxes/{key}/resume", json={})
                        except httpx.HTTPError:
                            pass

                thread = background(resume)
                time.sleep(delay)
            kill(daemon)
            thread.join(timeout=60)
            current[0] = start_daemon(tmp_path)
            with current[0].unix() as api:
                found = api.get(f"/v1/sandboxes/{key}").json()
                seen.append(found["state"])
                assert found["state"] in ("running", "parked", "lost"), found
                if found["state"] == "lost":
                    assert found["lost"], found
                    break
                assert sh(api, key, LOOK)[:2] == ["alive", "kept"]  # resumes it if it was parked
                assert api.post(f"/v1/sandboxes/{key}/park", json={}).status_code == 200
        with current[0].unix() as api:
            assert api.delete(f"/v1/sandboxes/{key}").status_code == 200
    finally:
        stop_daemon(current[0])
    assert "lost" not in seen, seen


def test_leave_hands_running_sandboxes_to_the_next_daemon(image: Image, tmp_path: Path) -> None:
    """`--on-exit leave` (an upgrade): SIGTERM leaves the sandbox running and the next daemon takes it over."""
    first = start_daemon(tmp_path, "--on-exit", "leave")
    with first.unix() as api:
        info = create(api, "handed")
        sh(api, info["id"], HOLDER, "handed-over")
    err = stop_daemon(first)
    assert "leaving sandbox" in err and alive(info["vmm_pid"]), err
    assert Path(os.environ["MEMVISOR_RUNTIME_DIR"], info["id"]).is_dir()
    second = start_daemon(tmp_path)
    try:
        with second.unix() as api:
            listed = api.get(f"/v1/sandboxes/{info['id']}").json()
            assert listed["state"] == "running" and listed["vmm_pid"] == info["vmm_pid"], listed
            assert sh(api, info["id"], LOOK)[:2] == ["alive", "handed-over"]
            assert api.delete(f"/v1/sandboxes/{info['id']}").status_code == 200
    finally:
        stop_daemon(second)
