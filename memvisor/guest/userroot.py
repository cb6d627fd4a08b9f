"""The user's image as the root commands run in (docs/image.md): its read-only erofs under a tmpfs overlay,
with /proc, /sys, /dev and /tmp of the guest's own, at USER_ROOT (/mnt/image/root). The agent chroots each
command into it, so the workload sees the user's files and memvisor's init, agent and modules stay on
memvisor's root. Guest only, stdlib only.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time

from memvisor import contract
from memvisor.errors import SetupError
from memvisor.guest import blockio, linux

BASE = "/mnt/image"  # next to /mnt/rootfs, memvisor's own root
USER_ROOT = f"{BASE}/root"
BLKROSET = 0x125D  # include/uapi/linux/fs.h: _IO(0x12, 93)
MS_RDONLY, MS_BIND = 0x1, 0x1000


def find_device(kind: str, timeout: float = 10.0) -> str:
    """The user image's device: the pmem on the NVDIMM in its slot, or the virtio-blk disk with its serial."""
    if kind == "blk":
        return blockio.find_disk(contract.IMAGE_DISK_SERIAL, timeout)[0]
    deadline = time.monotonic() + timeout
    handle = contract.nvdimm_handle(contract.IMAGE_NVDIMM_SLOT)
    while True:
        for name in sorted(os.listdir("/sys/block")):
            if name.startswith("pmem") and nvdimm_handle_of(name) == handle:
                if read_sysfs(f"/sys/block/{name}/queue/dax") != "1":
                    raise SetupError(f"the image's /dev/{name} has no DAX (no NVDIMM info block?): rebuild the image")
                return f"/dev/{name}"
        if time.monotonic() > deadline:
            raise SetupError(f"the image's pmem device did not appear in the guest within {timeout:g} s")
        time.sleep(0.01)


def read_sysfs(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read(64).strip()
    except OSError:
        return None


def nvdimm_handle_of(block: str) -> str | None:
    """The NFIT handle of the NVDIMM under /sys/block/`block` (.../regionN/pfnN.M/block/pmemN: the region's
    first mapping names the nmem device), or None."""
    region = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(f"/sys/block/{block}"))))
    mapping = read_sysfs(f"{region}/mapping0") or ""
    nmem = mapping.partition(",")[0]
    if not nmem.startswith("nmem") or "/" in nmem:
        return None
    return read_sysfs(f"/sys/bus/nd/devices/{nmem}/nfit/handle")


def set_readonly(device: str) -> None:
    """Make the block device read-only in the guest, so writes to it fail loudly (the host drops them anyway)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKROSET, struct.pack("i", 1))
    finally:
        os.close(fd)


def real_dir(root: str, path: str) -> str:
    """`root`/`path` as a real directory inside `root`, for PID 1 to mount on: a symlink the image put anywhere
    on the way is removed (from the guest's overlay; the image itself is read-only), never followed, since PID
    1 would resolve it in its own root."""
    current = root
    for part in [p for p in path.split("/") if p]:
        if part == "..":
            raise SetupError(f"mount point {path} climbs out of the image root")
        current = f"{current}/{part}"
        if os.path.islink(current) or (os.path.lexists(current) and not os.path.isdir(current)):
            os.unlink(current)
        if not os.path.lexists(current):
            os.mkdir(current, 0o755)
    return current


def setup(kind: str, memctl: bool) -> str:
    """Mount the user's root; return its path."""
    device = find_device(kind)
    lower, upper = f"{BASE}/lower", f"{BASE}/upper"
    for d in (lower, upper, USER_ROOT):
        os.makedirs(d, exist_ok=True)
    try:
        if kind == "pmem":
            set_readonly(device)
        linux.mount(device, lower, "erofs", MS_RDONLY, "dax=always" if kind == "pmem" else "")
        if os.path.ismount(contract.SCRATCH_MOUNT):  # the scratch disk stage 0 formatted (policy scratch_mib)
            upper = f"{contract.SCRATCH_MOUNT}/image"
        else:
            linux.mount("image-upper", upper, "tmpfs", 0, "mode=0755")
        os.makedirs(f"{upper}/data")
        os.makedirs(f"{upper}/work")
        linux.mount("overlay", USER_ROOT, "overlay", 0,
                    f"lowerdir={lower},upperdir={upper}/data,workdir={upper}/work")
        for target, fstype, flags, data in (
            ("proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, ""),
            ("sys", "sysfs", MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, ""),
            ("dev", "devtmpfs", linux.MS_NOSUID, ""),
            ("tmp", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777"),
        ):
            linux.mount(fstype, real_dir(USER_ROOT, target), fstype, flags, data)
        if memctl:  # the workload asks PID 1 for memctl through this socket (docs/memctl.md)
            sock_dir = os.path.dirname(contract.MEMCTL_SOCKET)
            os.makedirs(sock_dir, exist_ok=True)  # memctld creates its socket there later
            linux.mount(sock_dir, real_dir(USER_ROOT, sock_dir), "", MS_BIND)
    except OSError as exc:
        raise SetupError(f"cannot mount the image's root ({device}, {kind}): {exc}") from None
    return USER_ROOT
