"""Guest swap against real guests: devices and tables, pressure, secrecy, tamper-evidence, step-down, access.

Asserted from more than one side: the guest (/proc/swaps, the workload's own exit), the host (the swap file's
bytes, util-linux reading our header) and the report.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from memvisor import policy
from memvisor.host.result import RunResult
from memvisor.host.sandbox import Instance
from memvisor.image.build import Image
from tests.vm.conftest import Runner, report

HOG = (Path(__file__).parent / "hog.py").read_text()
SMALL_GUEST = 128  # MiB: MemTotal ~100 MiB, of which the initramfs takes ~17 MiB
HOG_MIB = 200  # ~2x the guest's RAM


def hog_argv(mib: int, marker: str, hold: float = 0) -> list[str]:
    return ["python3", "-S", "-c", HOG, str(mib), marker, str(hold)]


def swap_policy(mode: str | None, size: int = 512, zram: int = 0, memory: int = SMALL_GUEST,
                timeout: float = 400) -> policy.Policy:
    layer: dict[str, object] = {"memory_mib": memory, "swap_size_mib": size, "zram_percent": zram,
                                "timeout": timeout}
    if mode:
        layer["swap_mode"] = mode
    return policy.merge(("test", layer))


def run_hog(image: Image, pol: policy.Policy, mib: int, marker: str, hold: float = 0,
            on_filled: Callable[[Instance], None] | None = None) -> tuple[RunResult, str, bytes]:
    """Run the hog; call on_filled(vm) while the VM is alive, once it has filled its memory.
    Returns (result, guest console, the hog's stdout)."""
    out = bytearray()
    with Instance(pol, image) as vm:
        def stdout(data: bytes) -> None:
            out.extend(data)
            if b"FILLED" in data and on_filled is not None:
                on_filled(vm)
        result = vm.run(hog_argv(mib, marker, hold), on_stdout=stdout)
        console = vm.console_log.read_text(errors="replace")
    return result, console, bytes(out)


def data_extents(fd: int, start: int = 0) -> Iterator[tuple[int, int]]:
    """(start, end) of each written extent of a sparse file from `start` on (SEEK_DATA/SEEK_HOLE)."""
    size = os.fstat(fd).st_size
    pos = start
    while pos < size:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        end = os.lseek(fd, pos, os.SEEK_HOLE)
        yield pos, end
        pos = end


def count_in_file(path: Path, needle: bytes) -> int:
    """Occurrences of needle in a (sparse) file, reading only its data extents."""
    count = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for pos, end in data_extents(fd):
            tail = b""
            while pos < end:
                chunk = os.pread(fd, min(1 << 22, end - pos), pos)
                data = tail + chunk
                count += data.count(needle)
                tail = data[-(len(needle) - 1):]
                count -= tail.count(needle)  # do not count the overlap twice
                pos += len(chunk)
            count += tail.count(needle)
    finally:
        os.close(fd)
    return count


def test_no_swap_by_default(memvisor: Runner) -> None:
    r = memvisor("run", "--json", "--", "cat", "/proc/swaps")
    assert r.stdout.splitlines()[1:-1] == []
    rep = report(r.stdout)
    assert rep["swap"]["asked"] == "off" and rep["swap"]["effective"] == "off" and rep["swap"]["devices"] == []


@pytest.mark.parametrize(("mode", "tables"), [
    ("plain", []),
    ("encrypted", ["crypt aes-xts-plain64"]),
    ("authenticated", ["integrity 254:0 0 ", "crypt capi:"]),  # aegis128 (32-byte tags) or the gcm fallback
])
def test_each_mode_device_priority_and_table(memvisor: Runner, mode: str, tables: list[str]) -> None:
    r = memvisor("run", "--json", "--memory", "192", "--swap-size", "256", "--swap-mode", mode, "--",
                 "cat", "/proc/swaps")
    assert r.returncode == 0, r.stderr
    swaps = [line.split() for line in r.stdout.splitlines()[1:-1]]
    assert len(swaps) == 1 and swaps[0][4] == "10"
    rep = report(r.stdout)["swap"]
    assert rep["asked"] == mode and rep["effective"] == mode
    [dev] = rep["devices"]
    assert dev["device"] == swaps[0][0] and dev["active"] and dev["priority"] == 10
    assert len(dev["table"]) == len(tables)
    for row, expected in zip(dev["table"], tables, strict=True):
        assert expected in row
    if mode == "authenticated":  # the tag size dm-integrity keeps must be the AEAD's: 32 aegis128, 28 gcm
        aead = dev["table"][-1].split()[4]  # "<name>: <start> <length> crypt <cipher> <key> ..."
        tag = {"capi:aegis128-random": "32", "capi:gcm(aes)-random": "28"}[aead]
        assert dev["table"][0].split()[6] == tag, dev["table"]  # "<name>: <start> <length> integrity <dev> 0 <tag>"
        # 4 KiB metadata buffers (order-0 allocations) instead of dm-integrity's 64 KiB: docs/swap.md, the stall.
        assert "buffer_sectors:8" in dev["table"][0]
        assert rep["tag_store"] is None
    if mode != "plain":
        crypt = dev["table"][-1]
        assert "no_read_workqueue" in crypt and "no_write_workqueue" in crypt and "sector_size:4096" in crypt
        key = crypt.split()[5]
        assert key.endswith(":logon:memvisor:swap-crypt"), "the key is referenced in the keyring, never in the table"
    assert rep["setup_seconds"] is not None  # how long it takes is bench/swap.py's business


def test_confidential_swap_segments_tables_and_growth(memvisor: Runner) -> None:
    """256 MiB of confidential swap: segments of 64, 64 and 128 MiB (guest/segments.py), the first two swapped on at
    setup, the third once a workload has half filled them; tags, superblock and journal on the RAM disk, so the
    segments cover the whole host file."""
    script = 'cat /proc/swaps; python3 -S -c "$0" 200 confidential-growth 0 >/dev/null; cat /proc/swaps'
    r = memvisor("run", "--json", "--memory", "192", "--swap-size", "256", "--swap-mode", "confidential", "--",
                 "sh", "-c", script, HOG)
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("Filename")
    before = [line.split() for line in out[1].splitlines()[1:]]
    after = [line.split() for line in out[2].splitlines()[1:-1]]
    rep = report(r.stdout)["swap"]
    assert (rep["asked"], rep["effective"]) == ("confidential", "confidential")
    devices = rep["devices"]
    assert [(d["segment"], d["offset_bytes"] >> 20, d["size_bytes"] >> 20) for d in devices] == \
        [(0, 0, 64), (1, 64, 64), (2, 128, 128)]
    # each segment's priority below the one before, down to the disk's 10: the kernel fills them in order
    assert [d["priority"] for d in devices] == [12, 11, 10]
    assert [(row[0], int(row[4])) for row in before] == [(d["device"], d["priority"]) for d in devices[:2]]
    assert [row[0] for row in after] == [d["device"] for d in devices], "the third segment was never swapped on"
    integrity, crypt, linear = devices[2]["table"]
    aead = crypt.split()[4]
    tag = {"capi:aegis128-random": "32", "capi:gcm(aes)-random": "28"}[aead]
    assert integrity.split()[6] == tag and "meta_device:1:0" in integrity and "buffer_sectors:8" in integrity
    assert crypt.split()[5].endswith(":logon:memvisor:swap-crypt") and "no_write_workqueue" in crypt
    assert linear.split()[3] == "linear" and linear.split()[5] == str(128 << 11), linear  # from 128 MiB on
    store = rep["tag_store"]
    assert store["device"] == "/dev/ram0" and store["tag_bytes"] == int(tag)
    # setup wrote the superblock and journal (136 KiB) and the two first segments' tags; the third's came later
    assert store["setup_bytes"] == 136 * 1024 + 2 * (64 << 20) // 4096 * int(tag)
    assert store["used_bytes"] == store["setup_bytes"] + (128 << 20) // 4096 * int(tag)


def test_zram_in_front_of_authenticated_disk(memvisor: Runner) -> None:
    r = memvisor("run", "--json", "--memory", "192", "--swap-size", "256", "--swap-mode", "authenticated",
                 "--zram-pct", "50", "--", "cat", "/proc/swaps")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: int(line.split()[4]) for line in r.stdout.splitlines()[1:-1]}
    assert rows["/dev/zram0"] == 100
    disk = [prio for dev, prio in rows.items() if dev.startswith("/dev/dm-")]
    assert disk == [10]
    rep = report(r.stdout)["swap"]
    assert [d["kind"] for d in rep["devices"]] == ["zram", "disk"] and rep["effective"] == "authenticated"


def test_pressure_completes_with_swap_and_ooms_without(image: Image) -> None:
    marker = secrets.token_hex(8)
    with_swap, _, out = run_hog(image, swap_policy("authenticated", zram=25), HOG_MIB, marker)
    assert with_swap.exit_code == 0, with_swap.stderr
    assert f"VERIFIED {HOG_MIB} bad 0".encode() in out
    swap = with_swap.report["swap"]
    assert swap["pswpout"] > 20_000 and swap["pswpin"] > 0  # pages
    assert swap["zram"]["orig_data_size"] > 0 and swap["zram"]["ratio"] > 1
    without, console, _ = run_hog(image, swap_policy(None, size=0), HOG_MIB, marker)
    assert without.signal == 9 and without.exit_code == 137
    assert "Out of memory" in console or "oom-kill" in console


@pytest.mark.parametrize(("mode", "expect_plaintext"), [("plain", True), ("encrypted", False),
                                                          ("authenticated", False)])
def test_marker_in_host_swap_file(image: Image, mode: str, expect_plaintext: bool) -> None:
    marker = "MVMARK-" + secrets.token_hex(8)
    hits: list[int] = []
    result, _, _ = run_hog(image, swap_policy(mode), 160, marker, hold=3,
                        on_filled=lambda vm: hits.append(count_in_file(vm.swap_path, marker.encode())))
    assert result.exit_code == 0, result.stderr
    assert result.report["swap"]["pswpout"] > 5_000
    assert hits, "the workload never reported FILLED"
    if expect_plaintext:
        assert hits[0] > 1000  # proves the scan can see swapped pages
    else:
        assert hits[0] == 0


def test_tampered_page_is_never_returned(image: Image) -> None:
    """Authenticated: flip a byte in every written block of the host file under the swapped-out hog."""
    def tamper(vm: Instance) -> None:
        flipped = 0
        fd = os.open(vm.swap_path, os.O_RDWR)
        try:
            # From 1 MiB on: leave the dm-integrity superblock alone, we attack data, not the format.
            for pos, end in data_extents(fd, 1 << 20):
                for block in range(pos, end, 4096):
                    byte = os.pread(fd, 1, block + 100)
                    os.pwrite(fd, bytes([byte[0] ^ 0xFF]), block + 100)
                    flipped += 1
            os.fsync(fd)
        finally:
            os.close(fd)
        assert flipped > 1000

    result, console, out = run_hog(image, swap_policy("authenticated"), 160, "MVMARK-tamper", hold=8,
                                   on_filled=tamper)
    assert b"VERIFIED" not in out, "changed data was returned to the workload"
    assert result.signal == 7 and result.exit_code == 128 + 7  # SIGBUS
    assert "integrity" in console.lower() or "AEAD ERROR" in console


def test_plain_header_is_accepted_by_util_linux(image: Image) -> None:
    seen: dict[str, str] = {}

    def probe(vm: Instance) -> None:
        r = subprocess.run(["blkid", "-p", "-o", "export", str(vm.swap_path)], capture_output=True, text=True)
        seen.update(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)  # type: ignore[misc]
        r = subprocess.run(["swaplabel", str(vm.swap_path)], capture_output=True, text=True)
        seen["swaplabel"] = r.stdout

    result, _, _ = run_hog(image, swap_policy("plain", size=64, memory=192), 8, "x", hold=1, on_filled=probe)
    assert result.exit_code == 0
    assert seen["TYPE"] == "swap" and seen["LABEL"] == "memvisor" and seen["VERSION"] == "1"
    assert "LABEL: memvisor" in seen["swaplabel"]


def test_missing_kernel_feature_errors_then_steps_down(memvisor: Runner) -> None:
    args = ["run", "--json", "--memory", "192", "--swap-size", "128", "--swap-mode", "authenticated",
            "--kernel-arg", "module_blacklist=dm_integrity"]
    r = memvisor(*args, "--", "cat", "/proc/swaps")
    assert r.returncode == 125
    assert "swap mode authenticated is not available: kernel module dm_integrity could not be loaded" in r.stderr
    assert "--allow-weaker-swap" in r.stderr

    r = memvisor(*args, "--allow-weaker-swap", "--", "cat", "/proc/swaps")
    assert r.returncode == 0, r.stderr
    assert "warning: swap mode authenticated is not available" in r.stderr
    rep = report(r.stdout)["swap"]
    assert (rep["asked"], rep["effective"]) == ("authenticated", "encrypted")
    assert "/dev/dm-0" in r.stdout

    r = memvisor(*args[:-1], "module_blacklist=dm_mod", "--allow-weaker-swap", "--", "true")
    assert r.returncode == 0
    assert report(r.stdout)["swap"]["effective"] == "plain"

    # confidential without the RAM disk for its tags: refused, or authenticated when allowed (and then without the
    # discards asked for: authenticated cannot take them safely)
    args = ["run", "--json", "--memory", "192", "--swap-size", "128", "--swap-mode", "confidential", "--swap-discard",
            "--kernel-arg", "module_blacklist=brd"]
    r = memvisor(*args, "--", "true")
    assert r.returncode == 125
    assert "swap mode confidential is not available: kernel module brd could not be loaded" in r.stderr
    r = memvisor(*args, "--allow-weaker-swap", "--", "true")
    assert r.returncode == 0, r.stderr
    assert "warning: swap mode confidential is not available" in r.stderr
    assert "warning: swap discards are off: swap mode authenticated cannot take them safely" in r.stderr
    rep = report(r.stdout)["swap"]
    assert (rep["asked"], rep["effective"], rep["tag_store"]) == ("confidential", "authenticated", None)
    assert [d["discard"] for d in rep["devices"]] == [False]


def test_workload_cannot_reach_the_swap_stack(memvisor: Runner) -> None:
    # confidential: every device authenticated has, and the RAM disk of tags
    script = ("for d in /dev/vd* /dev/dm-* /dev/zram* /dev/ram* /dev/mapper/*; do [ -e $d ] || continue; "
              "head -c 1 $d >/dev/null 2>&1 && echo READ-OK $d; done; "
              "cat /sys/kernel/debug/ramdisk_pages/ram0 2>/dev/null && echo DEBUGFS-OK; "
              "mknod /tmp/disk b 254 0 2>/dev/null && echo MKNOD-OK; ls /dev/dm-1 /dev/vda /dev/ram0")
    r = memvisor("run", "--memory", "192", "--swap-size", "128", "--swap-mode", "confidential", "--zram-pct", "25",
                 "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert "READ-OK" not in r.stdout and "MKNOD-OK" not in r.stdout and "DEBUGFS-OK" not in r.stdout
    assert "/dev/dm-1" in r.stdout and "/dev/ram0" in r.stdout  # they exist; the workload just cannot open them
    r = memvisor("run", "--root", "--memory", "192", "--swap-size", "128", "--", "sh", "-c",
                 "head -c 1 /dev/dm-1 >/dev/null && echo ROOT-OK")
    assert "ROOT-OK" in r.stdout  # proves the check above could have failed


def test_swap_file_is_private_sparse_and_never_on_disk(image: Image) -> None:
    from tests.vm.conftest import alive, memvisor_argv, ps, wait_for

    proc = subprocess.Popen(memvisor_argv("run", "--memory", "192", "--swap-size", "4096", "--", "sleep", "600"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        state = wait_for(lambda: next((s for s in ps() if "confidential" in s["summary"]
                                       and "(asked)" not in s["summary"]), None), 90, "swap set up in ps")
        swap = Path(state["files"]["swap"])  # /proc/<memvisor>/fd/N: held open, it has no name on disk
        assert swap.parent == Path(f"/proc/{state['owner_pid']}/fd") and os.readlink(swap).endswith("(deleted)")
        held = [f.stat() for f in Path(f"/proc/{state['vmm_pid']}/fd").iterdir()]
        assert any(os.path.samestat(swap.stat(), st) for st in held), held  # and the VMM has its own copy
        assert not (Path(state["runtime_dir"]) / "swap.img").exists()
        st = swap.stat()
        assert st.st_mode & 0o777 == 0o600
        assert st.st_size == 4096 * 2**20
        assert st.st_blocks * 512 < 64 * 2**20, "the swap file must stay sparse: setup may not write it all"
        assert "swap=4096MiB/confidential" in state["summary"]  # the default mode
    finally:
        proc.kill()  # SIGKILL: the VMM dies with memvisor, and with it the last reference to the file
        proc.communicate(timeout=30)
    wait_for(lambda: not alive(state["vmm_pid"]), 30, "the VMM to die with memvisor")
    assert not any(Path(state["runtime_dir"]).glob("swap*"))
    assert ps() == []
