"""A template's clone waking up (docs/templates.md): it must be its own machine before any workload code runs.

Every clone starts from the same frozen RAM, so right after its wake it holds the template's RNG state, hostname,
sandbox id and whatever the workload generated. PID 1, on the host's CLONED (while every command of the template
is still paused where it was frozen, and before the host runs a command in the clone):
  1. mixes 32 bytes from the host into the kernel's entropy pool and forces a reseed (RNDRESEEDCRNG), so
     getrandom() diverges at once; the kernel reseeds on its own when it sees the new VM generation ID that the
     clone's VMM wrote (its vmgenid driver sends a NEW_VMGENID uevent, which this module waits for and reports);
  2. takes its new sandbox id and hostname;
  3. sets up swap (templates are frozen with swap off): its key comes from the reseeded RNG;
  4. writes FORKED, the event a workload watches to reseed its own state (its PRNGs, its session ids).
stdlib only; imported by PID 1 only in a templatable sandbox (and so in its clones).
"""

from __future__ import annotations

import json
import os
import select
import socket
import time

from memvisor.guest import linux

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07), include/uapi/linux/random.h
NETLINK_KOBJECT_UEVENT = 15
FORKED_DIR = "/run/memvisor"
FORKED = f"{FORKED_DIR}/forked"  # written once the clone is its own machine: {"id", "hostname", "uptime"}
VMGENID_EVENT = b"NEW_VMGENID=1"
VMGENID_WAIT_S = 5.0


class UeventWatch:
    """The kernel's uevents, heard from before the template is frozen, so that a clone sees its vmgenid change."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                  NETLINK_KOBJECT_UEVENT)
        self.sock.bind((0, 1))  # the kernel's multicast group

    def drain(self) -> None:
        """Forget what came before (the template's own uevents)."""
        while True:
            try:
                self.sock.recv(8192)
            except BlockingIOError:
                return
            except OSError:  # ENOBUFS: some were lost; the rest is still there
                continue

    def wait_vmgenid(self, timeout: float) -> bool:
        """Whether the kernel announced a new VM generation ID within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            try:
                message = self.sock.recv(8192)
            except (BlockingIOError, OSError):
                continue
            if VMGENID_EVENT in message.split(b"\0"):
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
    """PID 1's part in a templatable sandbox: hear uevents from boot on, forget them at the freeze (PARK), and
    run the wake steps when the host says CLONED. `setup_swap` sets up the swap the template went without and
    returns its report; `chroot` is the user's image root, where FORKED is written too."""

    def __init__(self, setup_swap: Callable[[], dict[str, Any]], log: Callable[[str], None]) -> None:
        self.uevents = UeventWatch()
        self.setup_swap = setup_swap
        self.log = log
        self.chroot: str | None = None

    def park(self) -> None:
        self.uevents.drain()

    def wake(self, body: dict[str, Any]) -> dict[str, Any]:
        """The steps of the module docstring; their report (the CLONED answer). Raises on a failed step."""
        start = time.monotonic()
        reseed(bytes.fromhex(body["entropy"]))
        vmgenid = self.uevents.wait_vmgenid(VMGENID_WAIT_S)
        if not vmgenid:
            self.log(f"clone: no new VM generation ID announced within {VMGENID_WAIT_S:g} s (the RNG was reseeded "
                     "from the host's entropy all the same)")
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
