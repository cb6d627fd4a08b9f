"""Host memory against real guests: opt-in KSM, free-page reporting, and `memvisor stats` cross-checked against
/proc, the guest's own meminfo and QMP. Every ksmd setting a test changes is restored."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from memvisor import policy
from memvisor.host import ksm, stats
from memvisor.host.sandbox import Instance
from memvisor.image.build import Image
from tests.vm.conftest import alive, memvisor_argv, ps, wait_for

HOG = (Path(__file__).parent / "hog.py").read_text()
CONTROL = """
import ctypes, time
ctypes.CDLL(None, use_errno=True).prctl(67, 1, 0, 0, 0)  # PR_SET_MEMORY_MERGE
pages = [bytearray(b"k" * 4096) for _ in range(20000)]
time.sleep(300)
"""
ALLOC_FREE = """
import time
chunks = [bytearray(b"x" * (1 << 20)) for _ in range(300)]
print("ALLOCATED", flush=True)
time.sleep(6)
del chunks
print("FREED", flush=True)
time.sleep(30)
"""


@pytest.fixture
def ksmd() -> Iterator[None]:
    """ksmd running and scanning fast for the test; every tunable put back afterwards."""
    # A capability skip, not a hidden failure: PR_SET_MEMORY_MERGE exists from Linux 6.4 (this project's hosts
    # run 6.18, where it never skips). Without it there is nothing to merge; the warning memvisor gives then is
    # test_prctl_rejected_warns_and_still_runs's, which runs everywhere.
    if ksm.merge_supported() is not None:
        pytest.skip(f"KSM prctl unavailable on this host kernel: {ksm.merge_supported()}")  # kernel < 6.4
    previous = ksm.set_tunables(pages_to_scan=5000, sleep_millisecs=20, run=1)
    try:
        yield
    finally:
        ksm.set_tunables(**previous)


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(memvisor_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def running(count: int) -> list[dict[str, Any]]:
    return list(wait_for(lambda: (s := [x for x in ps() if x.get("vmm_pid")]) and len(s) == count and s, 90,
                         f"{count} sandboxes in ps"))


def stop(procs: list[subprocess.Popen[str]]) -> list[str]:
    """SIGTERM each, and return their stdout."""
    for p in procs:
        p.terminate()
    return [p.communicate(timeout=60)[0] for p in procs]


def proc_ksm_stat(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        out[key.rstrip(":")] = value.strip()
    return out


def test_ksm_merges_identical_sandboxes_that_opted_in(ksmd: None) -> None:
    procs = [start("run", "--ksm", "--memory", "256", "--", "python3", "-S", "-c", HOG, "100", "same-page", "300")
             for _ in range(2)]
    try:
        states = running(2)
        def merged() -> list[dict[str, Any]] | None:
            snap = stats.collect()["sandboxes"]
            return snap if len(snap) == 2 and all(s["ksm"]["share_of_guest_ram"] >= 0.30 for s in snap) else None
        snap = wait_for(merged, 90, "30% of each guest's RAM to be merged")
        merging = 0
        for s in states:
            raw = proc_ksm_stat(s["vmm_pid"])
            assert raw["ksm_merge_any"] == "yes"
            mine = next(x for x in snap if x["id"] == s["id"])
            assert int(raw["ksm_merging_pages"]) >= mine["ksm"]["merging_pages"] * 0.9  # still merging, or more
            merging += int(raw["ksm_merging_pages"])
        # What the host saves follows from the per-VMM counts only as a lower bound: a KSM page mapped by both
        # guests counts in each VMM's ksm_merging_pages but saves one page (pages_sharing = mappings - KSM
        # pages). Every KSM page has at least two mappings, so saved >= merging / 2 whatever the mix. (Read after
        # the per-VMM counts: ksmd only adds merges while the guests sit idle.)
        assert stats.host()["ksm"]["saved_bytes"] >= merging * ksm.PAGE_SIZE // 2
    finally:
        stop(procs)


def test_no_ksm_means_nothing_merges_even_with_ksmd_running(ksmd: None) -> None:
    procs = [start("run", "--memory", "256", "--", "python3", "-S", "-c", HOG, "100", "same-page", "300")
             for _ in range(2)]
    # A control that did opt in: if it merges while the VMMs do not, ksmd was working and the VMMs were not
    # mergeable (ksmd does not even scan when no process has opted in).
    control = subprocess.Popen([sys.executable, "-c", CONTROL])
    try:
        states = running(2)
        wait_for(lambda: int(proc_ksm_stat(control.pid)["ksm_merging_pages"]) > 1000, 60, "the control to merge")
        for s in states:
            raw = proc_ksm_stat(s["vmm_pid"])
            assert raw["ksm_merge_any"] == "no" and raw["ksm_merging_pages"] == "0"
            cmdline = " ".join(psutil.Process(s["vmm_pid"]).cmdline())
            assert "mem-merge=off" in cmdline
    finally:
        control.kill()
        control.wait()
        stop(procs)


def test_prctl_rejected_warns_and_still_runs(image: Image, monkeypatch: pytest.MonkeyPatch) -> None:
    def rejecting(option: int, arg: int) -> int:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(ksm, "prctl", rejecting)
    warnings: list[str] = []
    with Instance(policy.merge(("test", {"ksm": True, "memory_mib": 192})), image, on_warning=warnings.append) as vm:
        assert vm.process is not None
        pid = vm.process.pid
        merge_any = proc_ksm_stat(pid)["ksm_merge_any"]
        result = vm.run(["echo", "ran"])
    assert result.exit_code == 0 and result.stdout == b"ran\n"
    assert merge_any == "no"
    assert len(warnings) == 1 and "KSM asked for but not available" in warnings[0]
    assert "Invalid argument" in warnings[0]
    assert result.report["vmm"]["ksm"] is False


def test_ksmd_stopped_gets_a_remedy(image: Image) -> None:
    # Capability skip (Linux < 6.4 has no PR_SET_MEMORY_MERGE; never on this project's 6.18 hosts): there the
    # "not available" warning comes first, which test_prctl_rejected_warns_and_still_runs checks instead.
    if ksm.merge_supported() is not None:
        pytest.skip("KSM prctl unavailable on this host kernel")  # kernel < 6.4: nothing to warn about
    previous = ksm.set_tunables(run=0)
    try:
        warnings: list[str] = []
        with Instance(policy.merge(("test", {"ksm": True, "memory_mib": 192})), image,
                      on_warning=warnings.append) as vm:
            assert vm.process is not None
            assert proc_ksm_stat(vm.process.pid)["ksm_merge_any"] == "yes"
            vm.run(["true"])
        assert any("ksmd is not running" in w and "memvisor ksm start" in w for w in warnings)
    finally:
        ksm.set_tunables(**previous)


def rss_through_free(image: Image, balloon: bool) -> tuple[int, int]:
    """(VMM RSS after the guest allocated 300 MiB, RSS 10 s after it freed them), in bytes."""
    peak = after = 0
    with Instance(policy.merge(("test", {"memory_mib": 512, "balloon": balloon})), image) as vm:
        assert vm.process is not None
        proc = psutil.Process(vm.process.pid)

        def on_out(data: bytes) -> None:
            nonlocal peak, after
            if b"ALLOCATED" in data:
                time.sleep(3)
                peak = proc.memory_info().rss
            if b"FREED" in data:
                deadline = time.monotonic() + 10
                after = proc.memory_info().rss
                while time.monotonic() < deadline and after > peak - 200 * 2**20:
                    time.sleep(0.5)
                    after = proc.memory_info().rss
        vm.run(["python3", "-S", "-c", ALLOC_FREE], on_stdout=on_out)
    return peak, after


def test_free_page_reporting_returns_freed_memory(image: Image) -> None:
    peak, after = rss_through_free(image, balloon=True)
    assert peak > 300 * 2**20
    assert peak - after > 200 * 2**20, f"RSS went {peak >> 20} -> {after >> 20} MiB with free-page reporting"
    peak, after = rss_through_free(image, balloon=False)
    assert peak - after < 50 * 2**20, f"RSS went {peak >> 20} -> {after >> 20} MiB without a balloon"


def test_stats_json_matches_proc_guest_and_qmp(image: Image) -> None:
    script = "grep MemTotal /proc/meminfo; sleep 300"
    proc = start("run", "--memory", "256", "--swap-size", "64", "--", "sh", "-c", script)
    try:
        [state] = running(1)
        wait_for(lambda: (Path(state["runtime_dir"]) / stats.GUEST_STATS).exists(), 60, "guest stats")
        r = subprocess.run(memvisor_argv("stats", state["id"], "--json"), capture_output=True, text=True,
                           check=True)
        [s] = json.loads(r.stdout)["sandboxes"]
        vmm = psutil.Process(state["vmm_pid"])
        assert abs(s["vmm_rss_bytes"] - vmm.memory_info().rss) < 0.1 * s["vmm_rss_bytes"]
        assert 0 < s["guest_ram_rss_bytes"] <= s["vmm_rss_bytes"]
        assert s["balloon_actual_bytes"] == 256 * 2**20
        assert s["ksm"]["merging_pages"] == int(proc_ksm_stat(state["vmm_pid"])["ksm_merging_pages"]) == 0
        guest_file = json.loads((Path(state["runtime_dir"]) / stats.GUEST_STATS).read_text())
        assert s["guest"]["memtotal_bytes"] == guest_file["meminfo"]["MemTotal"] * 1024
        assert [d["priority"] for d in s["guest"]["swap"]] == [10]
        table = subprocess.run(memvisor_argv("stats"), capture_output=True, text=True, check=True).stdout
        assert state["id"] in table
    finally:
        [out] = stop([proc])
    # The guest's own MemTotal, printed by the workload, is what stats reported.
    assert int(out.split()[1]) * 1024 == s["guest"]["memtotal_bytes"]
    assert not alive(state["vmm_pid"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_prometheus_exporter(image: Image) -> None:
    proc = start("run", "--memory", "192", "--", "sleep", "300")
    port = free_port()
    exporter = subprocess.Popen(memvisor_argv("stats", "--serve", f"127.0.0.1:{port}"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        [state] = running(1)

        def scrape() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    return str(resp.read().decode())
            except OSError:
                return None
        text = wait_for(scrape, 30, "the exporter to answer")
        values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line and not line.startswith("#")}
        label = f'{{sandbox="{state["id"]}"}}'
        assert values[f"memvisor_vmm_rss_bytes{label}"] > 50 * 2**20
        assert values[f"memvisor_guest_memory_bytes{label}"] == 192 * 2**20
        assert values["memvisor_sandboxes"] == 1
        assert "memvisor_host_memavailable_bytes" in values
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)
        stop([proc])


def test_ksm_cli_start_stop_status() -> None:
    # Capability skip: a kernel built without CONFIG_KSM has no /sys/kernel/mm/ksm and no ksmd to start or
    # stop. Debian's kernels and this project's hosts have it, so here the test always runs.
    if not ksm.SYSFS.is_dir():
        pytest.skip("no KSM in this host kernel")  # CONFIG_KSM off: no ksmd to start or stop
    before = {k: v for k, v in ksm.state().values.items() if k in ("run", "pages_to_scan", "sleep_millisecs")}
    try:
        subprocess.run(memvisor_argv("ksm", "start", "--pages-to-scan", "1234"), check=True)
        assert ksm.state().running and ksm.state().values["pages_to_scan"] == 1234
        status = json.loads(subprocess.run(memvisor_argv("ksm", "status", "--json"), capture_output=True,
                                           text=True, check=True).stdout)
        assert status["running"] is True and status["pages_to_scan"] == 1234
        subprocess.run(memvisor_argv("ksm", "stop"), check=True)
        assert not ksm.state().running
    finally:
        ksm.set_tunables(**before)
