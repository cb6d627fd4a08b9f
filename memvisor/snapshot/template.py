"""Templates and clones (docs/templates.md): a warm sandbox frozen once; clones that start from it in a fraction of
a boot and share every page they do not write.

Freeze: a templatable sandbox (guest RAM in a memfd memvisor owns, no balloon, swap deferred) gets ready as for a
park, QEMU saves its device state into a sealed stream (x-ignore-shared: the RAM is not in it), memvisor seals the
RAM into a stream of its own (snapshot/park_ram.py), the manifest is written last; the VMM quits, memvisor drops its
own mapping and seals the memfd against writes, growth and shrinking (F_SEAL_WRITE | GROW | SHRINK | SEAL). That
memfd is the one copy of the template's RAM every clone maps; the sealed streams under <state>/templates/<name>/
let a later daemon rebuild it (open_ram).

Identity: every template gets a random id (`t-` + 16 hex) and its generation in the ledger (advanced at the freeze,
forgotten at its removal); its manifest is of kind "template" and its streams are "template-vm" and
"template-ram", so a template's files are never resumed as a sandbox, and a template made again under the same
name is another template: a clone's manifest binds its template's id, generation and digest (park.check_template).

Clone: a new Instance with the template's policy maps the sealed memfd privately (copy-on-write: what a clone
writes is its own) and takes the device state in (`-incoming defer`); after `cont` the guest is told CLONED (a new
id, 32 bytes of host entropy, the time) and becomes its own machine before any command runs (guest/clone.py).

This module is the host layer: the daemon decides when; nothing here imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memvisor import proto
from memvisor.errors import MemvisorError
from memvisor.host import memctl
from memvisor.host.runtime import TEMPLATE_NAME
from memvisor.host.sandbox import Instance
from memvisor.host.vmm.qmp import QMP
from memvisor.snapshot import files, migration, park, park_ram, seal, statedir
from memvisor.snapshot.manifest import Manifest
from memvisor.snapshot.migration import ParkError, StepFn
from memvisor.snapshot.park import Figures

log = logging.getLogger("memvisor")
NAME = TEMPLATE_NAME  # the one pattern, also the fleet's (fleet/records.py)
ID_PREFIX = "t-"  # a template's id: never a sandbox id (those are hex)
STREAM = "template-vm"  # its streams' names, so never a sandbox's (seal.STREAMS)
RAM_STREAM = "template-ram"
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
CLONED_ANSWER_S = 60.0  # the clone's wake: reseed, up to 5 s for the vmgenid event, its swap set up (TCG)


class TemplateError(MemvisorError):
    """A template cannot be made, found or used as asked."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise TemplateError(f"template name {str(name)[:40]!r} is not allowed",
                            hint="use 1-30 of a-z 0-9 _ - starting with a letter or digit")
    return name


def new_id() -> str:
    """A random template id."""
    return ID_PREFIX + secrets.token_hex(8)


def name_of(meta: Manifest) -> str:
    """The template's name, as its manifest records it."""
    return str(meta.sandbox.get("name"))


def folder(state: statedir.State, name: str, create: bool = False) -> Path:
    """<state>/templates/<name>; with `create`, made (mode 0700) and checked to be this user's own."""
    check_name(name)
    base = state.root / statedir.TEMPLATES
    if create:
        for path in (base, base / name):
            if files.make_dir(path):
                files.fsync_dir(path.parent)
            files.own_dir(path, f"the template directory {path}", hint=f"remove {path} or chmod 700 it")
    return base / name


def _read(state: statedir.State, name: str, gens: dict[str, int] | None = None) -> Manifest | None:
    path = folder(state, name)
    what = f"template {name}"
    if not files.own_dir(path, f"the template directory {path}", hint=f"remove {path}"):
        return None
    meta = state.read_manifest(path, "template", None, what)
    if meta is None:
        return None
    if name_of(meta) != name or not meta.id.startswith(ID_PREFIX):
        raise statedir.SnapshotProblem("damaged", f"{path / statedir.META} is the manifest of template "
                                                  f"{name_of(meta)} ({meta.id}), not of template {name}")
    current = gens.get(meta.id) if gens is not None else state.generations.current(meta.id)
    state.check_current(meta, f"{what} ({meta.id})", current)
    state.check_files(path, meta, what)
    return meta


def load(state: statedir.State, name: str) -> Manifest | None:
    """The committed template `name`, or None; SnapshotProblem if its manifest is not authentic, not this
    template's, not in the ledger, or its files are not all there."""
    return _read(state, name)


def scan(state: statedir.State) -> tuple[list[Manifest], list[statedir.Problem]]:
    """Every complete template (the daemon's start); partial ones (a freeze cut short) and ones the ledger no longer
    has (removed, and put back from an older copy: never used) are removed, damaged ones kept (not usable)."""
    base = state.root / statedir.TEMPLATES
    if not base.is_dir() or base.is_symlink():
        return [], []
    gens = state.generations.all()
    metas: list[Manifest] = []
    problems: list[statedir.Problem] = []
    for path in sorted(base.iterdir()):
        if not NAME.fullmatch(path.name) or not path.is_dir() or path.is_symlink():
            log.warning("ignoring %s: not a template directory", path)
            continue
        try:
            meta = _read(state, path.name, gens)
        except statedir.SnapshotProblem as exc:
            if exc.kind in ("stale", "unknown") and files.remove_tree(path):
                problems.append(statedir.Problem(path.name, "stale", f"template {path.name}, which the ledger does "
                                                 f"not have ({exc.message})", removed=True))
            else:
                problems.append(statedir.Problem(path.name, exc.kind, exc.message))
            continue
        if meta is None:
            if files.remove_tree(path):
                problems.append(statedir.Problem(path.name, "partial", f"a partial template {path.name} "
                                                 "(no meta.json)", removed=True))
            continue
        metas.append(meta)
    return metas, problems


def remove(state: statedir.State, name: str, meta: Manifest | None = None) -> None:
    """Delete template `name`'s files (its manifest first: a removal cut short leaves a partial template, which the
    next scan removes), then forget its id (`meta`'s) in the ledger."""
    path = folder(state, name)
    if path.exists():
        with contextlib.suppress(FileNotFoundError):
            (path / statedir.META).unlink()
            files.fsync_dir(path)
        if not files.remove_tree(path):
            raise statedir.StateError(f"cannot remove template {name} in {path}")
    if meta is not None:
        state.generations.forget(meta.id)


def ram_bytes(meta: Manifest) -> int:
    """What the template's RAM holds (the plaintext of its RAM stream: the data it carries, and its headers)."""
    return meta.streams[RAM_STREAM]["plaintext_bytes"]


# -- freezing ------------------------------------------------------------------------------------------------------
def freeze(state: statedir.State, inst: Instance, name: str, sandbox: dict[str, Any],
           on_step: StepFn | None = None) -> tuple[Manifest, int, Figures]:
    """Make template `name` of `inst` (templatable, running, no command in flight): returns its committed manifest,
    the sealed memfd of its RAM (the caller owns it) and figures. The Instance is closed (its VMM gone) only on
    success; on any failure it keeps running and MemvisorError says why. `sandbox` is kept in the manifest (policy,
    image, source...)."""
    check_name(name)
    step = on_step or (lambda _s: None)
    if not inst.policy.templatable or inst.memctl is None:
        raise TemplateError(f"sandbox {inst.id} was not created templatable: its RAM is not memvisor's to share",
                            hint="create the sandbox with --templatable (or `memvisor template create NAME -- CMD`)")
    try:
        if load(state, name) is not None:
            raise TemplateError(f"template {name} already exists", hint=f"remove it first: memvisor template rm {name}")
    except statedir.SnapshotProblem as exc:
        raise TemplateError(f"template {name} exists but cannot be used ({exc.message})",
                            hint=f"remove {folder(state, name)} by hand") from None
    start = time.monotonic()
    answer = migration.quiesce(inst, step, "become a template")
    session, process = inst.session, inst.process
    assert session is not None and process is not None
    path = folder(state, name)
    template_id = new_id()
    key = seal.new_key()
    stopped = False
    try:
        folder(state, name, create=True)
        ident = seal.Ident(template_id, state.generations.advance(template_id, None))
        with QMP(inst.qmp_path) as qmp:
            step("pause")
            qmp.execute("stop")
            stopped = True
            writer = migration.save_stream(qmp, path / f"{STREAM}.snap", key, ident, step, STREAM)
            step("ram")
            with seal.SealWriter(path / f"{RAM_STREAM}.snap", key, ident, RAM_STREAM) as ram:
                park_ram.save(inst.memctl, ram)
            streams = {STREAM: park.stream_sizes(writer), RAM_STREAM: park.stream_sizes(ram)}
            meta = state.wrap(Manifest(kind="template", id=template_id, generation=ident.generation,
                                       parked_at=time.time(), streams=streams,
                                       sandbox={**sandbox, "name": name, "hello": session.hello}), key)
            step("commit")
            state.commit_to(path, meta)
            with contextlib.suppress(MemvisorError):
                qmp.execute("quit", timeout=2.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5.0)
    except BaseException as exc:
        if path.exists():
            files.remove_tree(path)
        with contextlib.suppress(MemvisorError):
            state.generations.forget(template_id)
        if stopped:
            migration.continue_vm(inst)
        else:
            migration.unpark_guest(inst)
        if isinstance(exc, MemvisorError | OSError):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ParkError(f"making template {name} of sandbox {inst.id} failed: {reason}; it keeps running"
                            ) from None
        raise
    finally:
        files.zero(key)
    fd = inst.memctl.detach()
    inst.close()  # F_SEAL_WRITE needs every writable shared mapping gone: QEMU's too
    _seal(fd)
    figures = Figures(round(time.monotonic() - start, 3), sum(s["plaintext_bytes"] for s in streams.values()),
                      meta.disk_bytes(), answer)
    return meta, fd, figures


def open_ram(state: statedir.State, meta: Manifest, memory_mib: int) -> int:
    """Rebuild a committed template's RAM (a later daemon's first clone): every chunk checked, into a new memfd,
    sealed. Returns the memfd (the caller owns it); SealError if the template's files were changed."""
    name = name_of(meta)
    path = folder(state, name)
    on_disk = load(state, name)
    if on_disk is None or on_disk.to_bytes() != meta.to_bytes():
        raise statedir.SnapshotProblem("files", f"template {name} on disk is not the one this daemon listed "
                                                f"({meta.id}): it was removed or replaced")
    key = state.unwrap(on_disk)
    try:
        # The device stream is checked whole now (a clone feeds it to a running VMM); the RAM stream is checked
        # chunk by chunk as load() writes it into a memfd that is thrown away if one fails: one read, not two.
        seal.verify(path / f"{STREAM}.snap", key, meta.ident, STREAM)
        backing = memctl.Backing(memory_mib, f"memvisor-template-{name}", sealable=True)
        try:
            park_ram.load(backing, path / f"{RAM_STREAM}.snap", key, meta.ident, RAM_STREAM)
            fd = backing.detach()
        finally:
            backing.close()
    finally:
        files.zero(key)
    _seal(fd)
    return fd


def _seal(fd: int) -> None:
    """Seal a template's RAM memfd against writes, growth, shrinking and further seals; closes it on failure."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError:
        os.close(fd)
        raise


# -- cloning -------------------------------------------------------------------------------------------------------
def clone(state: statedir.State, inst: Instance, meta: Manifest, ram_fd: int, on_step: StepFn | None = None,
          start: Callable[[], None] | None = None) -> tuple[dict[str, Any], Figures]:
    """Start `inst` (a new Instance with the template's policy, not yet planned) as a clone of the template
    `meta`, whose sealed RAM is `ram_fd`: returns the guest's CLONED answer and figures. On failure the Instance is
    closed (MemvisorError says why)."""
    step = on_step or (lambda _s: None)
    began = time.monotonic()
    name = name_of(meta)
    hello = meta.sandbox.get("hello")
    if not isinstance(hello, dict):
        raise seal.SealError(f"template {name} has no HELLO of its guest")
    on_disk = load(state, name)
    if on_disk is None or on_disk.to_bytes() != meta.to_bytes():
        raise statedir.SnapshotProblem("files", f"template {name} on disk is not the one this daemon listed "
                                                f"({meta.id}): it was removed or replaced")
    key = state.unwrap(on_disk)
    inst.clone_ram_fd = ram_fd
    inst.resume_hello = hello
    try:
        step("start")
        (start or inst.start)()
        with QMP(inst.qmp_path) as qmp:
            step("load")
            migration.load_stream(qmp, inst, folder(state, name) / f"{STREAM}.snap", key, meta.ident, STREAM)
            step("continue")
            qmp.execute("cont")
        assert inst.session is not None
        step("wake")
        answer = inst.session.ask(proto.Kind.CLONED, {"sandbox_id": inst.id, "realtime": time.time(),
                                                      "entropy": secrets.token_hex(proto.CLONE_ENTROPY)},
                                  proto.Kind.CLONED, CLONED_ANSWER_S)
        if answer.get("error"):
            raise ParkError(f"clone {inst.id} of template {name} could not become its own machine: "
                            f"{answer['error']}")
        # The clone's HELLO is the template's, with the swap it set up when it woke (checked against the policy
        # here: a weaker mode than asked stops the clone).
        inst.session.hello = {**hello, "swap": answer.get("swap") or {}}
        inst.wait_ready()
    except BaseException as exc:
        inst.failed = True
        inst.close()
        if isinstance(exc, MemvisorError):
            raise
        if isinstance(exc, OSError | TimeoutError | ConnectionError):
            raise ParkError(f"starting a clone of template {name} failed: {exc}") from None
        raise
    finally:
        files.zero(key)
    stream = meta.streams[STREAM]
    return answer, Figures(round(time.monotonic() - began, 3), stream["plaintext_bytes"], stream["file_bytes"],
                           answer)
