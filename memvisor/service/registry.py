"""The daemon's sandboxes: create (boot and wait for the agent), look up, run commands, stop.

A daemon's VMMs outlive it (host/launch.py): each sandbox's runtime directory records the daemon's own view of it
(name, template, counts, and the phase it is in: booting, running, parking, resuming, freezing, stopping), so a
daemon killed at any instant loses nothing: the next one takes every sandbox over or settles it
(service/recovery.py), and what it cannot recover it lists as `lost` with the reason. VMMs are still spawned and
torn down from one long-lived thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memvisor import paths
from memvisor import policy as pol
from memvisor.errors import MemvisorError
from memvisor.host import runtime
from memvisor.host.result import RunResult
from memvisor.host.runtime import SAFE_ID
from memvisor.host.sandbox import Instance
from memvisor.image.build import Image
from memvisor.service import lostbook, need, recovery
from memvisor.service.errors import Conflict, NotFound
from memvisor.service.supervisor import ADMIT_WAIT_S, AdmissionRefused, Supervisor
from memvisor.service.templates import TemplateEntry, Templates
from memvisor.snapshot import park, statedir, template
from memvisor.snapshot.manifest import Manifest

if TYPE_CHECKING:  # the fleet layer (etcd's client) is imported only by a daemon that joins a fleet
    from memvisor.service.fleetd import Fleet
    from memvisor.service.fleetops import FleetOps

log = logging.getLogger("memvisor")
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
# The form of every id runtime.new_id() draws (8 lowercase hex digits). A name may not have it: a lookup takes an id
# before a name, so such a name could one day be shadowed by a new sandbox's id.
ID_FORM = re.compile(r"[0-9a-f]{8}")
ID_DRAWS = 8  # draws before giving up on a fresh id (each collides with a chance of about n / 2**32)
MAX_SANDBOXES = 256
ON_EXIT = ("park", "stop", "leave")
IDLE_CHECK_S = 2.0  # how often idle sandboxes are looked for
BUSY_POLL_S = 0.2  # how often an admission that waits for a busy sandbox to become idle looks again
MIB = 1 << 20


@dataclass
class Entry:
    """One sandbox the daemon owns."""

    id: str
    name: str
    policy: pol.Policy
    vm: Instance | None  # None while parked
    created: float = field(default_factory=time.time)
    state: str = "booting"  # booting | running | parking | parked | resuming | stopping | lost
    execs: int = 0  # commands run so far
    parked: Manifest | None = None  # the committed snapshot while parked
    parks: int = 0  # parks so far
    last_park: park.Figures | None = None
    last_resume: park.Figures | None = None
    used: float = field(default_factory=time.monotonic)  # when a command last ran or ended here
    template: str | None = None  # the template it was cloned from
    lost: str | None = None  # state "lost": why (its VMM and its snapshot are both gone)
    # execs between ensure_running() and their command's end: a park in that window would freeze a command the
    # guest has not been sent yet into the snapshot (and lose its session), so it is refused while any are held
    starting: int = 0
    recovered: dict[str, object] | None = None  # taken over from a daemon that died: when, and what it ended
    claimed: int | None = None  # fleet: the generation this node claimed from the store, until it resumes
    problem: str | None = None  # parked, but its snapshot cannot be resumed as it is (statedir.Problem), and why
    # park, resume and stop of one sandbox happen one at a time; an exec holds it while it resumes the sandbox
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def running(self) -> Instance:
        """The sandbox's VM; Conflict if it is not running."""
        if self.state == "lost":
            raise Conflict(f"sandbox {self.id} is lost: {self.lost}",
                           hint=f"nothing of it is left to run; `memvisor stop {self.id}` removes the record")
        if self.vm is None or self.state != "running":
            raise Conflict(f"sandbox {self.id} is {self.state}")
        return self.vm

    def record(self, phase: str, **extra: object) -> dict[str, object]:
        """What the sandbox's runtime directory keeps of it for a next daemon (Instance.record)."""
        return {"phase": phase, "name": self.name, "created": self.created, "template": self.template,
                "execs": self.execs, "parks": self.parks, **extra}


def check_name(name: str | None) -> None:
    """A sandbox name: 1-63 of a-z 0-9 _ . -, starting with a letter or digit, and never the form of an id, so no
    sandbox's id, now or later, can equal another's name."""
    if name is None:
        return
    if not NAME.fullmatch(name):
        raise MemvisorError(f"sandbox name {name!r} is not allowed",
                            hint="use 1-63 of a-z 0-9 _ . - starting with a letter or digit")
    if ID_FORM.fullmatch(name):
        raise MemvisorError(f"sandbox name {name!r} has the form of a sandbox id (8 of 0-9 a-f): a sandbox made "
                            "later could get it as its id", hint=f"choose another name, e.g. {name}-1 or sb-{name}")


class Moved(Conflict):
    """The entry a request held went to the fleet's store meanwhile: look the sandbox up again (the API does)."""


class Registry:
    """Every sandbox of this daemon, by id."""

    def __init__(self, image: Callable[[], Image], supervisor: Supervisor | None = None,
                 on_exit: str = "park", park_after_idle_s: int = 0, state: statedir.State | None = None,
                 fleet: Fleet | None = None) -> None:
        """`on_exit`: what close() does with running sandboxes: park them (the next daemon lists them parked), stop
        them, or leave them running for the next daemon to take over (an upgrade). `park_after_idle_s`: the
        default idle time before a sandbox is parked (0: never). `state`: the open state directory (its key and
        ledger), which the registry holds and close() closes (default: opened here, the key made if the directory
        holds nothing wrapped). `fleet`: this daemon's fleet (service/fleetd.py): parked sandboxes live in its
        store, every move goes through its fence (service/fleetops.py), and `state` is the fleet's
        (statedir.open_fleet)."""
        self.state = state or statedir.open(create_key=True)
        self.fleet = fleet
        self.ops: FleetOps | None = None
        if fleet is not None:
            from memvisor.service.fleetops import FleetOps

            self.ops = FleetOps(fleet, self.state)
        self.park_after_idle_s = park_after_idle_s
        self.admit_wait_s = ADMIT_WAIT_S  # how long an admission may wait for room (parks, squeezes)
        self._idle_stop = threading.Event()
        if on_exit not in ON_EXIT:
            raise MemvisorError(f"--on-exit {on_exit!r} is not one of {', '.join(ON_EXIT)}")
        self.on_exit = on_exit
        self._image = image
        self.supervisor = supervisor
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}  # fleet templates being brought here, one lock per name
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="memvisor-spawner")
        # First what a daemon that died left running or half done, before anything sweeps or scans.
        outcomes = recovery.recover(self.state, image(), on_warning=log.warning,
                                    committed=self.ops.committed if self.ops is not None else None)
        removed = runtime.sweep()
        if removed:
            log.warning("removed %d sandbox(es) left by a daemon or command that is gone: %s", len(removed),
                        ", ".join(removed))
        self.templates = Templates(self.state)
        self.templates.adopt()
        if supervisor is not None:
            supervisor.shared_bytes = self.templates.resident_bytes
        removed_snapshots = self._adopt_parked({o.id for o in outcomes if o.state == "running"})
        self._adopt_recovered(outcomes, removed_snapshots)
        if self.ops is not None:
            for outcome in outcomes:
                self.ops.recovered(outcome.id, outcome.state, outcome.record.get("generation"))
            self.ops.reconcile({e.id for e in self.list() if e.state == "running"},
                               {o.id for o in outcomes if o.state == "undecided"})
            assert fleet is not None
            fleet.on_rejoin = self._rejoined
        self._idle_thread = threading.Thread(target=self._idle_loop, name="memvisor-idle", daemon=True)
        self._idle_thread.start()

    def _idle_loop(self) -> None:
        while not self._idle_stop.wait(IDLE_CHECK_S):
            try:
                self.park_idle()
            except Exception:  # a bug here must not stop the daemon
                log.exception("parking idle sandboxes failed")

    @staticmethod
    def _parked_entry(meta: Manifest) -> Entry:
        """A parked sandbox's entry, from its authentic manifest (MemvisorError if its policy is not one)."""
        kept = meta.sandbox
        policy = pol.merge(("parked", pol.layer_from_mapping(kept.get("policy") or {}, "parked snapshot")))
        name = kept.get("name") if isinstance(kept.get("name"), str) else meta.id
        created = kept.get("created")
        entry = Entry(meta.id, str(name), policy, None,
                      created=float(created) if isinstance(created, int | float) else meta.parked_at,
                      state="parked", parked=meta)
        parks = kept.get("parks")
        entry.parks = parks if isinstance(parks, int) else 1
        entry.template = meta.template.name if meta.template else None
        return entry

    def _adopt_parked(self, running: set[str]) -> dict[str, str]:
        """List every parked snapshot in the state directory as a parked sandbox of this daemon (it resumes on
        demand); one that cannot be resumed as it is (a damaged manifest, a kept disk replaced...) is listed with
        its problem and stays parked; partial and stale ones (a park cut short, an old copy) are removed, and said.
        `running`: sandboxes taken over from a daemon that died (their directories hold their kept disks).
        Returns the sandboxes whose snapshot was removed, with why (unless it runs, such a sandbox is lost)."""
        metas, problems = self.state.scan(running=running)
        if self.ops is not None:  # in a fleet the store holds what is parked: a local copy is a leftover
            for leftover in {m.id for m in metas} | {p.id for p in problems if not p.removed}:
                if leftover not in running and SAFE_ID.fullmatch(leftover):
                    log.warning("removing a local copy of sandbox %s: its parked state is the fleet's", leftover)
                    with contextlib.suppress(MemvisorError, OSError):
                        self.state.remove(leftover)
            return {}
        for problem in problems:
            log.warning("%s", problem.note())
        adopted: list[Entry] = []
        for meta in metas:
            try:
                adopted.append(self._parked_entry(meta))
            except MemvisorError as exc:
                log.warning("sandbox %s stays parked but unlisted: its policy: %s", meta.id, exc)
        for problem in problems:
            if problem.removed or problem.kind == "partial" or not SAFE_ID.fullmatch(problem.id):
                continue
            entry = Entry(problem.id, problem.id, pol.DEFAULT, None, state="parked", problem=problem.why)
            if problem.manifest is not None:
                with contextlib.suppress(MemvisorError):
                    entry = self._parked_entry(problem.manifest)
                    entry.problem = problem.why
            entry.parks = max(entry.parks, 1)  # so that a stop removes its directory
            adopted.append(entry)
        for entry in adopted:
            if entry.template is not None:
                try:
                    self.templates.get(entry.template).clones.add(entry.id)
                except NotFound:
                    log.warning("sandbox %s is a clone of template %s, which is gone: it cannot resume",
                                entry.id, entry.template)
            self._entries[entry.id] = entry
        if adopted:
            log.warning("%d parked sandbox(es) found: %s", len(adopted), ", ".join(
                e.id + (f" (cannot resume: {e.problem})" if e.problem else "") for e in adopted))
        return {p.id: p.why for p in problems if p.removed and p.id not in running and SAFE_ID.fullmatch(p.id)}

    def _adopt_recovered(self, outcomes: list[recovery.Outcome], removed: dict[str, str]) -> None:
        """List what recovery settled: running sandboxes taken over, lost ones with the reason (parked ones are
        in the state directory's scan already); and as lost, a sandbox whose snapshot the scan had to remove
        (`removed`: a park cut short, or a copy older than the ledger) and that is neither running nor parked."""
        for outcome in outcomes:
            record = outcome.record
            name = record.get("name")
            created = record.get("created")
            template_name = record.get("template")
            entry = Entry(outcome.id, name if isinstance(name, str) else outcome.id,
                          outcome.vm.policy if outcome.vm else pol.DEFAULT, outcome.vm,
                          created=float(created) if isinstance(created, int | float) else time.time(),
                          template=template_name if isinstance(template_name, str) else None)
            for key in ("execs", "parks"):
                value = record.get(key)
                if isinstance(value, int) and value >= 0:
                    setattr(entry, key, value)
            if outcome.state == "running" and outcome.vm is not None:
                entry.state = "running"
                entry.recovered = {"at": time.time(), "ended": outcome.ended}
                self._register_clone(entry)
                self._supervise(entry, outcome.vm)
            elif outcome.state == "lost":
                if outcome.id in self._entries:  # its snapshot is complete after all: parked
                    continue
                entry.state, entry.lost = "lost", outcome.reason
                lostbook.write(entry.id, entry.name, outcome.reason, entry.created, entry.template)
            elif outcome.state == "undecided":  # shown, not recorded: the next start settles it
                entry.state, entry.lost = "lost", outcome.reason
            else:
                continue
            self._entries[entry.id] = entry
        known = {o.id for o in outcomes}
        for sandbox_id, why in sorted(removed.items()):
            if sandbox_id in self._entries or sandbox_id in known:
                continue
            reason = f"its snapshot could not be kept ({why}) and it does not run"
            entry = Entry(sandbox_id, sandbox_id, pol.DEFAULT, None, state="lost")
            entry.lost = reason
            lostbook.write(sandbox_id, sandbox_id, reason)
            self._entries[sandbox_id] = entry
        for record in lostbook.read_all():  # lost at an earlier start, and not removed since
            if record["id"] in self._entries:
                if self._entries[record["id"]].state != "lost":  # it came back (a snapshot put back): not lost
                    lostbook.remove(record["id"])
                continue
            name, created = record.get("name"), record.get("created")
            entry = Entry(record["id"], name if isinstance(name, str) else record["id"], pol.DEFAULT, None,
                          created=float(created) if isinstance(created, int | float) else 0.0, state="lost")
            entry.lost = record["reason"]
            self._entries[entry.id] = entry

    def _register_clone(self, entry: Entry) -> None:
        if entry.template is None:
            return
        try:
            self.templates.get(entry.template).clones.add(entry.id)
        except NotFound:
            log.warning("sandbox %s is a clone of template %s, which is gone", entry.id, entry.template)

    def create(self, policy: pol.Policy, name: str | None = None, debug: bool = False,
               template_name: str | None = None) -> Entry:
        """Boot a sandbox and wait until its agent is up; raises MemvisorError (GuestError) if it cannot.
        `debug`: kernel messages on its console (host/sandbox.py DEBUG_KERNEL_ARGS). `template_name`: start it as
        a clone of that template instead (its policy is the template's; `policy` is not used)."""
        check_name(name)
        if name is not None and self.fleet is not None and self.fleet.find(name) is not None:
            raise Conflict(f"the fleet has a sandbox named {name!r} already", hint="memvisor fleet ls")
        origin = self.template(template_name) if template_name is not None else None
        if origin is not None:
            self._same_image(f"template {origin.name}", origin.image)
            policy = origin.policy
        vm = Instance(policy, self._image(), sandbox_id=self.fresh_id(), on_warning=log.warning,
                      debug=debug and origin is None, outlive_owner=True)
        entry = Entry(vm.id, name or vm.id, policy, vm, template=origin.name if origin else None)
        vm.service = entry.record("cloning" if origin is not None else "booting")
        with self._lock:
            if len(self._entries) >= MAX_SANDBOXES:
                raise Conflict(f"this daemon already runs {MAX_SANDBOXES} sandboxes")
            if any(e.name == entry.name for e in self._entries.values()):
                raise Conflict(f"a sandbox named {entry.name!r} already exists")
            if entry.id in self._entries:  # two creates drew the same fresh id at once: never two sandboxes on it
                raise Conflict(f"sandbox id {entry.id} was taken while this sandbox was being made",
                               hint="try again")
            self._entries[entry.id] = entry  # holds the name while admission decides
        try:
            if self.supervisor is not None:  # outside the registry's lock: admission may wait for room
                self._admit(entry.id, policy)
            if self.ops is not None:  # the fleet knows it before it boots (an id no other node may take)
                self.ops.created(entry.id, entry.name, entry.template)
        except BaseException:
            with self._lock:
                self._entries.pop(entry.id, None)
            if self.supervisor is not None:
                self.supervisor.release(entry.id)
            raise
        try:
            if origin is not None:
                with origin.lock:
                    origin.clones.add(entry.id)
                _, figures = template.clone(self.state, vm, origin.meta, self.templates.ram(origin),
                                            start=lambda: self._spawner.submit(vm.start).result())
                entry.last_resume = figures
            else:
                self._spawner.submit(vm.start).result()
                vm.wait_ready()
        except BaseException:
            self._drop(entry)
            if self.ops is not None:
                self.ops.forget(entry.id)
            raise
        entry.state = "running"
        vm.record(**entry.record("running"))
        self._supervise(entry, vm)
        log.info("sandbox %s (%s) is up: %s", entry.id, entry.name, policy.summary())
        return entry

    def fresh_id(self) -> str:
        """A new sandbox id that is no sandbox's id or name here and has no runtime or state directory. 32 random
        bits collide rarely, but a collision would give a new sandbox another's name, snapshot or ledger entry."""
        for _ in range(ID_DRAWS):
            candidate = runtime.new_id()
            with self._lock:
                known = any(candidate in (e.id, e.name) for e in self._entries.values())
            if not known and not os.path.lexists(paths.runtime_root() / candidate) \
                    and not os.path.lexists(self.state.sandbox_dir(candidate)):
                return candidate
            log.info("sandbox id %s is taken: drawing another", candidate)
        raise MemvisorError(f"no free sandbox id in {ID_DRAWS} draws", hint="the id source is not random")

    # -- the fleet ------------------------------------------------------------------------------------------------
    def _rejoined(self) -> None:
        """The node joined the fleet again under a new lease: take every sandbox running here back into the fence."""
        assert self.ops is not None
        for entry in self.list():
            with entry.lock:  # not in the middle of a park or a resume
                if entry.state == "running":
                    self.ops.recovered(entry.id, "running", None)

    def counts(self) -> tuple[int, int, int]:
        """(running, parked, held bytes) for this node's fleet record."""
        entries = self.list()
        held = self.supervisor.status()["reserved_bytes"] if self.supervisor is not None else 0
        return (sum(e.state == "running" for e in entries), sum(e.state == "parked" for e in entries), held)

    def drain(self) -> dict[str, Any]:
        """Park every running sandbox of this node into the fleet's store and release it (memvisor fleet drain):
        the next exec resumes each wherever it reaches. Returns what was parked, and what could not be (it runs
        on here, with the reason)."""
        parked, failed = [], {}
        for entry in self.list():
            if entry.state != "running":
                continue
            try:
                self.park(entry.id)
                parked.append(entry.id)
            except MemvisorError as exc:
                failed[entry.id] = exc.message
        log.warning("drained: %d sandbox(es) parked into the fleet's store%s", len(parked),
                    f", {len(failed)} not: {failed}" if failed else "")
        return {"parked": parked, "failed": failed}

    def claim(self, key: str) -> Entry:
        """A sandbox parked in the fleet, claimed by this node and brought here as a parked entry (its bundle in
        the local state directory, checked), for a resume or an exec to resume it; a local one as it is.
        NotFound if neither this node nor the fleet has it; Conflict if it runs elsewhere (the API forwards)."""
        try:
            return self.get(key)
        except NotFound:
            if self.fleet is None or self.ops is None:
                raise
        from memvisor.fleet.records import State as FleetState

        record = self.fleet.find(key)
        if record is None:
            raise NotFound(f"no sandbox {key!r} in the fleet", hint="list them with `memvisor fleet ls`")
        if record.state != FleetState.PARKED:
            raise Conflict(f"sandbox {record.id} is {record.state} on node {record.node}")
        meta = self.ops.claim(record)
        try:
            entry = self._parked_entry(meta)
        except BaseException:
            self.ops.resume_failed(record.id)
            raise
        entry.claimed = meta.generation
        with self._lock:
            if entry.id in self._entries:  # another request brought it here meanwhile
                self.ops.resume_failed(record.id)
                raise Conflict(f"sandbox {entry.id} is being resumed here already")
            self._entries[entry.id] = entry
        self._register_clone(entry)
        return entry

    def get(self, key: str) -> Entry:
        """By id or name; NotFound otherwise."""
        with self._lock:
            entry = self._entries.get(key) or next((e for e in self._entries.values() if e.name == key), None)
        if entry is None:
            raise NotFound(f"no sandbox {key!r}", hint="list them with `memvisor ps` or GET /v1/sandboxes")
        return entry

    def list(self) -> list[Entry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.created)

    def stop(self, key: str) -> Entry:
        """Power the sandbox off and release everything it had."""
        entry = self.get(key)
        with entry.lock:
            entry.state = "stopping"
            try:
                if entry.vm is not None:
                    entry.vm.record(**entry.record("stopping"))
                    entry.vm.shutdown()
            finally:
                self._drop(entry)
                if entry.lost is not None:
                    lostbook.remove(entry.id)
                # A parked snapshot, the disks a resumed sandbox keeps in the state directory, or what a park the
                # last daemon's crash cut short left there (a first park whose VM was continued).
                if entry.parks or self.state.sandbox_dir(entry.id).exists():
                    self.state.remove(entry.id)
                    if self.ops is None:  # in a fleet the generation is etcd's: forget() below, after the fence
                        self.state.forget(entry.id)
                if self.ops is not None:
                    self.ops.forget(entry.id)
        log.info("sandbox %s (%s) stopped", entry.id, entry.name)
        return entry

    # -- parking ----------------------------------------------------------------------------------------------
    def park(self, key: str, unused_since: float | None = None) -> Entry:
        """Park a running sandbox (snapshot/park.py): its VMM exits, its state goes to a sealed snapshot, and it no
        longer counts in the memory budget. Conflict if it is not running or runs commands, or (`unused_since`,
        for the daemon's own parks) if an exec used it after that moment."""
        entry = self.get(key)
        with entry.lock:
            if unused_since is not None and entry.used > unused_since:
                raise Conflict(f"sandbox {entry.id} was used again")
            vm = entry.running()
            if entry.starting and not (vm.session is not None and vm.session.commands):
                raise Conflict(f"sandbox {entry.id} is starting a command", hint="park it when its commands have ended")
            if vm.session is not None and vm.session.commands:
                raise Conflict(f"sandbox {entry.id} runs {len(vm.session.commands)} command(s)",
                               hint="park it when they have ended (a parked sandbox resumes on its next exec)")
            publish, prev = None, None
            if self.ops is not None:  # the fence shows the park before anything of it is written
                prev = self.ops.begin_park(entry.id)
                publish = self.ops.publisher(entry.id, prev)
            try:
                entry.state = "parking"
                vm.record(**entry.record("parking", prev=prev))
                origin = self.templates.get(entry.template).meta if entry.template else None
                meta, figures = park.park(self.state, vm, self._kept(entry), template=origin,
                                          on_step=lambda s: log.debug("park %s: %s", entry.id, s), publish=publish)
            except BaseException:
                entry.state = "running"
                with contextlib.suppress(OSError):
                    vm.record(**entry.record("running"))
                if self.ops is not None:
                    self.ops.park_failed(entry.id)
                raise
            entry.state, entry.vm, entry.parked = "parked", None, meta
            entry.parks += 1
            entry.last_park = figures
            if self.supervisor is not None:
                self.supervisor.release(entry.id)
            # The VMM has quit; the rest of the teardown runs where the VMM was spawned.
            self._spawner.submit(vm.close).result()
            if self.ops is not None:  # it lives in the fleet's store now, for any node to resume
                self.ops.parked(entry.id)
                self._unlist(entry)
        log.info("sandbox %s (%s) parked in %.2f s: %d MiB of state", entry.id, entry.name, figures.seconds,
                 figures.file_bytes >> 20)
        return entry

    def resume(self, key: str) -> Entry:
        """Resume a parked sandbox; a running one is left as it is."""
        entry = self.get(key)
        with entry.lock:
            self._resume_locked(entry)
        return entry

    def ensure_running(self, entry: Entry) -> float | None:
        """The sandbox, running, for an exec: resumed first if it is parked. Returns the resume's seconds, or None
        if it was running. The exec is held against parks (Entry.starting) until exec_done(): call it in a
        finally."""
        with entry.lock:
            entry.used = time.monotonic()  # under the lock: the daemon's own parks see the exec coming
            if entry.state != "parked":
                entry.running()
                entry.starting += 1
                return None
            seconds = self._resume_locked(entry)
            entry.starting += 1
            return seconds

    def exec_done(self, entry: Entry) -> None:
        """An exec that ensure_running() let through has ended (or failed to start)."""
        with entry.lock:
            entry.starting -= 1
            entry.used = time.monotonic()

    def _checked_parked(self, entry: Entry) -> Manifest:
        """The parked sandbox's snapshot as on disk now (authentic, current, its files in place): a problem found
        at the start may have been put right since, and a snapshot that was fine may not be any more (the entry
        then shows why: 409)."""
        try:
            meta = self.state.load(entry.id)
        except statedir.SnapshotProblem as exc:
            entry.problem = exc.message
            raise
        if meta is None and self.ops is not None:
            # In a fleet a parked sandbox lives in the store: this entry went there (parked while a request waited
            # for it), and the request must find it again where it is now.
            raise Moved(f"sandbox {entry.id} was parked into the fleet's store meanwhile")
        if meta is None:  # nothing of it is left to resume: lost, never shown parked
            reason = f"its snapshot is gone from {self.state.root} (no manifest)"
            entry.state, entry.lost, entry.parked = "lost", reason, None
            lostbook.write(entry.id, entry.name, reason, entry.created, entry.template)
            raise Conflict(f"sandbox {entry.id} is lost: {reason}",
                           hint=f"`memvisor stop {entry.id}` removes the record")
        if entry.problem is not None and entry.parked is None:  # listed from a problem: now it can be known
            with contextlib.suppress(MemvisorError):
                fresh = self._parked_entry(meta)
                entry.policy, entry.template = fresh.policy, fresh.template
        entry.problem = None
        return meta

    def _resume_locked(self, entry: Entry) -> float | None:
        if entry.state != "parked":
            entry.running()
            return None
        if self.ops is not None and entry.claimed is None:  # not claimed here: it is the fleet's (see claim())
            raise Moved(f"sandbox {entry.id} is parked in the fleet's store")
        try:
            return self._resume_claimed(entry)
        except BaseException:
            if self.ops is not None and entry.claimed is not None and entry.state != "running":
                self.ops.resume_failed(entry.id)  # back to the fleet, parked as it was, whatever failed
                self._unlist(entry)
                entry.claimed = None
            raise

    def _resume_claimed(self, entry: Entry) -> float | None:
        meta = self._checked_parked(entry)
        image = self._image()
        self._same_image(f"sandbox {entry.id}", meta.sandbox.get("image"))
        origin = None
        if entry.template is not None:
            with contextlib.suppress(NotFound):
                origin = self.template(entry.template)
            park.check_template(meta, origin.meta if origin else None)  # before anything is loaded for it
        clone_ram = self.templates.ram(origin) if origin else None
        if self.supervisor is not None:
            self._admit(entry.id, entry.policy)
        vm = Instance(entry.policy, image, sandbox_id=entry.id, on_warning=log.warning, outlive_owner=True,
                      service=entry.record("resuming", generation=meta.generation))
        vm.clone_ram_fd = clone_ram
        entry.state = "resuming"
        try:
            figures = park.resume(self.state, vm, meta, template=origin.meta if origin else None,
                                  start=lambda: self._spawner.submit(vm.start).result())
        except BaseException as exc:
            if isinstance(exc, statedir.SnapshotProblem):
                entry.problem = exc.message
            entry.state = "parked"
            if self.supervisor is not None:
                self.supervisor.release(entry.id)
            self._spawner.submit(vm.close).result()
            raise
        entry.state, entry.vm, entry.parked, entry.last_resume = "running", vm, None, figures
        vm.record(**entry.record("running"))
        if self.ops is not None and entry.claimed is not None:
            self.ops.resumed(entry.id, entry.claimed)
            entry.claimed = None
        entry.used = time.monotonic()
        self._supervise(entry, vm)
        log.info("sandbox %s (%s) resumed in %.2f s", entry.id, entry.name, figures.seconds)
        return figures.seconds

    def _admit(self, sandbox_id: str, policy: pol.Policy) -> None:
        """Reserve room in the budget for a sandbox about to boot or resume. When it does not fit, the least
        recently used idle sandboxes are parked first, one at a time (a parked sandbox counts 0); while none is
        idle but some run commands, it waits (up to admit_wait_s) for one to become idle; then the supervisor's
        own wait for the squeeze, and its refusal (503)."""
        assert self.supervisor is not None
        # Without a balloon nothing can squeeze it: it is admitted at its maximum, which it will hold.
        size = policy.memory_mib * MIB
        floor = (policy.memory_floor_mib or 0) * MIB if policy.balloon else size
        deadline = time.monotonic() + self.admit_wait_s
        tried: set[str] = {sandbox_id}
        while True:
            try:
                self.supervisor.admit(sandbox_id, size, floor, need.estimate(policy), wait_s=0)
                return
            except AdmissionRefused:
                pass
            victim = self._coldest_idle(tried)
            if victim is None:
                # A command that ends frees its sandbox to be parked: an agent's next command should wait a
                # moment for that, not fail.
                if time.monotonic() >= deadline or not self._busy(tried):
                    break
                time.sleep(BUSY_POLL_S)
                continue
            tried.add(victim.id)
            log.warning("parking sandbox %s (%s), idle for %.0f s, to make room for %s", victim.id, victim.name,
                        time.monotonic() - victim.used, sandbox_id)
            try:
                self.park(victim.id, unused_since=victim.used)
            except MemvisorError as exc:
                log.warning("sandbox %s could not be parked to make room: %s", victim.id, exc)
        self.supervisor.admit(sandbox_id, size, floor, need.estimate(policy),
                              wait_s=max(0.0, deadline - time.monotonic()))

    def _busy(self, skip: set[str]) -> bool:
        """Whether a running sandbox not in `skip` runs commands now (it may be parked once they end)."""
        return any(e.id not in skip and e.state == "running" and e.vm is not None and e.vm.session is not None
                   and (e.vm.session.commands or e.starting) for e in self.list())

    def _coldest_idle(self, skip: set[str]) -> Entry | None:
        """The running sandbox with no command in flight that was used least recently, or None."""
        idle = [e for e in self.list() if e.id not in skip and e.state == "running" and e.vm is not None
                and e.vm.session is not None and not e.vm.session.commands and not e.starting]
        return min(idle, key=lambda e: e.used, default=None)

    def park_idle(self) -> None:
        """Park every running sandbox idle for longer than its park_after_idle_s (the policy's, else the
        daemon's default; 0: never). The daemon calls this every few seconds."""
        now = time.monotonic()
        for entry in self.list():
            limit = entry.policy.park_after_idle_s
            limit = self.park_after_idle_s if limit is None else limit
            vm = entry.vm
            if not limit or entry.state != "running" or vm is None or vm.session is None or vm.session.commands \
                    or entry.starting:
                continue
            used = entry.used
            if now - used < limit:
                continue
            log.info("sandbox %s (%s) idle for %.0f s: parking it", entry.id, entry.name, now - used)
            try:
                self.park(entry.id, unused_since=used)
            except MemvisorError as exc:
                entry.used = now  # try again after another idle period, not at once
                log.warning("sandbox %s could not be parked: %s", entry.id, exc)

    def _kept(self, entry: Entry) -> dict[str, object]:
        """What meta.json keeps for a resume by this or a later daemon (in a fleet, also the host a resume must
        match: fleetd.compat)."""
        host = {"host": self.fleet.compat} if self.fleet is not None else {}
        return {**host, "name": entry.name, "created": entry.created, "policy": pol.to_json(entry.policy),
                "image": self._image().manifest.get("key"), "execs": entry.execs, "parks": entry.parks + 1}

    def _supervise(self, entry: Entry, vm: Instance) -> None:
        """Hand a running sandbox to the supervisor: steered through its balloon, or (without one) counted."""
        if self.supervisor is None:
            return
        if entry.policy.balloon:
            self.supervisor.attach(entry.id, vm)
        else:
            self.supervisor.measure(entry.id, vm)

    def _same_image(self, what: str, key: object) -> None:
        """Conflict unless `what` was made with this daemon's guest image (its RAM holds that image's guest)."""
        ours = self._image().manifest.get("key")
        if key != ours:
            raise Conflict(f"{what} was made by a daemon with guest image {key}, not this daemon's {ours}",
                           hint="use it with the memvisor it was made with, or delete it")

    # -- templates --------------------------------------------------------------------------------------------
    def template(self, name: str) -> TemplateEntry:
        """Template `name`: this daemon's, or (in a fleet) one another node made, brought here on first use (one
        fetch at a time per name: two first clones at once must not fetch into one folder)."""
        try:
            return self.templates.get(name)
        except NotFound:
            if self.ops is None:
                raise
        with self._lock:
            lock = self._fetching.setdefault(name, threading.Lock())
        with lock:
            with contextlib.suppress(NotFound):
                return self.templates.get(name)  # fetched by the request this one waited for
            return self._fetch_template(name)

    def _fetch_template(self, name: str) -> TemplateEntry:
        assert self.ops is not None
        meta = self.ops.fetch_template(name)
        if meta is None:
            raise NotFound(f"no template {name!r} here or in the fleet", hint="list them with `memvisor template ls`")
        policy = pol.merge(("template", pol.layer_from_mapping(meta.sandbox.get("policy") or {}, f"template {name}")))
        made = TemplateEntry(name, meta, policy)
        self.templates.add(made)
        log.info("template %s fetched from the fleet's store", name)
        return made

    def remove_template(self, name: str) -> TemplateEntry:
        """Remove a template (Conflict while this daemon's clones of it run or are parked); in a fleet, from the
        fleet too (its name and its bundle)."""
        local = None
        with contextlib.suppress(NotFound):
            local = self.templates.get(name)
        if self.ops is not None:  # the fleet's clones are checked first: a template in use is never removed
            meta = local.meta if local is not None else self.ops.template_manifest(name)
            if meta is None:
                raise NotFound(f"no template {name!r} here or in the fleet", hint="memvisor template ls")
            self.ops.remove_template(name, meta)
            if local is None:
                policy = pol.merge(("template", pol.layer_from_mapping(meta.sandbox.get("policy") or {}, name)))
                return TemplateEntry(name, meta, policy)
        return self.templates.remove(name)

    def make_template(self, name: str, key: str) -> TemplateEntry:
        """Freeze the running templatable sandbox `key` into template `name` (snapshot/template.py): the sandbox
        becomes the template (its VMM exits) and is no longer listed."""
        template.check_name(name)
        entry = self.get(key)
        with entry.lock:
            vm = entry.running()
            if entry.template is not None:
                raise Conflict(f"sandbox {entry.id} is a clone of template {entry.template}: its RAM is that "
                               "template's, not its own", hint="make the template of a templatable sandbox")
            with self._lock:
                if any(t.name == name for t in self.templates.list()):
                    raise Conflict(f"template {name} already exists", hint=f"memvisor template rm {name}")
            if self.fleet is not None and self.fleet.catalog.get(name) is not None:  # checked before the freeze
                raise Conflict(f"the fleet has a template named {name} already", hint=f"memvisor template rm {name}")
            entry.state = "freezing"
            vm.record(**entry.record("freezing", template_name=name))
            try:
                meta, fd, figures = template.freeze(self.state, vm, name, {
                    "policy": pol.to_json(entry.policy), "image": self._image().manifest.get("key"),
                    "source": entry.id, "created": time.time()})
            except BaseException:
                entry.state = "running"
                with contextlib.suppress(OSError):
                    vm.record(**entry.record("running"))
                raise
            entry.state = "stopping"
            self._drop(entry)
        made = TemplateEntry(name, meta, entry.policy, ram_fd=fd)
        self.templates.add(made)
        if self.ops is not None:  # the sandbox is the template now; the template is the fleet's
            self.ops.forget(entry.id)
            try:
                self.ops.publish_template(name, meta)
            except MemvisorError as exc:
                log.warning("template %s stays on this node only: %s", name, exc.message)
        log.info("template %s made of sandbox %s in %.2f s: %d MiB of RAM", name, entry.id, figures.seconds,
                 template.ram_bytes(meta) >> 20)
        return made

    def template_from_command(self, name: str, policy: pol.Policy, argv: Sequence[str],
                              timeout: float | None = None) -> TemplateEntry:
        """Boot a templatable sandbox, run `argv` in it to warm it up, and make it template `name`; a warm-up that
        fails (exits non-zero) stops the sandbox and makes no template."""
        template.check_name(name)
        if not policy.templatable:
            raise MemvisorError("a template's sandbox must be templatable", hint="add --templatable")
        entry = self.create(policy)
        try:
            result = self.ensure_exec(entry, argv, timeout)
        except BaseException:
            self.stop(entry.id)
            raise
        if result.exit_code != 0:
            self.stop(entry.id)
            tail = result.stderr.decode(errors="replace")[-400:].strip()
            raise MemvisorError(f"the warm-up command exited with {result.exit_code}: no template made"
                                + (f" ({tail})" if tail else ""), hint="fix the command; it runs as root")
        return self.make_template(name, entry.id)

    def ensure_exec(self, entry: Entry, argv: Sequence[str], timeout: float | None) -> RunResult:
        self.ensure_running(entry)
        try:
            vm = entry.running()
            entry.execs += 1
            return vm.exec(list(argv), uid=0, timeout=timeout)
        finally:
            self.exec_done(entry)

    def close(self) -> None:
        """The daemon is ending: park every running sandbox (or stop it, with on_exit "stop"; a sandbox that
        cannot be parked is stopped), and say so. Parked sandboxes stay parked for the next daemon."""
        self._idle_stop.set()
        self._idle_thread.join(timeout=60)
        for entry in self.list():
            if entry.state == "parked" and self.ops is not None and entry.claimed is not None:
                self.ops.resume_failed(entry.id)  # claimed here, never resumed: the fleet's again
                continue
            if entry.state in ("parked", "lost"):
                continue
            if self.on_exit == "leave" and entry.vm is not None and entry.state == "running":
                log.warning("leaving sandbox %s (%s) running for the next daemon", entry.id, entry.name)
                self._spawner.submit(entry.vm.release).result()
                continue
            if self.on_exit == "park":
                log.warning("parking sandbox %s (%s): the daemon is ending", entry.id, entry.name)
                try:
                    self.park(entry.id)
                    continue
                except MemvisorError as exc:
                    if self.fleet is not None and entry.vm is not None and entry.state == "running":
                        # A fleet's sandbox is never stopped by a drain: it runs on for this node's next daemon,
                        # and the fleet shows it unreachable until then.
                        log.warning("sandbox %s cannot be parked (%s): leaving it running", entry.id, exc)
                        self._spawner.submit(entry.vm.release).result()
                        continue
                    log.warning("sandbox %s cannot be parked (%s): stopping it", entry.id, exc)
            else:
                log.warning("stopping sandbox %s (%s): the daemon is ending", entry.id, entry.name)
            try:
                self.stop(entry.id)
            except MemvisorError as exc:
                log.warning("sandbox %s: %s", entry.id, exc)
        if self.supervisor is not None:
            self.supervisor.close()
        self._spawner.shutdown(wait=True)
        self.templates.close()
        self.state.close()

    def _unlist(self, entry: Entry) -> None:
        """This daemon no longer has the sandbox (gone, or parked into the fleet's store)."""
        with self._lock:
            self._entries.pop(entry.id, None)
        if entry.template is not None and (entry.state != "parked" or self.ops is not None):
            with contextlib.suppress(NotFound):
                origin = self.templates.get(entry.template)
                with origin.lock:
                    origin.clones.discard(entry.id)

    def _drop(self, entry: Entry) -> None:
        self._unlist(entry)
        if self.supervisor is not None:
            self.supervisor.release(entry.id)
        # Teardown (quit, kill, remove files) runs on the spawner thread too: never from a thread that may
        # have been the VMM's parent and be gone already.
        if entry.vm is not None:
            self._spawner.submit(entry.vm.close).result()
