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
    a = lab("out", "d")["slots"]
    assert None not in a
    copy = swap.copy()
    assert copy.count(b"MVLAB|") == 0, "swapped-out pages are readable in the host file"
    at = [swap.spans(s[1])[0][0] for s in a]
    assert sum(copy[o:o + BLOCK] != bytes(BLOCK) for o in at) == PAGES  # ... while they are there
    lab("write", "d", "B")
    assert lab("out", "d")["slots"] == a, "version B went to other slots: the replay would not hit it"
    assert lab("evict")["bufio_bytes"] == 0
    assert swap.write_back(copy) >= PAGES
    pages: list[str] = lab("check", "d")["pages"]
    return pages


def tamper(lab: Lab, swap: SwapFile) -> list[str]:
    """A second region out; the host moves its page 0 over page 1, flips a byte of page 2, and cuts the file at
    its last page (the highest slot in use). What the workload reads back."""
    lab("alloc", "p", PROBE_PAGES)
    slots = [s[1] for s in lab("out", "p")["slots"]]
    assert slots[-1] == max(slots) and len(set(slots)) == PROBE_PAGES
    swap.move(slots[0], slots[1])
    swap.flip(slots[2])
    swap.truncate(slots[-1])
    pages: list[str] = lab("check", "p")["pages"]
    return pages


@pytest.mark.parametrize("mode", ["authenticated", "confidential"])
def test_what_a_host_can_do_to_a_swapped_page(image: Image, mode: str) -> None:
    with Instance(lab_policy(mode), image) as vm:
        lab = Lab(vm)
        swap = SwapFile(vm, mode)
        lab("alloc", "d", PAGES)
        tags_before = lab("tags")["pages"] if mode == "confidential" else 0
        replayed = replay(lab, swap)
        tags_after = lab("tags")["pages"] if mode == "confidential" else 0
        tampered = tamper(lab, swap)
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
    assert tampered[1] == tampered[2] == tampered[-1] == "SIGBUS", tampered
    assert tampered[:1] + tampered[3:-1] == ["A"] * (PROBE_PAGES - 3), tampered


def check_tag_store(store: dict[str, object], before: int, after: int) -> None:
    """The tag store (brd) took a page of guest RAM the first time each was written: PAGES swapped pages need
    PAGES * 32 bytes of tags, 128 to a page (the swap header's page was taken at setup)."""
    assert store["device"] == "/dev/ram0" and store["tag_bytes"] == 32
    assert isinstance(store["capacity_bytes"], int) and store["capacity_bytes"] >= 64 * 2**20 // BLOCK * 32
    assert before * BLOCK < 256 * 1024, f"setup wrote {before} pages: more than the superblock and journal"
    grown = after - before
    assert PAGES * 32 // BLOCK <= grown <= PAGES * 32 // BLOCK + 1, f"{grown} tag pages for {PAGES} swapped pages"
