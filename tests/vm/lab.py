"""The host side of tests/vm/swaplab.py: drive it in a running sandbox, and act on the swap file the way a
hostile host could (copy and write back, move a block, flip bytes, truncate), knowing exactly which 4 KiB block
of the file holds which of the workload's pages.

Where a swap slot (swap type, offset) lies in the host file depends on the mode: plain and encrypted map offset N
to the file's block N; confidential too, from the start of its swap area's segment (it keeps its tags on a RAM
disk in the guest: the file holds nothing else); authenticated interleaves dm-integrity's tag areas with the data
(`IntegrityLayout`).
"""

from __future__ import annotations

import json
import os
import queue
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memvisor import policy
from memvisor.host.sandbox import Instance

LAB = (Path(__file__).parent / "swaplab.py").read_text()
BLOCK = 4096
SECTOR = 512
Slot = tuple[int, int]  # (swap type, offset), as /proc/self/pagemap gives them


def lab_policy(mode: str, swap_mib: int = 128, discard: bool = False) -> policy.Policy:
    """A root guest with the initramfs root: on the shared (DAX) root the kernel ignores mlock for the
    interpreter's data pages, which would then swap out and be rolled back with the workload's."""
    return policy.merge(("test", {"memory_mib": 192, "swap_size_mib": swap_mib, "swap_mode": mode, "root": True,
                                  "rootfs": "initramfs", "swap_discard": discard, "timeout": 280}))


class Lab:
    """swaplab.py running as root in `vm`, one command at a time over its stdin."""

    def __init__(self, vm: Instance) -> None:
        assert vm.session is not None
        ready = vm.wait_ready()
        assert ready is not None
        self.vm = vm
        self.swap = ready["swap"]
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.areas: list[str] = []  # the guest's swap areas by swap type, as of the last `out`
        self.pending = bytearray()  # stdout not yet split into lines
        self.err = bytearray()
        self.command = vm.session.begin(["python3", "-S", "-c", LAB], uid=0, stdin=True, on_stdout=self._stdout,
                                        on_stderr=self.err.extend)

    def _stdout(self, data: bytes) -> None:
        self.pending.extend(data)
        while b"\n" in self.pending:
            line, _, rest = bytes(self.pending).partition(b"\n")
            self.pending[:] = rest
            if line.startswith(b"R "):
                self.replies.put(json.loads(line[2:]))

    def __call__(self, *words: object, timeout: float = 300) -> dict[str, Any]:
        """Send one command; its reply (AssertionError, with the workload's stderr, if none comes)."""
        assert self.vm.session is not None
        self.vm.session.write_stdin(self.command, (" ".join(map(str, words)) + "\n").encode())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.command.done.is_set():
            try:
                return self.replies.get(timeout=0.5)
            except queue.Empty:
                continue
        ended = f"it ended: {self.command.exit}" if self.command.done.is_set() else f"none in {timeout:g} s"
        raise AssertionError(f"swaplab gave no answer to {words} ({ended}): {self.err.decode(errors='replace')}")

    def out(self, region: str) -> list[Slot]:
        """Push `region` to swap: the slot of each of its pages (and the swap areas, for SwapFile.bind)."""
        reply = self("out", region)
        self.areas = reply["areas"]
        return [(s[0], s[1]) for s in reply["slots"]]

    def close(self) -> None:
        assert self.vm.session is not None
        self.vm.session.write_stdin(self.command, b"quit\n")
        self.command.done.wait(30)
        self.vm.session.finish(self.command)


@dataclass(frozen=True)
class IntegrityLayout:
    """Where dm-integrity (interleaved, no metadata device) keeps logical block N and its tag in the host file
    (drivers/md/dm-integrity.c: get_data_sector, get_metadata_sector_and_offset, calculate_device_limits)."""

    log2_interleave: int
    tag_size: int
    initial_sectors: int
    metadata_run: int  # sectors of tags ahead of each interleave area

    @staticmethod
    def read(path: Path) -> IntegrityLayout:
        with path.open("rb") as f:
            sb = f.read(SECTOR)
        magic, _version, log2_interleave, tag_size, journal_sections, _provided, flags, log2_spb = \
            struct.unpack_from("<8sBBHIQIB", sb)
        assert magic == b"integrt\0" and log2_spb == 3 and not flags & 0x8, "4 KiB blocks, no fix_padding"
        # a journal section: 8 metadata sectors, then the data of its entries (struct journal_entry + tag each)
        entry = -(-(8 + 8 * 8 + tag_size) // 8) * 8
        section = (SECTOR - 8) // entry * 8 * 8 + 8
        run = -(-(tag_size << (log2_interleave - log2_spb)) // (SECTOR << 8)) * (SECTOR << 8) // SECTOR
        return IntegrityLayout(log2_interleave, tag_size, 8 + section * journal_sections, run)

    def data(self, block: int) -> int:
        """Byte offset of logical 4 KiB block `block` in the file."""
        sector = block * 8
        area, offset = sector >> self.log2_interleave, sector & ((1 << self.log2_interleave) - 1)
        return ((area << self.log2_interleave) + (area + 1) * self.metadata_run + self.initial_sectors
                + offset) * SECTOR

    def tag(self, block: int) -> int:
        """Byte offset of that block's tag."""
        sector = block * 8
        area, offset = sector >> self.log2_interleave, sector & ((1 << self.log2_interleave) - 1)
        return (self.initial_sectors + (area << self.log2_interleave) + area * self.metadata_run) * SECTOR \
            + (offset >> 3) * self.tag_size


class SwapFile:
    """The host's view of a sandbox's swap file: blocks by swap slot, and what a hostile host can do to them."""

    def __init__(self, lab: Lab, mode: str) -> None:
        self.path = lab.vm.swap_path
        self.lab = lab
        self.layout = IntegrityLayout.read(self.path) if mode == "authenticated" else None
        # where each of the guest's disk swap devices starts in the file (confidential: one per segment)
        self.starts = {d["device"]: d.get("offset_bytes", 0) for d in lab.swap["devices"] if d["kind"] == "disk"}

    def spans(self, slot: Slot) -> list[tuple[int, int]]:
        """(offset, length) of everything the file holds of swap slot `slot`: its data, and its tag if the tag is
        in the file."""
        start = self.starts[self.lab.areas[slot[0]]]
        if self.layout is None:
            return [(start + slot[1] * BLOCK, BLOCK)]
        return [(self.layout.data(slot[1]), BLOCK), (self.layout.tag(slot[1]), self.layout.tag_size)]

    def data(self, slot: Slot) -> int:
        """Where the slot's data is in the file."""
        return self.spans(slot)[0][0]

    def holes(self, slots: list[Slot]) -> list[Slot]:
        """The slots whose data block the file no longer holds (discarded: QEMU punched a hole)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            out = []
            for slot in slots:
                offset = self.data(slot)
                try:
                    found = os.lseek(fd, offset, os.SEEK_DATA)
                except OSError:  # ENXIO: no data from there to the end
                    found = -1
                if found != offset:
                    out.append(slot)
            return out
        finally:
            os.close(fd)

    def read(self, offset: int, length: int) -> bytes:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def write(self, offset: int, data: bytes) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def copy(self) -> bytes:
        """The whole file (sparse regions read as zeros)."""
        return self.path.read_bytes()

    def write_back(self, old: bytes) -> int:
        """Put an old copy back wherever the file differs from it (a replay of every block); returns the number
        of 4 KiB blocks changed."""
        now = self.copy()
        changed = 0
        fd = os.open(self.path, os.O_RDWR)
        try:
            for offset in range(0, len(old), BLOCK):
                if now[offset:offset + BLOCK] != old[offset:offset + BLOCK]:
                    os.pwrite(fd, old[offset:offset + BLOCK], offset)
                    changed += 1
            os.fsync(fd)
        finally:
            os.close(fd)
        return changed

    def move(self, src_slot: Slot, dst_slot: Slot) -> None:
        """Copy slot `src_slot` (and its tag, where the file has it) over slot `dst_slot`."""
        for (src, length), (dst, _) in zip(self.spans(src_slot), self.spans(dst_slot), strict=True):
            self.write(dst, self.read(src, length))

    def flip(self, slot: Slot) -> None:
        """Invert one byte in the middle of the slot's data."""
        offset = self.data(slot) + BLOCK // 2
        self.write(offset, bytes([self.read(offset, 1)[0] ^ 0xFF]))

    def truncate(self, slot: Slot) -> None:
        """Cut the file at the slot and grow it back: from that slot on, the file reads as zeros."""
        size = self.path.stat().st_size
        offset = self.data(slot)
        with self.path.open("r+b") as f:
            f.truncate(offset)
            f.truncate(size)
