"""A template's clone waking up (docs/templates.md): it must be its own machine before any workload code runs.

Every clone starts from the same frozen RAM, so right after its wake it holds the template's RNG state, hostname,
sandbox id and whatever the workload generated. PID 1, on the host's CLONED (while every command of the template
is still paused where it was frozen, and before the host runs a command in the clone):
  1. mixes 32 bytes from the host into the kernel's entropy pool and forces a reseed (RNDRESEEDCRNG), so
     getrandom() diverges at once; the kernel reseeds on its own when it sees the new VM generation ID that the
     clone's VMM wrote (it logs `crng reseeded due to virtual machine fork`, which this module waits for and reports);
  2. takes its new sandbox id and hostname;
  3. sets up swap (templates are frozen with swap off): its key comes from the reseeded RNG;
  4. writes FORKED, the event a workload watches to reseed its own state (its PRNGs, its session ids).
stdlib only; imported by PID 1 only in a templatable sandbox (and so in its clones).
"""

from __future__ import annotations

import json
import os
import select
import time

from memvisor.guest import linux

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07), include/uapi/linux/random.h
FORKED_DIR = "/run/memvisor"
FORKED = f"{FORKED_DIR}/forked"  # written once the clone is its own machine: {"id", "hostname", "uptime"}
VMFORK_RESEED = b"crng reseeded due to virtual machine fork"
VMGENID_WAIT_S = 5.0


class KmsgWatch:
    """The kernel log, read from before the template is frozen, so that a clone sees its own kernel reseed on the
    new VM generation ID. Linux 6.1's vmgenid driver sends no uevent (that came in 6.10); random.c logs the
    reseed (`add_vmfork_randomness`)."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.drain()

    def drain(self) -> None:
        """Skip what the log holds now (the template's own messages)."""
        os.lseek(self.fd, 0, os.SEEK_END)

    def wait_reseed(self, timeout: float) -> bool:
        """Whether the kernel logged its VM-fork reseed within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                continue
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                continue
            except OSError:  # EPIPE: older records were overwritten while we read; go on from the next
                continue
            if VMFORK_RESEED in record:
                return True
        return False


def reseed(entropy: bytes) -> None:
    """Mix `entropy` into the input pool and reseed the kernel's RNG from it now. OSError if the kernel refuses."""
    fd = os.open("/dev/urandom", os.O_RDWR | os.O_CLOEXEC)
    try:
        os.write(fd, entropy)
        linux.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def write_forked(info: dict[str, object], roots: tuple[str, ...]) -> None:
    """FORKED under each root (the guest's, and the user's image root commands run in), written atomically."""
    data = json.dumps(info).encode()
    for root in roots:
        directory = root.rstrip("/") + FORKED_DIR
        os.makedirs(directory, mode=0o755, exist_ok=True)
        temp = f"{directory}/.forked.tmp"
        with open(temp, "wb") as f:
            f.write(data)
        os.chmod(temp, 0o644)
        os.rename(temp, directory + "/forked")


class Waker:
    """PID 1's part in a templatable sandbox: read the kernel log from boot on, skip it at the freeze (PARK), and
    run the wake steps when the host says CLONED. `setup_swap` sets up the swap the template went without and
    returns its report; `chroot` is the user's image root, where FORKED is written too."""

    def __init__(self, setup_swap: Callable[[], dict[str, Any]], log: Callable[[str], None]) -> None:
        self.kmsg = KmsgWatch()
        self.setup_swap = setup_swap
        self.log = log
        self.chroot: str | None = None

    def park(self) -> None:
        self.kmsg.drain()

    def wake(self, body: dict[str, Any]) -> dict[str, Any]:
        """The steps of the module docstring; their report (the CLONED answer). Raises on a failed step."""
        start = time.monotonic()
        reseed(bytes.fromhex(body["entropy"]))
        vmgenid = self.kmsg.wait_reseed(VMGENID_WAIT_S)
        if not vmgenid:
            self.log(f"clone: the kernel did not log its reseed on a new VM generation ID within {VMGENID_WAIT_S:g} s"
                     " (the RNG was reseeded from the host's entropy all the same)")
        sandbox_id = body["sandbox_id"]
        hostname = f"memvisor-{sandbox_id}"
        linux.sethostname(hostname)
        swap = self.setup_swap()
        roots = ("/",) if self.chroot is None else ("/", self.chroot)
        write_forked({"id": sandbox_id, "hostname": hostname, "uptime": time.clock_gettime(time.CLOCK_BOOTTIME)},
                     roots)
        self.log(f"clone {sandbox_id}: reseeded, vmgenid {'seen' if vmgenid else 'not seen'}, "
                 f"{len(swap.get('devices', []))} swap device(s), {FORKED} written")
        return {"reseeded": True, "vmgenid": vmgenid, "hostname": hostname, "swap": swap,
                "seconds": round(time.monotonic() - start, 3)}
