"""The confidential swap's tag store: a RAM disk (brd) in guest memory that holds dm-integrity's superblock,
journal and every block's tag, so the host file holds nothing but ciphertext.

A tag the host cannot reach is what stops a replay: with `authenticated`, a host that writes back an older
(ciphertext, tag) pair of a slot passes every check; here the older ciphertext no longer matches the tag only
the guest holds, and the read fails (docs/swap.md, "What the host can do").

brd allocates a page the first time a sector of it is written (drivers/block/brd.c, brd_insert_page) and, in
the guest's 6.1 kernel, never gives one back (it has no discard). That first write must never come from
dm-integrity: it would allocate (GFP_NOIO) inside the swap-out path, exactly when memory is gone, and loop in
direct reclaim while swap-out waits for it (guest/segments.py). So the store is written ahead of use, one swap
segment's tags at a time (`prefill`), before that segment can be swapped to. Its pages are kernel memory,
neither swapped (a tag on the host disk would undo the point) nor reclaimed. brd counts them itself, in debugfs
(ramdisk_pages/ram0), which memstats reports. Its module parameters are read once, at load: the size is
decided before loading, from the swap disk's size.

The confidential scratch disk (guest/scratch.py) keeps its tags the same way, on a second RAM disk of the same
module (ram1): brd makes all its disks one size, so whichever loads it first (the scratch, set up before swap)
sizes them for both, and a disk larger than its user needs costs nothing (capacity is allocated on first
write). Guest only, stdlib only.
"""

from __future__ import annotations

import errno
import mmap
import os
import time

from memvisor.guest import linux

MODULE = "brd"
NAME = "ram0"  # the confidential swap's
SCRATCH_NAME = "ram1"  # the confidential scratch disk's
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


def module_params(kib: int, disks: int = 1) -> dict[str, str]:
    """brd's load-time parameters: `disks` RAM disks of `kib` KiB each (its default is 16 disks of 16 MiB)."""
    return {MODULE: f"rd_nr={disks} rd_size={kib}"}


def device(kib: int, timeout: float = 5.0, name: str = NAME) -> tuple[str, tuple[int, int]]:
    """RAM disk `name`'s node and (major, minor); OSError if it is missing or smaller than `kib` KiB (brd was
    loaded before, with other parameters)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/sys/block/{name}/dev") as f:
                major, minor = (int(x) for x in f.read().split(":"))
            with open(f"/sys/block/{name}/size") as f:
                sectors = int(f.read())
            if os.path.exists(f"/dev/{name}"):
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise OSError(errno.ENODEV, "the RAM disk for the tags did not appear", f"/dev/{name}")
        time.sleep(0.01)
    if sectors < kib * 2:
        raise OSError(errno.EINVAL, f"the RAM disk has {sectors // 2} KiB, less than {kib} KiB (brd was loaded "
                      "before)", f"/dev/{name}")
    return f"/dev/{name}", (major, minor)


def mount_debugfs() -> None:
    """Mount debugfs (root only; nothing else in the guest uses it) so memstats can read the store's size."""
    if not os.path.exists(PAGES_FILE):
        linux.mount("debugfs", DEBUGFS, "debugfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)


def used_bytes(name: str = NAME) -> int:
    """Guest RAM RAM disk `name` holds now (brd's count of its pages)."""
    with open(f"{DEBUGFS}/ramdisk_pages/{name}") as f:
        return int(f.read()) * BLOCK


def prefill(offset: int, length: int) -> None:
    """Write zeros over [offset, offset + length) of the store (whole pages; what an unwritten tag reads as), so
    brd allocates those pages now rather than on the swap-out path. Each page is read first and must be zero: a
    page that holds a tag is in use, and overwriting it would lose that block (OSError instead)."""
    if offset % BLOCK or length % BLOCK:
        raise OSError(errno.EINVAL, f"tag store range {offset}+{length} is not in whole pages", f"/dev/{NAME}")
    chunk = 1 << 20
    buf = mmap.mmap(-1, chunk)  # page-aligned, for O_DIRECT
    fd = os.open(f"/dev/{NAME}", os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    try:
        for at in range(offset, offset + length, chunk):
            size = min(chunk, offset + length - at)
            with memoryview(buf)[:size] as view:
                if os.preadv(fd, [view], at) != size or buf[:size].count(0) != size:
                    raise OSError(errno.EEXIST, f"tag store range at {at} is already in use", f"/dev/{NAME}")
                if os.pwritev(fd, [view], at) != size:
                    raise OSError(errno.EIO, f"short write at {at}", f"/dev/{NAME}")
    finally:
        os.close(fd)
        buf.close()
