"""ELF helpers, vmlinux extraction and module naming, on real and synthetic inputs."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from memvisor.errors import ImageError
from memvisor.image import kernel, python


def test_needed_libraries_of_a_host_binary() -> None:
    needed = python.needed_libraries(Path("/bin/true").read_bytes())
    assert "libc.so.6" in needed


def test_elf_section_finds_real_sections() -> None:
    data = Path("/bin/true").read_bytes()
    assert kernel.elf_section(data, ".dynstr") is not None
    assert kernel.elf_section(data, ".no-such-section") is None
    with pytest.raises(ImageError):
        kernel.elf_section(b"not an elf", ".text")


def test_extract_vmlinux_from_synthetic_bzimage() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 10
    bzimage = b"MZ setup code" + lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + b"tail"
    assert kernel.extract_vmlinux(bzimage) == elf
    with pytest.raises(ImageError, match="no xz payload"):
        kernel.extract_vmlinux(b"MZ nothing here")
    with pytest.raises(ImageError, match="not an ELF"):
        kernel.extract_vmlinux(lzma.compress(b"plain text", format=lzma.FORMAT_XZ))


def test_module_names() -> None:
    assert kernel.module_name("kernel/drivers/md/dm-crypt.ko") == "dm_crypt"
    assert kernel.module_name("kernel/arch/x86/crypto/aegis128-aesni.ko") == "aegis128_aesni"


def test_resolve_in_follows_absolute_links_inside_root(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib/real.so").write_bytes(b"x")
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64/ld.so").symlink_to("/lib/real.so")
    assert python.resolve_in(tmp_path, tmp_path / "lib64/ld.so") == tmp_path / "lib/real.so"
    assert python.resolve_in(tmp_path, tmp_path / "lib/missing.so") is None
