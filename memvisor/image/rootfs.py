"""The shared read-only root: memvisor's guest tree as an erofs image, and the small stage-0 initramfs that mounts
it (docs/image.md).

Every guest of an image reads the same host file: attached as an emulated ACPI NVDIMM it is mapped into the guest
and erofs reads it with DAX (no copy in the guest's page cache; the host keeps one copy in its page cache for all
guests); attached as a read-only virtio-blk disk each guest caches what it reads. The file is a 2 MiB PFN info
block (image/nvdimm.py: what lets the guest use the NVDIMM with DAX) followed by the erofs bytes; a virtio-blk
attachment starts at the erofs (QEMU's raw driver with offset=2M). Not virtio-pmem: QEMU 7.2 cannot migrate it,
and a sandbox whose root is an NVDIMM can be parked. Writable paths are an overlay whose upper
layer is guest tmpfs. erofs because it is read-only by design (no journal, no write path to get wrong), mounts in
microseconds, supports DAX on uncompressed images, and Debian's kernel has it; squashfs has no DAX.

Stage 0 is a busybox shell script (no Python: the interpreter lives on the shared root): load the few modules,
find the device, mount erofs + tmpfs + overlay, unmount what it mounted, and switch_root to memvisor's /init,
which then boots exactly as from an initramfs. switch_root frees the stage-0 files, so it costs no RAM after boot.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from memvisor import contract, proc
from memvisor.errors import ImageError
from memvisor.image import kernel, nvdimm
from memvisor.image.tree import TreeWriter

ROOT_MODES = ("pmem", "blk")

STAGE0 = r"""#!/bin/busybox sh
# memvisor stage 0 (memvisor/image/rootfs.py): mount the shared read-only root under a tmpfs overlay, then hand
# over to memvisor's /init on it. Any failure powers the guest off with one line on the console.
# Once /proc is up, applets by name: this busybox then runs them without exec'ing itself again (it finds itself
# through /proc/self/exe; FEATURE_SH_STANDALONE), which saves ~40 ms per command under TCG; `read` reads small
# files without a process at all.
bb=/bin/busybox
fail() { echo "memvisor stage0: $*"; $bb poweroff -f; exit 1; }
$bb mount -t proc proc /proc || fail "cannot mount /proc"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mode=
scratch=
scratch_mode=
read -r cmdline < /proc/cmdline
for word in $cmdline; do
  case "$word" in
    memvisor.@SETTING@=*) mode="${word#memvisor.@SETTING@=}" ;;
    memvisor.scratch_mib=*) scratch="${word#memvisor.scratch_mib=}" ;;
    memvisor.scratch_mode=*) scratch_mode="${word#memvisor.scratch_mode=}" ;;
  esac
done
[ -n "$scratch" ] || fail "the host did not send memvisor.scratch_mib"
# A confidential scratch disk is PID 1's to set up (guest/scratch.py: device-mapper, in Python); PID 1's own root
# then has a tmpfs upper layer, as without a scratch disk.
case "$scratch_mode" in
  confidential) scratch=0 ;;
  plain) ;;
  *) fail "memvisor.scratch_mode='$scratch_mode' is not confidential or plain" ;;
esac
case "$mode" in pmem|blk) ;; *) fail "memvisor.@SETTING@='$mode' is not pmem or blk" ;; esac
load() {
  loaded=" $(cut -d' ' -f1 /proc/modules | tr '\n' ' ') "
  while read -r module; do
    case "$loaded" in *" ${module%.ko} "*) continue ;; esac
    insmod "/modules/$module" || fail "cannot load kernel module $module"
  done < "/modules/$1.order"
}
load "$mode"
[ "$scratch" = 0 ] || load scratch
by_serial() {  # the virtio-blk disk the host gave serial $1, or nothing
  for serial in /sys/block/vd*/serial; do
    text=
    read -r text < "$serial" 2>/dev/null  # no newline at its end: read says 1, and has read it
    [ "$text" = "$1" ] || continue
    name="${serial%/serial}"
    [ -b "/dev/${name##*/}" ] && echo "/dev/${name##*/}"
  done
}
by_nvdimm() {  # the /dev/pmemN on the NVDIMM whose NFIT handle is $1 (QEMU: slot + 1), or nothing
  for block in /sys/block/pmem*; do
    [ -e "$block" ] || continue
    path="$(readlink -f "$block")"  # .../ndbus0/regionN/pfnN.M/block/pmemN
    mapping=
    read -r mapping < "${path%/*/block/*}/mapping0" 2>/dev/null  # nmemK,offset,length,position
    handle=
    read -r handle < "/sys/bus/nd/devices/${mapping%%,*}/nfit/handle" 2>/dev/null
    [ "$handle" = "$1" ] && [ -b "/dev/${block##*/}" ] && echo "/dev/${block##*/}"
  done
}
dev=
tries=0
while [ -z "$dev" ]; do
  if [ "$mode" = pmem ]; then
    dev="$(by_nvdimm @HANDLE@)"
  else
    dev="$(by_serial @SERIAL@)"
  fi
  tries=$((tries + 1))
  [ -n "$dev" ] || [ $tries -lt 500 ] || fail "the root device ($mode) did not appear within 10 s"
  [ -n "$dev" ] || usleep 20000
done
mkdir -p /lower /upper /newroot
if [ "$mode" = pmem ]; then
  # The host maps the file read-only and drops writes; marking the device read-only makes them fail loudly.
  blockdev --setro "$dev" || fail "cannot make $dev read-only"
  dax=
  read -r dax < "/sys/block/${dev#/dev/}/queue/dax"
  [ "$dax" = 1 ] || fail "$dev has no DAX (the image has no NVDIMM info block?): rebuild the image"
  mount -t erofs -o ro,dax=always "$dev" /lower || fail "cannot mount $dev (erofs, dax)"
else
  mount -t erofs -o ro "$dev" /lower || fail "cannot mount $dev (erofs)"
fi
if [ "$scratch" = 0 ]; then
  mount -t tmpfs -o mode=0755 rootfs-upper /upper || fail "cannot mount the overlay's tmpfs"
else  # plain: writes go to the per-sandbox scratch disk, a fresh ext2 each boot (the host file is new and sparse)
  disk="$(by_serial @SCRATCH@)"
  [ -n "$disk" ] || fail "the scratch disk (serial @SCRATCH@) is missing"
  mke2fs -q -F -m 0 "$disk" >/dev/null || fail "cannot format the scratch disk $disk"
  mount -t ext2 "$disk" /upper || fail "cannot mount the scratch disk $disk"
fi
mkdir /upper/data /upper/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work /newroot \
  || fail "cannot mount the root overlay"
# The read-only root stays visible at /mnt/rootfs (its device and options in /proc/mounts, e.g. dax).
mkdir -p /newroot/mnt/rootfs && mount --move /lower /newroot/mnt/rootfs || fail "cannot move /lower"
if [ "$scratch" != 0 ]; then  # the init puts a user's image's overlay on it too (guest/userroot.py)
  mkdir -p /newroot@SCRATCH_MOUNT@ && mount --move /upper /newroot@SCRATCH_MOUNT@ || fail "cannot move /upper"
fi
# PID 1 must never fault on a swapped page (a tampered page would kill it, and with it the VM). Its mlockall
# does not hold here: the kernel ignores mlock on DAX mappings, and the interpreter's and libraries' data
# segments are private copies of pages of a DAX file. So PID 1 runs in a memory cgroup that may not swap at
# all, entered before Python starts so every page it ever touches is charged there; the agent runs commands
# outside it (memvisor/contract.py: INIT_CGROUP).
mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail "cannot mount cgroup2"
echo +memory > /sys/fs/cgroup/cgroup.subtree_control || fail "cannot enable the memory controller"
mkdir /sys/fs/cgroup/@INIT_CGROUP@ || fail "cannot create the init cgroup"
echo 0 > /sys/fs/cgroup/@INIT_CGROUP@/memory.swap.max || fail "cannot forbid swap to the init cgroup"
echo $$ > /sys/fs/cgroup/@INIT_CGROUP@/cgroup.procs || fail "cannot enter the init cgroup"
umount /sys/fs/cgroup
umount /proc /sys /dev
exec $bb switch_root /newroot /init
"""


def stage0_script() -> bytes:
    return (STAGE0.replace("@SETTING@", contract.ROOTFS_SETTING)
            .replace("@HANDLE@", contract.nvdimm_handle(contract.ROOTFS_NVDIMM_SLOT))
            .replace("@INIT_CGROUP@", contract.INIT_CGROUP).replace("@SCRATCH_MOUNT@", contract.SCRATCH_MOUNT)
            .replace("@SCRATCH@", contract.SCRATCH_DISK_SERIAL)
            .replace("@SERIAL@", contract.ROOTFS_DISK_SERIAL).encode())


def write_stage0(out: TreeWriter, busybox: Path, moddir: Path, modules: kernel.ModuleSet) -> int:
    """The stage-0 initramfs: busybox, the root modules of each mode with their load order, and /init."""
    for d in ("bin", "dev", "proc", "sys", "modules"):
        out.add_dir(d)
    out.add_device("dev/console", char=True, major=5, minor=1)
    out.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    out.add_symlink("bin/sh", "busybox")
    files = set()
    for mode in (*ROOT_MODES, "scratch"):
        order = modules.groups[f"rootfs_{mode}"]
        files.update(order)
        out.add_file(f"modules/{mode}.order", "".join(f"{os.path.basename(p)}\n" for p in order).encode())
    for rel in sorted(files):
        out.add_file(f"modules/{os.path.basename(rel)}", (moddir / rel).read_bytes())
    out.add_file("init", stage0_script(), 0o755)
    return len(files) + 3


def make_erofs(tree: Path, out: Path) -> None:
    """The root image of `tree`: the NVDIMM header, then an uncompressed erofs (DAX needs uncompressed blocks and no
    inline tails), owners and modes kept, timestamps fixed so the same tree gives the same bytes (the header's uuid
    is derived from them), zero-padded to 2 MiB."""
    raw = out.with_name(f".{out.name}.erofs")
    try:
        proc.run([proc.which("mkfs.erofs"), "--quiet", "-T0", "-Enoinline_data", "-x-1", str(raw), str(tree)],
                 timeout=600)
        digest = hashlib.sha256()
        with raw.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        nvdimm.write_image(raw, out, uuid=digest.digest()[:16])
    finally:
        raw.unlink(missing_ok=True)


def erofs_offset(image: Path) -> int:
    """Where the erofs bytes start in a root image file (after its NVDIMM header); raises ImageError for a file
    without one (built before the header existed), naming the fix."""
    try:
        nvdimm.read(image)
    except nvdimm.InfoBlockError as exc:
        raise ImageError(f"{image} is not a memvisor root image of this version: {exc}",
                         hint="rebuild it: `memvisor image build` (or import the OCI image again)") from None
    return nvdimm.HEADER_BYTES
