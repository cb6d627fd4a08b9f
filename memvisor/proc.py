"""The one way memvisor runs a host program: argv lists, stdin from /dev/null, a clean environment, and the
full command line in every failure message. Long-lived children (the VMM) are spawned in host/launch.py."""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from memvisor.errors import MemvisorError, MissingDependencyError

CLEAN_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "TMPDIR", "HOME")

# Host programs memvisor needs, and the Debian package that provides each.
DEBIAN_PACKAGE = {
    "qemu-system-x86_64": "qemu-system-x86",
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "mkfs.erofs": "erofs-utils",
}


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment for children: PATH and locale only, plus `extra`."""
    env = {k: os.environ[k] for k in CLEAN_ENV_KEYS if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(extra or {})
    return env


def which(program: str) -> str:
    """The full path of a host program, or MissingDependencyError saying which package to install."""
    path = shutil.which(program, path=clean_env()["PATH"])
    if path is None:
        pkg = DEBIAN_PACKAGE.get(program, program)
        raise MissingDependencyError(f"{program} is not installed", hint=f"apt-get install {pkg}")
    return path


def run(argv: Sequence[str], *, cwd: str | None = None, env: Mapping[str, str] | None = None,
        timeout: float | None = None, capture: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a program to completion; raise MemvisorError with its command line and stderr if it fails."""
    argv = [which(argv[0]), *argv[1:]] if "/" not in argv[0] else list(argv)
    try:
        proc = subprocess.run(argv, cwd=cwd, env=clean_env(env), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE if capture else None,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise MemvisorError(f"`{shlex.join(argv)}` did not finish within {timeout} s") from None
    if proc.returncode != 0:
        err = (proc.stderr or b"").decode(errors="replace").strip().splitlines()
        tail = "; ".join(err[-3:]) if err else "no error output"
        raise MemvisorError(f"`{shlex.join(argv)}` failed with exit status {proc.returncode}: {tail}")
    return proc


_libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, arg: int) -> int:
    """prctl(2) with one argument (include/uapi/linux/prctl.h); raises OSError. Safe in a pre-exec child."""
    result = int(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return result


# include/uapi/linux/prctl.h
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4


def keep_memory_private() -> None:
    """No core dump and no ptrace of this process, for one whose heap holds secrets (the daemon: snapshot keys,
    plaintext chunks of guest RAM). RLIMIT_CORE 0, soft and hard, so nothing later raises it; PR_SET_DUMPABLE 0,
    which also stops a core_pattern pipe (that ignores RLIMIT_CORE) and denies ptrace, /proc/PID/mem and
    process_vm_readv to other processes of the same user (root keeps CAP_SYS_PTRACE). The process's own
    /proc/self/fd/N still opens, and its children's execve resets the flag: VMMs start as before."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    prctl(PR_SET_DUMPABLE, 0)


# include/uapi/linux/sched.h
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x04000000, 0x08000000, 0x40000000


def unshare(flags: int) -> None:
    """unshare(2) (os.unshare needs Python 3.12); raises OSError. Safe in a pre-exec child."""
    if int(_libc.unshare(ctypes.c_int(flags))) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({flags:#x}): {os.strerror(err)}")


SYS_PIDFD_GETFD = 438  # x86-64 (arch/x86/entry/syscalls/syscall_64.tbl), Linux >= 5.6


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """pidfd_getfd(2): a new descriptor (O_CLOEXEC) of the open file that process `pidfd` holds at `target_fd`
    (needs ptrace access to it: root, or the same user). Raises OSError (EBADF: it holds no such fd; ESRCH: it
    is gone; EPERM: no access)."""
    result = int(_libc.syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd), ctypes.c_int(target_fd),
                               ctypes.c_uint(0)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd({target_fd}): {os.strerror(err)}")
    return result
