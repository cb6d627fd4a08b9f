"""The libnvdimm PFN info block that lets the guest map the shared erofs root with DAX from an emulated NVDIMM.

This module owns the first 2 MiB of the root image file when it is attached as QEMU's ACPI NVDIMM
(`-device nvdimm`) rather than virtio-pmem (which QEMU 7.2 cannot migrate). Without label storage the guest sees
the whole file as one label-less "io" namespace (`namespace0.0`); `nd_pmem` then probes it for a PFN info block
(drivers/nvdimm/pfn_devs.c, `nd_pfn_probe()` -> `nd_pfn_validate()`), which it reads at byte offset `SZ_4K` of the
namespace. A valid block turns the namespace into an fsdax `/dev/pmem0` that starts `dataoff` bytes in and has
`struct page`s, so erofs can mount it with `dax=always`; without one the namespace stays raw and DAX is refused.

Image layout (HEADER_BYTES = dataoff = 2 MiB, so the data starts on a 2 MiB boundary of guest physical memory):

    0        .. 4 KiB      zeros (the kernel never reads it for a PFN namespace)
    4 KiB    .. 8 KiB      struct nd_pfn_sb, below
    8 KiB    .. 2 MiB      zeros
    2 MiB    .. end        the erofs image, zero-padded to a multiple of 2 MiB

The block mirrors `struct nd_pfn_sb` from drivers/nvdimm/pfn.h (Linux 6.1; little-endian, 4096 bytes; every field is
naturally aligned, so the compiler inserts no padding of its own and only the explicit `padding[]` fills the gap):

    #define PFN_SIG_LEN 16
    #define PFN_SIG "NVDIMM_PFN_INFO\\0"

    struct nd_pfn_sb {
        u8 signature[PFN_SIG_LEN];     /*    0  16 */
        u8 uuid[16];                   /*   16  16 */
        u8 parent_uuid[16];            /*   32  16 */
        __le32 flags;                  /*   48   4 */
        __le16 version_major;          /*   52   2 */
        __le16 version_minor;          /*   54   2 */
        __le64 dataoff;                /*   56   8  relative to namespace_base + start_pad */
        __le64 npfns;                  /*   64   8 */
        __le32 mode;                   /*   72   4 */
        /* minor-version-1 additions for section alignment */
        __le32 start_pad;              /*   76   4 */
        __le32 end_trunc;              /*   80   4 */
        /* minor-version-2 record the base alignment of the mapping */
        __le32 align;                  /*   84   4 */
        /* minor-version-3 guarantee the padding and flags are zero */
        /* minor-version-4 record the page size and struct page size */
        __le32 page_size;              /*   88   4 */
        __le16 page_struct_size;       /*   92   2 */
        u8 padding[3994];              /*   94 3994 */
        __le64 checksum;               /* 4088   8 */
    };

The values written are the ones the kernel's own `nd_pfn_init()` writes for an fsdax namespace whose memmap lives
in RAM (`ndctl create-namespace -m fsdax -M mem`): version 1.4, `mode = PFN_MODE_RAM` (enum nd_pfn_mode in
drivers/nvdimm/nd.h: NONE 0, RAM 1, PMEM 2), `dataoff = ALIGN(start + SZ_8K, align) - start` = 2 MiB,
`npfns = PHYS_PFN(size - dataoff - end_trunc)`, `align` = 2 MiB (HPAGE_PMD_SIZE, the kernel's default with THP),
`page_size = PAGE_SIZE`, `page_struct_size = MAX_STRUCT_PAGE_SIZE` (64), `parent_uuid` all zero because
`nd_dev_to_uuid()` returns `uuid_null` for a label-less namespace, `start_pad`/`end_trunc`/`flags`/`padding` zero.
RAM mode, not PMEM, because the backing file is mapped read-only: PMEM mode would have the kernel write its memmap
into the device. The checksum is `nd_sb_checksum()` (drivers/nvdimm/claim.c): `nd_fletcher64()`
(drivers/nvdimm/core.c) over the whole 4096-byte block with the checksum field zeroed. The same header is what
Kata Containers' image builder (tools/osbuilder/image-builder/nsdax.gpl.c) writes, there as version 0.2 without
npfns, uuids or page sizes; `ndctl write-infoblock -M mem -a 2M` writes the same bytes as `pfn_info_block()`.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from memvisor.errors import ImageError

SZ_4K = 4 << 10
SZ_8K = 8 << 10
PAGE_SIZE = SZ_4K  # x86-64 guest page size; pfn_devs.c compares page_size with PAGE_SIZE
ALIGN = 2 << 20  # HPAGE_PMD_SIZE: lets the guest map the root with 2 MiB pages; also SUBSECTION_SIZE (see below)
HEADER_BYTES = 2 << 20  # dataoff: ALIGN(SZ_8K, ALIGN), the first 2 MiB boundary after the block
INFO_BLOCK_OFFSET = SZ_4K  # nd_pfn_validate(): nvdimm_read_bytes(ndns, SZ_4K, pfn_sb, sizeof(*pfn_sb), 0)
INFO_BLOCK_BYTES = SZ_4K  # BUILD_BUG_ON(sizeof(struct nd_pfn_sb) != SZ_4K) in nd_sb_checksum()
# memremap_compat_align() (mm/memremap.c, generic) is SUBSECTION_SIZE, 2 MiB on x86-64: nd_pfn_validate() wants the
# namespace's start and end (res->end + 1 - end_trunc) on it, so the file size must be a multiple of 2 MiB.
MEMREMAP_COMPAT_ALIGN = 2 << 20
# nd_info_block_reserve() (drivers/nvdimm/nd.h): ALIGN(SZ_8K, PAGE_SIZE); RAM mode needs dataoff >= this.
INFO_BLOCK_RESERVE = SZ_8K

PFN_SIG_LEN = 16
PFN_SIG = b"NVDIMM_PFN_INFO\0"  # fsdax; DAX_SIG "NVDIMM_DAX_INFO\0" would make it a devdax device instead
PFN_MODE_NONE = 0
PFN_MODE_RAM = 1
PFN_MODE_PMEM = 2
VERSION_MAJOR = 1
VERSION_MINOR = 4  # minor 4 adds page_size and page_struct_size; nd_pfn_init() writes 1.4
MAX_STRUCT_PAGE_SIZE = 64  # drivers/nvdimm/nd.h, "max struct page size independent of kernel config"
NULL_UUID = bytes(16)  # uuid_null: nd_dev_to_uuid() of a label-less (nd_namespace_io) namespace

PADDING_BYTES = 3994
# Field for field the C struct above: "<" = little-endian with no implicit padding, which is right because every
# field of nd_pfn_sb is naturally aligned; "3994s" is the explicit padding[] array.
_PFN_SB = struct.Struct("<16s16s16sIHHQQIIIIIH3994sQ")
CHECKSUM_OFFSET = INFO_BLOCK_BYTES - 8  # offsetof(struct nd_pfn_sb, checksum) = offsetof(struct nd_gen_sb, checksum)
assert _PFN_SB.size == INFO_BLOCK_BYTES


class InfoBlockError(ImageError):
    """A PFN info block is missing, corrupt, or one the guest kernel would refuse (nd_pfn_validate())."""


def nd_fletcher64(data: bytes | bytearray | memoryview) -> int:
    """Fletcher-64 as libnvdimm computes it (`nd_fletcher64(addr, len, le=true)`, drivers/nvdimm/core.c).

    Over little-endian u32 words: a u32 running sum `lo32` (wraps at 2**32) and a u64 sum of the running sums
    `hi32`; the result is `hi32 << 32 | lo32` truncated to 64 bits, so only the low 32 bits of `hi32` survive.
    The kernel ignores a trailing partial word; every caller here passes whole 4 KiB blocks, so one is an error.
    """
    if len(data) % 4:
        raise ValueError(f"fletcher64 takes whole 32-bit words, got {len(data)} bytes")
    lo32 = 0
    hi32 = 0
    for (word,) in struct.iter_unpack("<I", data):
        lo32 = (lo32 + word) & 0xFFFF_FFFF
        hi32 = (hi32 + lo32) & 0xFFFF_FFFF_FFFF_FFFF
    return ((hi32 << 32) | lo32) & 0xFFFF_FFFF_FFFF_FFFF


def nd_sb_checksum(block: bytes | bytearray | memoryview) -> int:
    """The checksum of a 4 KiB libnvdimm info block (`nd_sb_checksum()`, drivers/nvdimm/claim.c): fletcher64 of all
    4096 bytes with the trailing `__le64 checksum` taken as zero, whatever the block holds there now."""
    if len(block) != INFO_BLOCK_BYTES:
        raise ValueError(f"an info block is {INFO_BLOCK_BYTES} bytes, got {len(block)}")
    return nd_fletcher64(bytes(block[:CHECKSUM_OFFSET]) + bytes(8))


def data_bytes_padded(data_bytes: int) -> int:
    """The size of the data area for `data_bytes` of erofs: rounded up to ALIGN, because the namespace end must sit
    on memremap_compat_align() and the guest maps the data in 2 MiB pages."""
    if data_bytes <= 0:
        raise ValueError(f"the data area must not be empty, got {data_bytes} bytes")
    return data_bytes + (-data_bytes % ALIGN)


@dataclass(frozen=True)
class PfnSb:
    """One decoded `struct nd_pfn_sb` (drivers/nvdimm/pfn.h), numbers in host order, uuids as their 16 raw bytes
    (`uuid.UUID(bytes=...)` prints them the way the kernel's `%pUb` does)."""

    uuid: bytes
    dataoff: int
    npfns: int
    signature: bytes = PFN_SIG
    parent_uuid: bytes = NULL_UUID
    flags: int = 0
    version_major: int = VERSION_MAJOR
    version_minor: int = VERSION_MINOR
    mode: int = PFN_MODE_RAM
    start_pad: int = 0
    end_trunc: int = 0
    align: int = ALIGN
    page_size: int = PAGE_SIZE
    page_struct_size: int = MAX_STRUCT_PAGE_SIZE
    padding: bytes = field(default=bytes(PADDING_BYTES), repr=False)
    checksum: int | None = None  # None: computed by to_bytes(); set by parse() to what the block holds

    def to_bytes(self) -> bytes:
        """The 4096-byte little-endian block, its checksum computed by `nd_sb_checksum()`."""
        unsummed = _PFN_SB.pack(self.signature, self.uuid, self.parent_uuid, self.flags, self.version_major,
                                self.version_minor, self.dataoff, self.npfns, self.mode, self.start_pad,
                                self.end_trunc, self.align, self.page_size, self.page_struct_size, self.padding, 0)
        return unsummed[:CHECKSUM_OFFSET] + struct.pack("<Q", nd_sb_checksum(unsummed))

    @property
    def data_bytes(self) -> int:
        """Bytes of data after the header (what /dev/pmem0 holds), as the block describes them."""
        return self.npfns * PAGE_SIZE

    def check(self, namespace_bytes: int) -> None:
        """Raise InfoBlockError unless Linux 6.1 would accept this block, as memvisor writes it, on a label-less
        NVDIMM namespace of `namespace_bytes` (the whole backing file) whose physical start is 2 MiB aligned.

        Mirrors `nd_pfn_validate()` and the RAM-mode branch of `__nvdimm_setup_pfn()` (drivers/nvdimm/pfn_devs.c)
        where they can be checked without the guest, plus memvisor's own choices (RAM mode, version 1.4, no
        padding) so an image written by anything else is noticed.
        """
        problems: list[str] = []
        if self.parent_uuid != NULL_UUID:
            problems.append("parent_uuid is not zero (a label-less namespace's nd_dev_to_uuid() is uuid_null)")
        if (self.version_major, self.version_minor) != (VERSION_MAJOR, VERSION_MINOR):
            problems.append(f"version {self.version_major}.{self.version_minor}, expected 1.4")
        if self.mode != PFN_MODE_RAM:
            problems.append(f"mode {self.mode}: the read-only root needs PFN_MODE_RAM ({PFN_MODE_RAM})")
        if self.flags or self.start_pad or self.end_trunc or any(self.padding):
            problems.append("flags, start_pad, end_trunc or padding not zero")
        if self.page_size != PAGE_SIZE or self.page_struct_size != MAX_STRUCT_PAGE_SIZE:
            problems.append(f"page_size {self.page_size} / page_struct_size {self.page_struct_size}, "
                            f"expected {PAGE_SIZE} / {MAX_STRUCT_PAGE_SIZE}")
        if self.align != ALIGN:
            problems.append(f"align {self.align:#x}, expected {ALIGN:#x}")
        elif self.align > namespace_bytes:
            problems.append(f"alignment {self.align:#x} exceeds capacity {namespace_bytes:#x}")
        if self.dataoff >= namespace_bytes:
            problems.append(f"dataoff {self.dataoff:#x}: pfn array size exceeds capacity {namespace_bytes:#x}")
        if self.dataoff % PAGE_SIZE or (self.align and self.dataoff % self.align):
            problems.append(f"bad offset: {self.dataoff:#x} dax disabled align: {self.align:#x}")
        if self.dataoff < INFO_BLOCK_RESERVE:
            problems.append(f"dataoff {self.dataoff:#x} overlaps the info block (RAM mode needs >= {SZ_8K:#x})")
        if namespace_bytes % MEMREMAP_COMPAT_ALIGN:
            problems.append(f"resource end misaligned: {namespace_bytes:#x} bytes is not a multiple of 2 MiB")
        expected_npfns = (namespace_bytes - self.dataoff - self.end_trunc) // PAGE_SIZE
        if self.npfns != expected_npfns:
            problems.append(f"npfns {self.npfns}, expected {expected_npfns} for {namespace_bytes} bytes")
        if problems:
            raise InfoBlockError("PFN info block would not give a DAX /dev/pmem0: " + "; ".join(problems),
                                 "rebuild the image")


def pfn_sb(data_bytes: int, uuid: bytes | None = None) -> PfnSb:
    """The info block memvisor writes for `data_bytes` of erofs (padded to ALIGN) following a HEADER_BYTES header:
    what `nd_pfn_init()` would write for an fsdax, memmap-in-RAM namespace of that size. `uuid` defaults to a
    random one (the kernel just adopts it); pass a fixed one for byte-identical rebuilds."""
    if uuid is None:
        uuid = os.urandom(16)
    if len(uuid) != 16:
        raise ValueError(f"a uuid is 16 bytes, got {len(uuid)}")
    return PfnSb(uuid=bytes(uuid), dataoff=HEADER_BYTES, npfns=data_bytes_padded(data_bytes) // PAGE_SIZE)


def pfn_info_block(data_bytes: int, uuid: bytes | None = None) -> bytes:
    """The whole HEADER_BYTES (2 MiB) header for an image whose `data_bytes` of erofs, zero-padded to a multiple of
    ALIGN, follow at offset HEADER_BYTES: zeros except `struct nd_pfn_sb` at INFO_BLOCK_OFFSET (4 KiB)."""
    block = pfn_sb(data_bytes, uuid).to_bytes()
    tail = HEADER_BYTES - INFO_BLOCK_OFFSET - INFO_BLOCK_BYTES
    return bytes(INFO_BLOCK_OFFSET) + block + bytes(tail)


def parse(header: bytes | bytearray | memoryview) -> PfnSb:
    """Decode the info block of a header (or of a whole image: only bytes 4 KiB..8 KiB are read), checking what
    `nd_pfn_validate()` checks first: the signature, then the checksum. Raises InfoBlockError otherwise; use
    `PfnSb.check()` for whether the kernel would then accept it for a given file size."""
    end = INFO_BLOCK_OFFSET + INFO_BLOCK_BYTES
    if len(header) < end:
        raise InfoBlockError(f"header is {len(header)} bytes, too short for an info block at {INFO_BLOCK_OFFSET}")
    block = bytes(header[INFO_BLOCK_OFFSET:end])
    (signature, uuid, parent_uuid, flags, version_major, version_minor, dataoff, npfns, mode, start_pad, end_trunc,
     align, page_size, page_struct_size, padding, checksum) = _PFN_SB.unpack(block)
    if signature != PFN_SIG:
        raise InfoBlockError(f"no PFN info block at offset {INFO_BLOCK_OFFSET} (signature {signature!r})",
                             "the image predates the NVDIMM header; rebuild it")
    expected = nd_sb_checksum(block)
    if checksum != expected:
        raise InfoBlockError(f"PFN info block checksum {checksum:#018x}, computed {expected:#018x}",
                             "the image is corrupt; rebuild it")
    return PfnSb(uuid=uuid, dataoff=dataoff, npfns=npfns, signature=signature, parent_uuid=parent_uuid, flags=flags,
                 version_major=version_major, version_minor=version_minor, mode=mode, start_pad=start_pad,
                 end_trunc=end_trunc, align=align, page_size=page_size, page_struct_size=page_struct_size,
                 padding=padding, checksum=checksum)


def read(image: Path) -> PfnSb:
    """Parse and check the info block of an image file on the host, against that file's size."""
    with image.open("rb") as f:
        head = f.read(INFO_BLOCK_OFFSET + INFO_BLOCK_BYTES)
        size = os.fstat(f.fileno()).st_size
    sb = parse(head)
    sb.check(size)
    return sb


def write_image(erofs: Path, out: Path, uuid: bytes | None = None) -> PfnSb:
    """Write `out` as the header, the bytes of `erofs`, then zeros up to the next ALIGN boundary; returns the block.

    Written beside `out` and renamed over it: running guests map the old file (memory-backend-file, share=on), and
    truncating a mapped file under them would SIGBUS their reads. The zero runs are sparse holes, not written.
    """
    data_bytes = erofs.stat().st_size
    sb = pfn_sb(data_bytes, uuid)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with erofs.open("rb") as src, tmp.open("wb") as dst:
            dst.write(bytes(INFO_BLOCK_OFFSET) + sb.to_bytes())
            dst.truncate(HEADER_BYTES)
            dst.seek(HEADER_BYTES)
            shutil.copyfileobj(src, dst, 1 << 20)
            if dst.tell() != HEADER_BYTES + data_bytes:  # npfns was computed from the size it had at stat()
                raise InfoBlockError(f"{erofs} changed size while being copied")
            dst.truncate(HEADER_BYTES + data_bytes_padded(data_bytes))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return sb
