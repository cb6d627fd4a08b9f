"""The registry's moves in a fleet (docs/fleet.md): each local step of a sandbox's life paired with its step in
the fence, and parked state moved between this host's state directory and the fleet's store.

- create: the sandbox's record (running here, generation 0) before its VMM boots; removed if the boot fails.
- park: begin_park; the snapshot is sealed into the local state directory under the fleet key, then published
  before the VMM quits: the bundle (streams, kept disks, manifest last) into the store, then commit_park, which
  makes that generation the one resumable anywhere. If either fails the park is undone (the VM runs on,
  abort_park); once committed, the local copy goes: a parked sandbox costs this host nothing.
- resume (claim): claim_resume for the generation the fence names (one node wins), the bundle fetched into the
  local state directory (a manifest of another digest is refused before anything is copied), checked like any
  parked snapshot (the fleet key's wrap, the fleet's generation, every chunk) and against this host (QEMU, machine,
  CPU model, image); resumed; finish_resume, and the old bundle removed. Anything that fails before the guest
  answered: abort_resume, the local copy removed, the bundle still parked for a host that can honour it.
- stop: the record removed, and the sandbox's bundles.
- a daemon that died (recovery.py): what it left is judged against the fence (a park is done when the fence says
  parked), then taken back (adopt, abort_park, finish_resume, abort_resume) or given up (lose).

Nothing here runs without the fleet; the registry calls it only when it has one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from memvisor.errors import MemvisorError
from memvisor.fleet.errors import BundleNotFound, FleetError, NoSuchSandbox, StoreError, StoreFull
from memvisor.fleet.records import SandboxRecord, State
from memvisor.service.errors import Conflict
from memvisor.service.fleetd import Fleet, mismatches
from memvisor.snapshot import files, layout, park, statedir, template
from memvisor.snapshot.manifest import Manifest

log = logging.getLogger("memvisor")


class FleetOps:
    """One daemon's fleet steps, on its open state directory."""

    def __init__(self, fleet: Fleet, state: statedir.State) -> None:
        self.fleet = fleet
        self.state = state

    # -- create and stop ---------------------------------------------------------------------------------------
    def created(self, sandbox_id: str, name: str, template: str | None = None) -> None:
        self.fleet.fence.create(sandbox_id, name, template)

    def forget(self, sandbox_id: str) -> None:
        """The sandbox is gone for good (stopped, or its create failed): its record and every bundle of it."""
        with contextlib.suppress(NoSuchSandbox):
            self.fleet.fence.delete(sandbox_id)
        for bundle in self.fleet.store.of(sandbox_id):  # not a scan of the whole store on every stop
            self.fleet.store.remove(bundle.id, bundle.generation)
        with contextlib.suppress(MemvisorError):
            self.state.forget(sandbox_id)

    def stop_parked(self, record: SandboxRecord) -> None:
        """Remove a sandbox parked in the fleet (any node may: nothing of it runs)."""
        if record.state != State.PARKED:
            raise Conflict(f"sandbox {record.id} is {record.state} on node {record.node}",
                           hint="send the request to its owner")
        self.forget(record.id)

    # -- park ------------------------------------------------------------------------------------------------
    def begin_park(self, sandbox_id: str) -> int:
        """The fence shows the park; returns the generation it names now (the park's `prev`)."""
        return self.fleet.fence.begin_park(sandbox_id).generation

    def publisher(self, sandbox_id: str, prev: int) -> park.Publish:
        """What park.park calls once the snapshot is committed locally: the bundle into the store, then the
        fence's commit (undone, store first, if the commit fails)."""
        def publish(manifest: Manifest, directory: Path) -> None:
            data = manifest.to_bytes()
            sources = {f"{name}{layout.SNAP_SUFFIX}": directory / f"{name}{layout.SNAP_SUFFIX}"
                       for name in manifest.streams}
            sources.update({name: directory / name for name in manifest.files})
            try:
                self.fleet.store.put(sandbox_id, manifest.generation, sources, data)
            except StoreFull as exc:
                raise park.NoSpace(exc.message, hint=exc.hint) from None
            digest = manifest.digest().hex()  # of what the manifest says, not of its wrap (a rotation rewraps)
            try:
                self.fleet.fence.commit_park(sandbox_id, prev, manifest.generation, digest)
            except FleetError:
                if self._landed(sandbox_id, manifest.generation, digest):
                    return  # the reply was lost, not the commit: the park is done
                self.fleet.store.remove(sandbox_id, manifest.generation)
                raise
        return publish

    def _landed(self, sandbox_id: str, generation: int, digest: str) -> bool:
        """Whether a commit whose answer was lost (etcd timed out, or failed over) was applied after all: the
        record is read again, a few times, until etcd answers. Not applied (or not knowable) means the park is
        undone; applied means it must not be (the fence names this bundle: the VM must never run on)."""
        for _ in range(10):
            try:
                record = self.fleet.fence.get(sandbox_id)
            except FleetError:
                time.sleep(1.0)
                continue
            return record is not None and record.state == State.PARKED and record.generation == generation \
                and record.digest == digest
        return False

    def park_failed(self, sandbox_id: str) -> None:
        try:
            self.fleet.fence.abort_park(sandbox_id)
        except FleetError as exc:  # the next daemon (or rejoin) sets it right; the sandbox runs on here
            log.warning("sandbox %s runs on, but the fence still shows its park: %s", sandbox_id, exc.message)

    def parked(self, sandbox_id: str) -> None:
        """The park is committed in the fleet: the local copy goes (its kept disks' names included)."""
        with contextlib.suppress(MemvisorError, OSError):
            self.state.remove(sandbox_id)

    # -- resume ----------------------------------------------------------------------------------------------
    def claim(self, record: SandboxRecord) -> Manifest:
        """Claim a sandbox parked in the fleet and bring its bundle here: its manifest, authentic (the fleet
        key), current (the fleet's generation) and honourable here. On any failure it stays parked in the fleet
        (abort_resume) and nothing of it stays here."""
        fence = self.fleet.fence
        fence.claim_resume(record.id, record.generation)
        folder = self.state.sandbox_dir(record.id)
        try:
            if folder.exists():  # a copy left by an earlier claim that failed here
                self.state.remove(record.id)
            folder = self.state.sandbox_dir(record.id, create=True)
            self._fetch(record.id, record.generation, record.digest, folder, "the fence recorded")
            meta = self.state.load(record.id)
            if meta is None:
                raise statedir.SnapshotProblem("partial", f"the bundle of sandbox {record.id} has no manifest")
            wrong = mismatches(meta.sandbox.get("host"), self.fleet.compat)
            if wrong:
                raise Conflict(f"sandbox {record.id} cannot resume on node {self.fleet.node}: {'; '.join(wrong)}; "
                               "it stays parked", hint="resume it on a node that matches (memvisor fleet ls)")
            return meta
        except BaseException:
            self.resume_failed(record.id)
            raise

    def _fetch(self, bundle_id: str, generation: int, digest: str | None, folder: Path, named: str) -> None:
        """Bundle `bundle_id`/`generation` into `folder` (its manifest written last), if its manifest is the one
        whose digest (`digest`) the fleet names: compared before a byte of the bundle is copied, and again after
        (the store may change under the copy). StoreError otherwise: the bundle is refused and stays parked."""
        where = f"bundle {bundle_id}/{generation}"

        def check(data: bytes) -> None:
            found = Manifest.from_bytes(data, f"the manifest of {where}").digest().hex()
            if found != digest:
                raise StoreError(f"the manifest of {where} in the store is not the one {named} (digest "
                                 f"{found[:16]}..., not {(digest or '')[:16]}...); it stays parked",
                                 hint="the bundle was edited or replaced in the store: it is refused")

        manifest = self.fleet.store.manifest(bundle_id, generation)
        check(manifest)
        data = self.fleet.store.fetch(bundle_id, generation, folder)
        if data != manifest:
            check(data)
        files.write_atomic(folder / layout.META, data)

    def resumed(self, sandbox_id: str, generation: int) -> None:
        """The guest answered: the sandbox runs here, and the bundle it came from is consumed."""
        try:
            self.fleet.fence.finish_resume(sandbox_id)
        except FleetError as exc:
            log.warning("sandbox %s runs here, but the fence could not be told: %s", sandbox_id, exc.message)
            return
        with contextlib.suppress(BundleNotFound, FleetError):
            self.fleet.store.remove(sandbox_id, generation)

    def resume_failed(self, sandbox_id: str) -> None:
        """The sandbox stays parked in the fleet; nothing of it stays here."""
        with contextlib.suppress(MemvisorError, OSError):
            self.state.remove(sandbox_id)
        try:
            self.fleet.fence.abort_resume(sandbox_id)
        except FleetError as exc:
            log.warning("sandbox %s stays parked, but the fence could not be told: %s", sandbox_id, exc.message)

    # -- templates -------------------------------------------------------------------------------------------
    def publish_template(self, name: str, meta: Manifest) -> None:
        """A template made here goes into the store and takes its name in the fleet (FenceLost if another node's
        template has it: the local one is then removed by the caller)."""
        from memvisor.fleet.records import TemplateRecord

        folder = template.folder(self.state, name)
        sources = {f"{stream}{layout.SNAP_SUFFIX}": folder / f"{stream}{layout.SNAP_SUFFIX}" for stream in meta.streams}
        self.fleet.store.put(meta.id, meta.generation, sources, meta.to_bytes())
        try:
            self.fleet.catalog.publish(TemplateRecord(name, meta.id, meta.generation, meta.digest().hex(),
                                                      self.fleet.node))
        except BaseException:
            self.fleet.store.remove(meta.id, meta.generation)
            raise

    def fetch_template(self, name: str) -> Manifest | None:
        """Template `name` of the fleet, brought here (its bundle fetched into the local templates directory and
        checked like a local one: the fleet key's wrap, the fleet's generation, the digest the catalog names);
        None if the fleet has no such template."""
        record = self.fleet.catalog.get(name)
        if record is None:
            return None
        folder = template.folder(self.state, name, create=True)
        try:
            self._fetch(record.id, record.generation, record.digest, folder, f"the fleet names template {name}")
            meta = template.load(self.state, name)
            if meta is None:
                raise statedir.SnapshotProblem("partial", f"template {name} has no manifest here")
            return meta
        except BaseException:
            with contextlib.suppress(OSError):
                files.remove_tree(folder)
            raise

    def template_manifest(self, name: str) -> Manifest | None:
        """The manifest of the fleet's template `name` as the store holds it (None: the fleet has none)."""
        record = self.fleet.catalog.get(name)
        if record is None:
            return None
        return Manifest.from_bytes(self.fleet.store.manifest(record.id, record.generation), f"template {name}")

    def remove_template(self, name: str, meta: Manifest) -> None:
        """The template is removed fleet-wide: its name and its bundle (nodes that hold it loaded keep their copy
        for the clones they run)."""
        clones = [r.id for r in self.fleet.fence.list() if r.template == name]
        if clones:  # a parked clone resumes only on its template, and a running one parks onto it
            raise Conflict(f"template {name} is used by {len(clones)} sandbox(es) of the fleet: "
                           f"{', '.join(sorted(clones))}", hint="stop them first")
        record = self.fleet.catalog.get(name)
        if record is not None and record.id == meta.id:
            self.fleet.catalog.remove(record)
            with contextlib.suppress(BundleNotFound):
                self.fleet.store.remove(meta.id, meta.generation)
            with contextlib.suppress(MemvisorError):
                self.state.forget(meta.id)

    # -- after a crash -----------------------------------------------------------------------------------------
    def reconcile(self, running: set[str], keep: set[str]) -> None:
        """Set right what the fence says this node holds but this node does not (a daemon killed between a fence
        move and its local record: a claim whose fetch was cut, a create that never booted): a claim is given
        back (parked again), a sandbox this node does not run is given up (lost, with nothing left to resume).
        `running`: what runs here now; `keep`: what recovery left untouched (its VMM may still run)."""
        fence = self.fleet.fence
        for record in fence.list():
            if record.node != self.fleet.node or record.id in running or record.id in keep:
                continue
            try:
                if record.state == State.RESUMING:
                    fence.abort_resume(record.id)
                    log.warning("sandbox %s: its claim by this node was cut short; it is parked again", record.id)
                elif record.state in (State.RUNNING, State.PARKING):
                    fence.lose(record.id)
                    log.warning("sandbox %s: the fleet had it %s here, but nothing of it is here: lost", record.id,
                                record.state)
            except FleetError as exc:
                log.warning("sandbox %s: the fence could not be set right: %s", record.id, exc.message)

    def committed(self, sandbox_id: str, phase: str, local: dict[str, Any]) -> bool | None:
        """recovery.py's question, answered by the fence. A park was undone (the VM may go on) only while the fence
        still has the sandbox running or parking on this node at the generation the park began from (`prev` in
        the local record): in any other case (parked, claimed or running elsewhere since, removed) the VM here is
        stale and must not run again. A resume's snapshot still holds while the fence says it resumes here."""
        record = self.fleet.fence.get(sandbox_id)
        if phase == "parking":
            mine = record is not None and record.node == self.fleet.node \
                and record.state in (State.RUNNING, State.PARKING) and record.generation == local.get("prev")
            return not mine
        if phase == "resuming":
            return record is not None and record.state == State.RESUMING and record.node == self.fleet.node
        return None

    def recovered(self, sandbox_id: str, state: str, generation: object) -> None:
        """Tell the fence what recovery made of a sandbox this node had when its daemon died."""
        fence = self.fleet.fence
        if state == "undecided":
            return
        try:
            record = fence.get(sandbox_id)
            if record is None:
                return
            if state == "running":
                if record.state == State.PARKING:
                    fence.abort_park(sandbox_id)
                elif record.state == State.RESUMING:
                    fence.finish_resume(sandbox_id)
                    if isinstance(generation, int):
                        with contextlib.suppress(BundleNotFound):
                            self.fleet.store.remove(sandbox_id, generation)
                else:
                    fence.adopt(sandbox_id)
            elif state == "parked" and record.state == State.RESUMING and record.node == self.fleet.node:
                fence.abort_resume(sandbox_id)
            elif state == "lost" and record.node == self.fleet.node:
                fence.lose(sandbox_id)
            elif state == "gone" and record.node == self.fleet.node:
                fence.delete(sandbox_id)
            if state == "parked":  # in the store: the local copy (a park's, or a fetched bundle) goes
                self.parked(sandbox_id)
        except FleetError as exc:
            log.warning("sandbox %s (%s after the crash): the fence could not be told: %s", sandbox_id, state,
                        exc.message)
