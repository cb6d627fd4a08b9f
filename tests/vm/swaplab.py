"""A workload that lets a test attack its own swapped pages (run as root in the guest with `python3 -S -c`).

It reads one command per line on stdin and answers each with one line, `R <json>`, on stdout:

    alloc NAME PAGES          an anonymous region of PAGES pages, each holding version "A" of its contents
    write NAME VERSION        rewrite every page as VERSION (each page read first: see below)
    out NAME                  push the region to swap and wait until none of it is in guest RAM; answers the swap
                              slot of every page (swap type and offset, from /proc/self/pagemap) and the swap
                              areas by type, and flushes the swap devices
    evict                     empty dm-bufio's cache of dm-integrity tags (dm_bufio module parameters, then wait
                              for its cleanup to run), as memory pressure or a large swap would
    check NAME                read every page, each in a forked child; answers per page: "A"/"B"/... (that
                              version of this page), "other" (anything else) or "SIGBUS" (the child died of it)
    free NAME                 unmap the region (its swap slots are freed, and discarded with --swap-discard)
    tags                      pages of guest RAM the confidential swap's tag store holds
    quit

Two things would hide what the host did to the swap file, and are handled here: the interpreter's own pages
could be swapped out and rolled back too (it locks itself in RAM with mlockall(MCL_CURRENT | MCL_FUTURE), so what
it allocates later is locked too, and unlocks only its regions), and one SIGBUS would end the reader (each check
runs in forked children, a new one after each SIGBUS).
`write` reads every page before writing it: a page swapped in by a read keeps its swap slot while it stays in
the swap cache, so the next `out` writes the new version to the very slot the old one was in (a write fault
would free the slot, and the new version would land elsewhere).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # the guest's stdlib may lack it: annotations only
    from collections.abc import Callable

PAGE = 4096
MADV_PAGEOUT = 21  # include/uapi/asm-generic/mman-common.h (the mmap module has no constant for it here)
MCL_CURRENT, MCL_FUTURE = 1, 2
SIGNALS = {7: "SIGBUS", 11: "SIGSEGV", 9: "SIGKILL"}  # x86-64 (an initramfs root has no `signal` module)
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
TOKEN = os.urandom(8).hex().encode()
regions: dict[str, mmap.mmap] = {}


def content(version: str, index: int) -> bytes:
    """A page that says which version of which page it is (and carries a marker the host can search for)."""
    head = b"MVLAB|%s|%06d|%s|" % (version.encode(), index, TOKEN)
    return (head * (PAGE // len(head) + 1))[:PAGE]


def address(region: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(region))


def resident(region: mmap.mmap) -> int:
    """Pages of the region in guest RAM, swap cache included (mincore(2) reports a swapped-out page whose copy is
    still in the swap cache as resident)."""
    pages = len(region) // PAGE
    vec = ctypes.create_string_buffer(pages)
    if libc.mincore(ctypes.c_void_p(address(region)), len(region), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(b & 1 for b in vec.raw)


def slots(region: mmap.mmap) -> list[list[int] | None]:
    """(swap type, offset) of each page, from /proc/self/pagemap (None for a page that is not swapped out)."""
    start = address(region) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start * 8)
        raw = f.read(len(region) // PAGE * 8)
    out: list[list[int] | None] = []
    for i in range(0, len(raw), 8):
        entry = int.from_bytes(raw[i:i + 8], "little")
        out.append([entry & 0x1F, (entry >> 5) & ((1 << 50) - 1)] if entry >> 62 & 1 else None)
    return out


def swap_areas() -> list[str]:
    """The swap areas in the kernel's order: a slot's swap type is its index here."""
    with open("/proc/swaps") as f:
        return [line.split()[0] for line in f.readlines()[1:]]


def swap_devices() -> list[str]:
    return [a for a in swap_areas() if not a.startswith("/dev/zram")]


def cgroup_dir() -> str:
    with open("/proc/self/cgroup") as f:
        return "/sys/fs/cgroup" + f.read().strip().partition("::")[2]


def push_out(region: mmap.mmap) -> dict[str, object]:
    """MADV_PAGEOUT writes the pages out; they stay in the swap cache until written, and a reclaim of our own
    cgroup then frees them. Wait (with a deadline) until none is resident, then flush the swap device so
    dm-integrity writes its tags (to the host file, or to the tag store) too."""
    region.madvise(MADV_PAGEOUT)
    deadline = time.monotonic() + 120
    while resident(region):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{resident(region)} pages still resident")
        try:
            with open(cgroup_dir() + "/memory.reclaim", "w") as f:
                f.write(str(len(region)))
        except OSError:
            pass  # EAGAIN: it reclaimed less than asked
        time.sleep(0.2)
    for device in swap_devices():
        fd = os.open(device, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return {"slots": slots(region), "areas": swap_areas()}


def evict() -> dict[str, object]:
    params = "/sys/module/dm_bufio/parameters/"
    for name, value in (("retain_bytes", 0), ("max_age_seconds", 1), ("max_cache_size_bytes", 4096)):
        with open(params + name, "w") as f:
            f.write(str(value))
    deadline = time.monotonic() + 120  # dm-bufio's own cleanup runs every 30 s (DM_BUFIO_WORK_TIMER_SECS)
    while True:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")  # runs the slab shrinkers, dm-bufio's among them, as memory pressure would
        with open(params + "current_allocated_bytes") as f:
            now = int(f.read())
        if now == 0 or time.monotonic() > deadline:
            return {"bufio_bytes": now}
        time.sleep(0.5)


def classify(data: bytes, index: int) -> str:
    if data[:6] != b"MVLAB|":
        return "other"
    version = data[6:data.index(b"|", 6)].decode()
    return version if data == content(version, index) else "other"


def check(region: mmap.mmap) -> dict[str, object]:
    pages = len(region) // PAGE
    seen: list[str] = []
    while len(seen) < pages:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            for i in range(len(seen), pages):
                verdict = classify(bytes(region[i * PAGE:(i + 1) * PAGE]), i)
                os.write(wfd, verdict.encode() + b"\n")
            os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            seen += [line.decode().strip() for line in r]
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            seen.append(SIGNALS.get(os.WTERMSIG(status), f"signal {os.WTERMSIG(status)}"))
    return {"pages": seen}


def alloc(name: str, pages: str) -> dict[str, object]:
    size = int(pages) * PAGE
    region = regions[name] = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if libc.munlock(ctypes.c_void_p(address(region)), size) != 0:  # the one part that may swap
        raise OSError(ctypes.get_errno(), "munlock")
    for i in range(int(pages)):
        region[i * PAGE:(i + 1) * PAGE] = content("A", i)
    return {"token": TOKEN.decode()}


def write(name: str, version: str) -> dict[str, object]:
    region = regions[name]
    for i in range(len(region) // PAGE):
        region[i * PAGE]  # noqa: B018 - a read fault first: the page keeps its swap slot
        region[i * PAGE:(i + 1) * PAGE] = content(version, i)
    return {}


def free(name: str) -> dict[str, object]:
    regions.pop(name).close()
    return {}


def tags() -> dict[str, object]:
    """Pages the confidential swap's tag store (brd) has allocated, by brd's own count."""
    with open("/sys/kernel/debug/ramdisk_pages/ram0") as f:
        return {"pages": int(f.read())}


COMMANDS: dict[str, Callable[..., dict[str, object]]] = {
    "alloc": alloc, "write": write, "out": lambda name: push_out(regions[name]), "evict": evict,
    "check": lambda name: check(regions[name]), "free": free, "tags": tags}


def main() -> None:
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        raise OSError(ctypes.get_errno(), "mlockall")
    for line in sys.stdin:
        words = line.split()
        if words == ["quit"]:
            return
        if words:
            print("R " + json.dumps({"cmd": words[0], **COMMANDS[words[0]](*words[1:])}), flush=True)


main()
