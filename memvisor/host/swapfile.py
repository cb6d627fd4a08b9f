"""The host side of guest swap: one sparse file per sandbox, mode 0600, in its runtime directory.

The file is never read or written by memvisor: the guest formats what it needs (and for encrypted and
authenticated modes, only ciphertext ever reaches it). QEMU opens it with O_DIRECT (cache=none) so swapped-out
guest pages do not sit in the host page cache, which would give back the memory swap was meant to free; on a
filesystem without O_DIRECT (tmpfs) it falls back to the page cache, with a warning.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from memvisor.errors import MemvisorError


def create(path: Path, size_mib: int, what: str = "swap file") -> None:
    """Create a sparse file of `size_mib` MiB with mode 0600 (fails if it exists)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise MemvisorError(f"cannot create {what} {path}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, size_mib * 2**20)
    except OSError as exc:
        raise MemvisorError(f"cannot size {what} {path} to {size_mib} MiB: {exc.strerror}",
                            hint="check free space and file size limits of that filesystem") from None
    finally:
        os.close(fd)


def supports_direct_io(path: Path) -> bool:
    """Whether the file's filesystem accepts O_DIRECT (tmpfs does not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True
