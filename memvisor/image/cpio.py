"""A writer for the newc ("SVR4 with no CRC") cpio format the kernel unpacks as an initramfs.

Format: Documentation/driver-api/early-userspace/buffer-format.rst. Each entry is a 110-byte ASCII header
("070701" and 13 eight-digit hex fields), the NUL-terminated name padded to 4 bytes, then the data padded to 4
bytes; the archive ends with an entry named "TRAILER!!!". Entries are written with mtime 0 and sequential inode
numbers so the same inputs give the same bytes.
"""

from __future__ import annotations

import stat
from typing import BinaryIO

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Append entries to a newc archive; call `close()` (or use as a context manager) to write the trailer."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 0
        self._names: set[str] = set()

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()

    def _entry(self, name: str, mode: int, data: bytes = b"", *, uid: int = 0, gid: int = 0,
               rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/") or "."
        if name != TRAILER:
            if name in self._names:
                raise ValueError(f"duplicate cpio entry {name!r}")
            self._names.add(name)
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, uid, gid, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        chunk = header + encoded + _pad(len(header) + len(encoded)) + data + _pad(len(data))
        self._out.write(chunk)

    def add_dir(self, name: str, perm: int = 0o755, *, uid: int = 0, gid: int = 0) -> None:
        """A directory; parents must be added first (the kernel does not create them)."""
        self._entry(name, stat.S_IFDIR | perm, uid=uid, gid=gid)

    def add_file(self, name: str, data: bytes, perm: int = 0o644, *, uid: int = 0, gid: int = 0) -> None:
        """A regular file with the given contents."""
        self._entry(name, stat.S_IFREG | perm, data, uid=uid, gid=gid)

    def add_symlink(self, name: str, target: str) -> None:
        """A symbolic link; its data is the target path."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_device(self, name: str, *, char: bool, major: int, minor: int, perm: int = 0o600) -> None:
        """A character or block device node."""
        kind = stat.S_IFCHR if char else stat.S_IFBLK
        self._entry(name, kind | perm, rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer entry."""
        self._entry(TRAILER, 0)
        self._out.flush()
