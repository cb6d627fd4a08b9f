"""dm-integrity: format a device without wiping it, and learn how many data sectors it provides.

Formatting is O(1) in the device size: zero the first 4 KiB (so a stale superblock is never reused), then load
a one-block temporary integrity target over the whole device. dm-integrity writes a fresh superblock for the
full device when it finds none, computing `provided_data_sectors` (data space left after the interleaved tag
areas). Mode D (direct writes, no journal) and no wipe: sectors never written have no valid tags, and swap never
reads a slot it did not write.

With a metadata device (`meta_device:`, confidential swap: guest/tagstore.py) the superblock, the journal and
every tag live on that device, and the data device holds nothing but data, sector for sector
(drivers/md/dm-integrity.c: get_data_sector() returns the logical sector as is); `provided_data_sectors` is then
the data device's size in whole blocks. Guest only, stdlib only.
"""

from __future__ import annotations

import errno
import struct

from memvisor.guest import blockio, dm

# drivers/md/dm-integrity.c: struct superblock { __u8 magic[8]; __u8 version; __u8 log2_interleave_sectors;
#     __le16 integrity_tag_size; __le32 journal_sections; __le64 provided_data_sectors; __le32 flags; ... }
SB_MAGIC = b"integrt\0"
SUPERBLOCK = struct.Struct("<8sBBHIQI")
BLOCK_SIZE = 4096


# Mode D never writes through the journal, but dm-integrity still sizes one at 1/128 of the device (at most
# 64 MiB, DEFAULT_JOURNAL_SIZE_FACTOR / DEFAULT_MAX_JOURNAL_SECTORS), allocates it in guest RAM and writes it
# all when formatting: setup time and guest memory then grow with the swap size (measured: 0.72 s and ~70 MiB
# of guest RAM more for 32 GiB than for 512 MiB). The kernel rounds this up to its one-section minimum.
JOURNAL_SECTORS = 8
# dm-integrity reads and writes tags through a dm-bufio cache of 64 KiB buffers by default: order-4 allocations,
# made with GFP_NOIO|__GFP_NORETRY, which fail at once when memory is short and fragmented, i.e. exactly when
# swap runs. Measured under a 192 MiB hog in a 128 MiB guest: the cache sat at 4-6 such buffers (the shrinker's
# 256 KiB floor), so every tag miss became a synchronous 64 KiB read, plus a write-back of the evicted buffer,
# under the cache's mutex. 8 sectors gives 4 KiB buffers: order-0 allocations, 64 buffers at the same floor, 4 KiB
# tag I/O. It only sizes the in-memory cache (not stored on disk). docs/swap.md, "Swap that never stalls".
BUFFER_SECTORS = 8


def target_params(device: str, tag_size: int, meta_device: str | None = None, internal_hash: str | None = None,
                  discards: bool = False) -> bytearray:
    """`<dev> <offset> <tag size> D <#opts> block_size:4096 journal_sectors:8 buffer_sectors:8 [...]`: mode D,
    4 KiB blocks, the smallest journal (unused in mode D) and 4 KiB metadata buffers. `meta_device`: tags,
    superblock and journal on that device instead of interleaved with the data. `internal_hash`: dm-integrity
    computes and checks the tags itself (an upper target's tags are then refused); `discards`: pass discards down
    (the kernel takes them only with an internal hash)."""
    options = [f"block_size:{BLOCK_SIZE}", f"journal_sectors:{JOURNAL_SECTORS}", f"buffer_sectors:{BUFFER_SECTORS}"]
    if meta_device is not None:
        options.append(f"meta_device:{meta_device}")
    if internal_hash is not None:
        options.append(f"internal_hash:{internal_hash}")
    if discards:
        options.append("allow_discards")
    return bytearray(f"{device} 0 {tag_size} D {len(options)} {' '.join(options)}".encode())


def zero_first_block(device: str) -> None:
    """Overwrite the first 4 KiB with zeros (one O_DIRECT write; nothing is read)."""
    page = blockio.new_page()
    try:
        blockio.write_page(device, page)
    finally:
        page.close()


def read_superblock(device: str) -> tuple[int, int]:
    """(integrity_tag_size, provided_data_sectors) from the superblock, read with O_DIRECT: a buffered read
    can return a stale page cache copy (FACTS.md)."""
    page = blockio.read_page(device)
    magic, _version, _log2_interleave, tag_size, _journal, provided, _flags = SUPERBLOCK.unpack_from(page, 0)
    if magic != SB_MAGIC:
        raise OSError(errno.EINVAL, "no dm-integrity superblock after formatting", device)
    return tag_size, provided


def format_device(ctl: dm.DeviceMapper, device: str, major_minor: tuple[int, int], tag_size: int,
                  name: str, meta: tuple[str, tuple[int, int]] | None = None) -> int:
    """Format `device` for dm-integrity with `tag_size`-byte tags; return provided_data_sectors. `meta`: the
    metadata device (its node and (major, minor)), which then holds the superblock; the data device is then
    neither read nor written."""
    sb_device = meta[0] if meta is not None else device
    zero_first_block(sb_device)
    ref = f"{major_minor[0]}:{major_minor[1]}"
    meta_ref = f"{meta[1][0]}:{meta[1][1]}" if meta is not None else None
    ctl.create(name)
    try:
        params = target_params(ref, tag_size, meta_ref)
        ctl.load(name, [dm.Target(0, BLOCK_SIZE // 512, "integrity", params)])
        ctl.resume(name)
    finally:
        ctl.remove(name)
    got_tag, provided = read_superblock(sb_device)
    if got_tag != tag_size or provided <= 0:
        raise OSError(errno.EINVAL, f"dm-integrity superblock has tag size {got_tag}, {provided} data sectors", device)
    return provided


def metadata_start(table_params: str) -> int:
    """Where the tags begin on a metadata device, in bytes, from the live target's parameters: after the
    superblock (8 sectors) and the journal, whose size dm-integrity reports as `journal_sectors:N`
    (drivers/md/dm-integrity.c: initial_sectors = SB_SECTORS + journal sections; the bufio client's offset)."""
    for word in table_params.split():
        if word.startswith("journal_sectors:"):
            return (8 + int(word.partition(":")[2])) * 512
    raise OSError(errno.EINVAL, f"no journal_sectors in the integrity table {table_params[:120]!r}")
