"""The shared read-only root (issue 13, docs/image.md), on real guests: the default image has a complete Python;
every guest of an image reads one host file that no guest can change; what one guest writes lives in its own
overlay and no other guest sees it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from memvisor import policy
from memvisor.host.sandbox import Instance
from memvisor.image.build import Image

# The modules issue 13 names, and a few that need shared libraries of their own (ssl, sqlite3, lzma, ctypes).
STDLIB = ("random", "subprocess", "typing", "datetime", "hashlib", "socket", "threading", "logging", "ssl",
          "sqlite3", "lzma", "bz2", "ctypes", "decimal", "uuid", "asyncio", "email", "http.client", "unittest",
          "zoneinfo", "xml.etree.ElementTree", "csv", "sqlite3", "curses", "readline")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def run(vm: Instance, script: str, root: bool = True) -> str:
    result = vm.exec(["sh", "-c", script], uid=0 if root else None)
    assert result.exit_code == 0, (script, result.stdout, result.stderr)
    return result.stdout.decode()


@pytest.mark.parametrize("rootfs", ["pmem", "blk"])
def test_the_default_image_has_a_complete_python_on_a_shared_root(image: Image, rootfs: str) -> None:
    pol = policy.merge(("test", {"memory_mib": 192, "rootfs": rootfs}))
    with Instance(pol, image) as vm:
        out = run(vm, f"python3 -c 'import {', '.join(STDLIB)}; print(ssl.OPENSSL_VERSION)'; "
                      "grep -E ' / | /mnt/rootfs ' /proc/mounts", root=False)
        # PID 1 may never swap (mlock does not hold on DAX mappings): it lives in a no-swap cgroup, commands not.
        cgroups = run(vm, "cat /proc/1/cgroup /proc/self/cgroup; mkdir /tmp/cg; mount -t cgroup2 none /tmp/cg; "
                          "cat /tmp/cg/memvisor-init/memory.swap.max; umount /tmp/cg")
        init, command, swap_max = cgroups.split()
        assert (init, swap_max) == ("0::/memvisor-init", "0"), cgroups
        assert command.startswith("0::/memvisor-workloads/exec-"), cgroups  # each command in a cgroup of its own
        # Reading the stdlib's sources (~20 MiB; imports read only the .pyc): with DAX they never enter the guest's
        # page cache, from a virtio-blk disk they do.
        cached = run(vm, "grep ^Cached: /proc/meminfo; find /usr/lib/python3.11 -name '*.py' | xargs cat "
                         "| wc -c; grep ^Cached: /proc/meminfo")
    assert "OpenSSL" in out
    assert "overlay / overlay" in out
    mount = next(line for line in out.splitlines() if " /mnt/rootfs " in line).split()
    assert mount[2] == "erofs" and "ro" in mount[3].split(",")
    lines = cached.splitlines()
    before, after = (int(lines[i].split()[1]) for i in (0, -1))
    if rootfs == "pmem":
        assert mount[0] == "/dev/pmem0" and "dax=always" in mount[3]
        assert after - before < 2048, cached  # KiB
    else:
        assert after - before > 8192, cached


# Run as root in guest A: what a hostile tenant would try on the shared device.
ATTACK = {
    "pmem": """
        echo mine > /etc/written-by-a && cat /etc/written-by-a
        if echo evil | dd of=/dev/pmem0 bs=4096 seek=0 conv=fsync 2>/dev/null; then echo write-ok; fi
        blockdev --setrw /dev/pmem0  # root can lift the guest's own read-only mark: the host still drops it
        dd if=/dev/zero of=/dev/pmem0 bs=4096 count=16 conv=fsync 2>/dev/null
        echo 3 > /proc/sys/vm/drop_caches
        od -A n -t x1 -N 8 -j 1024 /dev/pmem0
    """,
    "blk": """
        echo mine > /etc/written-by-a && cat /etc/written-by-a
        dev=/dev/$(for s in /sys/block/vd*/serial; do [ "$(cat $s)" = memvisor-rootfs ] && basename ${s%/serial}; done)
        if echo evil | dd of=$dev bs=4096 seek=0 conv=fsync 2>/dev/null; then echo write-ok; fi
        blockdev --setrw $dev 2>/dev/null
        if dd if=/dev/zero of=$dev bs=4096 count=16 conv=fsync 2>/dev/null; then echo write-ok; fi
        echo 3 > /proc/sys/vm/drop_caches
        od -A n -t x1 -N 8 -j 1024 $dev
    """,
}
EROFS_MAGIC = "e2 e1 f5 e0"  # at byte 1024 of every erofs image (EROFS_SUPER_MAGIC_V1, little-endian)


@pytest.mark.parametrize("rootfs", ["pmem", "blk"])
def test_no_guest_can_change_what_another_sees(image: Image, rootfs: str) -> None:
    before = sha256(image.rootfs)
    pol = policy.merge(("test", {"memory_mib": 160, "rootfs": rootfs}))
    with Instance(pol, image) as a, Instance(pol, image) as b:
        seen_by_b = run(b, "sha256sum /usr/bin/busybox /usr/lib/python3.11/os.py")
        out = run(a, ATTACK[rootfs])
        assert out.splitlines()[0] == "mine"  # A's own overlay is writable
        assert "write-ok" not in out, out  # the guest's device is read-only: writes fail loudly
        assert EROFS_MAGIC in out, out  # and even after root lifts that, nothing reached the device
        # B: still running, its files intact, A's file nowhere.
        assert run(b, "sha256sum /usr/bin/busybox /usr/lib/python3.11/os.py") == seen_by_b
        assert run(b, "ls /etc/written-by-a 2>&1 || true").strip().endswith("No such file or directory")
        assert run(b, "python3 -c 'import json; print(json.dumps([1]))'").strip() == "[1]"
    assert sha256(image.rootfs) == before  # the host file never changed


@pytest.mark.parametrize(("rootfs", "mode"), [("pmem", "confidential"), ("blk", "plain")])
def test_writes_go_to_the_scratch_disk_instead_of_guest_ram(image: Image, rootfs: str, mode: str) -> None:
    pol = policy.merge(("test", {"memory_mib": 192, "rootfs": rootfs, "scratch_mib": 128, "scratch_mode": mode}))
    with Instance(pol, image) as vm:
        out = run(vm, "dd if=/dev/zero of=/home/sandbox/big bs=1M count=48 2>/dev/null && sync; "
                      "grep ^Shmem: /proc/meminfo; grep ' /mnt/scratch ' /proc/mounts; du -sm /mnt/scratch/data; "
                      "echo 3 > /proc/sys/vm/drop_caches; cmp /home/sandbox/big /dev/zero 2>&1 || true")
    lines = out.splitlines()
    assert int(lines[0].split()[1]) < 4096, out  # KiB: the 48 MiB are not in tmpfs
    device, fstype = lines[1].split()[0], lines[1].split()[2]
    assert fstype == "ext2"
    # plain: ext2 on the virtio disk itself; confidential: on the crypt device over it (tests/vm/test_scratch.py)
    assert device.startswith("/dev/dm-" if mode == "confidential" else "/dev/vd"), out
    assert int(lines[2].split()[0]) >= 48, out
    assert "EOF on /home/sandbox/big" in lines[3], out  # read back whole (from the disk: the caches were dropped)
