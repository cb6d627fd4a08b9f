"""Confidential swap in segments, each a swap area of its own, swapped on as the ones in use fill.

Why: the tag store (guest/tagstore.py) is a RAM disk that allocates a page the first time one is written. Left
to fill as blocks are written, that first write comes from dm-integrity's metadata worker writing back a tag
buffer, inside the swap-out path: brd allocates with GFP_NOIO, and when memory is gone that allocation loops in
direct reclaim (which may not do I/O, so cannot swap) while swap-out waits for the worker. Seen: 7 of 7 soak runs
stalled at the first swap-out (the worker running in brd_insert_page -> __alloc_pages -> try_to_free_pages; the
rest waiting on its buffer); with the whole store written at setup, 0 of 4. Writing the store ahead of use moves
the allocation out of the I/O path, but is safe only where nothing can read or write a tag meanwhile, and a swap
area the kernel does not use yet is such a place. So the crypt device is cut into slices (dm-linear), each a swap area
whose priority is below the one before (the kernel fills them in order, as it would one area); a slice's tags
are written (zeros, what an unwritten tag reads as) before its swap header, and it is swapped on when the active
ones are half full.

Sizes: 64 MiB, 64 MiB, then each as large as all before it, so setup does the same small work for any swap size
(the first two) and the store holds at most about twice the tags of the swap in use; at most MAX_SEGMENTS areas
(the kernel has 23 swap types here, and zram takes one). Slices start on 16 MiB boundaries: 4096 blocks, whose
tags fill whole pages for any tag size, so no page of the store serves two slices. Guest only, stdlib only.
"""

from __future__ import annotations

import _thread
import os
import time

from memvisor.guest import dm, swap, tagstore

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

FIRST_SECTORS = 64 << 11  # 64 MiB
ALIGN_SECTORS = 16 << 11  # 16 MiB: 4096 blocks
MAX_SEGMENTS = 16
POLL_S = 0.25  # how often PID 1's watcher looks at /proc/swaps
NAME = "memvisor-swap-{}"


def plan(sectors: int) -> list[tuple[int, int]]:
    """(start, length) in sectors of each slice of a `sectors`-long device: 64 MiB, 64 MiB, then doubling, the
    last taking what is left."""
    out: list[tuple[int, int]] = []
    start = 0
    while start < sectors:
        size = FIRST_SECTORS if len(out) < 2 else start
        if len(out) == MAX_SEGMENTS - 1 or sectors - start < size + ALIGN_SECTORS:
            size = sectors - start
        out.append((start, size))
        start += size
    return out


class Segments:
    """The slices of the crypt device and which of them are swapped on."""

    def __init__(self, crypt: tuple[int, int], sectors: int, tags_at: int, tag_size: int, priority: int,
                 discard: bool, log: Callable[[str], None]) -> None:
        self.crypt = crypt
        self.slices = plan(sectors)
        self.tags_at = tags_at  # byte offset of block 0's tag on the tag store
        self.tag_size = tag_size
        self.priority = priority
        self.discard = discard
        self.log = log
        self.nodes: list[str] = []
        self.active = 0

    def create(self, ctl: dm.DeviceMapper) -> list[str]:
        """A dm-linear device per slice (none swapped on yet); returns their nodes."""
        for k, (start, length) in enumerate(self.slices):
            name = NAME.format(k)
            dev = ctl.create(name)
            params = bytearray(f"{self.crypt[0]}:{self.crypt[1]} {start}".encode())
            ctl.load(name, [dm.Target(0, length, "linear", params)])
            ctl.resume(name)
            self.nodes.append(ctl.node(dev))
        return self.nodes

    def activate(self) -> str:
        """Write the next slice's tags ahead, then its swap header, and swap it on; returns its node."""
        k = self.active
        start, length = self.slices[k]
        first = self.tags_at + start // 8 * self.tag_size
        end = self.tags_at + (start + length) // 8 * self.tag_size
        tagstore.prefill(first, -(-(end - first) // tagstore.BLOCK) * tagstore.BLOCK)
        swap.write_header(self.nodes[k], length * 512, os.urandom(16))
        swap.swapon(self.nodes[k], self.priority_of(k), self.discard)
        self.active += 1
        return self.nodes[k]

    def priority_of(self, k: int) -> int:
        """Slice k's swap priority: each below the one before, down to `priority` for the last, so the kernel
        fills them in order, as it would one area (at equal priorities it spreads pages over all of them, which
        measured ~4% slower here), and a slice swapped on later takes only what the others cannot."""
        return self.priority + len(self.slices) - 1 - k

    def full(self) -> bool:
        """Whether the active slices are half used (then the next one is due)."""
        active = set(self.nodes[:self.active])
        used = size = 0
        with open("/proc/swaps") as f:
            for line in f.readlines()[1:]:
                name, _kind, total, in_use, _prio = line.split()
                if name in active:
                    size, used = size + int(total), used + int(in_use)
        return used * 2 >= size

    def watch(self) -> None:
        """PID 1's thread: swap on the next slice whenever the active ones are half used, until all are."""
        _thread.start_new_thread(self._watch, ())

    def _watch(self) -> None:
        while self.active < len(self.slices):
            time.sleep(POLL_S)
            try:
                if self.full():
                    started = time.monotonic()
                    node = self.activate()
                    self.log(f"swap on {node} (confidential, segment {self.active} of {len(self.slices)}, "
                             f"{self.slices[self.active - 1][1] >> 11} MiB, in {time.monotonic() - started:.2f} s)")
            except OSError as exc:  # the swap in use stays as it is: say why it cannot grow
                self.log(f"confidential swap cannot grow past segment {self.active}: {exc}")
                return
