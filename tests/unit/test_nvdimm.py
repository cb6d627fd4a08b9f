"""The libnvdimm PFN info block (memvisor/image/nvdimm.py), checked against hand-computed fletcher64 sums and against
blocks written by ndctl 76.1 (`ndctl write-infoblock -M mem -a 2M`, an implementation independent of ours)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import uuid as uuidlib
from pathlib import Path

import pytest

from memvisor.image import nvdimm
from memvisor.image.nvdimm import InfoBlockError

MiB = 1 << 20
UUID_A = uuidlib.UUID("01234567-89ab-cdef-0011-223344556677").bytes


def ndctl_block(head_hex: str, checksum_hex: str) -> bytes:
    """A 4 KiB block as ndctl wrote it: the first 96 bytes, zeros, then the 8 checksum bytes."""
    head = bytes.fromhex(head_hex)
    return head + bytes(nvdimm.INFO_BLOCK_BYTES - len(head) - 8) + bytes.fromhex(checksum_hex)


# `ndctl write-infoblock -o ref.img -s 8M -a 2M -M mem -u 01234567-89ab-cdef-0011-223344556677`: 6 MiB of data.
NDCTL_8M = ndctl_block(
    "4e5644494d4d5f50464e5f494e464f00" "0123456789abcdef0011223344556677" "00000000000000000000000000000000"
    "00000000" "0100" "0400" "0000200000000000" "0006000000000000" "01000000" "00000000" "00000000" "00002000"
    "00100000" "4000" "0000",
    "3f8331e5d1d8b91a")
# `... -s 132M ... -u 8d9b6c2e-3f41-4a57-9e0c-1b2d3e4f5a6b`: 130 MiB of data.
NDCTL_132M = ndctl_block(
    "4e5644494d4d5f50464e5f494e464f00" "8d9b6c2e3f414a579e0c1b2d3e4f5a6b" "00000000000000000000000000000000"
    "00000000" "0100" "0400" "0000200000000000" "0082000000000000" "01000000" "00000000" "00000000" "00002000"
    "00100000" "4000" "0000",
    "1903c30189f622b7")


def block_of(header: bytes) -> bytes:
    return header[nvdimm.INFO_BLOCK_OFFSET:nvdimm.INFO_BLOCK_OFFSET + nvdimm.INFO_BLOCK_BYTES]


def test_struct_is_4k_with_the_c_field_offsets() -> None:
    sb = nvdimm.PfnSb(uuid=bytes(range(16)), dataoff=0x1122334455667788, npfns=0x0102030405060708, flags=0xA1A2A3A4,
                      parent_uuid=bytes(range(16, 32)), version_major=0xB1B2, version_minor=0xC1C2, mode=0xD1D2D3D4,
                      start_pad=0xE1E2E3E4, end_trunc=0xF1F2F3F4, align=0x91929394, page_size=0x81828384,
                      page_struct_size=0x7172, padding=b"\x55" * nvdimm.PADDING_BYTES)
    raw = sb.to_bytes()
    assert len(raw) == nvdimm.INFO_BLOCK_BYTES == 4096
    # offsetof() of each field of struct nd_pfn_sb (drivers/nvdimm/pfn.h), little-endian
    assert raw[0:16] == b"NVDIMM_PFN_INFO\0"
    assert raw[16:32] == bytes(range(16))
    assert raw[32:48] == bytes(range(16, 32))
    assert struct.unpack_from("<I", raw, 48)[0] == 0xA1A2A3A4
    assert struct.unpack_from("<HH", raw, 52) == (0xB1B2, 0xC1C2)
    assert struct.unpack_from("<QQ", raw, 56) == (0x1122334455667788, 0x0102030405060708)
    assert struct.unpack_from("<IIIII", raw, 72) == (0xD1D2D3D4, 0xE1E2E3E4, 0xF1F2F3F4, 0x91929394, 0x81828384)
    assert struct.unpack_from("<H", raw, 92)[0] == 0x7172
    assert raw[94:4088] == b"\x55" * 3994
    assert struct.unpack_from("<Q", raw, 4088)[0] == nvdimm.nd_sb_checksum(raw)


def test_fletcher64_hand_vectors() -> None:
    assert nvdimm.nd_fletcher64(b"") == 0
    # words 1, 2, 3: lo32 runs 1, 3, 6; hi32 sums those: 1, 4, 10
    assert nvdimm.nd_fletcher64(struct.pack("<3I", 1, 2, 3)) == (10 << 32) | 6
    # little-endian words: bytes 01 00 00 00 are 1, not 0x01000000
    assert nvdimm.nd_fletcher64(bytes([1, 0, 0, 0])) == (1 << 32) | 1
    # lo32 wraps at 2**32 (0xffffffff + 2 = 1); hi32 = 0xffffffff + 1 = 2**32, whose bits the << 32 shifts out
    assert nvdimm.nd_fletcher64(struct.pack("<2I", 0xFFFF_FFFF, 2)) == 1
    with pytest.raises(ValueError):
        nvdimm.nd_fletcher64(b"abc")


def test_checksum_ignores_the_checksum_field() -> None:
    raw = nvdimm.pfn_sb(6 * MiB, UUID_A).to_bytes()
    assert nvdimm.nd_sb_checksum(raw) == nvdimm.nd_sb_checksum(raw[:-8] + b"\xff" * 8)
    assert nvdimm.nd_sb_checksum(raw) == nvdimm.nd_fletcher64(raw[:-8] + bytes(8))


@pytest.mark.parametrize(("data_bytes", "uuid", "expected"), [
    (6 * MiB, UUID_A, NDCTL_8M),
    (130 * MiB, uuidlib.UUID("8d9b6c2e-3f41-4a57-9e0c-1b2d3e4f5a6b").bytes, NDCTL_132M),
])
def test_matches_ndctl_write_infoblock(data_bytes: int, uuid: bytes, expected: bytes) -> None:
    assert block_of(nvdimm.pfn_info_block(data_bytes, uuid)) == expected
    assert nvdimm.parse(bytes(4096) + expected).checksum == struct.unpack("<Q", expected[-8:])[0]


def test_fields_for_a_sample_size() -> None:
    header = nvdimm.pfn_info_block(5 * MiB + 1, UUID_A)  # pads to 6 MiB of data
    sb = nvdimm.parse(header)
    assert sb.signature == b"NVDIMM_PFN_INFO\0"
    assert sb.uuid == UUID_A
    assert sb.parent_uuid == bytes(16)
    assert (sb.version_major, sb.version_minor) == (1, 4)
    assert sb.flags == sb.start_pad == sb.end_trunc == 0
    assert sb.dataoff == nvdimm.HEADER_BYTES == 2 * MiB
    assert sb.npfns == 6 * MiB // 4096 == 1536
    assert sb.data_bytes == 6 * MiB
    assert sb.mode == nvdimm.PFN_MODE_RAM == 1
    assert sb.align == nvdimm.ALIGN == 2 * MiB
    assert (sb.page_size, sb.page_struct_size) == (4096, 64)
    assert sb.padding == bytes(3994)
    sb.check(nvdimm.HEADER_BYTES + 6 * MiB)


def test_header_is_2mib_and_zero_outside_the_block() -> None:
    header = nvdimm.pfn_info_block(2 * MiB, UUID_A)
    assert len(header) == nvdimm.HEADER_BYTES
    assert header[:4096] == bytes(4096)
    assert header[8192:] == bytes(len(header) - 8192)
    assert block_of(header) == nvdimm.pfn_sb(2 * MiB, UUID_A).to_bytes()


def test_round_trip() -> None:
    header = nvdimm.pfn_info_block(64 * MiB)
    sb = nvdimm.parse(header)
    assert sb.to_bytes() == block_of(header)
    assert sb.checksum == nvdimm.nd_sb_checksum(block_of(header))


def test_random_uuid_by_default() -> None:
    a, b = nvdimm.pfn_sb(2 * MiB), nvdimm.pfn_sb(2 * MiB)
    assert len(a.uuid) == 16 and a.uuid != b.uuid
    assert nvdimm.pfn_info_block(2 * MiB, UUID_A) == nvdimm.pfn_info_block(2 * MiB, UUID_A)


@pytest.mark.parametrize("offset", [0, 15, 16, 40, 48, 55, 56, 72, 84, 92, 93, 94, 2000, 4087, 4088, 4095])
def test_a_flipped_byte_fails_parse(offset: int) -> None:
    header = bytearray(nvdimm.pfn_info_block(6 * MiB, UUID_A))
    header[nvdimm.INFO_BLOCK_OFFSET + offset] ^= 0x40
    with pytest.raises(InfoBlockError):
        nvdimm.parse(header)


def test_bytes_outside_the_block_are_not_read() -> None:
    header = bytearray(nvdimm.pfn_info_block(6 * MiB, UUID_A))
    header[0] = header[8192] = header[-1] = 0xFF
    assert nvdimm.parse(header).uuid == UUID_A


def test_parse_rejects_missing_block() -> None:
    with pytest.raises(InfoBlockError, match="no PFN info block"):
        nvdimm.parse(bytes(nvdimm.HEADER_BYTES))
    with pytest.raises(InfoBlockError, match="too short"):
        nvdimm.parse(bytes(4096))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        nvdimm.pfn_info_block(0)
    with pytest.raises(ValueError):
        nvdimm.pfn_info_block(2 * MiB, b"short")


def test_check_rejects_what_the_kernel_or_memvisor_would() -> None:
    good = nvdimm.pfn_sb(6 * MiB, UUID_A)
    size = nvdimm.HEADER_BYTES + 6 * MiB
    good.check(size)
    with pytest.raises(InfoBlockError, match="npfns"):
        good.check(size + 2 * MiB)  # the file grew after the header was written
    with pytest.raises(InfoBlockError, match="resource end misaligned"):
        good.check(size + 4096)
    with pytest.raises(InfoBlockError, match="exceeds capacity"):
        good.check(2 * MiB)
    bad = {
        "parent_uuid": nvdimm.PfnSb(uuid=UUID_A, dataoff=2 * MiB, npfns=1536, parent_uuid=UUID_A),
        "PFN_MODE_RAM": nvdimm.PfnSb(uuid=UUID_A, dataoff=2 * MiB, npfns=1536, mode=nvdimm.PFN_MODE_PMEM),
        "bad offset": nvdimm.PfnSb(uuid=UUID_A, dataoff=1 * MiB, npfns=1792),
        "version": nvdimm.PfnSb(uuid=UUID_A, dataoff=2 * MiB, npfns=1536, version_major=0, version_minor=2),
    }
    for match, sb in bad.items():
        with pytest.raises(InfoBlockError, match=match):
            sb.check(size)


def test_write_image_and_read(tmp_path: Path) -> None:
    erofs = tmp_path / "rootfs.erofs"
    payload = bytes(range(256)) * (3 * MiB // 256) + b"tail"
    erofs.write_bytes(payload)
    out = tmp_path / "rootfs.nvdimm"
    out.write_bytes(b"stale" * 10_000_000)
    with out.open("rb") as old:  # a guest mapping the old image keeps its bytes: the file is replaced, not rewritten
        sb = nvdimm.write_image(erofs, out, UUID_A)
        assert old.read(5) == b"stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rootfs.erofs", "rootfs.nvdimm"]
    image = out.read_bytes()
    assert len(image) == nvdimm.HEADER_BYTES + 4 * MiB
    assert image[:nvdimm.HEADER_BYTES] == nvdimm.pfn_info_block(len(payload), UUID_A)
    assert image[nvdimm.HEADER_BYTES:nvdimm.HEADER_BYTES + len(payload)] == payload
    assert image[nvdimm.HEADER_BYTES + len(payload):] == bytes(4 * MiB - len(payload))
    assert nvdimm.read(out) == nvdimm.parse(image)
    assert nvdimm.read(out).to_bytes() == sb.to_bytes()


@pytest.mark.skipif(shutil.which("ndctl") is None, reason="ndctl not installed")
def test_ndctl_read_infoblock_verifies(tmp_path: Path) -> None:
    img = tmp_path / "header.img"
    img.write_bytes(nvdimm.pfn_info_block(10 * MiB, UUID_A)[:8192])
    out = subprocess.run(["ndctl", "read-infoblock", "-i", str(img), "-j", "-V"], check=True,
                         capture_output=True, text=True).stdout
    (info,) = json.loads(out)
    assert (info["signature"], info["version"], info["mode"]) == ("NVDIMM_PFN_INFO", "1.4", 1)
    assert (info["dataoff"], info["npfns"], info["align"]) == (2 * MiB, 10 * MiB // 4096, 2 * MiB)
    assert info["uuid"] == str(uuidlib.UUID(bytes=UUID_A))


def test_an_image_without_the_header_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A root image built before the NVDIMM header (bare erofs) is refused before any VMM starts, naming the fix;
    one with the header gives the offset a virtio-blk attachment starts at."""
    from memvisor.errors import ImageError
    from memvisor.image import rootfs

    old = tmp_path / "old.erofs"
    old.write_bytes(b"\xe2\xe1\xf5\xe0" + bytes((2 << 20) - 4))
    with pytest.raises(ImageError, match="rebuild it"):
        rootfs.erofs_offset(old)
    erofs = tmp_path / "new.raw"
    erofs.write_bytes(bytes(5000))
    nvdimm.write_image(erofs, tmp_path / "new.erofs")
    assert rootfs.erofs_offset(tmp_path / "new.erofs") == 2 << 20
