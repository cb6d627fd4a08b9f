"""The confidential swap's tag store: a RAM disk (brd) in guest memory that holds dm-integrity's superblock,
journal and every block's tag, so the host file holds nothing but ciphertext.

A tag the host cannot reach is what stops a replay: with `authenticated`, a host that writes back an older
(ciphertext, tag) pair of a slot passes every check; here the older ciphertext no longer matches the tag only
the guest holds, and the read fails (docs/swap.md, "What the host can do").

brd allocates a page the first time a sector of it is written (drivers/block/brd.c, brd_insert_page) and, in
the guest's 6.1 kernel, never gives one back (it has no discard), so the store costs what swap has ever used at
once: one tag per 4 KiB block written (32 bytes: 0.8%) plus the superblock and the one journal section written
at format. Its pages are kernel memory, neither swapped (a tag on the host disk would undo the point) nor
reclaimed. brd counts them itself, in debugfs (ramdisk_pages/ram0), which memstats reports. Its module
parameters are read once, at load: the size is decided before loading, from the swap disk's size.
Guest only, stdlib only.
"""

from __future__ import annotations

import errno
import os
import time

from memvisor.guest import linux

MODULE = "brd"
NAME = "ram0"
DEBUGFS = "/sys/kernel/debug"
PAGES_FILE = f"{DEBUGFS}/ramdisk_pages/{NAME}"  # brd's count of allocated pages (6.1: brd_nr_pages)
BLOCK = 4096
# Room for the superblock (8 sectors) and dm-integrity's smallest journal, one section (264 sectors with 32-byte
# tags: `journal_sectors:8` is rounded up to it), ahead of the tags. Capacity costs nothing until it is written.
HEADROOM_KIB = 1024


def capacity_kib(data_sectors: int, tag_size: int) -> int:
    """The RAM disk's size for `data_sectors` of swap with `tag_size`-byte tags: the headroom, then one tag per
    4 KiB block in whole 4 KiB metadata buffers (drivers/md/dm-integrity.c, calculate_device_limits)."""
    blocks = data_sectors * 512 // BLOCK
    buffers = -(-blocks * tag_size // BLOCK)
    return HEADROOM_KIB + buffers * (BLOCK // 1024)


def module_params(kib: int) -> dict[str, str]:
    """brd's load-time parameters: one RAM disk of `kib` KiB (its default is 16 disks of 16 MiB)."""
    return {MODULE: f"rd_nr=1 rd_size={kib}"}


def device(kib: int, timeout: float = 5.0) -> tuple[str, tuple[int, int]]:
    """The RAM disk's node and (major, minor); OSError if it is missing or not `kib` KiB (brd was loaded before,
    with other parameters)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/sys/block/{NAME}/dev") as f:
                major, minor = (int(x) for x in f.read().split(":"))
            with open(f"/sys/block/{NAME}/size") as f:
                sectors = int(f.read())
            if os.path.exists(f"/dev/{NAME}"):
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise OSError(errno.ENODEV, "the RAM disk for the swap tags did not appear", f"/dev/{NAME}")
        time.sleep(0.01)
    if sectors != kib * 2:
        raise OSError(errno.EINVAL, f"the RAM disk has {sectors // 2} KiB, not {kib} KiB (brd was loaded before)",
                      f"/dev/{NAME}")
    return f"/dev/{NAME}", (major, minor)


def mount_debugfs() -> None:
    """Mount debugfs (root only; nothing else in the guest uses it) so memstats can read the store's size."""
    if not os.path.exists(PAGES_FILE):
        linux.mount("debugfs", DEBUGFS, "debugfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
