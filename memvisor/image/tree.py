"""Where the image builder writes a filesystem tree: a newc cpio (an initramfs) or a directory (the input of
mkfs.erofs). Both take the same calls, so one layout function (image/build.py) writes either."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol


class TreeWriter(Protocol):
    def add_dir(self, name: str, perm: int = 0o755, *, uid: int = 0, gid: int = 0) -> None: ...

    def add_file(self, name: str, data: bytes, perm: int = 0o644, *, uid: int = 0, gid: int = 0) -> None: ...

    def add_symlink(self, name: str, target: str) -> None: ...

    def add_device(self, name: str, *, char: bool, major: int, minor: int, perm: int = 0o600) -> None: ...


class DirWriter:
    """Writes entries under `root` with their owners, modes and device numbers (needs root for those)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        rel = name.strip("/")
        if not rel or ".." in rel.split("/"):
            raise ValueError(f"bad tree entry {name!r}")
        return self.root / rel

    def add_dir(self, name: str, perm: int = 0o755, *, uid: int = 0, gid: int = 0) -> None:
        if name.strip("/") in ("", "."):  # the root itself (cpio writes it as ".")
            os.chown(self.root, uid, gid)
            self.root.chmod(perm)
            return
        path = self._path(name)
        path.mkdir()
        os.chown(path, uid, gid)
        path.chmod(perm)

    def add_file(self, name: str, data: bytes, perm: int = 0o644, *, uid: int = 0, gid: int = 0) -> None:
        path = self._path(name)
        with open(path, "xb") as f:
            f.write(data)
        os.chown(path, uid, gid)
        path.chmod(perm)

    def add_symlink(self, name: str, target: str) -> None:
        os.symlink(target, self._path(name))

    def add_device(self, name: str, *, char: bool, major: int, minor: int, perm: int = 0o600) -> None:
        kind = stat.S_IFCHR if char else stat.S_IFBLK
        os.mknod(self._path(name), kind | perm, os.makedev(major, minor))
