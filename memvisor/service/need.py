"""What a guest needs: the least guest RAM (a balloon target) a sandbox can be left with and keep working.

The balloon takes pages from the memory the guest kernel manages. A guest never sees all of its RAM (the kernel's
image, its struct pages and reservations take a part: the gap between the policy's size and the MemTotal the
guest boots with), and of what it sees, part can never be given back: kernel memory, PID 1 (in a cgroup that may
not swap), mlocked pages, zram's store, anonymous pages no swap has room for. The guest reports those parts
(guest/memstats.py `reclaim`); a target under

    gap + unreclaimable + watermark + margin

leaves the guest kernel nothing to reclaim before its OOM killer runs, and with only PID 1 to kill it panics
("System is deadlocked on memory", the panics of issue 19). The margin is room for what the guest allocates
before the supervisor's next decision (a fork, a pipe, a burst of page faults).

A guest that has not reported yet (booting, or admission deciding whether it may boot) is given an estimate from
its policy, calibrated on Debian's 6.1 kernel under QEMU (docs/service.md, "What a guest needs"). The guest's
figures are untrusted: they are bounded here, and a guest that claims more than it has is simply never squeezed.
"""

from __future__ import annotations

from typing import Any

from memvisor import policy as pol

MIB = 1 << 20
KIB = 1 << 10
MARGIN = 16 * MIB  # at least; and at least MARGIN_SHARE of the guest's memory
MARGIN_SHARE = 1 / 16
# The estimate before a guest reports (measured on the default image, 128-1024 MiB guests, idle, after boot):
GAP_BASE = 46 * MIB  # memory a guest never sees: ~46 MiB plus 1/64 of its size (struct pages)
GAP_SHARE = 1 / 64
BOOT_UNRECLAIMABLE = 26 * MIB  # kernel, PID 1, page tables after boot: ~25 MiB plus 1/64 of its size ...
SECURE_SWAP_EXTRA = 6 * MIB  # ... plus PID 1 mlocked and the device-mapper stack when swap is set up
SWAP_MAP_PER_GIB = 768 * KIB  # swapon's bookkeeping: 3 bytes per 4 KiB slot
WATERMARK = 4 * MIB  # what the kernel keeps free; more once it has transparent huge pages (below)
THP_MIN_MANAGED = 512 * MIB  # the kernel enables THP from this much RAM on, and khugepaged then raises
THP_WATERMARK_CAP = 44 * MIB  # min_free_kbytes to 5% of it, at most ~22 MiB per zone (mm/khugepaged.c)


def margin(max_bytes: int) -> int:
    """Room kept free above what the guest cannot give back."""
    return max(MARGIN, int(max_bytes * MARGIN_SHARE))


def estimate(policy: pol.Policy) -> int:
    """Bytes of guest RAM a sandbox of this policy needs to boot and idle, before it has said anything."""
    size = policy.memory_mib * MIB
    swap = policy.swap_size_mib * MIB
    gap = GAP_BASE + int(size * GAP_SHARE)
    watermark = WATERMARK
    if size - gap >= THP_MIN_MANAGED:
        watermark = max(WATERMARK, min(size // 20, THP_WATERMARK_CAP) * 5 // 4)
    need = gap + BOOT_UNRECLAIMABLE + int(size * GAP_SHARE) + watermark
    if policy.effective_swap_mode is not pol.SwapMode.OFF or policy.zram_percent:
        need += SECURE_SWAP_EXTRA + swap * SWAP_MAP_PER_GIB // (1 << 30)
    return min(size, need + margin(size))


def from_guest(max_bytes: int, reclaim: dict[str, Any]) -> int | None:
    """The guest's own figure (guest/memstats.py `reclaim`, already cleaned to non-negative integers), in bytes
    and at most `max_bytes`; None if the figures are missing or make no sense (the estimate stands then)."""
    try:
        boot = int(reclaim["boot_memtotal_kib"]) * KIB
        unreclaimable = int(reclaim["unreclaimable_kib"]) * KIB
        watermark = int(reclaim.get("watermark_kib", 0)) * KIB
    except (KeyError, TypeError, ValueError):
        return None
    if not 0 < boot <= max_bytes:
        return None
    need = (max_bytes - boot) + unreclaimable + min(watermark, boot) + margin(max_bytes)
    return min(max_bytes, need)
