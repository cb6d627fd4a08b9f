"""Spawn the VMM process: the only long-lived child memvisor starts.

In the child, before exec: PR_SET_PDEATHSIG so the VMM dies with memvisor (even on SIGKILL), and the KSM prctl
when the policy asks for it (issue #4). stdin is /dev/null, stdout/stderr go to a log file, the environment is
clean, and only the listed fds are inherited.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
from pathlib import Path

from memvisor import proc
from memvisor.errors import MemvisorError

# include/uapi/linux/prctl.h
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def spawn_vmm(argv: list[str], *, pass_fds: tuple[int, ...], log: Path) -> subprocess.Popen[bytes]:
    """Start the VMM; raise MemvisorError with the command line if it cannot be started."""
    parent = os.getpid()

    def in_child() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    with log.open("wb") as out:
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=proc.clean_env(), pass_fds=pass_fds, preexec_fn=in_child)
        except OSError as exc:
            raise MemvisorError(f"cannot start `{shlex.join(argv)}`: {exc.strerror}") from None
