"""Every literal the host and the guest must agree on, in one place (stdlib only: the guest imports it at boot).

The host decides; the guest is told. Every guest-side setting travels on the kernel command line as an explicit
`memvisor.<key>=<value>` word (memvisor.policy.to_cmdline writes all of them, defaults included), and the guest
reads them with `require` below: it never falls back to a default of its own, so the two sides cannot drift.
"""

from __future__ import annotations

PORT_NAME = "org.memvisor.ctl"  # the control channel's virtio-serial port
SWAP_DISK_SERIAL = "memvisor-swap"  # the virtio-blk serial of the swap disk (/dev/disk/by-id/virtio-...)
# The shared read-only root (memvisor/image/rootfs.py): how stage 0 finds it.
ROOTFS_SETTING = "rootfs"  # pmem | blk; an initramfs-booted guest never reads it
ROOTFS_DISK_SERIAL = "memvisor-rootfs"
# As an emulated ACPI NVDIMM (QEMU `-device nvdimm,slot=N`), memvisor's root is in slot 0 and the user's image in
# slot 1; the guest finds each by its NFIT device handle, which QEMU makes slot + 1 (hw/acpi/nvdimm.c).
ROOTFS_NVDIMM_SLOT = 0
# A scratch disk (policy scratch_mib) holds the root overlays' upper layers instead of tmpfs; stage 0 formats
# it and leaves it mounted here.
SCRATCH_DISK_SERIAL = "memvisor-scratch"
SCRATCH_MOUNT = "/mnt/scratch"
# On a shared root, stage 0 puts PID 1 in this cgroup v2 (memory.swap.max = 0: mlock does not hold on DAX
# mappings); the agent runs every command in a cgroup of its own (memvisor/guest/cgroups.py).
INIT_CGROUP = "memvisor-init"
# The user's image (memvisor/guest/userroot.py): none, or how it is attached (pmem | blk).
USER_IMAGE_SETTING = "user_image"
IMAGE_NVDIMM_SLOT = 1
IMAGE_DISK_SERIAL = "memvisor-image"
# Tests only (tests/vm/test_keydump.py): the guest also writes its swap key to this disk, so the test can look for
# copies of it in a dump of guest RAM. Never set by a policy; a user's --kernel-arg cannot set memvisor.* words.
KEY_HANDOVER_SETTING = "key_handover"
KEY_HANDOVER_SERIAL = "memvisor-keyout"
WORKLOAD_UID = 1000  # the unprivileged user commands run as unless the policy says root
WORKLOAD_USER = "sandbox"
WORKLOAD_HOME = "/home/sandbox"
MEMCTL_SOCKET = "/run/memvisor/memctl.sock"  # where workloads ask PID 1 for memctl (docs/memctl.md)


def nvdimm_handle(slot: int) -> str:
    """The NFIT device handle of the NVDIMM in `slot`, as the guest's sysfs shows it (nmemN/nfit/handle)."""
    return f"{slot + 1:#x}"


class MissingSetting(Exception):
    """The host did not send a setting the guest needs."""


def require(settings: dict[str, str], key: str) -> str:
    """A setting the host must have sent."""
    try:
        return settings[key]
    except KeyError:
        raise MissingSetting(f"the host did not send memvisor.{key} on the kernel command line") from None
