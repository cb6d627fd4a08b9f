"""The supervisor never kills a sandbox, on real guests: a guest squeezed below what it needs takes memory back
from its balloon instead of losing a process (or panicking); a command the guest's own OOM killer ends says so;
the daemon squeezes an idle guest down to what it reports it needs and no further, ever more gently, then holds
still; a guest that shows pressure gets memory back on the very report that shows it; admission reserves the
same figure. tests/unit/test_control.py proves the control law on recorded figures; tests/vm/test_supervisor_soak.py
runs the load."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from memvisor.host.vmm.qmp import QMP
from memvisor.image.build import Image
from memvisor.sdk import Sandbox
from memvisor.service import control
from memvisor.service.supervisor import ADMIT_WAIT_S
from tests.vm.conftest import Runner, report, wait_for
from tests.vm.test_service import exec_api, start_daemon, stop_daemon

MIB = 1 << 20
# Fill 48 MiB of the guest's tmpfs (resident shmem, swappable), then idle; later a command needs memory.
FILL = "mkdir -p /tmp && dd if=/dev/urandom of=/tmp/cold bs=1M count=48 2>/dev/null && echo FILLED"
NEED = """
import sys, time
chunks = [bytearray(b"n" * (1 << 20)) for _ in range(int(sys.argv[1]))]
time.sleep(2)
print("HELD", len(chunks))
"""


def balloon_bytes(qmp_path: Path) -> int:
    with QMP(qmp_path) as qmp:
        return int(qmp.execute("query-balloon")["actual"])


def test_a_guest_squeezed_below_its_need_takes_memory_back_rather_than_kill(image: Image) -> None:
    with Sandbox(memory_mib=192).start() as live:  # balloon on, deflate-on-oom by default, no swap
        vm = live._vm
        assert vm.process is not None
        # No transparent huge pages in a ballooned VMM: khugepaged would refill the balloon's holes.
        with open(f"/proc/{vm.process.pid}/status") as f:
            assert "THP_enabled:\t0" in f.read()
        with QMP(vm.qmp_path) as qmp:  # far below what it needs (~90 MiB): what the old supervisor did
            qmp.execute("balloon", {"value": 64 * MIB})
        time.sleep(3)  # let the balloon take what it can
        squeezed = balloon_bytes(vm.qmp_path)
        # A command that needs 40 MiB more than the squeezed guest has free.
        r = live.exec(["python3", "-S", "-c", NEED, "40"], timeout=120)
        assert r.exit_code == 0 and r.stdout == b"HELD 40\n" and r.oom_kills == 0, (r, r.stderr[-300:])
        counters = live.exec(["grep", "-E", "^(oom_kill|balloon_deflate) ", "/proc/vmstat"]).stdout.decode()
        figures = dict(line.split() for line in counters.splitlines())
        assert figures["oom_kill"] == "0" and int(figures["balloon_deflate"]) > 0, figures
        assert balloon_bytes(vm.qmp_path) > squeezed  # the guest took it back: the host sees it
        assert "Kernel panic" not in vm.console_tail(1000)


def test_a_command_the_guest_oom_killer_ends_is_reported_as_such(memvisor: Runner) -> None:
    hog = "b = [bytearray(1 << 20) for _ in range(400)]"  # 400 MiB in a 128 MiB guest without swap
    r = memvisor("run", "--memory", "128", "--json", "--", "python3", "-S", "-c", hog)
    assert r.returncode == 137, r.stderr
    assert "killed by the guest's OOM killer" in r.stderr, r.stderr
    assert report(r.stdout)["oom_kills"] >= 1
    after = memvisor("run", "--memory", "128", "--", "true")  # a plain exit is not an OOM kill
    assert after.returncode == 0 and "OOM" not in after.stderr


class Recorder:
    """Every memory report a daemon sandbox's guest sends (its runtime directory's guest-stats.json, one per
    guest uptime), collected on a thread while the test runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reports: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seen: set[float] = set()
        while not self._stop.wait(0.05):
            try:
                body = json.loads(self.path.read_text())
            except (OSError, ValueError):
                continue
            if body.get("uptime") not in seen:
                seen.add(body["uptime"])
                self.reports.append(body)

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join()
        return self.reports


def first_pressed(reports: list[dict[str, Any]]) -> float | None:
    """The uptime of the first report whose stall since the report before it is PRESSED_STALL or more."""
    for before, now in zip(reports, reports[1:], strict=False):
        stalled = (now["reclaim"]["stall_us"] - before["reclaim"]["stall_us"]) / 1e6
        if stalled >= control.PRESSED_STALL * (now["uptime"] - before["uptime"]):
            return float(now["uptime"])
    return None


def test_the_daemon_squeezes_to_the_guests_need_and_gives_back_on_the_report_that_shows_pressure(
        image: Image, tmp_path: Path) -> None:
    d = start_daemon(tmp_path, "--budget", "1200")
    try:
        with d.unix() as api:
            made = api.post("/v1/sandboxes", json={"policy": {
                "vm": {"memory_mib": 192}, "swap": {"size_mib": 256, "mode": "authenticated"}}})
            assert made.status_code == 201, made.text
            sid = made.json()["id"]
            # Admission reserves the same figure: what the running guest needs, and the newcomer's own floor. The
            # guest runs a command meanwhile, longer than admission waits for a busy sandbox to become idle: an
            # idle one would be parked to make room (test_park.py).
            busy = threading.Event()

            def hold() -> None:
                with d.unix() as other, other.stream("POST", f"/v1/sandboxes/{sid}/exec", json={
                        "argv": ["sh", "-c", f"echo busy; sleep {ADMIT_WAIT_S + 15:g}"]}) as held:
                    for _ in held.iter_lines():
                        busy.set()

            holder = threading.Thread(target=hold)
            holder.start()
            assert busy.wait(60), "the holding command never started"
            refused = api.post("/v1/sandboxes", json={"policy": {"vm": {"memory_mib": 1024, "floor_mib": 1000}}})
            holder.join()
            assert refused.status_code == 503 and "no room for a sandbox with a 1000 MiB floor" in refused.text
            out, err, end = exec_api(api, sid, {"argv": ["sh", "-c", FILL], "root": True})
            assert out == b"FILLED\n", (err, end)
            recorder = Recorder(Path(os.environ["MEMVISOR_RUNTIME_DIR"]) / sid / "guest-stats.json")

            def supervisor() -> dict[str, Any]:
                info: dict[str, Any] = api.get(f"/v1/sandboxes/{sid}").json()["supervisor"]
                return info

            # Idle: squeezed toward what the guest says it needs (its cold tmpfs pages go to its swap), never
            # below it, then left alone.
            wait_for(lambda: supervisor()["need_measured"], 60, "the guest's own figures")

            def settled() -> dict[str, Any] | None:
                """The decision once the squeeze ended near the need and nothing moved for 10 s."""
                now = supervisor()
                last = now["history"][-1]["time"] if now["history"] else 0
                near = now["target_bytes"] - now["floor_bytes"] < 2 * control.MIN_STEP
                return now if near and time.time() - last > 10 else None

            steady = wait_for(settled, 240, "the idle guest to be squeezed to its need")
            assert steady["floor_bytes"] == steady["need_bytes"] > 64 * MIB  # more than the old quarter-size
            assert all(h["to_bytes"] >= h["floor_bytes"] for h in steady["history"]), steady["history"]
            steps = [h["from_bytes"] - h["to_bytes"] for h in steady["history"] if h["reason"].startswith("idle")]
            assert len(steps) >= 3 and steps[-1] < steps[0], steps  # ever more gently near the need
            time.sleep(15)  # steady figures: nothing moves
            assert supervisor()["history"] == steady["history"]
            # Pressure: a command that needs 100 MiB gets memory back and completes, nothing killed.
            out, err, end = exec_api(api, sid, {"argv": ["python3", "-S", "-c", NEED, "100"]})
            assert out == b"HELD 100\n" and end["exit_code"] == 0 and end["oom_kills"] == 0, (err, end)
            reports = recorder.stop()
            # (decided after the steady state: while admission waited above, the squeeze pressed the guest too)
            settled_at = steady["history"][-1]["time"]
            grown = [h for h in supervisor()["history"] if h["time"] > settled_at and "pressure" in h["reason"]]
            assert grown and grown[0]["to_bytes"] > grown[0]["from_bytes"], supervisor()["history"]
            # The grow was decided on the first report that showed the pressure, not on a later one.
            assert grown[0]["report_uptime"] == first_pressed(reports), (grown[0], [
                (r["uptime"], r["reclaim"]["stall_us"]) for r in reports])
            stats = api.get("/metrics").text
            assert "memvisor_supervisor_need_bytes" in stats and "memvisor_guest_oom_kills" in stats
    finally:
        stop_daemon(d)
