"""The confidential scratch disk and a parked guest that holds still (issue 26), on one real guest.

- What the workload writes to its root goes to the scratch disk and reads back; the host file holds no byte of it.
- Between PARKING and RESUMED nothing changes the scratch disk: a background writer that syncs every 0.1 s stops
  (its cgroup frozen, the file system frozen) and goes on after RESUMED.
- The host flips a block of the scratch file, or writes back an older copy of a block: with the guest's caches
  dropped, reading either is an I/O error in the guest, never other data.
The plain mode is covered by tests/vm/test_rootfs.py (its scratch test runs once per mode).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time

from memvisor import policy, proto
from memvisor.host.sandbox import Instance
from memvisor.image.build import Image

from .conftest import wait_for

BLOCK = 4096
HOME = "/home/sandbox"
UPPER = f"/mnt/scratch/data{HOME}"  # the overlay's upper layer, where the files' blocks live
# Prints the scratch device block of each file's first 4 KiB (FIBMAP on the upper layer's file: ext2 maps its
# blocks to the crypt device's sectors 1:1, and dm-integrity with its tags elsewhere maps those to the host file's).
FIBMAP = """
import fcntl, os, struct, sys
for name in sys.argv[1:]:
    fd = os.open(name, os.O_RDONLY)
    print(struct.unpack("i", fcntl.ioctl(fd, 1, struct.pack("i", 0)))[0])
    os.close(fd)
"""
WRITER = (f"(i=0; while :; do i=$((i+1)); echo $i > {HOME}/counter; sync; sleep 0.1; done) >/dev/null 2>&1 & "
          "echo $! > /tmp/writer.pid")


def sh(vm: Instance, script: str) -> str:
    result = vm.exec(["sh", "-c", script], uid=0, timeout=120)
    assert result.exit_code == 0, (script, result.stdout, result.stderr)
    return result.stdout.decode()


def digest(fd: int) -> str:
    """The host scratch file's contents (sparse: reading the holes is quick)."""
    h = hashlib.sha256()
    size = os.fstat(fd).st_size
    for offset in range(0, size, 1 << 20):
        h.update(os.pread(fd, 1 << 20, offset))
    return h.hexdigest()


def test_the_confidential_scratch_disk_holds_still_when_parked_and_refuses_changed_blocks(image: Image) -> None:
    pol = policy.merge(("test", {"memory_mib": 192, "scratch_mib": 64}))  # scratch_mode: confidential by default
    with contextlib.ExitStack() as stack:
        vm = stack.enter_context(Instance(pol, image))
        # The host file, through a description of its own: memvisor's is O_DIRECT.
        host_file = open(f"/proc/self/fd/{vm.disk_fds['scratch.img']}", "r+b", buffering=0)  # noqa: SIM115
        stack.callback(host_file.close)
        fd = host_file.fileno()
        out = sh(vm, f"for f in a b c; do yes OLD-VALUE-$f | head -c {4 * BLOCK} > {HOME}/$f; done; sync; "
                     f"echo 3 > /proc/sys/vm/drop_caches; md5sum {HOME}/a | cut -c1-32; "
                     "grep ' /mnt/scratch ' /proc/mounts; cat /sys/kernel/debug/ramdisk_pages/ram1")
        md5, mount, tag_pages = out.split("\n")[:3]
        # read back through the whole stack after the caches were dropped
        assert md5 == hashlib.md5((b"OLD-VALUE-a\n" * BLOCK)[:4 * BLOCK]).hexdigest(), out
        assert mount.startswith("/dev/dm-") and " ext2 " in mount, mount
        assert int(tag_pages) > 0  # the tags live in guest RAM
        assert b"OLD-VALUE" not in os.pread(fd, os.fstat(fd).st_size, 0)  # ciphertext only on the host

        # A background writer, left by a command that ended, syncs a counter every 0.1 s.
        sh(vm, WRITER)
        before = digest(fd)
        wait_for(lambda: digest(fd) != before, 10, "the writer to change the host file")
        assert vm.session is not None
        parking = vm.session.ask(proto.Kind.PARK, {}, proto.Kind.PARKING, 60)
        assert parking["ok"] is True, parking
        frozen = digest(fd)
        time.sleep(2.0)  # 20 of the writer's rounds
        assert digest(fd) == frozen, "the scratch disk changed between PARKING and RESUMED"
        resumed = vm.session.ask(proto.Kind.RESUMED, {"realtime": time.time()}, proto.Kind.RESUMED, 60)
        assert "error" not in resumed, resumed
        wait_for(lambda: digest(fd) != frozen, 10, "the writer to go on after RESUMED")
        first = int(sh(vm, f"cat {HOME}/counter"))
        wait_for(lambda: int(sh(vm, f"cat {HOME}/counter")) > first, 10, "the counter to advance")
        sh(vm, "kill $(cat /tmp/writer.pid)")

        # The host changes blocks behind the guest's back.
        block_a, block_b = (int(x) for x in sh(vm, f"python3 -c '{FIBMAP}' {UPPER}/a {UPPER}/b").split())
        old_a = os.pread(fd, BLOCK, block_a * BLOCK)
        sh(vm, f"yes NEW-VALUE-a | head -c {BLOCK} | dd of={HOME}/a bs={BLOCK} count=1 conv=notrunc,fsync "
               "2>/dev/null; echo 3 > /proc/sys/vm/drop_caches")
        assert sh(vm, f"head -c 10 {HOME}/a") == "NEW-VALUE-"  # rewritten in place, read back from the disk
        assert os.pread(fd, BLOCK, block_a * BLOCK) != old_a
        os.pwrite(fd, old_a, block_a * BLOCK)  # rollback: the block as it was before
        flipped = bytearray(os.pread(fd, BLOCK, block_b * BLOCK))
        flipped[100] ^= 0x01
        os.pwrite(fd, bytes(flipped), block_b * BLOCK)  # one bit flipped
        os.fsync(fd)
        result = vm.exec(["sh", "-c", f"echo 3 > /proc/sys/vm/drop_caches; for f in a b c; do "
                          f"head -c 64 {HOME}/$f > /dev/null 2>&1 && echo $f read || echo $f failed; done; "
                          f"cat {HOME}/a {HOME}/b; dmesg | grep -c 'INTEGRITY AEAD ERROR'"], uid=0)
        out = result.stdout.decode()
        assert out.splitlines()[:3] == ["a failed", "b failed", "c read"], (out, result.stderr)
        assert "OLD-VALUE-a" not in out and "OLD-VALUE-b" not in out, out  # never the old or changed data
        assert b"Input/output error" in result.stderr, result.stderr
        assert int(out.split()[-1]) >= 2, out
