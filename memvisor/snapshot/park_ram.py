"""memctl's guest RAM in a parked snapshot: the sealed stream "ram" (docs/parking.md).

With memctl the guest's RAM is a shared memfd (host/memctl.py), and QEMU's migration stream skips shared RAM
(x-ignore-shared, which the shared read-only root needs). memvisor owns that memfd, so it carries the pages
itself: after QEMU has saved the paused VM, `save` writes the memfd's data (SEEK_DATA/SEEK_HOLE: never-touched
and freed pages are holes; all-zero pieces are skipped too) into a SealWriter, and `load` refills a new memfd
from it, after the resuming VMM started and before it loads QEMU's stream.

The plaintext (inside the seal) is a header, MAGIC, the RAM size and the ranges memvisor held locked for the
guest (MLOCK, re-locked on load); then records: offset and length (u64 each, page-aligned, at most PIECE),
then that many bytes. The stream is authenticated, but `load` still checks every record against the memfd's
size before it writes anything. Guest RAM passes through one buffer of each side's, reused and zeroed at the end
(as far as Python lets a program forget: seal.read_chunks' chunks are immutable).

A template's RAM is the same format in the stream "template-ram" (`stream`).
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
    buffer = bytearray(PIECE)
    try:
        with memoryview(buffer) as view:
            while offset < backing.size:
                try:
                    start = os.lseek(backing.fd, offset, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no data past offset
                        break
                    raise
                end = min(os.lseek(backing.fd, start, os.SEEK_HOLE), backing.size)
                for pos in range(start, end, PIECE):
                    n = os.preadv(backing.fd, [view[:min(PIECE, end - pos)]], pos)
                    if view[:n] == _ZEROS[:n]:
                        continue
                    writer.write(RANGE.pack(pos, n))
                    writer.write(view[:n])
                    carried += n
                offset = end
    finally:
        buffer[:] = bytes(PIECE)
    return carried


def load(backing: memctl.Backing, path: Path, key: bytes | bytearray, ident: seal.Ident,
         stream: str = "ram") -> int:
    """Refill `backing` (a new, empty memfd of the same size) from the sealed stream `stream` at `path`, checking
    each chunk as it comes; then lock the ranges that were locked. Returns the bytes of RAM written; SealError if
    the stream is damaged or does not fit the memfd."""
    def bad(why: str) -> seal.SealError:
        return seal.SealError(f"{path.name}: {why}")

    # What is left of one chunk (an unfinished record, at most a header and a piece) plus the next chunk: a fixed
    # buffer, never regrown (a regrown bytearray leaves copies of guest RAM in freed memory), zeroed at the end.
    buffer = bytearray(seal.CHUNK_BYTES + HEADER.size + RANGE.size + PIECE)
    fill = 0
    header: tuple[bytes, int, int] | None = None
    locked: list[tuple[int, int]] = []
    written = 0
    try:
        with memoryview(buffer) as view:
            for chunk in seal.read_chunks(path, key, ident, stream):
                if fill + len(chunk) > len(buffer):
                    raise bad(f"a record longer than {PIECE} bytes")
                view[fill:fill + len(chunk)] = chunk
                fill += len(chunk)
                used = 0
                if header is None:
                    if fill < HEADER.size:
                        continue
                    header = HEADER.unpack_from(buffer)
                    if header[0] != MAGIC or header[1] != backing.size:
                        raise bad(f"not a RAM stream for {backing.size} bytes of guest RAM")
                    used = HEADER.size
                while len(locked) < header[2] and fill - used >= RANGE.size:
                    locked.append(_checked(RANGE.unpack_from(buffer, used), backing.size, bad))
                    used += RANGE.size
                if len(locked) == header[2]:
                    while fill - used >= RANGE.size:
                        offset, length = _checked(RANGE.unpack_from(buffer, used), backing.size, bad)
                        if length > PIECE:
                            raise bad(f"a record of {length} bytes (at most {PIECE})")
                        if fill - used - RANGE.size < length:
                            break
                        start = used + RANGE.size
                        os.pwrite(backing.fd, view[start:start + length], offset)
                        written += length
                        used = start + length
                view[:fill - used] = view[used:fill]  # the unfinished rest to the front (memmove)
                fill -= used
    finally:
        buffer[:] = bytes(len(buffer))
    if header is None or len(locked) != header[2] or fill:
        raise bad("the RAM stream ends inside a record")
    backing.lock_ranges(locked)
    return written


def _checked(span: tuple[int, int], size: int, bad: Callable[[str], seal.SealError]) -> tuple[int, int]:
    offset, length = span
    if offset % memctl.PAGE or length % memctl.PAGE or length == 0 or offset + length > size:
        raise bad(f"a range [{offset:#x}, +{length:#x}) outside the {size}-byte guest RAM")
    return offset, length
