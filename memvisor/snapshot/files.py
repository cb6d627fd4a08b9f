"""Files of memvisor's own that must not be trusted as found: checked on their descriptor, written durably.

Every file the parked state keeps (the key file, the ledger and its head, manifests, kept disks) is opened without
following a symlink and checked on the open descriptor (type, owner, mode, links, size), so nothing can be swapped
in between a check and a use; every write is a temp file, fsync, rename, fsync of the directory. This module owns
those moves and nothing else: it knows no key, no ledger, no manifest.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memvisor.errors import MemvisorError

log = logging.getLogger("memvisor")
_TMP = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")  # write_temp's names: .<name>.<16 hex>.tmp


class StateError(MemvisorError):
    """The state directory or a file in it is not what memvisor wrote: wrong owner or mode, malformed, not
    authentic, or not fresh."""


def own_dir(path: Path, what: str, hint: str) -> bool:
    """True if `path` is a real directory owned by this user with mode exactly 0700, False if it does not exist;
    StateError otherwise (never trust what another user could have planted or read)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StateError(f"cannot use {what} {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700:
        raise StateError(f"{what} {path} is not memvisor's own (owner uid {st.st_uid}, mode "
                         f"{stat.filemode(st.st_mode)}): refusing to trust what is in it", hint=hint)
    return True


def make_dir(path: Path) -> bool:
    """mkdir `path` with mode exactly 0700 (whatever the umask); True if this call created it."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return False
    os.chmod(path, 0o700)
    return True


def fsync_dir(path: Path) -> None:
    """Make the directory entries of `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(path: Path, data: bytes | bytearray, mode: int) -> Path:
    """A new, fsynced temp file next to `path` holding `data` with exactly `mode`; removed if anything fails."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # exactly `mode`: the umask must not loosen or tighten it
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def write_atomic(path: Path, data: bytes | bytearray, mode: int = 0o600) -> None:
    """Replace `path` with `data` so a reader (or a crash) sees the old file or the new one, never a mix: a temp
    file in the same directory, fsync, rename over `path`, fsync the directory."""
    tmp = write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, doc: object) -> None:
    """write_atomic() of `doc` as indented JSON (mode 0600)."""
    write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def open_nofollow(path: Path | str, flags: int, what: str, dir_fd: int | None = None) -> int:
    """os.open without following a symlink at the last component (O_NOFOLLOW) or blocking on a FIFO;
    FileNotFoundError passes through, anything else is a StateError naming `what` and why."""
    try:
        return os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise StateError(f"cannot open {what}: {why}") from None


def check_fd(fd: int, what: str, modes: tuple[int, ...] | None = None, links: int | None = None,
             size: int | None = None, max_size: int | None = None) -> os.stat_result:
    """Check open file `fd`: a regular file of this user's, and (when given) with one of `modes`, exactly `links`
    hard links, exactly `size` bytes or at most `max_size`. StateError names `what` and the check that failed."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise StateError(f"{what} is not a regular file ({stat.filemode(st.st_mode)})")
    if st.st_uid != os.geteuid():
        raise StateError(f"{what} is not memvisor's own: its owner is uid {st.st_uid}, not {os.geteuid()}")
    if modes is not None and stat.S_IMODE(st.st_mode) not in modes:
        wanted = " or ".join(f"{m:04o}" for m in modes)
        raise StateError(f"{what} has mode {stat.S_IMODE(st.st_mode):04o}, not {wanted}: it may have been read or "
                         "written by others")
    if links is not None and st.st_nlink != links:
        raise StateError(f"{what} has {st.st_nlink} hard links, not {links}: another name reaches the same file")
    if size is not None and st.st_size != size:
        raise StateError(f"{what} is {st.st_size} bytes, not the {size} recorded")
    if max_size is not None and st.st_size > max_size:
        raise StateError(f"{what} is over {max_size} bytes: it is not one memvisor wrote")
    return st


def read_own(path: Path, limit: int, what: str | None = None, modes: tuple[int, ...] | None = None,
             dir_fd: int | None = None) -> tuple[bytes, os.stat_result]:
    """The contents of regular file `path`, which must be this user's own, at most `limit` bytes and (when given)
    of one of `modes`, checked on the open file so it cannot be swapped in between; FileNotFoundError passes
    through."""
    label = what or str(path)
    fd = open_nofollow(path, os.O_RDONLY, label, dir_fd=dir_fd)
    with open(fd, "rb") as f:
        st = check_fd(fd, label, modes=modes, max_size=limit)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise StateError(f"{label} is over {limit} bytes: it is not one memvisor wrote")
    return data, st


def parse_json(data: bytes, source: Path | str) -> Any:
    """json.loads, with a StateError naming `source` for anything that is not JSON."""
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StateError(f"{source} is not valid JSON: {exc}") from None


def canonical(doc: object) -> bytes:
    """The one serialization of an authenticated document (manifest, ledger, head): sorted keys, no spaces,
    ASCII only, no NaN, one newline. A file is authentic only if its bytes are exactly this of what they parse to,
    so there is nothing outside the MAC to vary (duplicate keys, spacing, escapes)."""
    return (json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
            + "\n").encode()


def allocated(st: os.stat_result) -> int:
    """What a file holds on disk: its allocated blocks (a sparse file's holes take none)."""
    return st.st_blocks * 512


def is_temp(name: str) -> bool:
    """Whether `name` is one of write_temp's temp files."""
    return bool(_TMP.fullmatch(name))


def remove_temp(path: Path, min_age_s: float) -> bool:
    """Unlink a leftover temp file of this user's at least `min_age_s` old (a younger one may be another process's
    write in progress); True if removed."""
    try:
        st = os.lstat(path)
        if st.st_uid != os.geteuid() or time.time() - st.st_mtime < min_age_s:
            return False
        path.unlink()
    except OSError:
        return False
    return True


def remove_tree(folder: Path) -> bool:
    """rmtree `folder` if it is a real directory (never a symlink) of this user's; True if removed."""
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        log.warning("not removing %s: not a directory owned by uid %d", folder, os.geteuid())
        return False
    try:
        shutil.rmtree(folder)  # fd-based on Linux: does not follow symlinks inside it
    except OSError as exc:
        log.warning("could not remove %s: %s", folder, exc)
        return False
    fsync_dir(folder.parent)
    return True


@contextlib.contextmanager
def locked(path: Path, how: int = fcntl.LOCK_EX) -> Iterator[int]:
    """Hold flock `how` on `path` (created 0600 if missing; released when the fd closes, also if we are killed);
    yields the fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, how)
        yield fd
    finally:
        os.close(fd)


def zero(buffer: bytearray | None) -> None:
    """Overwrite `buffer` with zeros in place (key bytes, plaintext: as far as Python lets a program forget)."""
    if buffer:
        buffer[:] = bytes(len(buffer))
