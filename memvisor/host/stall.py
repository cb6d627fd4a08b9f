"""What a stalled sandbox looked like: the guest kernel's own report of its blocked tasks, PID 1's dump, the
guest's last memory figures, and where the console log was kept.

Two layers, because a stalled guest may have no process able to run:
- the kernel: SysRq 9, w, m pressed on the guest's keyboard through QMP. The guest kernel prints its blocked
  tasks (with their stacks) and memory state from the keyboard interrupt, needing no guest process and no
  memory; the host then parses the blocked tasks out of the console log;
- PID 1: asked over the control channel (DUMP) for what only a process can read (D-state stacks, PSI, in-flight
  I/O, blk-mq queues, device-mapper status, reclaim counters); it answers DUMPED if it can run at all.

Everything read here is guest output: bounded, parsed defensively, never trusted for more than display.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memvisor import proto
from memvisor.errors import MemvisorError
from memvisor.host.vmm.qmp import QMP

log = logging.getLogger("memvisor")
DUMP_TIMEOUT_S = 30.0  # for PID 1's dump (a stalled TCG guest is slow, and PID 1 may never answer)
KERNEL_DUMP_TIMEOUT_S = 15.0  # for the kernel's SysRq reports to reach the console
SCAN_BYTES = 512 * 1024  # of the console's end searched for the kernel's blocked-task report
_TASK = re.compile(r"task:(?P<comm>\S.{0,15}?)\s+state:D\s.*?\bpid:\s*(?P<pid>\d+)")
_FRAME = re.compile(r"^\[[ \d.]+\]\s+(?P<fn>[A-Za-z_][\w.]*)\+0x")
# Frames that only say "it sleeps": the interesting one is the first frame below them.
_WAITING = ("schedule", "io_schedule", "__wait", "wait_for", "mutex_lock", "__mutex_lock", "rwsem", "down_",
            "__down", "bit_wait", "folio_wait", "out_of_line_wait", "__cond_resched", "preempt_schedule")


@dataclass
class Stall:
    """A timed-out sandbox's last state."""

    blocked: list[list[Any]]  # [pid, comm, "D", "where<caller"]: the guest kernel's report, else PID 1's
    dumped: bool  # PID 1 answered DUMP (its dump is in the console log)
    last_stats: dict[str, Any]  # the guest's last STATS body ({} if none arrived)
    console_log: str | None  # the kept console log (None if it could not be kept)
    console_tail: str

    def to_json(self) -> dict[str, Any]:
        return {"dumped": self.dumped, "blocked": self.blocked, "console_log": self.console_log,
                "meminfo": self.last_stats.get("meminfo", {}), "vmstat": self.last_stats.get("vmstat", {}),
                "swaps": self.last_stats.get("swaps", [])}


def kernel_dump(qmp_path: Path, console_log: Path, restore_level: int) -> bool:
    """Press SysRq 9 (console log level 9, so the reports show on a quiet console), w (blocked tasks), m
    (memory), then the digit of the level the guest booted with, and wait (at most KERNEL_DUMP_TIMEOUT_S) until
    the console shows that last key handled: the kernel handles the keys after QMP returns. False (and a
    warning) if QMP failed or the reports did not arrive."""
    try:
        start = console_log.stat().st_size
    except OSError:
        start = 0
    try:
        with QMP(qmp_path) as qmp:
            qmp.sysrq(f"9wm{restore_level}")
    except MemvisorError as exc:
        log.warning("could not ask the guest kernel for its blocked tasks: %s", exc)
        return False
    done = f"sysrq: Loglevel set to {restore_level}"
    deadline = time.monotonic() + KERNEL_DUMP_TIMEOUT_S
    while time.monotonic() < deadline:
        if done in read_end(console_log, start=start):
            return True
        time.sleep(0.2)
    log.warning("the guest kernel did not print its SysRq reports within %.0f s", KERNEL_DUMP_TIMEOUT_S)
    return False


def read_end(path: Path, size: int = SCAN_BYTES, start: int = 0) -> str:
    """The last `size` bytes of a console log past offset `start`, as text ('' if unreadable)."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(start, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def parse_blocked(console: str) -> list[list[Any]]:
    """The D-state tasks of the kernel's last "Show Blocked State" report in `console`, as
    [pid, comm, "D", "function<caller"] rows (at most proto.MAX_BLOCKED)."""
    start = console.rfind("sysrq: Show Blocked State")
    if start < 0:
        return []
    end = console.find("sysrq:", start + 10)
    rows: list[list[Any]] = []
    current: list[Any] | None = None
    frames: list[str] = []
    for line in console[start:end if end > 0 else None].splitlines():
        task = _TASK.search(line)
        if task:
            if current is not None:
                rows.append([*current, "<".join(frames)])
            current, frames = [int(task["pid"]), task["comm"].strip()[:32], "D"], []
            continue
        frame = _FRAME.match(line)
        if current is not None and frame and len(frames) < 2 and not frame["fn"].lstrip("_").startswith(
                tuple(w.lstrip("_") for w in _WAITING)):
            frames.append(frame["fn"][:30])
    if current is not None:
        rows.append([*current, "<".join(frames)])
    return rows[:proto.MAX_BLOCKED]
