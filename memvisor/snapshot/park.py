"""Parking a running sandbox to a sealed snapshot, and resuming it (docs/parking.md).

Park: the guest gets ready (PARK: sync, drop its caches, compact, go quiet), the VM is paused, and QEMU writes its
migration stream into a pipe that memvisor reads and seals chunk by chunk (snapshot/seal.py) into the sandbox's
root-only state directory (snapshot/statedir.py); the sandbox's disks (swap, scratch) are given names there; the
snapshot is committed by writing meta.json last; only then does the VMM quit. Anything that fails before the
commit leaves the sandbox running as it was: the VM is continued and the partial files are removed.

Resume: every chunk is verified before a VMM starts (a snapshot changed, cut, reordered, of another sandbox or of
an older generation is refused and stays parked); a VMM with the same devices starts paused with `-incoming
defer`, takes the stream from a pipe memvisor fills (checking each chunk again as it goes), and the snapshot is
uncommitted (meta.json removed) before the guest runs again, so a snapshot can never be resumed twice or over
disks the guest has changed since; then the guest is told the wall-clock time.

This module is the host layer: the daemon (memvisor/service) decides when to park; nothing here imports it.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import logging
import os
import subprocess
import threading
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
from memvisor.snapshot import park_ram, seal, statedir

log = logging.getLogger("memvisor")
PARK_ANSWER_S = 30.0  # the guest's PARKING: a sync of its dirty pages, under TCG
RESUMED_ANSWER_S = 30.0
MIGRATION_S = 120.0  # save or load of the stream (RAM-sized: ~0.2 s for 100 MB here); bounds a daemon's exit
# Free-page reporting hands pages back at most every 2 s (the guest's PAGE_REPORTING_DELAY): wait that long after
# the guest dropped its caches, so the pages it freed are zero pages in the stream, not copies of stale data.
REPORTING_SETTLE_S = 2.5
MAX_BANDWIDTH = 100 << 30  # bytes/s: QEMU's default (128 MiB/s) throttles even a paused VM
POLL_S = 0.02
STREAM = "vm"
RAM_STREAM = "ram"  # memctl's guest RAM (snapshot/park_ram.py)
FD_NAME = "memvisor-stream"

StepFn = Callable[[str], None]


class ParkError(MemvisorError):
    """A park or resume failed on the VMM's or the guest's side (the sandbox stays as it was: running or parked)."""


class NoSpace(ParkError):
    """A park failed because the state directory's filesystem is full (or the quota is): the sandbox runs on."""


def _no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Figures:
    """What a park or resume took, for the caller's report."""

    seconds: float
    stream_bytes: int  # the migration stream's plaintext
    file_bytes: int  # what the sealed files hold on disk
    guest: dict[str, Any]  # the guest's PARKING or RESUMED answer


def park(inst: Instance, sandbox: dict[str, Any], on_step: StepFn | None = None) -> tuple[statedir.Meta, Figures]:
    """Park `inst` (running, no command in flight): returns the committed snapshot's metadata and figures. The
    Instance is closed (its VMM gone) only on success; on any failure it keeps running and MemvisorError says
    why. `sandbox` is kept opaque in meta.json for whoever resumes it (policy, name, image...)."""
    step = on_step or (lambda _s: None)
    start = time.monotonic()
    answer = quiesce(inst, step)
    session, process = inst.session, inst.process
    assert session is not None and process is not None
    generation = statedir.next_generation(inst.id)
    ident = seal.Ident(inst.id, generation)
    fresh = not statedir.sandbox_dir(inst.id).exists()
    directory = statedir.sandbox_dir(inst.id, create=True)
    stream_path = directory / f"{STREAM}.snap"
    ram_path = directory / f"{RAM_STREAM}.snap"
    for path in (stream_path, ram_path):
        path.unlink(missing_ok=True)  # an older generation's, never committed
    key = seal.new_key()
    stopped = False
    files: dict[str, int] = {}
    linked: list[Path] = []  # disks this park gave a name (a resumed sandbox's are named already)
    try:
        with QMP(inst.qmp_path) as qmp:
            step("pause")
            qmp.execute("stop")
            stopped = True
            writer = save_stream(qmp, stream_path, key, ident, step)
            streams = {STREAM: {"plaintext_bytes": writer.plaintext_bytes, "file_bytes": writer.file_bytes}}
            if inst.memctl is not None:  # guest RAM in a shared memfd, which QEMU's stream skipped
                step("ram")
                with seal.SealWriter(ram_path, key, ident, RAM_STREAM) as ram:
                    park_ram.save(inst.memctl, ram)
                streams[RAM_STREAM] = {"plaintext_bytes": ram.plaintext_bytes, "file_bytes": ram.file_bytes}
            step("disks")
            for name, fd in inst.disk_fds.items():
                os.fsync(fd)
                if not (directory / name).exists():
                    linked.append(directory / name)
                swapfile.keep(fd, directory / name)
                files[name] = os.fstat(fd).st_size
            meta = statedir.Meta(
                sandbox_id=inst.id, generation=generation, parked_at=time.time(),
                wrapped_key=base64.b64encode(seal.wrap_key(statedir.host_key(), key, ident)).decode(),
                streams=streams,
                files=files, sandbox={**sandbox, "hello": session.hello})
            step("commit")
            statedir.commit(meta)
            with contextlib.suppress(MemvisorError):
                qmp.execute("quit", timeout=2.0)
        with contextlib.suppress(subprocess.TimeoutExpired):  # then close() has nothing left to stop
            process.wait(timeout=5.0)
    except BaseException as exc:
        for path in (stream_path, ram_path, *linked):
            path.unlink(missing_ok=True)
        if fresh:  # a first park leaves no trace; a resumed sandbox's directory holds its disks' names
            with contextlib.suppress(OSError):
                directory.rmdir()
        if stopped:
            continue_vm(inst)
        cause = exc.__cause__ if isinstance(exc, MemvisorError) and exc.__cause__ is not None else exc
        if _no_space(cause):
            raise NoSpace(f"parking sandbox {inst.id} failed: no space left in {directory.parent}; it keeps running",
                          hint="free space on the state directory's filesystem (MEMVISOR_STATE_DIR)") from None
        if isinstance(exc, MemvisorError | OSError):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ParkError(f"parking sandbox {inst.id} failed: {reason}; it keeps running") from None
        raise
    inst.close()
    figures = Figures(round(time.monotonic() - start, 3), sum(s["plaintext_bytes"] for s in streams.values()),
                      sum(s["file_bytes"] for s in streams.values()) + sum(files.values()), answer)
    return meta, figures


def quiesce(inst: Instance, step: StepFn, what: str = "park") -> dict[str, Any]:
    """Get a running sandbox with no command in flight ready to be saved (the guest's PARK; with a balloon, the
    wait for free-page reporting): its PARKING answer. MemvisorError if it is not running, runs commands or will
    not; then it runs on as it was."""
    session, process = inst.session, inst.process
    if session is None or process is None or process.poll() is not None or session.gone.is_set():
        raise MemvisorError(f"sandbox {inst.id} is not running")
    if session.commands:
        raise MemvisorError(f"sandbox {inst.id} runs {len(session.commands)} command(s)",
                            hint=f"{what} it when they have ended")
    step("guest")
    try:
        answer = session.ask(proto.Kind.PARK, {}, proto.Kind.PARKING, PARK_ANSWER_S)
    except (OSError, TimeoutError, ConnectionError) as exc:
        raise ParkError(f"sandbox {inst.id} did not get ready to {what}: {exc}") from None
    if not answer.get("ok"):
        unpark_guest(inst)
        raise MemvisorError(f"sandbox {inst.id} will not {what}: {answer.get('reason', 'no reason given')}")
    if inst.policy.balloon:
        time.sleep(REPORTING_SETTLE_S)
    return answer


def save_stream(qmp: QMP, path: Any, key: bytes, ident: seal.Ident, step: StepFn) -> seal.SealWriter:
    """Migrate the paused VM into a pipe, sealing what comes out of it into `path`; returns the closed writer."""
    qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
    qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    writer = seal.SealWriter(path, key, ident, STREAM)
    failure: list[BaseException] = []

    def pump() -> None:
        try:
            with writer:
                while data := os.read(read_end, 1 << 20):
                    writer.write(data)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            failure.append(exc)
            # Drain the rest so QEMU finishes at once rather than blocking on a full pipe until MIGRATION_S.
            with contextlib.suppress(OSError):
                while os.read(read_end, 1 << 20):
                    pass

    thread = threading.Thread(target=pump, name="memvisor-park", daemon=True)
    thread.start()
    try:
        try:
            qmp.pass_fd(write_end, FD_NAME)
        finally:
            os.close(write_end)  # QEMU has its copy: EOF comes when it closes it
        step("save")
        qmp.execute("migrate", {"uri": f"fd:{FD_NAME}"})
        status = _wait_migration(qmp)
        if status.get("status") != "completed":
            raise MemvisorError(f"QEMU could not save the VM: {status.get('error-desc', status.get('status'))}")
        thread.join(MIGRATION_S)
        if thread.is_alive():
            raise MemvisorError("the migration stream did not end")
    finally:
        os.close(read_end)  # a pump still blocked gets EBADF and gives up
        thread.join(5.0)
    if failure:
        exc = failure[0]
        raise MemvisorError(f"cannot write the snapshot: {exc.strerror if isinstance(exc, OSError) else exc}") from exc
    return writer


def _wait_migration(qmp: QMP) -> dict[str, Any]:
    deadline = time.monotonic() + MIGRATION_S
    while time.monotonic() < deadline:
        status: dict[str, Any] = qmp.execute("query-migrate")
        if status.get("status") in ("completed", "failed", "cancelled"):
            return status
        time.sleep(POLL_S)
    qmp.execute("migrate_cancel")
    raise MemvisorError(f"saving the VM took over {MIGRATION_S:g} s")


def continue_vm(inst: Instance) -> None:
    """Undo a park that failed after the pause: run the VM again and let the guest report again."""
    try:
        with QMP(inst.qmp_path) as qmp:
            # A migration reports "completed" a moment before the VM's run state leaves finish-migrate; a `cont`
            # in between would race QEMU's own move to postmigrate.
            deadline = time.monotonic() + 5.0
            while qmp.execute("query-status").get("status") == "finish-migrate" and time.monotonic() < deadline:
                time.sleep(POLL_S)
            qmp.execute("cont")
    except MemvisorError as exc:
        log.warning("sandbox %s: cannot continue the VM after a failed park: %s", inst.id, exc)
    unpark_guest(inst)


def unpark_guest(inst: Instance) -> None:
    assert inst.session is not None
    try:
        inst.session.ask(proto.Kind.RESUMED, {"realtime": time.time()}, proto.Kind.RESUMED, RESUMED_ANSWER_S)
    except (OSError, TimeoutError, ConnectionError) as exc:
        log.warning("sandbox %s: the guest did not answer after a failed park: %s", inst.id, exc)


# -- resume -------------------------------------------------------------------------------------------------------
def check(meta: statedir.Meta) -> bytes:
    """Everything about a parked snapshot that can be checked without a VMM, with every chunk authenticated:
    returns its key. Raises SealError (MemvisorError) naming what is wrong; nothing is changed."""
    on_disk = statedir.load(meta.sandbox_id)  # StateError if it is not of the ledger's generation
    if on_disk is None:
        raise seal.SealError(f"sandbox {meta.sandbox_id} has no committed snapshot in {statedir.root()}")
    if on_disk.generation != meta.generation:
        raise seal.SealError(f"the snapshot of sandbox {meta.sandbox_id} is generation {on_disk.generation}, not "
                             f"{meta.generation} as parked: an older or newer snapshot is never resumed")
    meta = on_disk
    ident = seal.Ident(meta.sandbox_id, meta.generation)
    try:
        wrapped = base64.b64decode(meta.wrapped_key, validate=True)
    except ValueError:
        raise seal.SealError(f"the snapshot key of sandbox {meta.sandbox_id} is not base64") from None
    key = seal.unwrap_key(statedir.host_key(), wrapped, ident)
    directory = statedir.sandbox_dir(meta.sandbox_id)
    for name in meta.streams:
        seal.verify(directory / f"{name}.snap", key, ident, name)
    for name, size in meta.files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            raise seal.SealError(f"the parked disk {name} of sandbox {meta.sandbox_id} is missing or not "
                                 f"{size} bytes")
    return key


def resume(inst: Instance, meta: statedir.Meta, on_step: StepFn | None = None,
           start: Callable[[], None] | None = None) -> Figures:
    """Resume the parked sandbox `meta` in `inst`, a new Instance of the same id and policy (not yet planned).
    `start`: how to start its VMM (default inst.start; the daemon starts every VMM on one thread). On success
    the Instance runs and the snapshot is consumed; on failure the Instance is closed and the snapshot stays
    parked (MemvisorError says why)."""
    step = on_step or (lambda _s: None)
    began = time.monotonic()
    step("verify")
    key = check(meta)
    ident = seal.Ident(meta.sandbox_id, meta.generation)
    directory = statedir.sandbox_dir(meta.sandbox_id)
    hello = meta.sandbox.get("hello")
    if not isinstance(hello, dict):
        raise seal.SealError(f"the snapshot of sandbox {meta.sandbox_id} has no HELLO of its guest")
    # memctl's and a templatable sandbox's RAM is a memfd of memvisor's: its own stream. A clone's RAM maps its
    # template privately: QEMU's stream carries it.
    owned = inst.policy.memctl or (inst.policy.templatable and inst.clone_ram_fd is None)
    if (RAM_STREAM in meta.streams) != owned:
        carried = "carries" if RAM_STREAM in meta.streams else "lacks"
        raise seal.SealError(f"the snapshot of sandbox {meta.sandbox_id} {carried} a RAM stream of its own, but "
                             f"its guest RAM {'is' if owned else 'is not'} a memfd of memvisor's")
    inst.kept_disks = {name: directory / name for name in meta.files}
    inst.resume_hello = hello
    try:
        step("start")
        (start or inst.start)()
        if inst.memctl is not None:  # before QEMU loads its stream: it expects the shared RAM filled
            step("ram")
            park_ram.load(inst.memctl, directory / f"{RAM_STREAM}.snap", key, ident)
        with QMP(inst.qmp_path) as qmp:
            step("load")
            load_stream(qmp, inst, directory / f"{STREAM}.snap", key, ident)
            # From here the guest may change its disks: the snapshot must never be resumed again.
            statedir.uncommit(meta.sandbox_id)
            step("continue")
            qmp.execute("cont")
        assert inst.session is not None
        answer = inst.session.ask(proto.Kind.RESUMED, {"realtime": time.time()}, proto.Kind.RESUMED,
                                  RESUMED_ANSWER_S)
    except BaseException as exc:
        inst.failed = True
        inst.close()
        if isinstance(exc, MemvisorError | OSError | TimeoutError | ConnectionError):
            if isinstance(exc, seal.SealError | statedir.StateError):
                raise
            raise ParkError(f"resuming sandbox {meta.sandbox_id} failed: {exc}; it stays parked") from None
        raise
    if answer.get("error"):
        inst.warn(f"sandbox {meta.sandbox_id} resumed, but its clock: {answer['error']}")
    return Figures(round(time.monotonic() - began, 3), sum(s["plaintext_bytes"] for s in meta.streams.values()),
                   sum(s["file_bytes"] for s in meta.streams.values()), answer)


def load_stream(qmp: QMP, inst: Instance, path: Any, key: bytes, ident: seal.Ident) -> None:
    """Feed the sealed stream to the paused VMM through a pipe, checking each chunk on the way; returns when
    the VM is loaded (paused)."""
    qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    failure: list[BaseException] = []

    def pump() -> None:
        try:
            for chunk in seal.read_chunks(path, key, ident, STREAM):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(write_end, view):]
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            failure.append(exc)
        finally:
            os.close(write_end)  # EOF (or a cut stream, which QEMU refuses)

    try:
        qmp.pass_fd(read_end, FD_NAME)
    finally:
        os.close(read_end)
    thread = threading.Thread(target=pump, name="memvisor-resume", daemon=True)
    thread.start()
    qmp.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
    assert inst.process is not None
    deadline = time.monotonic() + MIGRATION_S
    while True:
        if failure:
            raise failure[0]
        if inst.process.poll() is not None:
            raise MemvisorError(f"the VMM exited while loading the snapshot: {inst.vmm_log_tail()}")
        status = qmp.execute("query-status")
        if status.get("status") != "inmigrate":
            break
        if time.monotonic() > deadline:
            raise MemvisorError(f"loading the snapshot took over {MIGRATION_S:g} s")
        time.sleep(POLL_S)
    thread.join(5.0)
    if failure:
        raise failure[0]
    if status.get("status") != "paused":
        raise MemvisorError(f"the VMM is {status.get('status')} after loading the snapshot, not paused")
