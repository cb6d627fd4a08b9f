"""The supervisor: keeps the daemon's sandboxes inside a host memory budget by moving guest RAM between them
with their balloons, about once a second, and never squeezes a guest below what it needs.

Admission: a sandbox may start only if its floor still fits: the floors of the sandboxes already running plus
its own, and what each VMM costs beyond its guest's RAM, must not exceed the budget (HTTP 503 with the figures
otherwise). A floor is the policy's explicit one or what the guest needs (service/need.py: what it cannot give
back plus a margin; estimated from the policy until the guest reports), whichever is more. A newcomer starts at
its maximum if the budget has room for it, otherwise at the room that is left (never under its floor).

Control, per sandbox, from what the guest pushes (MemAvailable, memory stall, what it cannot reclaim), what the
balloon says (QMP query-balloon) and the host (MemAvailable, memory PSI, each VMM's RSS): the control law is
service/control.py (pressure gets memory back within a tick, idle guests are squeezed ever more gently toward
their floor, hysteresis, a backoff after the guest deflated its balloon on OOM). If the targets add up to more
than the budget, or the VMMs' resident memory does, the guests with the most spare memory give first, never
below their floors. The balloon runs with deflate-on-oom, so a guest squeezed too far takes memory back rather
than kill (or, with nothing it may kill, panic). Every change is logged, kept (target, reason, the last
decisions) and written to the sandbox's runtime directory for `memvisor stats` and /metrics.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from memvisor.errors import MemvisorError
from memvisor.host import runtime
from memvisor.host.vmm.qmp import QMP
from memvisor.service import need
from memvisor.service.control import HOLD_S, Control, Figures, decide, over_budget

log = logging.getLogger("memvisor")
MIB = 1 << 20
INTERVAL_S = 1.0
HOST_SHORT = 0.10  # host MemAvailable under this share of MemTotal: squeeze idle guests twice as fast
HOST_PSI_HIGH = 5.0  # ... or host memory PSI some avg10 (%) at or above this
ADMIT_WAIT_S = 60.0  # how long a create may wait for the squeeze to make room before it is refused
DEFAULT_OVERHEAD = 32 * MIB  # a VMM's own memory before any was measured (QEMU under KVM; TCG adds its cache)
SUPERVISOR_FILE = "supervisor.json"  # in the sandbox's runtime directory, read by `memvisor stats`


class AdmissionRefused(MemvisorError):
    """The new sandbox's floor does not fit the host budget (HTTP 503)."""


class Supervisor:
    """One control loop for every sandbox of the daemon."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.controls: dict[str, Control] = {}
        self._sandboxes: dict[str, Any] = {}  # id -> Instance, steered through its balloon
        self._measured: dict[str, Any] = {}  # id -> Instance without a balloon (a clone): counted, never steered
        # The bytes of shared memory the daemon holds for its sandboxes once, whoever maps it: the templates' RAM
        # (service/templates.py). A clone's VMM counts only its own pages (_rss); this counts the template's.
        self.shared_bytes: Callable[[], int] = lambda: 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified after every tick (admission waits on it)
        self._waiting = 0  # creates waiting for room: idle guests are squeezed as if the host were short
        self._asked: dict[str, float] = {}  # when each sandbox's balloon was last asked for its size
        self._stop = threading.Event()
        self._report = threading.Event()  # a guest sent new figures: decide now, not at the next interval
        self._thread = threading.Thread(target=self._loop, name="memvisor-supervisor", daemon=True)
        self._thread.start()

    # -- admission -------------------------------------------------------------------------------------------
    def admit(self, sandbox_id: str, max_bytes: int, policy_floor_bytes: int, need_bytes: int,
              wait_s: float = ADMIT_WAIT_S) -> None:
        """Reserve the floor of a sandbox about to boot (its policy's floor or what it needs to boot, whichever is
        more), plus what a VMM costs beyond its guest's RAM, or raise AdmissionRefused. The balloon cannot take
        the VMM's own memory (QEMU, and under TCG its translation cache, up to qemu.TCG_TB_MIB): that cost is
        measured on the running VMMs (RSS minus the guest RAM they hold), so a sandbox that would only fit by
        being squeezed below its floor is refused instead of OOM-killed later.

        The floors are a promise; what the VMMs hold now is a fact. If the floors fit but the resident memory
        leaves no room for the newcomer's floor, admission waits up to `wait_s` while the control loop squeezes
        idle guests harder, and refuses if it still does not fit: a host that is still making room says so
        (HTTP 503) instead of letting the kernel OOM-kill a VMM."""
        deadline = time.monotonic() + wait_s
        control = Control(sandbox_id, max_bytes, policy_floor_bytes, need_bytes, max_bytes)
        floor = control.floor_bytes
        with self._changed:
            reserved = sum(c.floor_bytes for c in self.controls.values())
            overhead = self._overhead()
            if reserved + floor + overhead * (len(self.controls) + 1) > self.budget_bytes:
                raise AdmissionRefused(
                    f"no room for a sandbox with a {floor // MIB} MiB floor: the {len(self.controls)} running "
                    f"sandbox(es) reserve {reserved // MIB} MiB of the {self.budget_bytes // MIB} MiB budget, and "
                    f"each VMM costs ~{overhead // MIB} MiB beyond its guest's RAM",
                    hint="stop a sandbox, give it less --memory, or raise memvisor serve --budget")
            self._waiting += 1
            try:
                while (room := self.budget_bytes - self._held() - overhead) < floor:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise AdmissionRefused(
                            f"no room now for a sandbox with a {floor // MIB} MiB floor: the running sandboxes "
                            f"hold {self._held() // MIB} MiB of the {self.budget_bytes // MIB} MiB budget and the "
                            f"supervisor could not squeeze enough out of idle guests within {wait_s:g} s",
                            hint="retry later, stop a sandbox, or raise memvisor serve --budget")
                    self._changed.wait(min(left, INTERVAL_S))
            finally:
                self._waiting -= 1
            control.target_bytes = max(floor, min(max_bytes, room))
            if control.target_bytes < max_bytes:
                control.reason = f"started at the {control.target_bytes // MIB} MiB left in the budget"
            self.controls[sandbox_id] = control

    def _held(self) -> int:
        """What the sandboxes hold now: each running VMM's measured memory, and for one still booting its
        starting target plus a VMM's overhead; or, if more, what the daemon's memory cgroup is charged (page
        cache, page tables, socket buffers and the daemon itself count there too, and that is the figure the
        kernel OOM-kills by). Called with the lock held."""
        overhead = self._overhead()
        booting = [c for i, c in self.controls.items() if i not in self._sandboxes and i not in self._measured]
        vmms = sum(_rss(vm) for vm in (*self._sandboxes.values(), *self._measured.values())) + self.shared_bytes()
        return max(vmms, cgroup_usage() or 0) + sum(c.target_bytes + overhead for c in booting)

    def _overhead(self) -> int:
        """The largest measured VMM overhead (RSS minus guest-RAM RSS) among running sandboxes; the default
        guess while none runs. Called with the lock held."""
        measured = [_rss(vm) - (_guest_rss(vm) or 0) for vm in self._sandboxes.values()]
        return max([DEFAULT_OVERHEAD, *[m for m in measured if m > 0]]) if measured else DEFAULT_OVERHEAD

    def attach(self, sandbox_id: str, vm: Any) -> None:
        """Start steering a sandbox whose agent is up (its balloon driver is loaded): a sandbox admitted below
        its maximum gets that target now. Each report the guest sends wakes the control loop."""
        vm.on_report = self._report.set
        with self._lock:
            self._sandboxes[sandbox_id] = vm
            control = self.controls.get(sandbox_id)
        if control is None:
            return
        control.hold_until = time.monotonic() + HOLD_S  # a new sandbox is about to be used: no idle squeeze yet
        _save(control, vm)
        if control.target_bytes < control.max_bytes:
            start = control.target_bytes
            control.target_bytes = control.max_bytes  # what the guest has until the balloon takes the rest
            self._steer(control, vm, start, control.reason)

    def measure(self, sandbox_id: str, vm: Any) -> None:
        """Count a running sandbox without a balloon (a template's clone) in what the sandboxes hold, by what it
        holds itself: nothing can squeeze it, so it keeps its admission at its full size."""
        with self._lock:
            self._measured[sandbox_id] = vm

    def release(self, sandbox_id: str) -> None:
        with self._lock:
            self.controls.pop(sandbox_id, None)
            self._sandboxes.pop(sandbox_id, None)
            self._measured.pop(sandbox_id, None)
            self._asked.pop(sandbox_id, None)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"budget_bytes": self.budget_bytes,
                    "reserved_bytes": sum(c.floor_bytes for c in self.controls.values()),
                    "targets_bytes": sum(c.target_bytes for c in self.controls.values())}

    def close(self) -> None:
        self._stop.set()
        self._report.set()
        self._thread.join(timeout=10)

    # -- control ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        """A tick every INTERVAL_S, and one as soon as a guest reports (a guest under pressure reports at once:
        guest/agent.py), so pressure gets memory back within a tick of being seen."""
        while not self._stop.is_set():
            self._report.wait(INTERVAL_S)
            self._report.clear()
            if self._stop.is_set():
                return
            try:
                self.tick()
            except Exception:  # the loop must outlive any one bad tick
                log.exception("supervisor tick failed")

    def tick(self) -> None:
        """One round of decisions."""
        now = time.monotonic()
        with self._lock:
            work = [(self.controls[i], vm) for i, vm in self._sandboxes.items() if i in self.controls]
        host = psutil.virtual_memory()
        host_short = host.available < HOST_SHORT * host.total or host_pressure() >= HOST_PSI_HIGH \
            or self._waiting > 0
        wanted: dict[str, tuple[int, str]] = {}
        figures: dict[str, Figures] = {}
        for c, vm in work:
            figures[c.id] = Figures.of(vm.last_stats)
            measured = need.from_guest(c.max_bytes, (vm.last_stats or {}).get("reclaim") or {})
            if measured is not None:
                c.observe_need(now, measured)
            # Only a squeezed balloon can deflate on OOM (the others are not asked), and QMP is asked at most once
            # an interval however often the guests report.
            actual = None
            if c.target_bytes < c.max_bytes:
                actual = c.last_actual
                if now - self._asked.get(c.id, -INTERVAL_S) >= INTERVAL_S or actual is None:
                    self._asked[c.id] = now
                    actual = self._actual(c, vm)
            wanted[c.id] = decide(c, figures[c.id], actual, host_short, now)
        with self._lock:
            overhead = self._overhead()
        # Both must fit: the targets with each VMM's own cost on top, and what the VMMs hold now.
        committed = sum(t for t, _ in wanted.values()) + overhead * len(work)
        over = max(committed, sum(_rss(vm) for _, vm in work), cgroup_usage() or 0) - self.budget_bytes
        if over > 0:
            rows = [(c, wanted[c.id][0], figures[c.id].available) for c, _ in work]
            for sid, target in over_budget(rows, over, now).items():
                wanted[sid] = (target, f"over the {self.budget_bytes // MIB} MiB budget")
        for c, vm in work:
            target, reason = wanted[c.id]
            if target != c.target_bytes:
                self._steer(c, vm, target, reason)
        with self._changed:
            self._changed.notify_all()

    def _actual(self, c: Control, vm: Any) -> int | None:
        """The balloon's `actual` (guest RAM the balloon leaves the guest), from QMP; None if QMP fails."""
        try:
            with QMP(vm.qmp_path, "memvisor-supervisor") as qmp:
                return int(qmp.execute("query-balloon", timeout=2.0)["actual"])
        except (MemvisorError, KeyError, TypeError, ValueError) as exc:
            log.debug("sandbox %s: query-balloon failed: %s", c.id, exc)
            return None

    def _steer(self, c: Control, vm: Any, target: int, reason: str) -> None:
        """Set the balloon target, log and keep the decision."""
        try:
            with QMP(vm.qmp_path, "memvisor-supervisor") as qmp:
                qmp.execute("balloon", {"value": target}, timeout=2.0)
        except MemvisorError as exc:
            log.warning("sandbox %s: balloon to %d MiB failed: %s", c.id, target // MIB, exc)
            return
        log.info("sandbox %s: balloon target %d -> %d MiB: %s", c.id, c.target_bytes // MIB, target // MIB, reason)
        c.history.append({"time": round(time.time(), 1), "from_bytes": c.target_bytes, "to_bytes": target,
                          "reason": reason, "floor_bytes": c.floor_bytes,
                          "report_uptime": c.last_report[0] if c.last_report else None})
        c.target_bytes, c.reason = target, reason
        if target > (c.last_actual or 0):
            c.last_actual = None  # a deflation the supervisor asked for is not the guest's
        _save(c, vm)


def _save(c: Control, vm: Any) -> None:
    """The decision where `memvisor stats` (another process) reads it."""
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
    host holds them once. A template's clone counts its anonymous pages only (the ones it wrote, QEMU's own):
    the template's RAM it maps is shared memory the daemon counts once (Supervisor.shared_bytes)."""
    process = getattr(vm, "process", None)
    if process is None:
        return 0
    kinds = ("RssAnon:",) if getattr(vm, "is_clone", False) else ("RssAnon:", "RssShmem:")
    try:
        with open(f"/proc/{process.pid}/status") as f:
            kib = sum(int(x.split()[1]) for x in f if x.startswith(kinds))
        return kib * 1024
    except (OSError, ValueError, IndexError):
        return 0


def _guest_rss(vm: Any) -> int | None:
    process = getattr(vm, "process", None)
    if process is None:
        return None
    from memvisor.host import stats

    return stats.guest_ram_rss(process.pid, vm.policy.memory_mib)


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
