"""Swap headers and swapon(2). No mkswap or swapon binaries.

The header is written as one 4 KiB page with O_DIRECT and nothing is read first: on an integrity device a read
of a never-written sector is an error (that is why swapon(8)/blkid, which read ahead, are not used).
Guest only, stdlib only.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct

from memvisor.guest import blockio

PAGE_SIZE = 4096
SWAP_MAGIC = b"SWAPSPACE2"
# include/linux/swap.h: union swap_header { struct { char reserved[PAGE_SIZE - 10]; char magic[10]; } magic;
#   struct { char bootbits[1024]; __u32 version; __u32 last_page; __u32 nr_badpages;
#            unsigned char sws_uuid[16]; unsigned char sws_volume[16]; __u32 padding[117]; __u32 badpages[1]; } info; }
SWAP_INFO = struct.Struct("<III16s16s")
SWAP_INFO_OFFSET = 1024
# include/linux/swap.h
SWAP_FLAG_PREFER = 0x8000
SWAP_FLAG_PRIO_MASK = 0x7FFF
SWAP_FLAG_DISCARD = 0x10000
SWAP_FLAG_DISCARD_PAGES = 0x40000  # discard freed clusters only, never the whole area at swapon

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def header(size_bytes: int, uuid: bytes, label: str = "memvisor") -> mmap.mmap:
    """A v1 swap header page for a device of `size_bytes` (page-aligned buffer, ready for O_DIRECT)."""
    pages = size_bytes // PAGE_SIZE
    if pages < 10:
        raise OSError(errno.EINVAL, f"a swap area of {size_bytes} bytes is too small")
    page = blockio.new_page()
    SWAP_INFO.pack_into(page, SWAP_INFO_OFFSET, 1, pages - 1, 0, uuid, label.encode()[:16])
    page[PAGE_SIZE - len(SWAP_MAGIC):] = SWAP_MAGIC
    return page


def write_header(device: str, size_bytes: int, uuid: bytes) -> None:
    """Write the header page at offset 0 with one O_DIRECT write."""
    page = header(size_bytes, uuid)
    try:
        blockio.write_page(device, page)
    finally:
        page.close()


def swapon(device: str, priority: int, discard: bool = False) -> None:
    """swapon(2) with an explicit priority (0..32767). With `discard`, the kernel discards each swap cluster
    that becomes free (SWAP_FLAG_DISCARD_PAGES; no whole-area discard at swapon, which would take time in
    proportion to the size). It does so only on a non-rotational device (mm/swapfile.c keeps per-cluster state
    only for those): see mark_nonrotational()."""
    flags = SWAP_FLAG_PREFER | (priority & SWAP_FLAG_PRIO_MASK)
    if discard:
        flags |= SWAP_FLAG_DISCARD | SWAP_FLAG_DISCARD_PAGES
    if _libc.swapon(device.encode(), ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"swapon: {os.strerror(err)}", device)


def mark_nonrotational(disk: str) -> None:
    """Tell the kernel the disk (`vdb`, no /dev) is not rotational: virtio-blk says it is, and swap then keeps
    no per-cluster state and never discards. Device-mapper devices made on top inherit the flag."""
    with open(f"/sys/block/{disk}/queue/rotational", "w") as f:
        f.write("0")
