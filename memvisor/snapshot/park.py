"""Parking a running sandbox to a sealed snapshot, and resuming it (docs/parking.md).

Park: the guest gets ready (PARK: sync, drop its caches, compact, go quiet), the VM is paused, and QEMU writes its
migration stream into a pipe that memvisor reads and seals chunk by chunk (snapshot/seal.py) into the sandbox's
root-only state directory (snapshot/statedir.py); the sandbox's disks (swap, scratch) are given names there; the
snapshot is committed by writing meta.json last; only then does the VMM quit. Anything that fails before the
commit leaves the sandbox running as it was: the VM is continued and the partial files are removed.

Resume: the manifest is authenticated (statedir.py), every chunk is verified and every kept disk is opened without
following a link and checked on its descriptor before a VMM starts (a snapshot changed, cut, reordered, of
another sandbox, of a template or of an older generation is refused and stays parked); a VMM with the same devices
starts paused with `-incoming defer`, gets the kept disks as those very descriptors, takes the stream from a pipe
memvisor fills (checking each chunk again as it goes), and runs (`cont`); the guest is told RESUMED with the
wall-clock time. Only once it has answered is the snapshot uncommitted (meta.json removed, its generation retired
in the ledger), so a resume never loses a sandbox: anything that fails before the answer kills the new VMM and
the sandbox stays parked on its intact snapshot. That is safe because the guest keeps its workload and its
scratch filesystem frozen from PARKING until it is told RESUMED: before then nothing of it writes to the kept
disks, so the snapshot still matches them. (The guest's kernel runs in that window and could in principle write
swap under memory pressure, which the frozen workload does not create; with confidential swap such a write is an
I/O error at a later resume of the same snapshot, never stale data.)

This module is the host layer: the daemon (memvisor/service) decides when to park; nothing here imports it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memvisor import proto
from memvisor.errors import MemvisorError
from memvisor.host import swapfile
from memvisor.host.sandbox import Instance
from memvisor.host.vmm.qmp import QMP
from memvisor.snapshot import files, migration, park_ram, seal, statedir
from memvisor.snapshot.manifest import PROTECTIONS, KeptFile, Manifest, TemplateRef

log = logging.getLogger("memvisor")
RESUMED_ANSWER_S = 30.0  # the resumed guest's answer: its clock set, its workload thawed
STREAM = migration.STREAM
RAM_STREAM = "ram"  # memctl's guest RAM (snapshot/park_ram.py)
ParkError = migration.ParkError  # the names callers know them by
StepFn = migration.StepFn


class NoSpace(migration.ParkError):
    """A park failed because the state directory's filesystem is full (or the quota is): the sandbox runs on."""


def _no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Figures:
    """What a park or resume took, for the caller's report."""

    seconds: float
    stream_bytes: int  # the migration stream's plaintext
    file_bytes: int  # what the sealed files and kept disks hold on disk (allocated blocks)
    guest: dict[str, Any]  # the guest's PARKING or RESUMED answer


def stream_sizes(writer: seal.SealWriter) -> dict[str, int]:
    """A closed stream's sizes for its manifest: plaintext, file, and what the file holds on disk."""
    return {"plaintext_bytes": writer.plaintext_bytes, "file_bytes": writer.file_bytes,
            "allocated_bytes": files.allocated(os.stat(writer.path))}


def protection(inst: Instance, name: str) -> str:
    """What guards kept disk `name` against the host while parked (manifest.PROTECTIONS): swap, the mode the guest
    set up (a weaker one than asked only when the policy allows it); scratch, the policy's scratch mode."""
    if name == "swap.img":
        setup = (inst.session.hello or {}).get("swap") if inst.session is not None else None
        mode = setup.get("effective") if isinstance(setup, dict) else None
        mode = mode if mode in PROTECTIONS else str(inst.policy.effective_swap_mode)
    else:
        mode = str(inst.policy.scratch_mode)
    return mode if mode in PROTECTIONS else "plain"


def template_ref(template: Manifest | None) -> TemplateRef | None:
    """What a clone's manifest binds of its template."""
    if template is None:
        return None
    return TemplateRef(name=str(template.sandbox.get("name")), id=template.id, generation=template.generation,
                       digest=template.digest().hex())


Publish = Callable[[Manifest, Path], None]


def park(state: statedir.State, inst: Instance, sandbox: dict[str, Any], template: Manifest | None = None,
         on_step: StepFn | None = None, publish: Publish | None = None) -> tuple[Manifest, Figures]:
    """Park `inst` (running, no command in flight): returns the committed snapshot's manifest and figures. The
    Instance is closed (its VMM gone) only on success; on any failure it keeps running and MemvisorError says
    why. `sandbox` goes into the manifest for whoever resumes it (policy, name, image...); `template` is the
    manifest of the template `inst` is a clone of (its id, generation and digest are bound into the clone's).
    `publish(manifest, directory)`: called once the snapshot is committed in the state directory and before the
    VMM quits (a fleet daemon puts the bundle into its store and commits it in the fence there); if it raises, the
    park is undone like any other failure: the local commit is withdrawn and the VM runs on."""
    step = on_step or (lambda _s: None)
    start = time.monotonic()
    answer = migration.quiesce(inst, step)
    session, process = inst.session, inst.process
    assert session is not None and process is not None
    directory = state.sandbox_dir(inst.id)
    fresh = not directory.exists()
    stream_path = directory / f"{STREAM}.snap"
    ram_path = directory / f"{RAM_STREAM}.snap"
    key = seal.new_key()
    stopped = False
    kept: dict[str, KeptFile] = {}
    linked: list[Path] = []  # disks this park gave a name (a resumed sandbox's are named already)
    committed = False
    try:
        generation = state.generations.advance(inst.id, state.generations.current(inst.id))
        ident = seal.Ident(inst.id, generation)
        state.sandbox_dir(inst.id, create=True)
        for path in (stream_path, ram_path):
            path.unlink(missing_ok=True)  # an older generation's, never committed
        with QMP(inst.qmp_path) as qmp:
            step("pause")
            qmp.execute("stop")
            stopped = True
            writer = migration.save_stream(qmp, stream_path, key, ident, step)
            streams = {STREAM: stream_sizes(writer)}
            if inst.memctl is not None:  # guest RAM in a shared memfd, which QEMU's stream skipped
                step("ram")
                with seal.SealWriter(ram_path, key, ident, RAM_STREAM) as ram:
                    park_ram.save(inst.memctl, ram)
                streams[RAM_STREAM] = stream_sizes(ram)
            step("disks")
            for name, fd in inst.disk_fds.items():
                os.fsync(fd)
                if not (directory / name).exists():
                    linked.append(directory / name)
                swapfile.keep(fd, directory / name)
                st = os.stat(directory / name, follow_symlinks=False)
                kept[name] = KeptFile(bytes=st.st_size, allocated_bytes=files.allocated(st),
                                      protection=protection(inst, name))
            manifest = state.wrap(Manifest(
                kind="sandbox", id=inst.id, generation=generation, parked_at=time.time(), streams=streams,
                files=kept, sandbox={**sandbox, "hello": session.hello}, template=template_ref(template)), key)
            step("commit")
            state.commit(manifest)
            committed = True
            if publish is not None:
                step("publish")
                publish(manifest, directory)
            with contextlib.suppress(MemvisorError):
                qmp.execute("quit", timeout=2.0)
        with contextlib.suppress(subprocess.TimeoutExpired):  # then close() has nothing left to stop
            process.wait(timeout=5.0)
    except BaseException as exc:
        if committed:  # withdrawn, durably: the VM runs on, so this snapshot must never be resumed
            statedir.drop_snapshot(directory)
        for path in (stream_path, ram_path, *linked):
            path.unlink(missing_ok=True)
        if fresh:  # a first park leaves no trace; a resumed sandbox's directory holds its disks' names
            with contextlib.suppress(OSError):
                directory.rmdir()
        if stopped:
            migration.continue_vm(inst)
        else:
            migration.unpark_guest(inst)  # told PARK, never paused: it must hear RESUMED to go on
        cause = exc.__cause__ if isinstance(exc, MemvisorError) and exc.__cause__ is not None else exc
        if isinstance(exc, NoSpace):  # a publisher's store is full
            raise NoSpace(f"parking sandbox {inst.id} failed: {exc.message}; it keeps running", hint=exc.hint) from None
        if _no_space(cause):
            raise NoSpace(f"parking sandbox {inst.id} failed: no space left in {directory.parent}; it keeps running",
                          hint="free space on the state directory's filesystem (MEMVISOR_STATE_DIR)") from None
        if isinstance(exc, MemvisorError | OSError):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ParkError(f"parking sandbox {inst.id} failed: {reason}; it keeps running") from None
        raise
    finally:
        files.zero(key)
    inst.close()
    figures = Figures(round(time.monotonic() - start, 3), sum(s["plaintext_bytes"] for s in streams.values()),
                      manifest.disk_bytes(), answer)
    return manifest, figures


# -- resume -------------------------------------------------------------------------------------------------------
def check(state: statedir.State, meta: Manifest, template: Manifest | None = None
          ) -> tuple[Manifest, bytearray, dict[str, int]]:
    """Everything about a parked snapshot that can be checked without a VMM: its manifest authentic and current,
    every chunk authenticated, its template (a clone's) the one it was made of, and every kept disk opened and
    checked on its descriptor. Returns the manifest as on disk, its key (the caller zeroes it) and the kept disks'
    fds (the caller owns them). Raises SealError or StateError (MemvisorError) naming what is wrong, and that the
    sandbox stays parked; nothing is changed."""
    what = f"sandbox {meta.id}"
    on_disk = state.load(meta.id)
    if on_disk is None:
        raise statedir.SnapshotProblem("partial", f"{what} has no committed snapshot in {state.root}")
    if on_disk.generation != meta.generation:
        raise seal.SealError(f"the snapshot of {what} is generation {on_disk.generation}, not {meta.generation} as "
                             "parked: an older or newer snapshot is never resumed")
    check_template(on_disk, template)
    key = state.unwrap(on_disk)
    fds: dict[str, int] = {}
    try:
        directory = state.sandbox_dir(on_disk.id)
        for name in on_disk.streams:
            seal.verify(directory / f"{name}.snap", key, on_disk.ident, name)
        fds = state.open_kept(directory, on_disk, what)
    except BaseException:
        files.zero(key)
        raise
    return on_disk, key, fds


def check_template(meta: Manifest, template: Manifest | None) -> None:
    """StateError unless `template` is the very template the clone `meta` was made of (or neither is a clone):
    a template made again under the same name is another template, whose RAM the clone's state does not fit."""
    bound = meta.template
    if bound is None and template is None:
        return
    if bound is None:
        raise statedir.SnapshotProblem("damaged", f"sandbox {meta.id} is not a clone, yet a template was given")
    if template is None:
        raise statedir.SnapshotProblem(
            "files", f"sandbox {meta.id} is a clone of template {bound.name} ({bound.id}), which is gone: it "
                     "stays parked", hint="it cannot resume without that template; stop it")
    if (template.id, template.generation, template.digest().hex()) != (bound.id, bound.generation, bound.digest):
        raise statedir.SnapshotProblem(
            "files", f"sandbox {meta.id} is a clone of template {bound.name} {bound.id} (generation "
                     f"{bound.generation}), but template {bound.name} is now {template.id} (generation "
                     f"{template.generation}): it was made again, and the clone cannot resume over another "
                     "template; it stays parked", hint="stop the clone, or put the template it was made of back")


def resume(state: statedir.State, inst: Instance, meta: Manifest, template: Manifest | None = None,
           on_step: StepFn | None = None, start: Callable[[], None] | None = None) -> Figures:
    """Resume the parked sandbox `meta` in `inst`, a new Instance of the same id and policy (not yet planned);
    `template`: a clone's template (inst.clone_ram_fd is its RAM). `start`: how to start its VMM (default
    inst.start; the daemon starts every VMM on one thread). On success the Instance runs and the snapshot is
    consumed; on failure before the guest answered RESUMED the Instance is closed and the snapshot stays parked,
    intact (MemvisorError says why; see the module's docstring for why that is safe)."""
    step = on_step or (lambda _s: None)
    began = time.monotonic()
    step("verify")
    hello = meta.sandbox.get("hello")
    if not isinstance(hello, dict):
        raise seal.SealError(f"the snapshot of sandbox {meta.id} has no HELLO of its guest")
    meta, key, kept = check(state, meta, template)
    inst.kept_disks = kept  # the Instance owns the checked descriptors from here, and hands them to QEMU
    ident = meta.ident
    directory = state.sandbox_dir(meta.id)
    try:
        # memctl's and a templatable sandbox's RAM is a memfd of memvisor's: its own stream. A clone's RAM maps
        # its template privately: QEMU's stream carries it.
        owned = inst.policy.memctl or (inst.policy.templatable and inst.clone_ram_fd is None)
        if (RAM_STREAM in meta.streams) != owned:
            carried = "carries" if RAM_STREAM in meta.streams else "lacks"
            raise seal.SealError(f"the snapshot of sandbox {meta.id} {carried} a RAM stream of its own, but its "
                                 f"guest RAM {'is' if owned else 'is not'} a memfd of memvisor's")
        inst.resume_hello = hello
        step("start")
        (start or inst.start)()
        if inst.memctl is not None:  # before QEMU loads its stream: it expects the shared RAM filled
            step("ram")
            park_ram.load(inst.memctl, directory / f"{RAM_STREAM}.snap", key, ident)
        with QMP(inst.qmp_path) as qmp:
            step("load")
            migration.load_stream(qmp, inst, directory / f"{STREAM}.snap", key, ident)
            step("continue")
            qmp.execute("cont")
        assert inst.session is not None
        step("resumed")
        answer = inst.session.ask(proto.Kind.RESUMED, {"realtime": time.time()}, proto.Kind.RESUMED,
                                  RESUMED_ANSWER_S)
    except BaseException as exc:
        inst.failed = True
        inst.close()
        if isinstance(exc, MemvisorError | OSError | TimeoutError | ConnectionError):
            if isinstance(exc, seal.SealError | statedir.StateError):
                raise
            raise ParkError(f"resuming sandbox {meta.id} failed: {exc}; it stays parked") from None
        raise
    finally:
        files.zero(key)
    # The guest runs on from here (its workload thawed): the snapshot must never be resumed again.
    step("uncommit")
    try:
        state.uncommit(meta.id, meta.generation)
    except (MemvisorError, OSError) as exc:
        # It runs; the stale snapshot is retired by its next park (a new generation) or the next daemon's scan.
        inst.warn(f"sandbox {meta.id} resumed, but its snapshot could not be retired: {exc}")
    if answer.get("error"):
        inst.warn(f"sandbox {meta.id} resumed, but its clock: {answer['error']}")
    return Figures(round(time.monotonic() - began, 3), sum(s["plaintext_bytes"] for s in meta.streams.values()),
                   meta.disk_bytes(), answer)
