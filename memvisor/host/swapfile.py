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


def create_unnamed(directory: Path, size_mib: int, what: str = "swap file") -> int:
    """A sparse file of `size_mib` MiB, mode 0600, with no name (O_TMPFILE in `directory`): returns its O_RDWR fd.
    Nothing is left on disk if memvisor dies, yet a park can still give it a name (keep()), which a file that
    was created and then unlinked could never get again."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise MemvisorError(f"cannot create {what} in {directory}: {exc.strerror}",
                            hint="the runtime directory's filesystem must support O_TMPFILE (ext4, xfs, btrfs, "
                                 "tmpfs do)") from None
    try:
        os.ftruncate(fd, size_mib * 2**20)
    except OSError as exc:
        os.close(fd)
        raise MemvisorError(f"cannot size {what} in {directory} to {size_mib} MiB: {exc.strerror}",
                            hint="check free space and file size limits of that filesystem") from None
    return fd


def keep(fd: int, path: Path) -> None:
    """Give the open file `fd` the name `path` (a parked sandbox's disk): a hard link when it has no name yet and
    `path` is on the same filesystem, else a sparse copy of its data; nothing if `path` already is that file.
    Raises OSError (ENOSPC, ...) with a partial copy removed."""
    if path.exists() and os.path.samestat(os.fstat(fd), path.stat()):
        return
    # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N names an O_TMPFILE file. Python calls link(2), which does not
    # follow the magic link (and fails with EXDEV), unless a dir fd is given: it is, so Python calls linkat(2).
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=directory, follow_symlinks=True)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOENT, errno.EPERM):
            raise
    finally:
        os.close(directory)
    copy_sparse(fd, path)


def copy_sparse(fd: int, path: Path) -> None:
    """Copy the data of `fd` to a new file `path` (mode 0600), holes kept as holes."""
    size = os.fstat(fd).st_size
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data past offset
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            while start < end:
                done = _copy_range(fd, out, start, end - start)
                if done == 0:
                    break
                start += done
            offset = end
        os.ftruncate(out, size)
        os.fsync(out)
    except BaseException:
        os.close(out)
        path.unlink(missing_ok=True)
        raise
    os.close(out)


def _copy_range(src: int, dst: int, offset: int, count: int) -> int:
    """Copy up to `count` bytes at `offset` of `src` to the same offset of `dst`: copy_file_range(2), which the
    kernel refuses across filesystems (EXDEV: a state directory on another one), else sendfile(2)."""
    try:
        return os.copy_file_range(src, dst, count, offset, offset)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    os.lseek(dst, offset, os.SEEK_SET)
    return os.sendfile(dst, src, offset, min(count, 1 << 30))


def supports_direct_io(path: Path | str) -> bool:
    """Whether the file's filesystem accepts O_DIRECT (tmpfs does not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True
