"""The scratch disk in confidential mode (policy scratch_mode; docs/image.md, "The scratch disk"): what the
workload writes to its root goes to the host's sparse file as ciphertext, and a block the host changes, moves or
writes back from an older copy reads as an I/O error in the guest, never as other data.

    /dev/vdX (serial memvisor-scratch) -> integrity (mode D, 4 KiB blocks; superblock, journal and every tag on
        the RAM disk /dev/ram1 in guest memory: guest/tagstore.py) -> crypt capi:aegis128-random (AEAD: a random
        IV and an authentication tag per block, 32 bytes in all; gcm(aes) if aegis128 is missing)
        -> ext2 with 4 KiB blocks, mounted at /mnt/scratch

as confidential swap does (guest/swapstack.py), with its own key: getrandom into the kernel keyring as a `logon`
key, loaded by dm-crypt and invalidated, never logged, never in a Python string, never sent anywhere. The tags
the host cannot reach are what stop a rollback: an older (ciphertext, IV) pair no longer matches the tag only the
guest holds. They cost guest RAM as blocks are written (brd allocates a page on its first write): 32 bytes per
4 KiB, 8 MiB per GiB written.

Set up by PID 1, not stage 0: stage 0 is busybox only, and PID 1's Python already has the device-mapper code,
so the only boot cost is the work itself. Stage 0 then gives PID 1's own root a tmpfs upper layer (as without a
scratch disk), and PID 1 builds the workload's root here: memvisor's read-only root under an overlay whose upper
layer is on the scratch, with the guest's /proc, /sys and /dev, at WORKLOAD_ROOT; the agent chroots every command
into it (as for a user's image, guest/userroot.py, which puts its own overlay on the scratch instead).

No block is read before it is written (dm-integrity has no valid tag for it, and the read fails): busybox's
mke2fs writes 1024-byte superblocks into blocks it never writes whole, which the kernel reads first, so those
blocks are written with zeros before; 4 KiB file-system blocks, one per page, mean the kernel never reads a block
to change part of it. Readahead may still ask for a never-written block past the end of a directory; that read
fails quietly (a readahead is a hint) and nobody sees its data. Guest only, stdlib only.
"""

from __future__ import annotations

import mmap
import os
import time

from memvisor import cmdline, contract
from memvisor.errors import SetupError
from memvisor.guest import blockio, dm, integrity, linux, swapstack, tagstore, userroot

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

MODES = ("confidential", "plain")  # memvisor.policy.ScratchMode (not imported: boot cost)
INTEGRITY_NAME = "memvisor-scratch-integrity"
CRYPT_NAME = "memvisor-scratch-crypt"
KEY_DESCRIPTION = "memvisor:scratch-crypt"
WORKLOAD_ROOT = "/mnt/workload"  # the root commands run in (memvisor's root, its upper layer on the scratch)
LOWER = "/mnt/rootfs"  # memvisor's read-only root, where stage 0 left it
BLOCK = 4096
BLOCKS_PER_GROUP = 8 * BLOCK  # ext2: one block bitmap per group
# 4 KiB blocks (one per page: no block is ever read to change part of it); 128-byte inodes (ext2 has no use for
# more) and one per 16 KiB, as e2fsprogs makes them: mke2fs writes every inode table through the AEAD at boot
# (the kernel reads an inode's block before it writes the inode), 8 MiB per GiB of scratch.
MKE2FS = ("/usr/bin/busybox", "mke2fs", "-q", "-F", "-m", "0", "-b", str(BLOCK), "-I", "128", "-i", "16384")
NEEDS = ("block", "dm", "crypt", "integrity", "rootfs_scratch")  # module groups (image/kernel.py), in order
MS_BIND, MS_REC = 0x1000, 0x4000


def setup(settings: dict[str, str], load_group: Callable[[str, dict[str, str] | None], list[str]],
          log: Callable[[str], None]) -> tuple[dict[str, Any], str | None]:
    """Set up the scratch disk if the settings ask for a confidential one (a plain one is stage 0's). Returns a
    report (empty when there is nothing to do) and the workload's root (None: commands run in PID 1's root, or
    the user's image root does the job). Raises SetupError naming what is missing."""
    size_mib = int(contract.require(settings, "scratch_mib"))
    mode = contract.require(settings, "scratch_mode")
    if mode not in MODES:
        raise SetupError(f"memvisor.scratch_mode={mode[:20]!r} is not one of {', '.join(MODES)}")
    if size_mib == 0 or mode == "plain":
        return {}, None
    marks = [time.monotonic()]
    for group in NEEDS:
        failed = load_group(group, None)
        if failed:
            raise SetupError(f"the confidential scratch disk needs kernel module {failed[0]}, which could not be "
                             "loaded; use --scratch-mode plain")
    disk = blockio.find_disk(contract.SCRATCH_DISK_SERIAL)
    cipher, _name, key_size, tag_size = aead(load_group)
    meta = tag_store(settings, disk[2], load_group)
    marks.append(time.monotonic())
    ctl = dm.DeviceMapper()
    try:
        node = stack(ctl, disk, meta, cipher, key_size, tag_size)
    except OSError as exc:
        for name in (CRYPT_NAME, INTEGRITY_NAME):
            try:
                ctl.remove(name)
            except OSError:
                pass
        raise SetupError(f"the confidential scratch disk could not be set up: {exc.strerror or exc}") from None
    finally:
        ctl.close()
    marks.append(time.monotonic())
    try:
        make_filesystem(node)
        os.makedirs(contract.SCRATCH_MOUNT, exist_ok=True)
        linux.mount(node, contract.SCRATCH_MOUNT, "ext2")
    except OSError as exc:
        raise SetupError(f"cannot make the scratch disk's file system on {node}: {exc}") from None
    marks.append(time.monotonic())
    seconds = [round(b - a, 3) for a, b in zip(marks, marks[1:], strict=False)]
    report: dict[str, Any] = {"mode": mode, "device": node, "backing": disk[0], "cipher": cipher,
                              "tag_store": meta[0], "tags_bytes": tagstore.used_bytes(tagstore.SCRATCH_NAME),
                              "seconds": dict(zip(("modules", "device_mapper", "mkfs_mount"), seconds, strict=True))}
    if contract.require(settings, contract.USER_IMAGE_SETTING) != "none":
        return report, None  # the user's image root puts its overlay on the scratch (guest/userroot.py)
    return report, workload_root(memctl=cmdline.parse_bool(contract.require(settings, "memctl")))


def aead(load_group: Callable[[str, dict[str, str] | None], list[str]]) -> tuple[str, str, int, int]:
    """The strongest AEAD the kernel has, as confidential swap chooses it: aegis128, else gcm(aes)."""
    load_group("aegis", None)  # aegis128_aesni may fail without AES-NI; the generic aegis128 still works
    if swapstack.crypto_available("aegis128"):
        return swapstack.AEADS[0]
    if not load_group("gcm", None):
        return swapstack.AEADS[1]
    raise SetupError("the confidential scratch disk needs an AEAD cipher: neither aegis128 nor gcm(aes) can be "
                     "loaded; use --scratch-mode plain")


def tag_store(settings: dict[str, str], sectors: int,
              load_group: Callable[[str, dict[str, str] | None], list[str]]) -> tuple[str, tuple[int, int]]:
    """The RAM disk for the scratch's tags (ram1). brd sizes every disk alike when it loads, and the scratch is
    set up before swap: room here for confidential swap's tags too (ram0), whose disk is attached by then."""
    tag_bytes = max(a[3] for a in swapstack.AEADS)
    kib = tagstore.capacity_kib(sectors, tag_bytes)
    if contract.require(settings, "swap_mode") == "confidential":
        kib = max(kib, tagstore.capacity_kib(blockio.find_disk(contract.SWAP_DISK_SERIAL)[2],
                                             max(tag_bytes, swapstack.INTERNAL_HASH[1])))
    if load_group("ramdisk", tagstore.module_params(kib, disks=2)):
        raise SetupError("the confidential scratch disk needs kernel module brd (a RAM disk for its tags), which "
                         "could not be loaded; use --scratch-mode plain")
    try:
        meta = tagstore.device(tagstore.capacity_kib(sectors, tag_bytes), name=tagstore.SCRATCH_NAME)
        tagstore.mount_debugfs()
    except OSError as exc:
        raise SetupError(f"the scratch disk's tag store: {exc.strerror}") from None
    return meta


def stack(ctl: dm.DeviceMapper, disk: tuple[str, tuple[int, int], int], meta: tuple[str, tuple[int, int]],
          cipher: str, key_size: int, tag_size: int) -> str:
    """integrity (tags on `meta`) and crypt (AEAD) over the disk; returns the crypt device's node."""
    device, major_minor, _sectors = disk
    provided = integrity.format_device(ctl, device, major_minor, tag_size, "memvisor-scratch-format", meta)
    sectors = provided - provided % (BLOCK // 512)
    integ = ctl.create(INTEGRITY_NAME)
    ctl.load(INTEGRITY_NAME, [dm.Target(0, sectors, "integrity", integrity.target_params(
        f"{major_minor[0]}:{major_minor[1]}", tag_size, f"{meta[1][0]}:{meta[1][1]}"))])
    ctl.resume(INTEGRITY_NAME)
    serial = swapstack.logon_key(key_size, description=KEY_DESCRIPTION)
    options = (f"integrity:{tag_size}:aead", f"sector_size:{BLOCK}", *swapstack.CRYPT_FLAGS)
    params = swapstack.crypt_params(cipher, key_size, f"{integ[0]}:{integ[1]}", options, KEY_DESCRIPTION)
    try:
        crypt = ctl.create(CRYPT_NAME)
        ctl.load(CRYPT_NAME, [dm.Target(0, sectors, "crypt", params)], secret=True)
    finally:
        swapstack.invalidate_key(serial)  # dm-crypt copied it at table load; nothing else may ever find it
    ctl.resume(CRYPT_NAME)
    return ctl.node(crypt)


def superblock_groups(blocks: int) -> list[int]:
    """The block groups of an ext2 of `blocks` 4 KiB blocks that hold a superblock copy (sparse_super: 0, 1 and the
    powers of 3, 5 and 7)."""
    groups = -(-blocks // BLOCKS_PER_GROUP)
    out = {0, 1} if groups > 1 else {0}
    for base in (3, 5, 7):
        power = base
        while power < groups:
            out.add(power)
            power *= base
    return sorted(out)


def make_filesystem(node: str) -> None:
    """ext2 with 4 KiB blocks, by busybox's mke2fs, on a device no block of which was ever written. mke2fs
    writes each superblock copy as 1024 bytes, into a block it writes nothing else of: the page cache would read
    that block first, and fail. So the first block of every group that gets a copy is written whole first."""
    with open(f"/sys/block/{node.removeprefix('/dev/')}/size") as f:
        blocks = int(f.read()) * 512 // BLOCK
    page = mmap.mmap(-1, BLOCK)  # zeros, page-aligned for O_DIRECT
    fd = os.open(node, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        for group in superblock_groups(blocks):
            if os.pwritev(fd, [page], group * BLOCKS_PER_GROUP * BLOCK) != BLOCK:
                raise OSError(5, f"short write in block group {group}", node)
    finally:
        os.close(fd)
        page.close()
    pid = os.posix_spawn(MKE2FS[0], [*MKE2FS[1:], node], {"PATH": "/usr/sbin:/usr/bin"})
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(5, f"mke2fs failed (exit status {os.waitstatus_to_exitcode(status)})", node)


def workload_root(memctl: bool) -> str:
    """memvisor's root under an overlay whose upper layer is on the scratch, with the guest's /proc, /sys and /dev
    (and memctl's socket, with memctl) as the commands' root; /mnt/scratch is visible in it, as it is in PID 1's
    root when the scratch is plain."""
    upper = contract.SCRATCH_MOUNT
    for d in (f"{upper}/data", f"{upper}/work", WORKLOAD_ROOT):
        os.makedirs(d, exist_ok=True)
    try:
        linux.mount("overlay", WORKLOAD_ROOT, "overlay", 0,
                    f"lowerdir={LOWER},upperdir={upper}/data,workdir={upper}/work")
        binds = ["/proc", "/sys", "/dev", contract.SCRATCH_MOUNT]
        if memctl:  # the workload asks PID 1 for memctl through a socket there (docs/memctl.md)
            sock_dir = os.path.dirname(contract.MEMCTL_SOCKET)
            os.makedirs(sock_dir, exist_ok=True)  # memctld creates its socket there later
            binds.append(sock_dir)
        for path in binds:
            linux.mount(path, userroot.real_dir(WORKLOAD_ROOT, path), "", MS_BIND | MS_REC)
    except OSError as exc:
        raise SetupError(f"cannot mount the workload's root on the scratch disk: {exc}") from None
    return WORKLOAD_ROOT
