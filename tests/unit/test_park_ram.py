"""memctl's guest RAM as the sealed "ram" stream of a parked snapshot (snapshot/park_ram.py): what is carried comes
back byte for byte (holes and zero pieces skipped, locked ranges locked again); a stream for other RAM, cut, or
with a record outside the memfd is refused before anything is written there."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.host import memctl
from memvisor.snapshot import park_ram, seal
from memvisor.snapshot.seal import Ident, SealError, SealWriter

MiB = 1 << 20
IDENT = Ident("abc", 1)


@pytest.fixture
def key() -> bytes:
    return bytes(seal.new_key())


@pytest.fixture
def backing() -> Iterator[memctl.Backing]:
    b = memctl.Backing(16)
    yield b
    b.close()


def sealed(path: Path, key: bytes, plaintext: bytes) -> Path:
    with SealWriter(path, key, IDENT, "ram") as w:
        w.write(plaintext)
    return path


def test_a_round_trip_carries_the_data_and_the_locks_and_skips_holes_and_zeros(
        backing: memctl.Backing, key: bytes, tmp_path: Path) -> None:
    os.pwrite(backing.fd, os.urandom(3 * MiB + 4096), 5 * MiB)
    os.pwrite(backing.fd, bytes(2 * MiB), 10 * MiB)  # data, but all zeros: not carried
    os.pwrite(backing.fd, b"\x01" * 4096, 15 * MiB + 8192)
    backing.lock_ranges([(5 * MiB, 64 * 1024), (6 * MiB, 4096)])
    with SealWriter(tmp_path / "ram.snap", key, IDENT, "ram") as w:
        carried = park_ram.save(backing, w)
    assert carried == 3 * MiB + 4096 + 4096
    again = memctl.Backing(16)
    try:
        assert park_ram.load(again, tmp_path / "ram.snap", key, IDENT) == carried
        assert os.pread(again.fd, 16 * MiB, 0) == os.pread(backing.fd, 16 * MiB, 0)
        assert again.locked_ranges() == [(5 * MiB, 64 * 1024), (6 * MiB, 4096)]
        assert again.counters.locked_bytes == 64 * 1024 + 4096
        resident = os.lseek(again.fd, 0, os.SEEK_DATA)
        assert resident == 5 * MiB, "a hole before the first data was filled"
    finally:
        again.close()


@pytest.mark.parametrize("plaintext, why", [
    (park_ram.HEADER.pack(b"MVRAM001", 32 * MiB, 0), "not a RAM stream for"),
    (park_ram.HEADER.pack(b"NOTRAM01", 16 * MiB, 0), "not a RAM stream for"),
    (park_ram.HEADER.pack(b"MVRAM001", 16 * MiB, 0) + park_ram.RANGE.pack(16 * MiB, 4096) + bytes(4096), "outside"),
    (park_ram.HEADER.pack(b"MVRAM001", 16 * MiB, 0) + park_ram.RANGE.pack(100, 4096) + bytes(4096), "outside"),
    (park_ram.HEADER.pack(b"MVRAM001", 16 * MiB, 1) + park_ram.RANGE.pack(0, 0), "outside"),
    (park_ram.HEADER.pack(b"MVRAM001", 16 * MiB, 0) + park_ram.RANGE.pack(0, 2 * MiB) + bytes(2 * MiB), "at most"),
    (park_ram.HEADER.pack(b"MVRAM001", 16 * MiB, 0) + park_ram.RANGE.pack(0, 8192) + bytes(4096), "ends inside"),
    (park_ram.HEADER.pack(b"MVRAM001", 16 * MiB, 0)[:10], "ends inside"),
])
def test_a_stream_that_does_not_fit_is_refused(backing: memctl.Backing, key: bytes, tmp_path: Path,
                                               plaintext: bytes, why: str) -> None:
    path = sealed(tmp_path / "ram.snap", key, plaintext)
    with pytest.raises(SealError, match=why):
        park_ram.load(backing, path, key, IDENT)
    assert os.lseek(backing.fd, 0, os.SEEK_END) == 16 * MiB
    with pytest.raises(OSError):  # nothing written: still all hole
        os.lseek(backing.fd, 0, os.SEEK_DATA)


def test_another_sandboxs_ram_stream_is_refused(backing: memctl.Backing, key: bytes, tmp_path: Path) -> None:
    with SealWriter(tmp_path / "ram.snap", key, Ident("other", 1), "ram") as w:
        park_ram.save(backing, w)
    with pytest.raises(SealError):
        park_ram.load(backing, tmp_path / "ram.snap", key, IDENT)
