"""Linux system calls the stdlib does not wrap, through ctypes on the guest's libc.

Each wrapper raises OSError(errno, strerror, path) like the os module does. Guest only.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL("libc.so.6", use_errno=True)

# include/uapi/linux/reboot.h
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
LINUX_REBOOT_CMD_RESTART = 0x01234567
# arch/x86/entry/syscalls/syscall_64.tbl
SYS_finit_module = 313
# include/uapi/linux/mount.h
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8


def _check(result: int, what: str, path: str | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2)."""
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                       data.encode() or None), f"mount {fstype}", target)


def finit_module(path: str, params: str = "") -> bool:
    """Load a kernel module from a file with its parameters (`name=value` words, as modprobe would pass them:
    they are read once, at load); False if it was already loaded (EEXIST: then `params` were not applied)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syscall(SYS_finit_module, fd, params.encode(), 0) == 0:
            return True
        err = ctypes.get_errno()
        if err == 17:  # EEXIST
            return False
        raise OSError(err, f"finit_module: {os.strerror(err)}", path)
    finally:
        os.close(fd)


def sethostname(name: str) -> None:
    """sethostname(2) (socket.sethostname would import enum at boot)."""
    data = name.encode()
    _check(_libc.sethostname(data, ctypes.c_size_t(len(data))), "sethostname")


def mlockall() -> None:
    """mlockall(MCL_CURRENT | MCL_FUTURE) (include/uapi/asm-generic/mman-common.h)."""
    _check(_libc.mlockall(ctypes.c_int(1 | 2)), "mlockall")


def reboot(cmd: int) -> None:
    """reboot(2); only returns on failure."""
    _check(_libc.reboot(ctypes.c_int(cmd)), "reboot")


def ioctl(fd: int, request: int) -> int:
    """ioctl(2) with no argument (fcntl.ioctl would be one more module in the image)."""
    return _check(_libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), None), f"ioctl {request:#x}")
