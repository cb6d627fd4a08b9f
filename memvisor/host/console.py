"""The guest's serial console, read by memvisor and kept on disk as a bounded tail.

QEMU relays the console to one end of a socketpair (`-chardev socket,fd=N`); the sandbox's reader thread
(memvisor/host/session.py) reads the other and hands the bytes here. The file never holds more than `limit`
bytes: once a write would take it past that, it is cut back to its newest half (after a marker line saying how
much was dropped), so a guest that writes to its console without end costs at most `limit` of host disk.
"""

from __future__ import annotations

import os
from pathlib import Path

MARKER_ROOM = 80  # bytes kept free for the "earlier bytes dropped" line


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
        if len(data) > self.limit // 2:  # a chunk larger than half the log keeps only its end
            self.dropped += len(data) - self.limit // 2
            data = data[-(self.limit // 2):]
        if self._size + len(data) > self.limit:
            self._trim(self.limit // 2 - len(data))
        os.write(self._fd, data)
        self._size += len(data)

    def _trim(self, keep: int) -> None:
        """Cut the file to a marker line and its newest `keep` bytes (room for the write that follows)."""
        with open(self.path, "rb") as f:
            f.seek(max(0, self._size - max(0, keep - MARKER_ROOM)))
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
