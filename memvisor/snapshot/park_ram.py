"""memctl's guest RAM in a parked snapshot: the sealed stream "ram" (docs/parking.md).

With memctl the guest's RAM is a shared memfd (host/memctl.py), and QEMU's migration stream skips shared RAM
(x-ignore-shared, which the shared read-only root needs). memvisor owns that memfd, so it carries the pages
itself: after QEMU has saved the paused VM, `save` writes the memfd's data (SEEK_DATA/SEEK_HOLE: never-touched
and freed pages are holes; all-zero pieces are skipped too) into a SealWriter, and `load` refills a new memfd
from it, after the resuming VMM started and before it loads QEMU's stream.

The plaintext (inside the seal) is a header, MAGIC, the RAM size and the ranges memvisor held locked for the
guest (MLOCK, re-locked on load); then records: offset and length (u64 each, page-aligned, at most PIECE),
then that many bytes. The stream is authenticated, but `load` still checks every record against the memfd's
size before it writes anything.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path

from memvisor.host import memctl
from memvisor.snapshot import seal

MAGIC = b"MVRAM001"
HEADER = struct.Struct("<8sQI")  # magic, RAM bytes, locked ranges
RANGE = struct.Struct("<QQ")  # offset, length
PIECE = 1 << 20
_ZEROS = memoryview(bytes(PIECE))


def save(backing: memctl.Backing, writer: seal.SealWriter) -> int:
    """Write the guest RAM memfd's data into `writer`; returns the bytes of RAM it carries. Call it with the VM
    paused (nothing writes the memfd but memvisor)."""
    locked = backing.locked_ranges()
    writer.write(HEADER.pack(MAGIC, backing.size, len(locked)))
    for offset, length in locked:
        writer.write(RANGE.pack(offset, length))
    carried = 0
    offset = 0
    while offset < backing.size:
        try:
            start = os.lseek(backing.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past offset
                break
            raise
        end = min(os.lseek(backing.fd, start, os.SEEK_HOLE), backing.size)
        for pos in range(start, end, PIECE):
            data = os.pread(backing.fd, min(PIECE, end - pos), pos)
            if data == _ZEROS[:len(data)]:
                continue
            writer.write(RANGE.pack(pos, len(data)))
            writer.write(data)
            carried += len(data)
        offset = end
    return carried


def load(backing: memctl.Backing, path: Path, key: bytes, ident: seal.Ident) -> int:
    """Refill `backing` (a new, empty memfd of the same size) from the sealed stream at `path`, checking each
    chunk as it comes; then lock the ranges that were locked. Returns the bytes of RAM written; SealError if the
    stream is damaged or does not fit the memfd."""
    def bad(why: str) -> seal.SealError:
        return seal.SealError(f"{path.name}: {why}")

    buffer = bytearray()
    header: tuple[bytes, int, int] | None = None
    locked: list[tuple[int, int]] = []
    written = 0
    for chunk in seal.read_chunks(path, key, ident, "ram"):
        buffer += chunk
        used = 0
        if header is None:
            if len(buffer) < HEADER.size:
                continue
            header = HEADER.unpack_from(buffer)
            if header[0] != MAGIC or header[1] != backing.size:
                raise bad(f"not a RAM stream for {backing.size} bytes of guest RAM")
            used = HEADER.size
        while len(locked) < header[2] and len(buffer) - used >= RANGE.size:
            locked.append(_checked(RANGE.unpack_from(buffer, used), backing.size, bad))
            used += RANGE.size
        if len(locked) == header[2]:
            while len(buffer) - used >= RANGE.size:
                offset, length = _checked(RANGE.unpack_from(buffer, used), backing.size, bad)
                if length > PIECE:
                    raise bad(f"a record of {length} bytes (at most {PIECE})")
                if len(buffer) - used - RANGE.size < length:
                    break
                start = used + RANGE.size
                os.pwrite(backing.fd, memoryview(buffer)[start:start + length], offset)
                written += length
                used = start + length
        del buffer[:used]
    if header is None or len(locked) != header[2] or buffer:
        raise bad("the RAM stream ends inside a record")
    backing.lock_ranges(locked)
    return written


def _checked(span: tuple[int, int], size: int, bad: Callable[[str], seal.SealError]) -> tuple[int, int]:
    offset, length = span
    if offset % memctl.PAGE or length % memctl.PAGE or length == 0 or offset + length > size:
        raise bad(f"a range [{offset:#x}, +{length:#x}) outside the {size}-byte guest RAM")
    return offset, length
