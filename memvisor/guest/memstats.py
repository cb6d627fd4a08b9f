"""The guest's memory figures for the host (STATS and EXIT): /proc/meminfo, /proc/vmstat, /proc/swaps, zram's
mm_stat, and what of its memory the guest cannot give back (`reclaim`). Plain file reads only, so it is cheap to
import at boot. Guest only, stdlib only."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

ZRAM_SYS = "/sys/block/zram0"
INIT_CGROUP_STAT = "/sys/fs/cgroup/memvisor-init/memory.stat"  # contract.INIT_CGROUP (not imported: boot cost)
WORKLOAD_PRESSURE = "/sys/fs/cgroup/memvisor-workloads/memory.pressure"  # guest/cgroups.py WORKLOADS
TAG_STORE_PAGES = "/sys/kernel/debug/ramdisk_pages/ram0"  # guest/tagstore.py PAGES_FILE (confidential swap)
VMSTAT_KEYS = ("pswpin", "pswpout", "oom_kill", "balloon_inflate", "balloon_deflate")
PAGE_KIB = 4
# Pages swapped to zram still cost their compressed size: count zram's free room at half its size.
ZRAM_GAIN = 0.5
boot_memtotal_kib = 0  # MemTotal before the host ever inflated the balloon (init records it for HELLO)


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
    """Memory PSI: the share of the last 10 s in which some (or all) tasks waited for memory, in %: the whole
    guest's (/proc/pressure/memory), and its workload's alone (`workload_some_avg10`, guest/cgroups.py)."""
    out = {}
    for path, prefix in (("/proc/pressure/memory", ""), (WORKLOAD_PRESSURE, "workload_")):
        try:
            with open(path) as f:
                for line in f:
                    kind, _, rest = line.partition(" ")
                    out[f"{prefix}{kind}_avg10"] = float(rest.split()[0].partition("=")[2])
        except (OSError, ValueError, IndexError):
            continue
    return out


def stall_us() -> int:
    """The workload's cumulative memory stall ("some" total of its cgroups' memory.pressure) in microseconds,
    or the whole guest's if there is no workload cgroup (0 without PSI): the host tells fresh pressure from a
    decaying average by how much it grew between two reports."""
    for path in (WORKLOAD_PRESSURE, "/proc/pressure/memory"):
        try:
            with open(path) as f:
                return int(f.readline().rsplit("total=", 1)[1])
        except (OSError, ValueError, IndexError):
            continue
    return 0


def tag_store_kib() -> int:
    """Guest RAM the confidential swap's tag store holds (brd's own count of its pages; 0 without one)."""
    try:
        with open(TAG_STORE_PAGES) as f:
            return int(f.read()) * PAGE_KIB
    except (OSError, ValueError):
        return 0


def vmstat() -> dict[str, int]:
    """The /proc/vmstat counters the host reads (swap traffic, OOM kills, balloon pages in and out)."""
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            key, value = line.split()
            if key in VMSTAT_KEYS:
                out[key] = int(value)
    return out


def cgroup_stat(path: str) -> dict[str, int]:
    """A cgroup v2 memory.stat in bytes ({} if there is none)."""
    try:
        with open(path) as f:
            return {k: int(v) for k, v in (line.split() for line in f)}
    except (OSError, ValueError):
        return {}


def reclaim(info: dict[str, int], counters: dict[str, int], devices: list[dict[str, object]],
            store: dict[str, int], init: dict[str, int], tags_kib: int = 0) -> dict[str, int]:
    """What of its memory the guest cannot give back, in KiB, from its own figures: the host's balloon must
    never leave it less than `unreclaimable_kib` (plus the kernel's watermarks) of the memory it booted with.

    The parts add up to `unreclaimable_kib`:
      kernel       used memory that is on no page list: slab that cannot be reclaimed, page tables, stacks,
                   vmalloc (swap maps, dm-integrity's buffers), per-cpu data
      init         PID 1's anonymous memory (its cgroup may not swap: memvisor-init, image/rootfs.py)
      mlocked      unevictable pages: mlock()ed memory (PID 1 after mlockall, memctl's MLOCK), ramfs
      zram         zram's compressed store
      tags         the confidential swap's tag store (brd pages: kernel memory on no page list, `tags_kib`)
      unswappable  anonymous and tmpfs pages no swap has room for (all of them without swap)
    Besides: `reclaimable_kib` (file cache, reclaimable slab, what swap can take), `balloon_kib` (what the
    balloon holds now; never counted as used), `boot_memtotal_kib`, `watermark_kib` (what the kernel keeps
    free: about its high watermark, 1.25 x vm.min_free_kbytes); report() adds `stall_us` (how long, in all,
    some task of the workload waited for memory)."""
    balloon = max(0, counters.get("balloon_inflate", 0) - counters.get("balloon_deflate", 0)) * PAGE_KIB
    boot = boot_memtotal_kib or info["MemTotal"]
    # The balloon's pages are used memory of the boot-time total whether or not the kernel still counts them in
    # MemTotal (it does with deflate-on-oom): either way, this is what everything else uses.
    used = max(0, boot - info["MemFree"] - balloon)
    anon = info.get("Active(anon)", 0) + info.get("Inactive(anon)", 0)
    file = info.get("Active(file)", 0) + info.get("Inactive(file)", 0)
    slab = info.get("SReclaimable", 0)
    unevictable = info.get("Unevictable", 0)
    pinned = min(anon, (init.get("active_anon", 0) + init.get("inactive_anon", 0)) // 1024)
    disk_room = zram_room = 0
    for dev in devices:
        size, used_kib = dev["size_kib"], dev["used_kib"]
        assert isinstance(size, int) and isinstance(used_kib, int)
        if str(dev["device"]).startswith("/dev/zram"):
            zram_room += max(0, size - used_kib)
        else:
            disk_room += max(0, size - used_kib)
    movable = anon - pinned
    to_disk = min(movable, disk_room)
    swappable = to_disk + int(min(movable - to_disk, zram_room) * ZRAM_GAIN)
    zram_kib = store.get("mem_used_total", 0) // 1024
    kernel = max(0, used - anon - file - unevictable - slab - zram_kib - tags_kib)
    unswappable = movable - swappable
    parts = {"kernel_kib": kernel, "init_kib": pinned, "mlocked_kib": unevictable, "zram_kib": zram_kib,
             "tags_kib": tags_kib, "unswappable_kib": unswappable}
    try:
        with open("/proc/sys/vm/min_free_kbytes") as f:
            minimum = int(f.read())
        watermark = minimum + minimum // 4  # the zones' high watermarks, about: kswapd reclaims up to them
    except (OSError, ValueError):
        watermark = 0
    return {**parts, "unreclaimable_kib": sum(parts.values()), "reclaimable_kib": file + slab + swappable,
            "balloon_kib": balloon, "boot_memtotal_kib": boot, "watermark_kib": watermark}


def report() -> dict[str, Any]:
    """Everything the host gets in STATS and EXIT."""
    info, counters, devices, store = meminfo(), vmstat(), swaps(), zram()
    return {"meminfo": info, "swaps": devices, "vmstat": counters, "zram": store, "psi": pressure(),
            "reclaim": {**reclaim(info, counters, devices, store, cgroup_stat(INIT_CGROUP_STAT), tag_store_kib()),
                        "stall_us": stall_us()}}
