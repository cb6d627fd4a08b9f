"""Where every MiB of each sandbox went: host RSS of the VMM and of its guest RAM, KSM merging and profit, the
guest's own view (pushed by the guest agent, stored by `memvisor run` in the runtime directory), swap and zram,
and the balloon's size from QMP. Read-only: collecting stats changes nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psutil

from memvisor.errors import MemvisorError
from memvisor.host import guestdata, ksm, runtime
from memvisor.host.vmm.qmp import QMP

GUEST_STATS = "guest-stats.json"
MEMCTL = "memctl.json"  # the host's memctl counters (memvisor/host/memctl.py), written by the sandbox's owner
SUPERVISOR = "supervisor.json"  # the daemon's supervisor's latest decision (memvisor/service/supervisor.py)
MIB = 2**20


def memfd_ram(pid: int) -> tuple[int, int]:
    """(Rss, Pss) in bytes of the VMM's mappings of memvisor's guest-RAM memfds (memctl, a templatable sandbox,
    a clone's template), from /proc/PID/smaps; (0, 0) if it has none or is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return 0, 0
    rss = pss = 0
    inside = False
    for line in text.splitlines():
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        if not first.endswith(":"):  # a mapping's header; its fields are "Name: value"
            inside = "memfd:memvisor-" in line
        elif inside and first in ("Rss:", "Pss:"):
            value = int(line.split()[1]) << 10
            rss, pss = (rss + value, pss) if first == "Rss:" else (rss, pss + value)
    return rss, pss


def guest_ram_rss(pid: int, memory_mib: int) -> int | None:
    """Resident bytes of the VMM's guest-RAM mapping, from /proc/PID/smaps: the mapping of exactly the guest's
    size (QEMU maps guest RAM as one anonymous block), else the largest one at least that big."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    mappings: list[tuple[int, int]] = []  # (size KiB, rss KiB)
    size = 0
    for line in text.splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("Rss:"):
            mappings.append((size, int(line.split()[1])))
    want = memory_mib * 1024
    exact = [rss for size, rss in mappings if size == want]
    bigger = sorted((m for m in mappings if m[0] > want), reverse=True)
    if exact:
        return max(exact) * 1024
    return bigger[0][1] * 1024 if bigger else None


def balloon_bytes(qmp_path: Path) -> int | None:
    """The balloon's `actual` (guest RAM not taken by the balloon), from QMP query-balloon; None without one."""
    try:
        with QMP(qmp_path, "memvisor-stats") as qmp:
            reply = qmp.execute("query-balloon", timeout=2.0)
    except MemvisorError:
        return None
    return int(reply["actual"]) if isinstance(reply, dict) else None


def sandbox(state: runtime.SandboxState) -> dict[str, Any]:
    """One sandbox's figures (bytes unless the name says otherwise)."""
    memory_mib = int(state.policy.get("vm", {}).get("memory_mib", 0))
    out: dict[str, Any] = {"id": state.id, "vmm_pid": state.vmm_pid, "memory_mib": memory_mib,
                           "summary": state.summary}
    pid = state.vmm_pid
    if pid is not None and runtime.same_process(pid, state.vmm_started):
        try:
            proc = psutil.Process(pid)
            out["vmm_rss_bytes"] = proc.memory_info().rss
        except psutil.Error:
            pass
        out["guest_ram_rss_bytes"] = guest_ram_rss(pid, memory_mib)
        k = ksm.process_stats(pid)
        merging = k.get("ksm_merging_pages", 0)
        merging_pages = merging if isinstance(merging, int) else 0
        out["ksm"] = {
            "merge_any": k.get("ksm_merge_any"),
            "merging_pages": merging_pages,
            "profit_bytes": k.get("ksm_process_profit", 0),
            "share_of_guest_ram": round(merging_pages * ksm.PAGE_SIZE / (memory_mib * MIB), 4) if memory_mib else None,
        }
    if state.policy.get("balloon", {}).get("enable"):
        out["balloon_actual_bytes"] = balloon_bytes(Path(state.files.get("qmp", "")))
    try:
        decision = json.loads((Path(state.runtime_dir) / SUPERVISOR).read_text())
        out["supervisor"] = {k: decision[k] for k in ("target_bytes", "floor_bytes", "max_bytes", "reason")}
        for key in ("need_bytes", "need_measured", "deflations"):  # the daemon's own figures
            out["supervisor"][key] = decision.get(key)
        out["supervisor"]["history"] = decision.get("history", [])[-5:]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        out["memctl"] = json.loads((Path(state.runtime_dir) / MEMCTL).read_text())
    except (OSError, ValueError):
        pass
    guest_file = Path(state.runtime_dir) / GUEST_STATS
    try:
        guest = json.loads(guest_file.read_text())
    except (OSError, ValueError):
        guest = {}
    if guest:
        # Guest figures (bounded by host/guestdata.py when they arrived), under their own key.
        mem = guestdata.figures(guest.get("meminfo"))
        vmstat = guestdata.figures(guest.get("vmstat"))
        out["guest"] = {
            "age_seconds": round(time.time() - guest_file.stat().st_mtime, 1),
            "memtotal_bytes": mem.get("MemTotal", 0) * 1024,
            "memavailable_bytes": mem.get("MemAvailable", 0) * 1024,
            "memfree_bytes": mem.get("MemFree", 0) * 1024,
            "swap": [{"device": guestdata.text(s["device"], 40), "used_bytes": f["used_kib"] * 1024,
                      "size_bytes": f["size_kib"] * 1024, "priority": s.get("priority")}
                     for s in guest.get("swaps") or [] if isinstance(s, dict) and isinstance(s.get("device"), str)
                     and {"used_kib", "size_kib"} <= set(f := guestdata.figures(s))],
            "pswpin": vmstat.get("pswpin"),
            "pswpout": vmstat.get("pswpout"),
            "oom_kills": vmstat.get("oom_kill"),  # processes the guest's OOM killer ended since boot
            "unreclaimable_bytes": guestdata.figures(guest.get("reclaim")).get("unreclaimable_kib", 0) * 1024,
            # guest RAM holding the confidential swap's tags (docs/swap.md): part of the unreclaimable bytes
            "swap_tags_bytes": guestdata.figures(guest.get("reclaim")).get("tags_kib", 0) * 1024,
        }
        zram = guestdata.figures(guest.get("zram"))
        if zram.get("compr_data_size"):
            out["guest"]["zram_ratio"] = round(zram.get("orig_data_size", 0) / zram["compr_data_size"], 2)
    return out


def host() -> dict[str, Any]:
    """Host-wide figures: memory and ksmd."""
    vm = psutil.virtual_memory()
    k = ksm.state()
    return {"memtotal_bytes": vm.total, "memavailable_bytes": vm.available,
            "ksm": {"available": k.available, "running": k.running, "saved_bytes": k.saved_bytes(),
                    "ksmd_cpu_seconds": k.cpu_seconds, **k.values}}


def collect(sandbox_id: str | None = None) -> dict[str, Any]:
    """Every live sandbox (or one), plus host totals."""
    states = runtime.live()
    if sandbox_id is not None:
        states = [s for s in states if s.id == sandbox_id]
        if not states:
            raise MemvisorError(f"no running sandbox with id {sandbox_id!r}", hint="see `memvisor ps`")
    return {"time": time.time(), "sandboxes": [sandbox(s) for s in states], "host": host()}
