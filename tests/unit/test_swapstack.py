"""The swap stack's tables and the confidential swap's tag store, without a guest (tests/vm/test_swap*.py boot one)."""

from __future__ import annotations

from memvisor import policy
from memvisor.guest import integrity, memstats, segments, swapstack, tagstore
from memvisor.host import report


def test_integrity_tables() -> None:
    assert integrity.target_params("254:0", 32) == \
        b"254:0 0 32 D 3 block_size:4096 journal_sectors:8 buffer_sectors:8"
    # confidential: tags on the RAM disk; with discards, dm-integrity hashes itself (it refuses discards otherwise)
    assert integrity.target_params("254:0", 32, "1:0") == \
        b"254:0 0 32 D 4 block_size:4096 journal_sectors:8 buffer_sectors:8 meta_device:1:0"
    assert integrity.target_params("254:0", 32, "1:0", "sha256", discards=True) == \
        b"254:0 0 32 D 6 block_size:4096 journal_sectors:8 buffer_sectors:8 meta_device:1:0 internal_hash:sha256 " \
        b"allow_discards"


def test_the_tag_store_has_room_for_every_tag() -> None:
    # 64 MiB of swap: 16384 blocks x 32 bytes = 512 KiB of tags, after 1 MiB for the superblock and journal
    assert tagstore.capacity_kib(64 * 2048, 32) == 1024 + 512
    # 32 GiB: 256 MiB of tags, in whole 4 KiB buffers; the RAM disk takes a page only when one is written
    assert tagstore.capacity_kib(32 * 2**21, 32) == 1024 + 256 * 1024
    assert tagstore.capacity_kib(8 * 3 + 8, 28) == 1024 + 4
    assert tagstore.module_params(1536) == {"brd": "rd_nr=1 rd_size=1536"}
    # sized for the largest tag any confidential stack uses
    assert swapstack.SwapStack._tag_store_kib(64 * 2048) == tagstore.capacity_kib(64 * 2048, 32)


def test_guest_and_host_agree_on_the_modes_that_discard() -> None:
    assert swapstack.DISCARD_MODES == tuple(str(m) for m in policy.DISCARD_MODES)
    assert swapstack.MODES == tuple(str(m) for m in reversed(policy.SwapMode) if m is not policy.SwapMode.OFF)


def test_tags_are_their_own_part_of_what_the_guest_cannot_give_back() -> None:
    info = {"MemTotal": 200_000, "MemFree": 100_000, "Active(anon)": 10_000, "Inactive(anon)": 0,
            "Active(file)": 5_000, "Inactive(file)": 0, "SReclaimable": 1_000, "Unevictable": 0}
    without = memstats.reclaim(info, {}, [], {}, {})
    with_tags = memstats.reclaim(info, {}, [], {}, {}, tags_kib=3_000)
    assert with_tags["tags_kib"] == 3_000 and without["tags_kib"] == 0
    assert with_tags["kernel_kib"] == without["kernel_kib"] - 3_000
    assert with_tags["unreclaimable_kib"] == without["unreclaimable_kib"]  # the same memory, now named


def test_the_report_carries_the_tag_store_and_what_it_holds() -> None:
    pol = policy.merge(("t", {"swap_size_mib": 64, "swap_mode": "confidential"}))
    store = {"device": "/dev/ram0", "capacity_bytes": 1536 << 10, "tags": "aead", "tag_bytes": 32}
    hello = {"swap": {"effective": "confidential", "tag_store": store, "devices": []}}
    section = report.swap_section(pol, hello, {"reclaim": {"tags_kib": 168}})
    assert section["tag_store"] == {**store, "used_bytes": 168 << 10}
    assert report.swap_section(pol, {"swap": {"effective": "authenticated"}}, {})["tag_store"] is None


def test_confidential_segments_start_small_and_double() -> None:
    mib = 2048  # sectors
    assert segments.plan(16 * mib) == [(0, 16 * mib)]
    assert segments.plan(128 * mib) == [(0, 64 * mib), (64 * mib, 64 * mib)]
    assert [n // mib for _, n in segments.plan(512 * mib)] == [64, 64, 128, 256]
    assert [n // mib for _, n in segments.plan(100 * mib)] == [64, 36]
    big = segments.plan(32 * 1024 * mib)
    assert [n // mib for _, n in big] == [64, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    huge = segments.plan(1 << 36)  # the kernel has few swap types: the last segment takes the rest
    assert len(huge) == segments.MAX_SEGMENTS and sum(n for _, n in huge) == 1 << 36
    for plan in (big, huge, segments.plan(777 * mib + 8)):
        assert all(start % segments.ALIGN_SECTORS == 0 for start, _ in plan)  # no tag page serves two segments
        assert [s for s, _ in plan[1:]] == [s + n for s, n in plan[:-1]]


def test_the_tags_start_after_the_superblock_and_the_journal() -> None:
    live = "254:0 0 32 D 5 meta_device:1:0 block_size:4096 journal_sectors:264 interleave_sectors:1 buffer_sectors:8"
    assert integrity.metadata_start(live) == (8 + 264) * 512 == 34 * 4096
