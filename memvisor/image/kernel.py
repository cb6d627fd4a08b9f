"""The guest kernel from Debian's linux-image package: the vmlinux inside its bzImage, and the modules memvisor
loads, with their dependency closure in load order.

The bzImage's payload is unpacked because QEMU boots an ELF vmlinux through its PVH entry point, which skips the
real-mode setup and the in-guest decompressor (FACTS.md: /init reached in 2.5 s instead of 6.8 s under TCG).
Dependencies come from each module's own `.modinfo` section (`depends=`, `softdep=pre:`), which is what depmod
reads too, so no kmod tools are needed on the host.
"""

from __future__ import annotations

import lzma
import struct
from dataclasses import dataclass
from pathlib import Path

from memvisor.errors import ImageError

XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"

# Module groups the guest init loads on demand; the image carries the closure of all of them.
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "base": ("virtio_pci", "virtio_console"),
    "block": ("virtio_blk",),
    "balloon": ("virtio_balloon",),
    "dm": ("dm_mod",),
    "crypt": ("dm_crypt", "xts", "aesni_intel"),
    "integrity": ("dm_integrity",),
    # confidential swap: the RAM disk that holds dm-integrity's tags in guest memory (loaded with its size), and
    # the SIMD SHA-256 its discard variant hashes with (only the generic one is built in; nothing in the guest
    # would load the faster ones on demand: there is no modprobe)
    "ramdisk": ("brd",),
    "sha256": ("sha256_ssse3",),
    "aegis": ("aegis128", "aegis128_aesni"),
    "gcm": ("gcm", "ghash_clmulni_intel"),
    "zram": ("zram", "lz4", "lzo_rle", "zstd"),
    # stage 0 (image/rootfs.py) loads these before the root exists: the shared read-only root and its overlay.
    # erofs needs libcrc32c, whose init asks the crypto API for "crc32c" (a softdep on an alias, which no module
    # loader resolves in stage 0): crc32c_generic provides it.
    # pmem: the root on QEMU's emulated ACPI NVDIMM (nfit finds it, nd_pmem makes the fsdax /dev/pmemN).
    "rootfs_pmem": ("nfit", "nd_pmem", "crc32c_generic", "erofs", "overlay"),
    "rootfs_blk": ("virtio_pci", "virtio_blk", "crc32c_generic", "erofs", "overlay"),
    # the scratch disk, only when the policy asks for one (ext4 also mounts ext2)
    "rootfs_scratch": ("virtio_pci", "virtio_blk", "ext4"),
}


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside an x86 bzImage whose payload is xz-compressed (Debian's are)."""
    start = bzimage.find(XZ_MAGIC)
    if start < 0:
        raise ImageError("the kernel image has no xz payload", hint="memvisor expects Debian's linux-image-amd64")
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        vmlinux = dec.decompress(bzimage[start:])
    except lzma.LZMAError as exc:
        raise ImageError(f"cannot decompress the kernel payload: {exc}") from None
    if not vmlinux.startswith(ELF_MAGIC):
        raise ImageError("the kernel payload is not an ELF file")
    return vmlinux


def elf_section(data: bytes, wanted: str) -> bytes | None:
    """The contents of section `wanted` of a 64-bit little-endian ELF file (struct elf64_hdr / elf64_shdr,
    include/uapi/linux/elf.h), or None if it has no such section."""
    if not data.startswith(ELF_MAGIC) or data[4] != 2 or data[5] != 1:
        raise ImageError("not a 64-bit little-endian ELF file")
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def shdr(i: int) -> tuple[int, int, int]:
        # sh_name (u32), sh_type (u32), sh_flags (u64), sh_addr (u64), sh_offset (u64), sh_size (u64)
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, e_shoff + i * e_shentsize)
        return name, offset, size

    _, str_off, _ = shdr(e_shstrndx)
    for i in range(e_shnum):
        name_off, offset, size = shdr(i)
        end = data.index(b"\0", str_off + name_off)
        if data[str_off + name_off:end].decode() == wanted:
            return data[offset:offset + size]
    return None


def modinfo(path: Path) -> dict[str, list[str]]:
    """A module's .modinfo key=value strings (keys may repeat, e.g. alias)."""
    section = elf_section(path.read_bytes(), ".modinfo") or b""
    info: dict[str, list[str]] = {}
    for item in section.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def module_name(relpath: str) -> str:
    """The kernel's name for a module file: basename without .ko, '-' folded to '_'."""
    return Path(relpath).name.removesuffix(".ko").replace("-", "_")


@dataclass(frozen=True)
class ModuleSet:
    """The modules to ship: `files` (paths relative to /lib/modules/KVER), and per group the load order."""

    kernel_version: str
    files: tuple[str, ...]
    groups: dict[str, list[str]]


def resolve_modules(moddir: Path, groups: dict[str, tuple[str, ...]] = MODULE_GROUPS) -> ModuleSet:
    """Compute the dependency closure of every group in `moddir` (/lib/modules/KVER of the unpacked package)."""
    order = (moddir / "modules.order").read_text().split()
    by_name = {module_name(p): p for p in order}
    builtin = {module_name(p) for p in (moddir / "modules.builtin").read_text().split()}
    deps_cache: dict[str, list[str]] = {}

    def deps(name: str) -> list[str]:
        if name not in deps_cache:
            info = modinfo(moddir / by_name[name])
            found = [d.replace("-", "_") for v in info.get("depends", []) for d in v.split(",") if d]
            for soft in info.get("softdep", []):
                pre = soft.partition("pre:")[2].partition("post:")[0]
                found += [d.replace("-", "_") for d in pre.split() if d.replace("-", "_") in by_name]
            deps_cache[name] = found
        return deps_cache[name]

    def visit(name: str, out: list[str], stack: tuple[str, ...]) -> None:
        if name in builtin or by_name.get(name) in out:
            return
        if name not in by_name:
            raise ImageError(f"kernel module {name} is not in the kernel package {moddir.name}",
                             hint="check MODULE_GROUPS in memvisor/image/kernel.py against the kernel config")
        if name in stack:
            raise ImageError(f"kernel module dependency cycle: {' -> '.join((*stack, name))}")
        for dep in deps(name):
            visit(dep, out, (*stack, name))
        out.append(by_name[name])

    resolved: dict[str, list[str]] = {}
    for group, names in groups.items():
        out: list[str] = []
        for name in names:
            visit(name, out, ())
        resolved[group] = out
    files = tuple(sorted({p for paths in resolved.values() for p in paths}))
    return ModuleSet(moddir.name, files, resolved)
