"""The supervisor: keeps the daemon's sandboxes inside a host memory budget by moving guest RAM between them
with their balloons, about once a second.

Admission: a sandbox may start only if its floor still fits: the floors of the sandboxes already running plus
its own, and what each VMM costs beyond its guest's RAM, must not exceed the budget (HTTP 503 with the figures
otherwise). A newcomer starts at its maximum if the budget has room for it, otherwise at the room that is left
(never under its floor): it grows from there when it shows pressure, and the others give way.

Control, per sandbox, from what the guest pushes (MemAvailable, memory PSI) and the host (MemAvailable, memory
PSI, each VMM's RSS):
- a guest under memory pressure (PSI some avg10 >= PSI_HIGH %, or MemAvailable under LOW_AVAILABLE of its
  memory) gets memory back first: its balloon target grows by GROW of its memory, up to its maximum;
- a cold, idle guest (PSI under PSI_LOW, MemAvailable above IDLE_AVAILABLE) is squeezed toward its floor by
  SHRINK of its memory a tick (twice that while the host itself is short), never below the floor. As in Meta's
  Senpai, the squeeze goes on past the guest's free memory until the guest shows pressure: the balloon driver
  then reclaims, and the guest's own encrypted/authenticated swap and zram absorb its cold pages, so the host
  gets the memory back without ever seeing those pages;
- if the targets add up to more than the budget, or the VMMs' resident anonymous memory (measured on the host:
  the guest RAM they hold plus the VMM's own) does, the guests with the most spare memory give first.
The balloon is best effort: `deflate-on-oom` stays on as the guest's last resort. Every change is logged, kept
(target, reason, the last HISTORY decisions) and written to the sandbox's runtime directory for `memvisor
stats` and /metrics.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from memvisor.errors import MemvisorError
from memvisor.host import runtime
from memvisor.host.vmm.qmp import QMP

log = logging.getLogger("memvisor")
MIB = 1 << 20
INTERVAL_S = 1.0
PSI_HIGH = 10.0  # % of the last 10 s some guest task waited for memory: give memory back
PSI_LOW = 1.0  # below this (and with spare memory) a guest counts as idle
LOW_AVAILABLE = 0.03  # of its memory: under this MemAvailable a guest counts as pressed
IDLE_AVAILABLE = 0.05  # of its memory: above this MemAvailable an unpressed guest may give memory back
GROW = 0.25  # of its memory, per tick, for a pressed guest
SHRINK = 0.03  # of its memory, per tick, for an idle guest
MIN_STEP = 4 * MIB  # smaller changes are not worth a QMP call
HOST_SHORT = 0.10  # host MemAvailable under this share of MemTotal: squeeze idle guests twice as fast
HOST_PSI_HIGH = 5.0  # ... or host memory PSI some avg10 (%) at or above this
HISTORY = 20
ADMIT_WAIT_S = 60.0  # how long a create may wait for the squeeze to make room before it is refused
DEFAULT_OVERHEAD = 32 * MIB  # a VMM's own memory before any was measured (QEMU under KVM; TCG adds its cache)
SUPERVISOR_FILE = "supervisor.json"  # in the sandbox's runtime directory, read by `memvisor stats`


class AdmissionRefused(MemvisorError):
    """The new sandbox's floor does not fit the host budget (HTTP 503)."""


@dataclass
class Control:
    """The supervisor's state for one sandbox."""

    id: str
    max_bytes: int
    floor_bytes: int
    target_bytes: int
    reason: str = "started at its maximum"
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def to_json(self) -> dict[str, Any]:
        return {"target_bytes": self.target_bytes, "floor_bytes": self.floor_bytes, "max_bytes": self.max_bytes,
                "reason": self.reason, "history": list(self.history)}


class Supervisor:
    """One control loop for every sandbox of the daemon."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.controls: dict[str, Control] = {}
        self._sandboxes: dict[str, Any] = {}  # id -> Instance
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified after every tick (admission waits on it)
        self._waiting = 0  # creates waiting for room: idle guests are squeezed as if the host were short
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memvisor-supervisor", daemon=True)
        self._thread.start()

    # -- admission -------------------------------------------------------------------------------------------
    def admit(self, sandbox_id: str, max_mib: int, floor_mib: int, wait_s: float = ADMIT_WAIT_S) -> None:
        """Reserve the floor of a sandbox about to boot, plus what a VMM costs beyond its guest's RAM, or raise
        AdmissionRefused. The balloon cannot take the VMM's own memory (QEMU, and under TCG its translation
        cache, up to qemu.TCG_TB_MIB): that cost is measured on the running VMMs (RSS minus the guest RAM they
        hold), so a sandbox that would only fit by being squeezed below its floor is refused instead of
        OOM-killed later.

        The floors are a promise; what the VMMs hold now is a fact. If the floors fit but the resident memory
        leaves no room for the newcomer's floor, admission waits up to `wait_s` while the control loop squeezes
        idle guests harder, and refuses if it still does not fit: a host that is still making room says so
        (HTTP 503) instead of letting the kernel OOM-kill a VMM."""
        deadline = time.monotonic() + wait_s
        with self._changed:
            reserved = sum(c.floor_bytes for c in self.controls.values())
            overhead = self._overhead()
            need = reserved + floor_mib * MIB + overhead * (len(self.controls) + 1)
            if need > self.budget_bytes:
                raise AdmissionRefused(
                    f"no room for a sandbox with a {floor_mib} MiB floor: the {len(self.controls)} running "
                    f"sandbox(es) reserve {reserved // MIB} MiB of the {self.budget_bytes // MIB} MiB budget, and "
                    f"each VMM costs ~{overhead // MIB} MiB beyond its guest's RAM",
                    hint="stop a sandbox, lower --memory-floor, or raise memvisor serve --budget")
            self._waiting += 1
            try:
                while (room := self.budget_bytes - self._held() - overhead) < floor_mib * MIB:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise AdmissionRefused(
                            f"no room now for a sandbox with a {floor_mib} MiB floor: the running sandboxes hold "
                            f"{self._held() // MIB} MiB of the {self.budget_bytes // MIB} MiB budget and the "
                            f"supervisor could not squeeze enough out of idle guests within {wait_s:g} s",
                            hint="retry later, stop a sandbox, or raise memvisor serve --budget")
                    self._changed.wait(min(left, INTERVAL_S))
            finally:
                self._waiting -= 1
            start = max(floor_mib * MIB, min(max_mib * MIB, room))
            reason = "started at its maximum" if start == max_mib * MIB else \
                f"started at the {start // MIB} MiB left in the budget"
            self.controls[sandbox_id] = Control(sandbox_id, max_mib * MIB, floor_mib * MIB, start, reason)

    def _held(self) -> int:
        """What the sandboxes hold now: each running VMM's measured memory, and for one still booting its
        starting target plus a VMM's overhead; or, if more, what the daemon's memory cgroup is charged (page
        cache, page tables, socket buffers and the daemon itself count there too, and that is the figure the
        kernel OOM-kills by). Called with the lock held."""
        overhead = self._overhead()
        booting = [c for i, c in self.controls.items() if i not in self._sandboxes]
        vmms = sum(_rss(vm) for vm in self._sandboxes.values())
        return max(vmms, cgroup_usage() or 0) + sum(c.target_bytes + overhead for c in booting)

    def _overhead(self) -> int:
        """The largest measured VMM overhead (RSS minus guest-RAM RSS) among running sandboxes; the default
        guess while none runs. Called with the lock held."""
        measured = [_rss(vm) - (_guest_rss(vm) or 0) for vm in self._sandboxes.values()]
        return max([DEFAULT_OVERHEAD, *[m for m in measured if m > 0]]) if measured else DEFAULT_OVERHEAD

    def attach(self, sandbox_id: str, vm: Any) -> None:
        """Start steering a sandbox whose agent is up (its balloon driver is loaded): a sandbox admitted below
        its maximum gets that target now."""
        with self._lock:
            self._sandboxes[sandbox_id] = vm
            control = self.controls.get(sandbox_id)
        if control is not None and control.target_bytes < control.max_bytes:
            start = control.target_bytes
            control.target_bytes = control.max_bytes  # what the guest has until the balloon takes the rest
            self._apply(control, vm, start, control.reason)

    def release(self, sandbox_id: str) -> None:
        with self._lock:
            self.controls.pop(sandbox_id, None)
            self._sandboxes.pop(sandbox_id, None)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"budget_bytes": self.budget_bytes,
                    "reserved_bytes": sum(c.floor_bytes for c in self.controls.values()),
                    "targets_bytes": sum(c.target_bytes for c in self.controls.values())}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    # -- control ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            try:
                self.tick()
            except Exception:  # the loop must outlive any one bad tick
                log.exception("supervisor tick failed")

    def tick(self) -> None:
        """One round of decisions."""
        with self._lock:
            work = [(self.controls[i], vm) for i, vm in self._sandboxes.items() if i in self.controls]
        host = psutil.virtual_memory()
        host_short = host.available < HOST_SHORT * host.total or host_pressure() >= HOST_PSI_HIGH \
            or self._waiting > 0
        wanted = {c.id: self._want(c, vm.last_stats, host_short) for c, vm in work}
        with self._lock:
            overhead = self._overhead()
        # Both must fit: the targets with each VMM's own cost on top, and what the VMMs hold now.
        committed = sum(t for t, _ in wanted.values()) + overhead * len(work)
        over = max(committed, sum(_rss(vm) for _, vm in work), cgroup_usage() or 0) - self.budget_bytes
        if over > 0:  # the guests with the most spare memory give first
            for c, _vm in sorted(work, key=lambda w: -_available(w[1].last_stats)):
                target, _ = wanted[c.id]
                give = min(over, target - c.floor_bytes)
                if give > 0:
                    wanted[c.id] = (target - give, f"over the {self.budget_bytes // MIB} MiB budget")
                    over -= give
        for c, vm in work:
            target, reason = wanted[c.id]
            if abs(target - c.target_bytes) >= MIN_STEP:
                self._apply(c, vm, target, reason)
        with self._changed:
            self._changed.notify_all()

    def _want(self, c: Control, stats: dict[str, Any], host_short: bool) -> tuple[int, str]:
        if not stats:
            return c.target_bytes, c.reason
        available = _available(stats)
        raw_psi = (stats.get("psi") or {}).get("some_avg10", 0.0)
        psi = float(raw_psi) if isinstance(raw_psi, int | float) and 0 <= raw_psi <= 100 else 0.0
        if psi >= PSI_HIGH or available < LOW_AVAILABLE * c.max_bytes:
            grown = min(c.max_bytes, c.target_bytes + int(GROW * c.max_bytes))
            return grown, f"guest memory pressure (PSI some {psi:.1f}%, MemAvailable {available // MIB} MiB)"
        if psi < PSI_LOW and available > IDLE_AVAILABLE * c.max_bytes:
            step = SHRINK * c.max_bytes * (2 if host_short else 1)
            shrunk = max(c.floor_bytes, c.target_bytes - int(step))
            why = "idle" + (", host short of memory or a sandbox waiting for room" if host_short else "")
            return shrunk, f"{why} (PSI some {psi:.1f}%, MemAvailable {available // MIB} MiB)"
        return c.target_bytes, c.reason

    def _apply(self, c: Control, vm: Any, target: int, reason: str) -> None:
        try:
            with QMP(vm.qmp_path) as qmp:
                qmp.execute("balloon", {"value": target}, timeout=2.0)
        except MemvisorError as exc:
            log.warning("sandbox %s: balloon to %d MiB failed: %s", c.id, target // MIB, exc)
            return
        log.info("sandbox %s: balloon target %d -> %d MiB: %s", c.id, c.target_bytes // MIB, target // MIB, reason)
        c.history.append({"time": round(time.time(), 1), "from_bytes": c.target_bytes, "to_bytes": target,
                          "reason": reason})
        c.target_bytes, c.reason = target, reason
        if vm.dir is not None:
            runtime.write_json(Path(vm.dir) / SUPERVISOR_FILE, c.to_json())


def cgroup_usage(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The working set of this process's memory cgroup, if it is in one with a limit: what it is charged (v2:
    memory.current under a memory.max that is not "max"; v1: memory.usage_in_bytes under a real limit) less
    its inactive file pages."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and os.path.exists(f"{root}/cgroup.controllers"):  # v2
            base = f"{root}{path}"
            limit, usage = _read(f"{base}/memory.max"), _read(f"{base}/memory.current")
            if limit and limit != "max" and usage:
                return int(usage) - _stat(f"{base}/memory.stat", "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            base = f"{root}/memory{path}"
            limit, usage = _read(f"{base}/memory.limit_in_bytes"), _read(f"{base}/memory.usage_in_bytes")
            if limit and usage and int(limit) < 1 << 60:
                return int(usage) - _stat(f"{base}/memory.stat", "total_inactive_file")
    return None


def _stat(path: str, key: str) -> int:
    """One figure of a cgroup's memory.stat (0 if absent): inactive file pages are left out of what the
    sandboxes hold, since the kernel reclaims them before it OOM-kills anyone (the working set, as kubelet
    counts it)."""
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.isdigit():
            return int(value)
    return 0


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


def host_pressure(path: str = "/proc/pressure/memory") -> float:
    """The host's memory PSI: % of the last 10 s in which some task waited for memory (0 if unavailable)."""
    try:
        with open(path) as f:
            return float(f.readline().split()[1].partition("=")[2])
    except (OSError, ValueError, IndexError):
        return 0.0


def _rss(vm: Any) -> int:
    """The VMM's resident memory that is its own: anonymous (guest RAM, QEMU's heap, TCG's translation cache)
    plus shared memory (guest RAM when memctl backs it with a memfd), as the host measures it (0 if it
    cannot). File pages (the kernel and initramfs images) are left out: every VMM maps the same ones, and the
    host holds them once."""
    process = getattr(vm, "process", None)
    if process is None:
        return 0
    try:
        with open(f"/proc/{process.pid}/status") as f:
            kib = sum(int(x.split()[1]) for x in f if x.startswith(("RssAnon:", "RssShmem:")))
        return kib * 1024
    except (OSError, ValueError, IndexError):
        return 0


def _guest_rss(vm: Any) -> int | None:
    process = getattr(vm, "process", None)
    if process is None:
        return None
    from memvisor.host import stats

    return stats.guest_ram_rss(process.pid, vm.policy.memory_mib)


def _available(stats: dict[str, Any]) -> int:
    value = (stats.get("meminfo") or {}).get("MemAvailable", 0)
    return int(value) * 1024 if isinstance(value, int) and value >= 0 else 0


def parse_budget(text: str) -> int:
    """`--budget 4096` (MiB) or `--budget 60%` (of host MemTotal), in bytes."""
    total = psutil.virtual_memory().total
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100:
                raise ValueError
            return int(total * share / 100)
        mib = int(text)
        if mib <= 0:
            raise ValueError
        return mib * MIB
    except ValueError:
        raise MemvisorError(f"--budget {text!r} is not a size", hint="give MiB (e.g. 4096) or a share of host "
                            f"memory (e.g. 60%); this host has {total // MIB} MiB") from None
