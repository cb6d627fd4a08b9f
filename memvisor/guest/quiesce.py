"""A parked guest holds still: every workload process frozen, the scratch filesystem frozen.

Why (docs/parking.md, "Between PARKING and RESUMED"): the host keeps a parked sandbox's snapshot committed until
the guest answers RESUMED, so that a resume which fails after the new VMM's `cont` can be tried again from the
same snapshot. That is safe only if nothing changes a disk the snapshot goes with (a scratch block, a swap slot
freed or filled by a faulting process) from the moment the guest answers PARKING until it answers RESUMED. So a
PARK freezes, with the cgroup v2 freezer, every cgroup directly under the root except PID 1's own
(contract.INIT_CGROUP): the agent's memvisor-workloads, whose exec-N cgroups hold every command and whatever a
command left running in the background, and any cgroup a root workload made for itself; and it freezes the
scratch filesystem (FIFREEZE: its dirty data written, further writes blocked), when one is mounted. RESUMED and
CLONED thaw both before they are answered.

A process a root workload moved into the root cgroup itself is not frozen (the root cgroup cannot be): that is
the workload's own doing, and it changes only its own disks. Guest only, stdlib only, cheap to import.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time

from memvisor import contract

FREEZE_WAIT_S = 10.0  # how long a PARK waits for every task of a cgroup to stop (a task in D state delays it)
POLL_S = 0.002
# include/uapi/linux/fs.h: _IOWR('X', 119, int) and _IOWR('X', 120, int)
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


class FreezeError(Exception):
    """The guest could not be frozen (the reason is the message); everything it froze is thawed again."""


class Frozen:
    """What one freeze() froze, to thaw exactly that."""

    def __init__(self) -> None:
        self.cgroups: list[str] = []
        self.filesystems: list[str] = []


def workload_cgroups(root: str) -> list[str]:
    """Every cgroup directly under `root` but PID 1's own."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    return [f"{root}/{name}" for name in names
            if name != contract.INIT_CGROUP and os.path.isfile(f"{root}/{name}/cgroup.freeze")]


def freeze(cgroup_root: str | None, mounts: tuple[str, ...], timeout: float = FREEZE_WAIT_S) -> Frozen:
    """Freeze every workload cgroup under `cgroup_root` (None: no cgroup tree, as in a unit test) and wait, at most
    `timeout` seconds, until each reports `frozen 1`; then FIFREEZE each of `mounts` that is a mount point.
    Raises FreezeError with the reason, after thawing whatever it had frozen."""
    done = Frozen()
    try:
        for cgroup in workload_cgroups(cgroup_root) if cgroup_root else []:
            _write(f"{cgroup}/cgroup.freeze", "1")
            done.cgroups.append(cgroup)
        deadline = time.monotonic() + timeout
        for cgroup in done.cgroups:
            while not _frozen(cgroup):
                if time.monotonic() > deadline:
                    raise FreezeError(f"{cgroup} did not freeze within {timeout:g} s")
                time.sleep(POLL_S)
        for mount in mounts:
            if os.path.ismount(mount):
                _fs_ioctl(mount, FIFREEZE)
                done.filesystems.append(mount)
    except (OSError, FreezeError) as exc:
        problems = thaw(done)
        reason = str(exc) if isinstance(exc, FreezeError) else f"cannot freeze: {exc.strerror} ({exc.filename})"
        raise FreezeError("; ".join([reason, *problems])) from None
    return done


def thaw(frozen: Frozen | None) -> list[str]:
    """Undo a freeze: filesystems first (a thawed process may write at once), then cgroups. Returns what could not
    be thawed (empty when all went well); it tries every item whatever fails."""
    if frozen is None:
        return []
    problems = []
    for mount in reversed(frozen.filesystems):
        try:
            _fs_ioctl(mount, FITHAW)
        except OSError as exc:
            problems.append(f"cannot thaw {mount}: {exc.strerror}")
    for cgroup in reversed(frozen.cgroups):
        try:
            _write(f"{cgroup}/cgroup.freeze", "0")
        except FileNotFoundError:
            pass  # the cgroup is gone: nothing left in it to thaw
        except OSError as exc:
            problems.append(f"cannot thaw {cgroup}: {exc.strerror}")
    frozen.filesystems.clear()
    frozen.cgroups.clear()
    return problems


def _frozen(cgroup: str) -> bool:
    with open(f"{cgroup}/cgroup.events") as f:
        return "frozen 1" in f.read().split("\n")


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _fs_ioctl(mount: str, request: int) -> None:
    """FIFREEZE / FITHAW on the filesystem mounted at `mount` (the argument is unused by the kernel)."""
    fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, struct.pack("i", 0))
    finally:
        os.close(fd)

