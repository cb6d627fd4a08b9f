"""Swap that never stalls, and a stall that explains itself.

- A guest wedged on purpose (its swap disk throttled to one request a second through QMP while a hog needs
  swap) runs into its --timeout: memvisor asks PID 1 for a diagnostic dump, and the error names the guest's
  blocked tasks and memory state, shows the console tail and says where the whole console log was kept.
- The small soak: six hog runs, three with authenticated swap and three with confidential, two sandboxes at a
  time (bench/soak.py, whose full run is `make soak`): every run completes, none stalls.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import soak
from memvisor.host import stats
from memvisor.host.vmm.qmp import QMP
from tests.vm.conftest import Runner, report, wait_for
from tests.vm.test_failures import running_sandbox, start_background

HOG = (Path(__file__).parent / "hog.py").read_text()


def test_wedged_swap_disk_gives_a_dump_and_a_clear_error(tmp_path: Path) -> None:
    logs = tmp_path / "logs"  # MEMVISOR_LOG_DIR (conftest)
    proc = start_background("run", "--json", "--memory", "128", "--swap-size", "256", "--timeout", "40",
                            "--", "python3", "-S", "-c", HOG, "160", "wedged", "0")
    state = running_sandbox(proc)
    # Once the hog runs (the guest pushes its figures only while a command runs), stop the swap disk.
    wait_for(lambda: (Path(state["runtime_dir"]) / stats.GUEST_STATS).exists(), 60, "the hog to start")
    with QMP(Path(state["files"]["qmp"])) as qmp:
        # One 4 KiB request a second: the hog's swap traffic can never get through.
        qmp.execute("block_set_io_throttle", {"device": "disk0", "bps": 4096, "bps_rd": 0, "bps_wr": 0,
                                              "iops": 1, "iops_rd": 0, "iops_wr": 0})
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 124, err
    assert "ran past its --timeout of 40 s" in err
    assert "guest memory at the last report: MemFree" in err
    assert "tasks in uninterruptible sleep (D):" in err, err
    stall = report(out)["stall"]
    # The guest kernel reported its blocked tasks (SysRq w from the host); PID 1 itself may be stuck waiting
    # for memory, so its own dump is not required here (test_healthy_timeout_gets_pid1_dump covers it).
    assert stall["blocked"] and all(row[2] == "D" for row in stall["blocked"]), stall
    assert stall["meminfo"]["MemTotal"] > 0
    kept = Path(stall["console_log"])
    assert kept.parent == logs and f"kept at {kept}" in err
    console = kept.read_text(errors="replace")
    for piece in ("sysrq: Show Blocked State", "state:D", "sysrq: Show Memory", "Free swap"):
        assert piece in console, piece
    assert oct(kept.stat().st_mode & 0o777) == "0o600"


def test_timeout_of_a_running_guest_gets_pid1s_dump(memvisor: Runner, isolated: Path) -> None:
    proc = memvisor("run", "--json", "--memory", "128", "--swap-size", "64", "--swap-mode", "encrypted",
                    "--timeout", "20", "--", "sleep", "600")
    assert proc.returncode == 124, proc.stderr
    stall = report(proc.stdout)["stall"]
    assert stall["dumped"] is True
    console = Path(stall["console_log"]).read_text(errors="replace")
    for piece in ("sysrq: Show Blocked State", "=== memvisor diagnostic dump", "/proc/pressure/memory",
                  "/sys/block/vda/inflight", "memvisor-swap-crypt: 0 ", "pswpout", "=== end of memvisor diagnostic"):
        assert piece in console, piece
    assert "memvisor: no guest task was in uninterruptible sleep" in proc.stderr or "tasks in" in proc.stderr


RUNS, PARALLEL, RUN_TIMEOUT = 4, 2, 300


# The soak's own per-run --timeout is the stall detector: a run past it is asked for its dump and counted as
# stalled. pytest's default per-test guard (300 s, sized for one sandbox) must not cut the soak short before
# that can happen (it did on a loaded host, three rounds of runs taking over 100 s each): this test's guard is
# the soak's own bound, rounds x (per-run timeout + the dump and teardown).
@pytest.mark.timeout(-(-RUNS // PARALLEL) * (RUN_TIMEOUT + 60))
def test_small_soak_authenticated_and_confidential_never_stall() -> None:
    runs = soak.soak({"authenticated": RUNS // 2, "confidential": RUNS - RUNS // 2}, parallel=PARALLEL, memory=128,
                     hog_mib=192, swap_mib=512, timeout=RUN_TIMEOUT)
    print("\n" + soak.table(runs))
    assert [r.outcome for r in runs] == ["completed"] * RUNS, json.dumps([vars(r) for r in runs], indent=1)


def test_debug_boots_with_kernel_messages_and_a_short_hung_task_timeout(memvisor: Runner) -> None:
    for args in (("run", "--debug"), ("--debug", "run")):
        out = memvisor(*args, "--dry-run", "--", "true").stdout
        assert "loglevel=7" in out and "sysctl.kernel.hung_task_timeout_secs=10" in out, out
    assert "loglevel=7" not in memvisor("run", "--dry-run", "--", "true").stdout
