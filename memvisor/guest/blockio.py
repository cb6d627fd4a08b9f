"""Block devices: the host's disks found by their serial, and one-page direct I/O on them (the only way the
guest's swap code touches a disk's contents).

O_DIRECT bypasses the guest page cache (a buffered read can return a stale copy, FACTS.md) and needs a
page-aligned buffer, which an anonymous mmap is. Guest only, stdlib only.
"""

from __future__ import annotations

import errno
import mmap
import os
import time

from memvisor.errors import SetupError

PAGE_SIZE = 4096


def find_disk(serial: str, timeout: float = 5.0) -> tuple[str, tuple[int, int], int]:
    """The virtio-blk disk the host attached with this serial (swap, a user's image, ...): (/dev path,
    (major, minor), size in 512-byte sectors)."""
    deadline = time.monotonic() + timeout
    while True:
        for name in sorted(os.listdir("/sys/block")):
            try:
                with open(f"/sys/block/{name}/serial") as f:
                    if f.read().strip() != serial:
                        continue
                with open(f"/sys/block/{name}/dev") as f:
                    major, minor = (int(x) for x in f.read().split(":"))
                with open(f"/sys/block/{name}/size") as f:
                    sectors = int(f.read())
            except OSError:
                continue
            if os.path.exists(f"/dev/{name}"):
                return f"/dev/{name}", (major, minor), sectors
        if time.monotonic() > deadline:
            raise SetupError(f"the disk with virtio-blk serial {serial} did not appear in the guest within "
                             f"{timeout:g} s")
        time.sleep(0.01)


def new_page() -> mmap.mmap:
    """A zeroed, page-aligned 4 KiB buffer (close it when done)."""
    return mmap.mmap(-1, PAGE_SIZE)


def write_page(device: str, page: mmap.mmap, offset: int = 0) -> None:
    """Write one page at `offset` with O_DIRECT; nothing is read first."""
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        if os.pwritev(fd, [page], offset) != PAGE_SIZE:
            raise OSError(errno.EIO, f"short write at offset {offset}", device)
    finally:
        os.close(fd)


def read_page(device: str, offset: int = 0) -> bytes:
    """Read one page at `offset` with O_DIRECT."""
    page = new_page()
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        if os.preadv(fd, [page], offset) != PAGE_SIZE:
            raise OSError(errno.EIO, f"short read at offset {offset}", device)
        return bytes(page)
    finally:
        os.close(fd)
        page.close()
