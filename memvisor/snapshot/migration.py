"""QEMU's migration stream through a pipe: sealed chunk by chunk on its way out of a paused VM, checked chunk by
chunk on its way into a paused one; and the guest's side of a park: told to get ready (PARK), told to go on
(RESUMED) when a park is undone. Used by park.py (parks and resumes) and template.py (freezes and clones).

The VMM is under `-sandbox spawn=deny`: it gets the pipe's end as an fd (SCM_RIGHTS + `getfd`), never a path or a
command. This module decides nothing about where streams live or which generation is current.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from memvisor import proto
from memvisor.errors import MemvisorError
from memvisor.host.sandbox import Instance
from memvisor.host.vmm.qmp import QMP
from memvisor.snapshot import files, seal

log = logging.getLogger("memvisor")
PARK_ANSWER_S = 30.0  # the guest's PARKING: a sync of its dirty pages, under TCG
UNPARK_ANSWER_S = 30.0  # the guest's RESUMED after a park was undone
MIGRATION_S = 120.0  # save or load of the stream (RAM-sized: ~0.2 s for 100 MB here); bounds a daemon's exit
# Free-page reporting hands pages back at most every 2 s (the guest's PAGE_REPORTING_DELAY): wait that long after
# the guest dropped its caches, so the pages it freed are zero pages in the stream, not copies of stale data.
REPORTING_SETTLE_S = 2.5
MAX_BANDWIDTH = 100 << 30  # bytes/s: QEMU's default (128 MiB/s) throttles even a paused VM
POLL_S = 0.02
STREAM = "vm"
FD_NAME = "memvisor-stream"

StepFn = Callable[[str], None]


class ParkError(MemvisorError):
    """A park or resume failed on the VMM's or the guest's side (the sandbox stays as it was: running or parked)."""



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


def save_stream(qmp: QMP, path: Any, key: bytes | bytearray, ident: seal.Ident, step: StepFn,
                stream: str = STREAM) -> seal.SealWriter:
    """Migrate the paused VM into a pipe, sealing what comes out of it into `path` as stream `stream`; returns
    the closed writer."""
    qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
    qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    writer = seal.SealWriter(path, key, ident, stream)
    failure: list[BaseException] = []

    def pump() -> None:
        buffer = bytearray(1 << 20)  # guest RAM in the clear: one buffer, reused, zeroed at the end
        try:
            with writer, memoryview(buffer) as view:
                while n := os.readv(read_end, [buffer]):
                    writer.write(view[:n])
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            failure.append(exc)
            # Drain the rest so QEMU finishes at once rather than blocking on a full pipe until MIGRATION_S.
            with contextlib.suppress(OSError):
                while os.readv(read_end, [buffer]):
                    pass
        finally:
            files.zero(buffer)

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
        inst.session.ask(proto.Kind.RESUMED, {"realtime": time.time()}, proto.Kind.RESUMED, UNPARK_ANSWER_S)
    except (OSError, TimeoutError, ConnectionError) as exc:
        log.warning("sandbox %s: the guest did not answer after a failed park: %s", inst.id, exc)


def load_stream(qmp: QMP, inst: Instance, path: Any, key: bytes | bytearray, ident: seal.Ident,
                stream: str = STREAM) -> None:
    """Feed the sealed stream `stream` to the paused VMM through a pipe, checking each chunk on the way; returns
    when the VM is loaded (paused)."""
    qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    failure: list[BaseException] = []

    def pump() -> None:
        try:
            for chunk in seal.read_chunks(path, key, ident, stream):
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
