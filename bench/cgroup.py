"""A memory cgroup with a hard limit, for the density benchmark: cgroup v1 (this host) or v2.

The benchmark's daemon is moved into it before it starts any VMM, so every VMM it spawns is charged to it and
the kernel's own OOM killer enforces the budget, whatever memvisor believes.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


class MemoryCgroup:
    """Created on __init__, removed by close() (after its processes are gone)."""

    def __init__(self, name: str, limit_bytes: int) -> None:
        self.v2 = (V2 / "cgroup.controllers").exists() and "memory" in (V2 / "cgroup.controllers").read_text()
        base = V2 if self.v2 else V1
        if not self.v2 and not (V1 / "memory.limit_in_bytes").exists():
            raise SystemExit("no memory cgroup controller (v1 or v2) on this host")
        self.path = base / name
        self.path.mkdir(exist_ok=True)
        limit_file = "memory.max" if self.v2 else "memory.limit_in_bytes"
        (self.path / limit_file).write_text(str(limit_bytes))
        if self.v2:
            with contextlib.suppress(OSError):
                (self.path / "memory.swap.max").write_text("0")
        self.limit_bytes = limit_bytes

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def usage_bytes(self) -> int:
        name = "memory.current" if self.v2 else "memory.usage_in_bytes"
        return int((self.path / name).read_text())

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer ended in this cgroup."""
        name = "memory.events" if self.v2 else "memory.oom_control"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def close(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.5)
