"""Kernel samepage merging on the host: ksmd's state and counters, per-process stats, and the prctl that opts a
VMM in.

memvisor never starts or tunes ksmd implicitly: `memvisor ksm start|stop` does it when an operator asks. KSM is a
side channel between tenants (CVE-2024-0564 and the earlier write-timing attacks): it is off unless the policy
asks for it, and then only the VMMs that asked are mergeable (PR_SET_MEMORY_MERGE, kernel >= 6.4).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from memvisor import proc
from memvisor.errors import MemvisorError

SYSFS = Path("/sys/kernel/mm/ksm")
# include/uapi/linux/prctl.h
PR_SET_MEMORY_MERGE = 67
PR_GET_MEMORY_MERGE = 68
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans", "general_profit",
            "ksm_zero_pages", "stable_node_chains")
TUNABLES = ("run", "pages_to_scan", "sleep_millisecs", "merge_across_nodes", "use_zero_pages")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Bound here so tests can simulate a kernel that rejects the KSM prctls (monkeypatch ksm.prctl).
prctl = proc.prctl


def merge_supported() -> str | None:
    """None if PR_SET_MEMORY_MERGE can work here, else the reason it cannot (asked without changing anything:
    PR_GET_MEMORY_MERGE fails the same way on kernels without it)."""
    if not SYSFS.is_dir():
        return "this kernel has no KSM (CONFIG_KSM is off)"
    try:
        prctl(PR_GET_MEMORY_MERGE, 0)
    except OSError as exc:
        return f"the kernel rejects PR_GET_MEMORY_MERGE ({exc.strerror}; it needs Linux 6.4 or later with KSM)"
    return None


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class KsmdState:
    """ksmd's settings and global counters, as /sys/kernel/mm/ksm shows them."""

    available: bool
    values: dict[str, int]
    cpu_seconds: float | None

    @property
    def running(self) -> bool:
        return self.values.get("run") == 1

    def saved_bytes(self) -> int:
        """Memory saved: pages_sharing x page size (each sharing page is one page not held twice)."""
        return self.values.get("pages_sharing", 0) * PAGE_SIZE


def ksmd_pid() -> int | None:
    for candidate in psutil.process_iter(["name", "ppid"]):
        if candidate.info["name"] == "ksmd" and candidate.info["ppid"] == 2:
            return int(candidate.pid)
    return None


def state() -> KsmdState:
    """ksmd's state now."""
    if not SYSFS.is_dir():
        return KsmdState(False, {}, None)
    values = {name: v for name in (*TUNABLES, *COUNTERS) if (v := read_int(SYSFS / name)) is not None}
    pid = ksmd_pid()
    cpu = None
    if pid is not None:
        try:
            times = psutil.Process(pid).cpu_times()
            cpu = times.user + times.system
        except psutil.Error:
            cpu = None
    return KsmdState(True, values, cpu)


def set_tunables(**values: int) -> dict[str, int]:
    """Write ksmd tunables (root only); returns the previous values so a caller can restore them."""
    if not SYSFS.is_dir():
        raise MemvisorError("this kernel has no KSM (/sys/kernel/mm/ksm is missing)",
                            hint="use a kernel with CONFIG_KSM")
    previous = {}
    for name, value in values.items():
        if name not in TUNABLES:
            raise MemvisorError(f"unknown ksmd tunable {name!r}", hint=f"one of {', '.join(TUNABLES)}")
        previous[name] = read_int(SYSFS / name) or 0
        try:
            (SYSFS / name).write_text(f"{value}\n")
        except OSError as exc:
            raise MemvisorError(f"cannot set {SYSFS / name} to {value}: {exc.strerror}",
                                hint="run as root") from None
    return previous


def process_stats(pid: int) -> dict[str, object]:
    """/proc/PID/ksm_stat (ksm_rmap_items, ksm_merging_pages, ksm_process_profit, ksm_merge_any, ...) plus
    /proc/PID/ksm_merging_pages; empty if the kernel has neither."""
    out: dict[str, object] = {}
    try:
        for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
            key, _, value = line.partition(" ")  # "ksm_rmap_items 0" and "ksm_merge_any: no" both occur
            key, value = key.rstrip(":"), value.strip()
            out[key] = int(value) if value.lstrip("-").isdigit() else value == "yes" if value in ("yes", "no") \
                else value
    except OSError:
        pass
    merging = read_int(Path(f"/proc/{pid}/ksm_merging_pages"))
    if merging is not None:
        out.setdefault("ksm_merging_pages", merging)
    return out
