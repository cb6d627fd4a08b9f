"""Spawn the VMM process: the only long-lived child memvisor starts.

In the child, before exec: PR_SET_PDEATHSIG so the VMM dies with memvisor (even on SIGKILL), and, when the policy
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

import os
import shlex
import signal
import subprocess
from pathlib import Path

from memvisor import proc
from memvisor.errors import MemvisorError
from memvisor.host import ksm as ksm_

# include/uapi/linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_THP_DISABLE = 41


def spawn_vmm(argv: list[str], *, pass_fds: tuple[int, ...], log: Path, ksm: bool = False,
              user: tuple[int, int] | None = None, huge_pages: bool = True) -> subprocess.Popen[bytes]:
    """Start the VMM; raise MemvisorError with the command line if it cannot be started.
    `ksm`: make its memory mergeable (the caller checked ksm.merge_supported() first).
    `huge_pages`: False turns transparent huge pages off for the whole VMM (a ballooned guest's RAM).
    `user`: (uid, gid) to run it as, with no supplementary groups, in new network, IPC and UTS namespaces
    (memvisor/paths.py: vmm_user)."""
    parent = os.getpid()

    def in_child() -> None:
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
