"""A daemon's start after another daemon died: every sandbox the dead one left is taken over or settled, and what
cannot be is reported `lost` with the reason, never a silent 404 (docs/service.md, "A daemon that dies").

A daemon's VMMs outlive it (host/launch.py, host/sandbox.py): each runtime directory a dead daemon left records
the VMM, the descriptors to take back from it, the guest's HELLO, and the daemon's own record of the sandbox,
including the phase it was in. What the next daemon does depends on that phase and on what it finds:

| phase      | VMM alive                                                    | VMM gone                      |
|------------|--------------------------------------------------------------|-------------------------------|
| running    | adopt: ADOPT ends the commands in flight; the sandbox goes on | parked if a snapshot is       |
| parking    | committed snapshot: the park is done, the VMM quits; else the | committed (a park that ended, |
|            | park is undone (migration cancelled, VM continued, RESUMED)  | a resume that had not begun); |
| resuming   | the VM ran (`cont`): adopt, RESUMED, the snapshot retired;   | else lost, with the reason    |
|            | not yet: the new VMM is killed, the sandbox stays parked     |                               |
| freezing   | committed template: done, the VMM quits; else undone         |                               |
| booting,   | the VMM is killed (the create or clone never answered: its   |                               |
| cloning    | request failed) and the sandbox is reported lost             |                               |
| stopping   | the stop is finished                                         | gone, as asked                |

The snapshot itself is judged by memvisor/snapshot (a park commits by writing its manifest last; a resume keeps
the snapshot committed until the guest answered RESUMED, and a guest between PARKING and RESUMED changes no
disk), so "the VM ran" is the one fact this module reads off the VMM: QMP's run state.

This module is the daemon's (memvisor/service): it uses host and snapshot, and nothing below imports it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memvisor.errors import MemvisorError
from memvisor.host import runtime
from memvisor.host.sandbox import AdoptError, Instance
from memvisor.host.vmm.qmp import QMP
from memvisor.image.build import Image
from memvisor.snapshot import layout, migration, seal, statedir, template

log = logging.getLogger("memvisor")
POLL_S = 0.05
SETTLE_S = 10.0  # a cancelled migration's VM leaves its transient states within this (QEMU answers at once)
PAUSED = ("paused", "postmigrate", "finish-migrate", "prelaunch")


@dataclass
class Outcome:
    """What became of one sandbox a dead daemon left."""

    id: str
    state: str  # "running" (taken over), "parked" (on its committed snapshot), "lost", "gone" (stopped as asked,
    # or it became a template), "undecided" (left untouched: the fence was out of reach)
    record: dict[str, Any]  # the dead daemon's record of it (name, created, template, execs, parks, phase...)
    vm: Instance | None = None
    reason: str = ""  # lost: why; otherwise what was done
    ended: list[list[Any]] = field(default_factory=list)  # the commands the crash ended: [[exec id, argv0], ...]


Committed = Callable[[str, str, dict[str, Any]], "bool | None"]


def recover(snapshots: statedir.State, image: Image, on_warning: Callable[[str], None] | None = None,
            committed: Committed | None = None) -> list[Outcome]:
    """Settle every sandbox a dead daemon left in this runtime root (call holding runtime.daemon_lock(), before
    anything sweeps or scans; `snapshots`: the open state directory). Never raises for one sandbox: each ends
    running, parked, gone or lost. `committed(id, phase, record)`: whether the park or resume of that phase holds,
    when another authority than the state directory decides it (a fleet's fence); None: the state directory."""
    outcomes = []
    for state in runtime.orphans():
        try:
            outcome = _settle(snapshots, state, image, on_warning, committed)
        except Undecided as exc:  # left exactly as it is: its VMM and runtime directory, for a later start
            outcome = Outcome(state.id, "undecided", dict(state.service), reason=exc.message)
        except Exception as exc:  # a bug settling one must not lose the others, nor the daemon
            log.exception("recovering sandbox %s failed", state.id)
            _kill(state)
            runtime.remove(_dir(state))
            outcome = Outcome(state.id, "lost", dict(state.service), reason=f"recovering it failed: {exc}")
        log.warning("sandbox %s (%s), left by a daemon that died while it was %s: %s%s", state.id,
                    outcome.record.get("name", state.id), outcome.record.get("phase", "booting"), outcome.state,
                    f" ({outcome.reason})" if outcome.reason else "")
        outcomes.append(outcome)
    return outcomes


def _settle(snapshots: statedir.State, state: runtime.SandboxState, image: Image,
            on_warning: Callable[[str], None] | None, authority: Committed | None) -> Outcome:
    record = dict(state.service)
    phase = record.get("phase", "booting")
    alive = state.vmm_pid is not None and runtime.same_process(state.vmm_pid, state.vmm_started) \
        and runtime.is_vmm(state.vmm_pid, state)
    decided = _ask(authority, state.id, phase, record) if phase in ("parking", "resuming") else None
    committed = decided if decided is not None else _committed(snapshots, state.id, phase, record)
    if not alive:
        runtime.remove(_dir(state))
        if phase in ("stopping", "freezing") and (phase == "stopping" or committed):
            return Outcome(state.id, "gone", record, reason="it was being stopped" if phase == "stopping"
                           else "it had become a template")
        if committed and phase != "freezing":
            return Outcome(state.id, "parked", record, reason="its snapshot is complete")
        return Outcome(state.id, "lost", record, reason=f"its VMM (pid {state.vmm_pid}) was gone when the daemon "
                       f"restarted: it exited or was killed while no daemon watched it")
    if phase in ("booting", "cloning") or state.hello is None:
        _kill(state)
        runtime.remove(_dir(state))
        verb = "cloned" if phase == "cloning" else "booted"
        return Outcome(state.id, "lost", record, reason=f"the daemon died while it {verb} it; its VMM was stopped "
                       "(the request that made it failed)")
    if committed and phase in ("parking", "freezing"):  # the park or freeze was complete: the VMM was to quit
        _kill(state)
        runtime.remove(_dir(state))
        if phase == "freezing":
            return Outcome(state.id, "gone", record, reason="it had become a template")
        return Outcome(state.id, "parked", record, reason="its park was complete")
    try:
        vm = Instance.adopt(state, image, on_warning=on_warning)
    except AdoptError as exc:
        _kill(state)
        runtime.remove(_dir(state))
        if committed:
            return Outcome(state.id, "parked", record, reason=f"{exc.message}; it stays parked")
        return Outcome(state.id, "lost", record, reason=exc.message)
    try:
        return _take_over(snapshots, vm, state, record, phase, committed)
    except BaseException:
        vm.failed = True
        vm.close()
        generation = record.get("generation")
        if phase == "resuming" and committed and isinstance(generation, int):
            # Its guest may have run and changed its disks before the crash: the snapshot is never resumed again.
            with contextlib.suppress(MemvisorError, OSError):
                snapshots.uncommit(state.id, generation)
        raise


class Undecided(MemvisorError):
    """What a crash left cannot be settled now (the fleet's fence is out of reach): nothing is touched."""


ASK_TRIES = 5  # an authority that does not answer (etcd) is asked again, a second apart, before recovery gives up


def _ask(authority: Committed | None, sandbox_id: str, phase: str, record: dict[str, Any]) -> bool | None:
    """The authority's answer (None: none, or it leaves it to the state directory). An authority that stays out of
    reach is an error: guessing could resume a sandbox on two hosts, or undo a park that another host resumed."""
    if authority is None:
        return None
    for attempt in range(ASK_TRIES):
        try:
            return authority(sandbox_id, phase, record)
        except MemvisorError as exc:
            if attempt == ASK_TRIES - 1:
                raise Undecided(f"whether its {phase} completed cannot be known now ({exc.message}); its VMM "
                                "is left as it was, for the daemon's next start") from None
            time.sleep(1.0)
    return None


def _take_over(snapshots: statedir.State, vm: Instance, state: runtime.SandboxState, record: dict[str, Any],
               phase: str, committed: bool) -> Outcome:
    with QMP(vm.qmp_path) as qmp:
        status = _settle_vm(qmp)
        if phase == "resuming" and status != "running":
            # The new VMM never ran the guest: its snapshot, still committed, is the sandbox.
            vm.close()
            if committed:
                return Outcome(state.id, "parked", record, reason="its resume had not started the guest")
            return Outcome(state.id, "lost", record, reason="its resume had not started the guest and its snapshot "
                           "is gone")
        if status != "running":
            qmp.execute("cont")
    answer = vm.take_over()
    if answer.get("parked"):  # between PARKING and RESUMED: the guest thaws and sets its clock
        migration.unpark_guest(vm)
    generation = record.get("generation")
    if phase == "resuming" and committed and isinstance(generation, int):
        snapshots.uncommit(state.id, generation)  # the guest ran: that snapshot must never resume again
    elif phase in ("parking", "freezing"):
        _drop_partial(snapshots, state.id, phase, record)
    if phase == "stopping":
        vm.shutdown()
        vm.close()
        return Outcome(state.id, "gone", record, reason="it was being stopped")
    ended = answer.get("ended") or []
    what = f"{len(ended)} command(s) in flight ended by the crash" if ended else "no command was in flight"
    vm.record(phase="running")
    return Outcome(state.id, "running", record, vm=vm, reason=f"taken over; {what}", ended=ended)


def _settle_vm(qmp: QMP) -> str:
    """Cancel a migration the dead daemon had begun (its reader is gone, so it cannot complete), and wait for the
    VM's run state to settle; returns it (running, paused, postmigrate, inmigrate, ...)."""
    migration = qmp.execute("query-migrate").get("status")
    if migration in ("setup", "active", "pre-switchover", "device", "postcopy-active"):
        qmp.execute("migrate_cancel")
    deadline = time.monotonic() + SETTLE_S
    while True:
        status: str = qmp.execute("query-status").get("status", "")
        if status not in ("finish-migrate",) and qmp.execute("query-migrate").get("status") not in (
                "setup", "active", "cancelling", "pre-switchover", "device"):
            return status
        if time.monotonic() > deadline:
            raise MemvisorError(f"the VM stayed {status} for {SETTLE_S:g} s after its migration was cancelled")
        time.sleep(POLL_S)


def _committed(snapshots: statedir.State, sandbox_id: str, phase: str, record: dict[str, Any]) -> bool:
    """Whether the snapshot the phase could have produced (or was resuming) is complete and current: the
    sandbox's own, or, while it was freezing, the template it was becoming."""
    try:
        if phase == "freezing":
            name = record.get("template_name")
            return isinstance(name, str) and template.load(snapshots, name) is not None
        return snapshots.load(sandbox_id) is not None
    except MemvisorError:
        return False


def _drop_partial(snapshots: statedir.State, sandbox_id: str, phase: str, record: dict[str, Any]) -> None:
    """A park or freeze the crash cut short and the VM continued: its partial files go (a resumed sandbox's
    directory keeps its disks' names: the next park links them again)."""
    if phase == "freezing":
        name = record.get("template_name")
        if isinstance(name, str):
            with contextlib.suppress(MemvisorError, OSError):
                if template.load(snapshots, name) is None:
                    template.remove(snapshots, name)
        return
    with contextlib.suppress(MemvisorError, OSError):
        folder = snapshots.sandbox_dir(sandbox_id)
        for stream in seal.STREAMS:
            (folder / f"{stream}{layout.SNAP_SUFFIX}").unlink(missing_ok=True)


def _kill(state: runtime.SandboxState) -> None:
    if state.vmm_pid is not None:
        runtime.kill_vmm(state)


def _dir(state: runtime.SandboxState) -> Path:
    return Path(state.runtime_dir)
