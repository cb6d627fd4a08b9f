"""swapfile.keep and copy_sparse: a parked sandbox's disk gets a name, by a link or by a copy that keeps holes,
on the same filesystem or another (copy_file_range refuses that one: EXDEV)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.host import swapfile

MIB = 1 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[int]:
    """A 64 MiB unnamed file with data at 1 MiB and at 40 MiB, holes elsewhere."""
    fd = swapfile.create_unnamed(tmp_path, 64)
    os.pwrite(fd, b"a" * MIB, MIB)
    os.pwrite(fd, b"b" * 4096, 40 * MIB)
    yield fd
    os.close(fd)


def same_data(fd: int, path: Path) -> bool:
    with path.open("rb") as f:
        return f.read() == os.pread(fd, 64 * MIB, 0)


def test_keep_links_an_unnamed_file_on_its_own_filesystem(disk: int, tmp_path: Path) -> None:
    swapfile.keep(disk, tmp_path / "swap.img")
    assert os.path.samestat(os.fstat(disk), (tmp_path / "swap.img").stat())
    swapfile.keep(disk, tmp_path / "swap.img")  # already that file: nothing to do


@pytest.mark.parametrize("elsewhere", [False, True], ids=["same filesystem", "another filesystem"])
def test_a_copy_keeps_the_data_and_the_holes(disk: int, tmp_path: Path, elsewhere: bool) -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm" if elsewhere else tmp_path) as where:
        copy = Path(where) / "swap.img"
        swapfile.copy_sparse(disk, copy)
        st = copy.stat()
        assert (st.st_size, st.st_mode & 0o777) == (64 * MIB, 0o600)
        assert st.st_blocks * 512 < 4 * MIB, "holes were filled"
        assert same_data(disk, copy)
