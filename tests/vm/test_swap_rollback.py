"""What a host that writes the swap file can do to a swapped page, per mode (docs/swap.md, "What the host can do"):
replay an older copy, move a block to another slot, flip bytes, truncate; and whether it can read a marker.

One guest per mode runs tests/vm/swaplab.py, which tells the host the swap slot of each of its pages (pagemap), so
the host attacks exactly the blocks that hold them. The replay is the issue-22 scenario: version A of 1024 pages
goes out, the host copies the whole file, the pages are rewritten as version B and go out again (to the same
slots: swaplab reads before it writes), dm-bufio's cache of tags is emptied as memory pressure would, the host
writes its copy back, and the workload reads every page in forked children. `authenticated` serves version A
without an error: the proof that it misses replays. `confidential` refuses every page: SIGBUS, and the guest
kernel logs the failed authentication.
"""

from __future__ import annotations

from collections import Counter

import pytest

from memvisor.host.sandbox import Instance
from memvisor.image.build import Image
from tests.vm.lab import BLOCK, Lab, SwapFile, lab_policy

PAGES = 1024  # 4 MiB of version A, then B
PROBE_PAGES = 16  # the region the move, flip and truncate act on


def replay(lab: Lab, swap: SwapFile) -> list[str]:
    """Version A out, the host's copy, version B out to the same slots, tags evicted, the copy written back:
    what the workload then reads, page by page."""
    a = lab.out("d")
    copy = swap.copy()
    assert copy.count(b"MVLAB|") == 0, "swapped-out pages are readable in the host file"
    at = [swap.data(slot) for slot in a]
    assert sum(copy[o:o + BLOCK] != bytes(BLOCK) for o in at) == PAGES  # ... while they are there
    lab("write", "d", "B")
    assert lab.out("d") == a, "version B went to other slots: the replay would not hit it"
    assert lab("evict")["bufio_bytes"] == 0
    assert swap.write_back(copy) >= PAGES
    pages: list[str] = lab("check", "d")["pages"]
    return pages


def tamper(lab: Lab, swap: SwapFile) -> tuple[list[str], set[int]]:
    """A second region out; the host moves one page's block over another's, flips a byte of a third, and cuts the
    file at the last of them (the highest offset in use). What the workload reads back, and which pages the host
    changed."""
    lab("alloc", "p", PROBE_PAGES)
    slots = lab.out("p")
    by_offset = sorted(range(PROBE_PAGES), key=lambda i: swap.data(slots[i]))
    assert len({swap.data(s) for s in slots}) == PROBE_PAGES
    src, moved, flipped, top = by_offset[0], by_offset[1], by_offset[2], by_offset[-1]
    swap.move(slots[src], slots[moved])
    swap.flip(slots[flipped])
    swap.truncate(slots[top])
    pages: list[str] = lab("check", "p")["pages"]
    return pages, {moved, flipped, top}


@pytest.mark.parametrize("mode", ["authenticated", "confidential"])
def test_what_a_host_can_do_to_a_swapped_page(image: Image, mode: str) -> None:
    with Instance(lab_policy(mode), image) as vm:
        lab = Lab(vm)
        swap = SwapFile(lab, mode)
        lab("alloc", "d", PAGES)
        tags_before = lab("tags")["pages"] if mode == "confidential" else 0
        replayed = replay(lab, swap)
        tags_after = lab("tags")["pages"] if mode == "confidential" else 0
        tampered, changed = tamper(lab, swap)
        lab.close()
        console = vm.console_log.read_text(errors="replace")
    if mode == "authenticated":
        # No freshness: every page comes back as it was before the rewrite, and nothing notices.
        assert Counter(replayed) == {"A": PAGES}, Counter(replayed)
    else:
        assert Counter(replayed) == {"SIGBUS": PAGES}, Counter(replayed)
        assert "INTEGRITY AEAD ERROR" in console
        check_tag_store(lab.swap["tag_store"], tags_before, tags_after)
    # Moved, flipped and truncated blocks fail in both; every other page is intact.
    assert [tampered[i] for i in sorted(changed)] == ["SIGBUS"] * 3, tampered
    assert [p for i, p in enumerate(tampered) if i not in changed] == ["A"] * (PROBE_PAGES - 3), tampered


def check_tag_store(store: dict[str, object], before: int, after: int) -> None:
    """The tag store (brd) holds the superblock, the journal and the tags of the segments swapped on (64 MiB
    each at first: 16384 blocks x 32 bytes = 128 pages), written ahead of use; swapping out took nothing more
    (tagstore.prefill: no first write of a tag page on the swap-out path)."""
    assert store["device"] == "/dev/ram0" and store["tag_bytes"] == 32
    assert isinstance(store["capacity_bytes"], int) and store["capacity_bytes"] >= 128 * 2**20 // BLOCK * 32
    assert store["setup_bytes"] == before * BLOCK
    # 128 MiB of swap: two segments of 64 MiB, both swapped on at setup; 34 pages (136 KiB) of superblock + journal
    assert before == 34 + 2 * 128, f"setup wrote {before} pages of tag store"
    assert after == before, f"swapping {PAGES} pages out took {after - before} new tag store pages"
