"""One-page direct I/O on a block device: the only way the guest's swap code touches a disk's contents.

O_DIRECT bypasses the guest page cache (a buffered read can return a stale copy, FACTS.md) and needs a
page-aligned buffer, which an anonymous mmap is. Guest only, stdlib only.
"""

from __future__ import annotations

import errno
import mmap
import os

PAGE_SIZE = 4096


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
