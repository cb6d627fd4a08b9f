"""The stall dump: what PID 1 writes to the console when the host asks (DUMP), so a wedged guest can be read.

The host has already had the kernel print its blocked tasks and memory state (SysRq w and m, pressed on the
guest's keyboard through QMP: that needs no guest process). PID 1 adds what the kernel does not print by itself:
the stack and wait channel of every task in uninterruptible sleep (and of kswapd, which loops in S/R), pressure
stall figures, each block device's in-flight requests and, where debugfs has them, its blk-mq queues, the
device-mapper targets' status, and the memory and reclaim counters.

It must work in a guest that is out of memory: it streams each file through one small read straight to the
console instead of building the dump in memory, and it never waits on anything but reads of /proc and /sys.
Imported only when a dump is asked for (never at boot). Guest only, stdlib only.
"""

from __future__ import annotations

import os

from memvisor import proto

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CONSOLE_FD = 1  # PID 1's stdout is the console
DEBUGFS = "/sys/kernel/debug"
VMSTAT_KEYS = ("nr_free_pages", "nr_writeback", "nr_dirty", "nr_isolated_anon", "nr_anon_pages", "pswpin",
               "pswpout", "pgscan_kswapd", "pgscan_direct", "pgsteal_kswapd", "pgsteal_direct", "allocstall_normal",
               "allocstall_movable", "compact_stall", "oom_kill", "workingset_refault_anon", "pgmajfault")
READ_LIMIT = 32 * 1024  # bytes per file: a stack or a status line is far smaller
ALWAYS_STACKS = ("kswapd", "kcompactd")  # reclaim threads: their stacks matter even when they are not in D


def _out(text: str) -> int:
    data = text.encode(errors="replace")
    view = memoryview(data)
    while view:
        view = view[os.write(CONSOLE_FD, view):]
    return len(data)


def _read(path: str) -> str:
    """At most READ_LIMIT bytes of a /proc or /sys file, or the error as text."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return f"<{exc.strerror}>"
    try:
        return os.read(fd, READ_LIMIT).decode(errors="replace")
    except OSError as exc:
        return f"<{exc.strerror}>"
    finally:
        os.close(fd)


def _section(title: str) -> int:
    return _out(f"--- {title} ---\n")


def tasks() -> list[tuple[int, str, str]]:
    """(pid, comm, state letter) of every task, from /proc/PID/stat (threads of PID 1's children included)."""
    rows = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        for tid in _thread_ids(int(name)):
            stat = _read(f"/proc/{name}/task/{tid}/stat")
            open_, close = stat.find("("), stat.rfind(")")
            if open_ < 0 or close < 0:
                continue
            rows.append((tid, stat[open_ + 1:close], stat[close + 2:close + 3]))
    return rows


def _thread_ids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task") if t.isdigit()]
    except OSError:
        return []


def _stacks(rows: list[tuple[int, str, str]]) -> tuple[int, list[list[Any]]]:
    written = _section("tasks in uninterruptible sleep (D), and reclaim threads: /proc/PID/stack")
    blocked: list[list[Any]] = []
    for pid, comm, state in rows:
        if state != "D" and not comm.startswith(ALWAYS_STACKS):
            continue
        wchan = _read(f"/proc/{pid}/wchan").strip()[:64]
        if state == "D" and len(blocked) < proto.MAX_BLOCKED:
            blocked.append([pid, comm[:64], state, wchan])
        written += _out(f"{pid} ({comm}) state {state} wchan {wchan}\n{_read(f'/proc/{pid}/stack')}")
    if not blocked:
        written += _out("no task in D state\n")
    return written, blocked


def _files(title: str, paths: list[str]) -> int:
    written = _section(title)
    for path in paths:
        written += _out(f"{path}: {_read(path).strip()}\n")
    return written


def _block_queues() -> int:
    """In-flight counts of every disk and, from debugfs (mounted here if needed), its blk-mq queue state."""
    disks = sorted(os.listdir("/sys/block"))
    written = _files("block devices: in flight (reads writes)", [f"/sys/block/{d}/inflight" for d in disks])
    if not os.path.isdir(f"{DEBUGFS}/block"):
        try:
            from memvisor.guest import linux

            linux.mount("debugfs", DEBUGFS, "debugfs")
        except OSError as exc:
            return written + _out(f"debugfs not mounted: {exc.strerror}\n")
    written += _section("blk-mq queues (debugfs)")
    for disk in disks:
        base = f"{DEBUGFS}/block/{disk}"
        for hctx in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            if not hctx.startswith("hctx"):
                continue
            for leaf in ("state", "busy", "dispatch"):
                text = _read(f"{base}/{hctx}/{leaf}").strip()
                if text:
                    written += _out(f"{disk}/{hctx}/{leaf}: {text}\n")
    return written


def _device_mapper() -> int:
    names = []
    for disk in sorted(os.listdir("/sys/block")):
        if disk.startswith("dm-"):
            names.append(_read(f"/sys/block/{disk}/dm/name").strip())
    if not names:
        return 0
    written = _section("device-mapper status")
    from memvisor.guest import dm

    try:
        ctl = dm.DeviceMapper()
    except OSError as exc:
        return written + _out(f"<{exc.strerror}>\n")
    try:
        for name in names:
            try:
                for start, length, type_, status in ctl.table(name, status=True):
                    written += _out(f"{name}: {start} {length} {type_} {status}\n")
            except OSError as exc:
                written += _out(f"{name}: <{exc.strerror}>\n")
    finally:
        ctl.close()
    return written


def _counters() -> int:
    written = _files("memory", ["/proc/meminfo"])
    wanted = []
    for line in _read("/proc/vmstat").splitlines():
        if line.split(" ", 1)[0] in VMSTAT_KEYS:
            wanted.append(line)
    written += _out("vmstat: " + ", ".join(wanted) + "\n")
    return written + _files("swap", ["/proc/swaps"])


def dump(reason: str, uptime: float) -> dict[str, Any]:
    """Write the whole dump to the console; return the DUMPED body (a bounded summary for the host)."""
    written = _out(f"=== memvisor diagnostic dump at {uptime:.3f} s: {reason[:200]} ===\n")
    more, blocked = _stacks(tasks())
    written += more
    written += _files("pressure stall information", [f"/proc/pressure/{r}" for r in ("cpu", "memory", "io")])
    written += _block_queues()
    written += _device_mapper()
    written += _counters()
    written += _out("=== end of memvisor diagnostic dump ===\n")
    return {"uptime": uptime, "blocked": blocked, "bytes": written}
