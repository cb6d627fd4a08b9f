"""The guest's memory figures for the host (STATS and EXIT): /proc/meminfo, /proc/vmstat, /proc/swaps, zram's
mm_stat. Plain file reads only, so it is cheap to import at boot. Guest only, stdlib only."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

ZRAM_SYS = "/sys/block/zram0"


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0])
    return out


def swaps() -> list[dict[str, object]]:
    """/proc/swaps as dicts: device, type, size_kib, used_kib, priority."""
    rows = []
    with open("/proc/swaps") as f:
        next(f)
        for line in f:
            name, kind, size, used, prio = line.split()
            rows.append({"device": name, "type": kind, "size_kib": int(size), "used_kib": int(used),
                         "priority": int(prio)})
    return rows


def zram() -> dict[str, int]:
    """mm_stat: orig_data_size, compr_data_size, mem_used_total (bytes) — Documentation/admin-guide/blockdev/zram."""
    if not os.path.exists(f"{ZRAM_SYS}/mm_stat"):
        return {}
    with open(f"{ZRAM_SYS}/mm_stat") as f:
        fields = [int(x) for x in f.read().split()]
    return {"orig_data_size": fields[0], "compr_data_size": fields[1], "mem_used_total": fields[2]}


def pressure() -> dict[str, float]:
    """/proc/pressure/memory: the share of the last 10 s in which some (or all) tasks waited for memory, in %."""
    out = {}
    try:
        with open("/proc/pressure/memory") as f:
            for line in f:
                kind, _, rest = line.partition(" ")
                out[f"{kind}_avg10"] = float(rest.split()[0].partition("=")[2])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def report() -> dict[str, Any]:
    """Everything the host gets in STATS and EXIT."""
    vmstat = {}
    with open("/proc/vmstat") as f:
        for line in f:
            key, value = line.split()
            if key in ("pswpin", "pswpout"):
                vmstat[key] = int(value)
    return {"meminfo": meminfo(), "swaps": swaps(), "vmstat": vmstat, "zram": zram(), "psi": pressure()}
