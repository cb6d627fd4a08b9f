"""The newc writer, checked by reading archives back with Debian's cpio and bsdtar."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from memvisor.image.cpio import CpioWriter


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "test.cpio"
    with path.open("wb") as f, CpioWriter(f) as c:
        c.add_dir("etc")
        c.add_file("etc/hello.txt", b"hello\n")
        c.add_file("etc/odd-length-name.bin", bytes(range(256)) * 3 + b"x", perm=0o600, uid=1000, gid=1000)
        c.add_file("empty", b"")
        c.add_dir("home", 0o1777)
        c.add_symlink("link", "etc/hello.txt")
        c.add_device("console", char=True, major=5, minor=1)
        c.add_device("vda", char=False, major=254, minor=0, perm=0o660)
    return path


def test_bsdtar_lists_everything(archive: Path) -> None:
    out = subprocess.run(["bsdtar", "-tvf", str(archive)], check=True, capture_output=True, text=True).stdout
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in out.splitlines()]
    assert names == ["etc", "etc/hello.txt", "etc/odd-length-name.bin", "empty", "home", "link", "console", "vda"]
    assert "1000" in out.splitlines()[2]


def test_cpio_extracts_identical_files(archive: Path, tmp_path: Path) -> None:
    dest = tmp_path / "x"
    dest.mkdir()
    with archive.open("rb") as f:
        subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], stdin=f, cwd=dest, check=True)
    assert (dest / "etc/hello.txt").read_bytes() == b"hello\n"
    assert (dest / "etc/odd-length-name.bin").read_bytes() == bytes(range(256)) * 3 + b"x"
    assert stat.S_IMODE((dest / "etc/odd-length-name.bin").stat().st_mode) == 0o600
    assert stat.S_IMODE((dest / "home").stat().st_mode) == 0o1777
    assert os.readlink(dest / "link") == "etc/hello.txt"
    assert (dest / "empty").read_bytes() == b""
    if os.geteuid() == 0:
        st = (dest / "console").stat()
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (5, 1)
        assert stat.S_ISBLK((dest / "vda").stat().st_mode)
        assert (dest / "etc/odd-length-name.bin").stat().st_uid == 1000


def test_archive_is_deterministic_and_aligned(tmp_path: Path, archive: Path) -> None:
    data = archive.read_bytes()
    assert len(data) % 4 == 0
    assert data.startswith(b"070701")
    assert b"TRAILER!!!" in data[-128:]
    copy = tmp_path / "again.cpio"
    with copy.open("wb") as f, CpioWriter(f) as c:
        c.add_dir("etc")
    with copy.open("wb") as f, CpioWriter(f) as c:
        c.add_dir("etc")
    assert copy.read_bytes() == copy.read_bytes()


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    with (tmp_path / "d.cpio").open("wb") as f:
        c = CpioWriter(f)
        c.add_dir("a")
        with pytest.raises(ValueError, match="duplicate"):
            c.add_file("a/", b"")
