"""memctl on the host: guest RAM in a memfd that QEMU maps shared and memvisor also holds, and the function codes
applied to it (docs/memctl.md).

With the policy setting `memctl`, memvisor creates the guest's RAM as a memfd, hands it to QEMU
(`memory-backend-file,mem-path=/proc/self/fd/N,share=on`) and maps it itself. A MEMCTL from the guest names
guest-physical ranges; each is checked against the machine's RAM layout (q35: RAM from 0 up to the 32-bit hole,
the rest from 4 GiB), page-aligned, bounded, and translated to an offset in the memfd. Nothing outside the
sandbox's own RAM can be named. What the codes do:

    FREE, REMOVE, DONTNEED   fallocate(PUNCH_HOLE): the host frees the pages at once (QEMU's mapping too); the
                             guest reads zeros there afterwards
    MLOCK, MUNLOCK           mlock/munlock of memvisor's mapping: the pages stay in host RAM (never host swap);
                             at most MAX_LOCKED_SHARE of the guest's RAM
    UNMERGEABLE              nothing to do: KSM never merges shared memory (answered as done, with that reason)
    DONTDUMP                 nothing to do: memvisor runs QEMU with dump-guest-core=off and marks its own mapping
                             MADV_DONTDUMP, so no host core dump holds guest RAM
    PAGEOUT, MERGEABLE, MPROTECT_*, SET_VMA_ANON_NAME   EOPNOTSUPP, with the reason (INFO lists them)

Every request is counted (per code: requests, ranges, bytes; and rejects), and rate-limited per sandbox.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from memvisor import proto
from memvisor.errors import MemvisorError

PAGE = proto.PAGE
FOUR_GIB = 1 << 32
MAX_LOCKED_SHARE = 0.25  # of the guest's RAM that MLOCK may pin in host RAM
MAX_LOCKED_EXTENTS = 64  # separate locked ranges per sandbox (each splits memvisor's mapping)
RATE_PER_S = 1000  # MEMCTL requests per second a sandbox may make on average...
BURST = 200  # ... and at once
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
_libc.mlock.argtypes = _libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

UNSUPPORTED = {
    "PAGEOUT": "guest RAM is shared memory mapped by the VMM; MADV_PAGEOUT skips pages mapped by more than one "
               "process{swap}",
    "MERGEABLE": "KSM does not merge shared memory, and memctl backs guest RAM with a shared memfd",
    "MPROTECT_NONE": "QEMU reads and writes guest RAM itself (device emulation, DMA): a protected page would "
                     "kill the VMM, not fault the guest",
    "SET_VMA_ANON_NAME": "PR_SET_VMA_ANON_NAME names anonymous mappings only; guest RAM is a memfd mapping",
}
for _code in ("MPROTECT_R", "MPROTECT_W", "MPROTECT_RW"):
    UNSUPPORTED[_code] = UNSUPPORTED["MPROTECT_NONE"]
DONE_BY_DESIGN = {
    "UNMERGEABLE": "already so: KSM never merges shared memory",
    "DONTDUMP": "already so: QEMU runs with dump-guest-core=off and memvisor's mapping is MADV_DONTDUMP",
}


def q35_layout(ram_bytes: int) -> list[tuple[int, int, int]]:
    """Guest RAM as QEMU's q35 machine maps it: [(guest-physical start, length, offset in the RAM block)].
    RAM fills from 0 up to the PCI hole (at 2 GiB if RAM is 2.75 GiB or more, else at 2.75 GiB); the rest
    starts at 4 GiB (hw/i386/pc_q35.c)."""
    lowmem = 0x80000000 if ram_bytes >= 0xB0000000 else 0xB0000000
    below = min(ram_bytes, lowmem)
    layout = [(0, below, 0)]
    if ram_bytes > below:
        layout.append((FOUR_GIB, ram_bytes - below, below))
    return layout


def host_has_swap() -> bool:
    try:
        with open("/proc/swaps") as f:
            return len(f.read().splitlines()) > 1
    except OSError:
        return False


@dataclass
class Counters:
    """What a sandbox asked for and what was done, for stats, the --json report and /metrics."""

    requests: dict[str, int] = field(default_factory=dict)
    ranges: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    rejects: dict[str, int] = field(default_factory=dict)  # why -> count: invalid, unsupported, rate, off
    locked_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"requests": dict(self.requests), "ranges": dict(self.ranges), "bytes": dict(self.bytes),
                "rejects": dict(self.rejects), "locked_bytes": self.locked_bytes}


class Backing:
    """A guest's RAM as a memfd, memvisor's mapping of it, and the codes applied to it."""

    def __init__(self, memory_mib: int, name: str = "memvisor-guest-ram", sealable: bool = False,
                 fd: int | None = None) -> None:
        """`sealable`: the memfd may be sealed later (a template's RAM, snapshot/template.py). `fd`: the memfd of
        a running guest's RAM to take over (a daemon adopting a sandbox; this object owns it from now on)."""
        self.size = memory_mib << 20
        self.layout = q35_layout(self.size)
        self.fd = fd if fd is not None else os.memfd_create(
            name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
        self.counters = Counters()
        self._locked = bytearray(self.size // PAGE)  # 1 per page memvisor holds locked
        self._lock = threading.Lock()
        self._tokens, self._refill = float(BURST), time.monotonic()
        self.addr = 0
        try:
            if fd is None:
                os.ftruncate(self.fd, self.size)
            elif os.fstat(fd).st_size != self.size:
                raise OSError(errno.EINVAL, f"the memfd is {os.fstat(fd).st_size} bytes, not {self.size}")
            addr = _libc.mmap(None, self.size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, self.fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), "mmap of the guest RAM memfd failed")
            self.addr = addr
            _libc.madvise(self.addr, self.size, mmap.MADV_DONTDUMP)
        except OSError as exc:
            self.close()
            raise MemvisorError(f"cannot set up memctl's guest RAM ({memory_mib} MiB memfd): {exc}") from None

    def detach(self) -> int:
        """Give up memvisor's mapping and return the memfd, which the caller now owns (a template seals it:
        F_SEAL_WRITE needs no writable shared mapping left)."""
        if self.addr:
            _libc.munmap(self.addr, self.size)
            self.addr = 0
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        if self.addr:
            _libc.munmap(self.addr, self.size)
            self.addr = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- requests --------------------------------------------------------------------------------------------
    def info(self) -> dict[str, str]:
        """code -> "supported", or "unsupported: why"."""
        return {code: "unsupported: " + why if (why := unsupported(code)) else
                "supported" + (f" ({DONE_BY_DESIGN[code]})" if code in DONE_BY_DESIGN else "")
                for code in proto.MEMCTL_CODES}

    def handle(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer one MEMCTL (already schema-checked by proto.check_memctl): the MEMCTL_ACK body."""
        code, seq = body["code"], body["seq"]
        with self._lock:
            if not self._take_token():
                return self._reject(seq, "rate", errno.EAGAIN, f"over {RATE_PER_S} memctl requests a second")
            if code == "INFO":
                self._count(code, 0, 0)
                return {"seq": seq, "ok": True, "errno": 0, "reason": "info", "bytes": 0, "info": self.info()}
            try:
                spans = [self._offset(start, length) for start, length in body["ranges"]]
            except ValueError as exc:
                return self._reject(seq, "invalid", errno.EINVAL, str(exc))
            total = sum(length for _, length in spans)
            why = unsupported(code)
            if why:
                return self._reject(seq, "unsupported", errno.EOPNOTSUPP, f"{code}: {why}")
            try:
                reason = self._apply(code, spans)
            except OSError as exc:
                return self._reject(seq, "failed", exc.errno or errno.EIO, f"{code} refused: {exc.strerror}")
            self._count(code, len(spans), total)
            return {"seq": seq, "ok": True, "errno": 0, "reason": reason, "bytes": total}

    def _apply(self, code: str, spans: list[tuple[int, int]]) -> str:
        """Do `code` on memfd spans; the reason to report. OSError if the kernel or the lock limit refuses."""
        if code in ("FREE", "REMOVE", "DONTNEED"):
            for offset, length in spans:
                if self._count_locked(offset, length):  # unlock first, so the host's locked figure stays true
                    self._call(_libc.munlock(self.addr + offset, length))
                self._call(_libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length))
                self._mark(offset, length, 0)
            return "the host freed the pages; the guest reads zeros there"
        if code == "MLOCK":
            adding = sum(length - self._count_locked(o, length) for o, length in spans)
            limit = int(self.size * MAX_LOCKED_SHARE)
            if self.counters.locked_bytes + adding > limit:
                raise OSError(errno.ENOMEM, f"it would lock more than {limit >> 20} MiB ({MAX_LOCKED_SHARE:.0%} "
                              "of guest RAM) in host memory")
            # Each separate locked extent splits memvisor's mapping (a VMA or two): bound them, or a guest
            # could lock every other page and exhaust the process's vm.max_map_count for every sandbox.
            trial = bytearray(self._locked)
            for offset, length in spans:
                trial[offset // PAGE:(offset + length) // PAGE] = b"\x01" * (length // PAGE)
            if _extents(trial) > MAX_LOCKED_EXTENTS:
                raise OSError(errno.ENOMEM, f"it would make more than {MAX_LOCKED_EXTENTS} separate locked "
                              "ranges: lock fewer, larger ones")
            for offset, length in spans:
                self._call(_libc.mlock(self.addr + offset, length))
                self._mark(offset, length, 1)
            return "the pages are locked in host RAM"
        if code == "MUNLOCK":
            for offset, length in spans:
                self._call(_libc.munlock(self.addr + offset, length))
                self._mark(offset, length, 0)
            return "the pages are no longer locked"
        return DONE_BY_DESIGN[code]

    # -- parking (snapshot/park_ram.py) ----------------------------------------------------------------------------
    def locked_ranges(self) -> list[tuple[int, int]]:
        """The memfd ranges memvisor holds locked for the guest, as (offset, length)."""
        with self._lock:
            ranges: list[tuple[int, int]] = []
            page = 0
            while (page := self._locked.find(1, page)) >= 0:
                end = self._locked.find(0, page)
                end = len(self._locked) if end < 0 else end
                ranges.append((page * PAGE, (end - page) * PAGE))
                page = end
            return ranges

    def lock_ranges(self, ranges: list[tuple[int, int]]) -> None:
        """Lock `ranges` again after a resume (what the guest had locked before its park). OSError if the
        kernel refuses."""
        with self._lock:
            self._apply("MLOCK", ranges)

    # -- helpers (called with the lock held) -----------------------------------------------------------------
    def _offset(self, start: int, length: int) -> tuple[int, int]:
        """A guest-physical range as (offset, length) in the memfd; ValueError unless it lies in one RAM region."""
        for gpa, size, offset in self.layout:
            if gpa <= start and start + length <= gpa + size:
                return offset + start - gpa, length
        raise ValueError(f"range [{start:#x}, +{length:#x}) is not in the guest's RAM")

    @staticmethod
    def _call(rc: int) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def _mark(self, offset: int, length: int, value: int) -> None:
        first, count = offset // PAGE, length // PAGE
        before = self._locked[first:first + count].count(1)
        self._locked[first:first + count] = bytes([value]) * count
        self.counters.locked_bytes += (count * value - before) * PAGE

    def _count_locked(self, offset: int, length: int) -> int:
        return self._locked[offset // PAGE:(offset + length) // PAGE].count(1) * PAGE

    def _count(self, code: str, ranges: int, nbytes: int) -> None:
        c = self.counters
        c.requests[code] = c.requests.get(code, 0) + 1
        c.ranges[code] = c.ranges.get(code, 0) + ranges
        c.bytes[code] = c.bytes.get(code, 0) + nbytes

    def _reject(self, seq: int, why: str, err: int, reason: str) -> dict[str, Any]:
        self.counters.rejects[why] = self.counters.rejects.get(why, 0) + 1
        return {"seq": seq, "ok": False, "errno": err, "reason": reason[:300], "bytes": 0}

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(BURST), self._tokens + (now - self._refill) * RATE_PER_S)
        self._refill = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def _extents(bitmap: bytearray) -> int:
    """How many separate runs of 1s a 0/1-per-byte bitmap holds."""
    value = int.from_bytes(b"\0" + bytes(bitmap) + b"\0", "big")
    return bin(value ^ (value >> 8)).count("1") // 2


def unsupported(code: str) -> str | None:
    """Why this backend cannot honour `code` (None: it can)."""
    if code not in UNSUPPORTED:
        return None
    return UNSUPPORTED[code].format(swap="" if host_has_swap() else ", and this host has no swap to page out to")


def refuse(body: dict[str, Any]) -> dict[str, Any]:
    """The MEMCTL_ACK for a sandbox without memctl."""
    return {"seq": body["seq"], "ok": False, "errno": errno.EOPNOTSUPP, "bytes": 0,
            "reason": "memctl is off for this sandbox (policy setting memctl)"}
