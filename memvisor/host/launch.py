"""Spawn the VMM process: the only long-lived child memvisor starts; and take one over that another memvisor started.

In the child, before exec: PR_SET_PDEATHSIG so the VMM of a one-shot `memvisor run` dies with it (even on
SIGKILL). A daemon's VMM must outlive the daemon instead (`outlive_owner`): a daemon killed at any instant
(SIGKILL, the OOM killer, a crash) leaves its sandboxes running, and the next daemon takes them over
(`Adopted`, host/sandbox.py Instance.adopt). Such a VMM gets no death signal and a session of its own (setsid),
so neither the daemon's death nor a signal to the daemon's process group (a terminal's ^C) reaches it; it stays in
the daemon's cgroup, which outlives the daemon's process (under systemd: KillMode=process, as containerd's unit
does). And, when the policy
asks for KSM, PR_SET_MEMORY_MERGE: set before exec, it survives execve and makes every anonymous mapping of the
VMM mergeable, so it works for any VMM, including ones whose seccomp filter would forbid the prctl later. With a
balloon, PR_SET_THP_DISABLE (also kept across execve): QEMU asks for transparent huge pages on guest RAM, and the
host's khugepaged then collapses the 4 KiB holes the balloon punched back into whole huge pages, filled with
zeros (its max_ptes_none is 511 by default): a squeezed guest's VMM was seen holding 164 MiB of guest RAM under a
103 MiB balloon target, the host's thp_collapse_alloc counter climbing.
stdin is /dev/null, stdout/stderr go to a log file, the environment is clean, and only the listed fds are
inherited.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Protocol

from memvisor import proc
from memvisor.errors import MemvisorError
from memvisor.host import ksm as ksm_

# include/uapi/linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_THP_DISABLE = 41


class VMMProcess(Protocol):
    """What memvisor needs of a VMM process: subprocess.Popen for one it started, Adopted for one it took over."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


def spawn_vmm(argv: list[str], *, pass_fds: tuple[int, ...], log: Path, ksm: bool = False,
              user: tuple[int, int] | None = None, huge_pages: bool = True,
              outlive_owner: bool = False) -> subprocess.Popen[bytes]:
    """Start the VMM; raise MemvisorError with the command line if it cannot be started.
    `outlive_owner`: the VMM does not die with memvisor (a daemon's sandbox: the next daemon adopts it).
    `ksm`: make its memory mergeable (the caller checked ksm.merge_supported() first).
    `huge_pages`: False turns transparent huge pages off for the whole VMM (a ballooned guest's RAM).
    `user`: (uid, gid) to run it as, with no supplementary groups, in new network, IPC and UTS namespaces
    (memvisor/paths.py: vmm_user)."""
    parent = os.getpid()

    def in_child() -> None:
        if outlive_owner:
            os.setsid()  # out of memvisor's process group and session: their signals are not its
        if ksm:  # needs CAP_SYS_RESOURCE: before the VMM drops root; the flag lives in the mm, it stays
            ksm_.prctl(ksm_.PR_SET_MEMORY_MERGE, 1)
        if not huge_pages:
            proc.prctl(PR_SET_THP_DISABLE, 1)
        if user is not None:
            # Its own network, IPC and hostname namespaces: QEMU needs no network (the guest has none), so a
            # compromised VMM cannot reach the host's loopback services or its SysV IPC.
            proc.unshare(proc.CLONE_NEWNET | proc.CLONE_NEWIPC | proc.CLONE_NEWUTS)
            os.setgroups([])
            os.setresgid(user[1], user[1], user[1])
            os.setresuid(user[0], user[0], user[0])
        if outlive_owner:
            return
        # After the change of credentials, which clears the parent-death signal.
        proc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    with log.open("wb") as out:
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=proc.clean_env(), pass_fds=pass_fds, preexec_fn=in_child)
        except OSError as exc:
            raise MemvisorError(f"cannot start `{shlex.join(argv)}`: {exc.strerror}") from None


class Adopted:
    """A VMM another memvisor process started (a daemon that was killed), taken over through a pidfd: it is not
    memvisor's child, so its exit status is not memvisor's to read (its zombie is reaped by whoever inherited it);
    `returncode` is then -9 if memvisor killed it, else 0."""

    def __init__(self, pid: int, pidfd: int) -> None:
        """`pidfd`: pidfd_open(pid), opened and checked by the caller (it is owned by this object from now on)."""
        self.pid = pid
        self._pidfd = pidfd
        self._killed = False
        self._code: int | None = None

    @property
    def returncode(self) -> int | None:
        return self._code

    def poll(self) -> int | None:
        return self._code if self._code is not None or not self._exited(0) else self._ended()

    def wait(self, timeout: float | None = None) -> int:
        if self._code is not None:
            return self._code
        if not self._exited(None if timeout is None else timeout * 1000):
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
        return self._ended()

    def kill(self) -> None:
        if self._code is None:
            with contextlib.suppress(OSError):  # ESRCH: it has already exited
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                self._killed = True

    def close(self) -> None:
        """Release the pidfd (after the VMM is gone, or when memvisor lets it go)."""
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def _exited(self, timeout_ms: float | None) -> bool:
        if self._pidfd < 0:
            return True
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(timeout_ms))

    def _ended(self) -> int:
        self._code = -signal.SIGKILL if self._killed else 0
        return self._code
