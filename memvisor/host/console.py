"""The guest's serial console, read by memvisor and kept on disk as a bounded tail.

QEMU relays the console to one end of a socketpair (`-chardev socket,fd=N`); the sandbox's reader thread
(memvisor/host/session.py) reads the other and hands the bytes here. The file keeps the newest `limit` bytes:
once it holds twice that, it is cut back to the last `limit` (after a marker line saying how much was dropped),
so a guest that writes to its console without end costs at most 2 x limit of host disk.
"""

from __future__ import annotations

import os
from pathlib import Path


class ConsoleLog:
    """Append-only console file, trimmed to its newest `limit` bytes."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.dropped = 0  # bytes cut from the front so far
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        if self._fd < 0 or not data:
            return
        os.write(self._fd, data)
        self._size += len(data)
        if self._size > 2 * self.limit:
            self._trim()

    def _trim(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(max(0, self._size - self.limit))
            tail = f.read()
        self.dropped += self._size - len(tail)
        marker = f"[memvisor: {self.dropped} earlier console bytes dropped]\n".encode()
        os.ftruncate(self._fd, 0)
        os.write(self._fd, marker + tail)
        self._size = len(marker) + len(tail)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
