"""Templates and clones (docs/templates.md): a warm sandbox frozen once; clones that start from it in a fraction of
a boot and share every page they do not write.

Freeze: a templatable sandbox (guest RAM in a memfd memvisor owns, no balloon, swap deferred) gets ready as for a
park, QEMU saves its device state into a sealed stream (x-ignore-shared: the RAM is not in it), memvisor seals the
RAM into a stream of its own (snapshot/park_ram.py), meta.json is written last; the VMM quits, memvisor drops its own
mapping and seals the memfd against writes, growth and shrinking (F_SEAL_WRITE | GROW | SHRINK | SEAL). That memfd
is the one copy of the template's RAM every clone maps; the sealed streams under <state>/templates/<name>/ let a
later daemon rebuild it (open_ram).

Clone: a new Instance with the template's policy maps the sealed memfd privately (copy-on-write: what a clone
writes is its own) and takes the device state in (`-incoming defer`); after `cont` the guest is told CLONED (a new
id, 32 bytes of host entropy, the time) and becomes its own machine before any command runs (guest/clone.py).

This module is the host layer: the daemon decides when; nothing here imports it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memvisor import proto
from memvisor.errors import MemvisorError
from memvisor.host import memctl
from memvisor.host.sandbox import Instance
from memvisor.host.vmm.qmp import QMP
from memvisor.snapshot import park, park_ram, seal, statedir
from memvisor.snapshot.park import RAM_STREAM, STREAM, Figures, ParkError, StepFn

log = logging.getLogger("memvisor")
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,29}")
ID_PREFIX = "t-"  # a template's id in its AADs and meta.json: never a sandbox id (those are hex)
GENERATION = 1  # a template never changes: it is removed and made again
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
CLONED_ANSWER_S = 60.0  # the clone's wake: reseed, up to 5 s for the vmgenid event, its swap set up (TCG)


class TemplateError(MemvisorError):
    """A template cannot be made, found or used as asked."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise TemplateError(f"template name {str(name)[:40]!r} is not allowed",
                            hint="use 1-30 of a-z 0-9 _ - starting with a letter or digit")
    return name


def ident(name: str) -> seal.Ident:
    return seal.Ident(ID_PREFIX + name, GENERATION)


def folder(name: str, create: bool = False) -> Path:
    """<state>/templates/<name>; with `create`, made (mode 0700) and checked to be this user's own."""
    check_name(name)
    base = statedir.root(create=create) / statedir.TEMPLATES
    if create:
        for path in (base, base / name):
            if statedir.make_dir(path):
                statedir.fsync_dir(path.parent)
            statedir.own_dir(path, f"the template directory {path}", hint=f"remove {path} or chmod 700 it")
    return base / name


def load(name: str) -> statedir.Meta | None:
    """The committed template `name`, or None; StateError if its meta.json is damaged or not this template's."""
    path = folder(name)
    if not statedir.own_dir(path, f"the template directory {path}", hint=f"remove {path}"):
        return None
    try:
        data, _ = statedir.read_own(path / statedir.META, statedir.JSON_LIMIT)
    except FileNotFoundError:
        return None
    meta = statedir.Meta.from_json(statedir.parse_json(data, path / statedir.META), str(path / statedir.META))
    if meta.sandbox_id != ID_PREFIX + name or meta.generation != GENERATION:
        raise statedir.StateError(f"{path / statedir.META} is not the meta of template {name}")
    return meta


def scan() -> tuple[list[statedir.Meta], list[str]]:
    """Every complete template (the daemon's start), after removing partial ones (a freeze cut short); plus one
    line for each thing removed."""
    base = statedir.root() / statedir.TEMPLATES
    if not base.is_dir():
        return [], []
    metas: list[statedir.Meta] = []
    notes: list[str] = []
    for path in sorted(base.iterdir()):
        if not NAME.fullmatch(path.name) or not path.is_dir() or path.is_symlink():
            log.warning("ignoring %s: not a template directory", path)
            continue
        try:
            meta = load(path.name)
            why = "no meta.json" if meta is None else statedir.missing(path, meta)
        except MemvisorError as exc:
            meta, why = None, exc.message
        if meta is None or why is not None:
            if statedir.remove_tree(path):
                notes.append(f"removed a partial template {path.name} ({why})")
            continue
        metas.append(meta)
    return metas, notes


def remove(name: str) -> None:
    """Delete template `name`'s files (meta.json first: a removal cut short leaves a partial template, which the
    next scan removes)."""
    path = folder(name)
    if not path.exists():
        return
    with contextlib.suppress(FileNotFoundError):
        (path / statedir.META).unlink()
        statedir.fsync_dir(path)
    if not statedir.remove_tree(path):
        raise statedir.StateError(f"cannot remove template {name} in {path}")


def ram_bytes(meta: statedir.Meta) -> int:
    """What the template's RAM holds (the plaintext of its RAM stream: the data it carries, and its headers)."""
    return meta.streams[RAM_STREAM]["plaintext_bytes"]


# -- freezing ------------------------------------------------------------------------------------------------------
def freeze(inst: Instance, name: str, sandbox: dict[str, Any], on_step: StepFn | None = None
           ) -> tuple[statedir.Meta, int, Figures]:
    """Make template `name` of `inst` (templatable, running, no command in flight): returns its committed meta,
    the sealed memfd of its RAM (the caller owns it) and figures. The Instance is closed (its VMM gone) only on
    success; on any failure it keeps running and MemvisorError says why. `sandbox` is kept in meta.json (policy,
    image, source...)."""
    check_name(name)
    step = on_step or (lambda _s: None)
    if not inst.policy.templatable or inst.memctl is None:
        raise TemplateError(f"sandbox {inst.id} was not created templatable: its RAM is not memvisor's to share",
                            hint="create the sandbox with --templatable (or `memvisor template create NAME -- CMD`)")
    if load(name) is not None:
        raise TemplateError(f"template {name} already exists", hint=f"remove it first: memvisor template rm {name}")
    start = time.monotonic()
    answer = park.quiesce(inst, step, "become a template")
    session, process = inst.session, inst.process
    assert session is not None and process is not None
    path = folder(name, create=True)
    key = seal.new_key()
    stopped = False
    try:
        with QMP(inst.qmp_path) as qmp:
            step("pause")
            qmp.execute("stop")
            stopped = True
            writer = park.save_stream(qmp, path / f"{STREAM}.snap", key, ident(name), step)
            step("ram")
            with seal.SealWriter(path / f"{RAM_STREAM}.snap", key, ident(name), RAM_STREAM) as ram:
                park_ram.save(inst.memctl, ram)
            streams = {STREAM: {"plaintext_bytes": writer.plaintext_bytes, "file_bytes": writer.file_bytes},
                       RAM_STREAM: {"plaintext_bytes": ram.plaintext_bytes, "file_bytes": ram.file_bytes}}
            meta = statedir.Meta(
                sandbox_id=ID_PREFIX + name, generation=GENERATION, parked_at=time.time(),
                wrapped_key=base64.b64encode(seal.wrap_key(statedir.host_key(), key, ident(name))).decode(),
                streams=streams, files={}, sandbox={**sandbox, "hello": session.hello})
            step("commit")
            doc = meta.to_json()
            statedir.Meta.from_json(doc, f"the meta of template {name}")
            statedir.write_json_atomic(path / statedir.META, doc)
            with contextlib.suppress(MemvisorError):
                qmp.execute("quit", timeout=2.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5.0)
    except BaseException as exc:
        statedir.remove_tree(path)
        if stopped:
            park.continue_vm(inst)
        if isinstance(exc, MemvisorError | OSError):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ParkError(f"making template {name} of sandbox {inst.id} failed: {reason}; it keeps running"
                            ) from None
        raise
    fd = inst.memctl.detach()
    inst.close()  # F_SEAL_WRITE needs every writable shared mapping gone: QEMU's too
    _seal(fd)
    figures = Figures(round(time.monotonic() - start, 3), sum(s["plaintext_bytes"] for s in streams.values()),
                      meta.disk_bytes(), answer)
    return meta, fd, figures


def open_ram(meta: statedir.Meta, memory_mib: int) -> int:
    """Rebuild a committed template's RAM (a later daemon's first clone): every chunk checked, into a new memfd,
    sealed. Returns the memfd (the caller owns it); SealError if the template's files were changed."""
    name = meta.sandbox_id.removeprefix(ID_PREFIX)
    key = meta.key(statedir.host_key())
    path = folder(name)
    # The device stream is checked whole now (a clone feeds it to a running VMM); the RAM stream is checked chunk
    # by chunk as load() writes it into a memfd that is thrown away if one fails: one read, not two.
    seal.verify(path / f"{STREAM}.snap", key, meta.ident, STREAM)
    backing = memctl.Backing(memory_mib, f"memvisor-template-{name}", sealable=True)
    try:
        park_ram.load(backing, path / f"{RAM_STREAM}.snap", key, meta.ident)
        fd = backing.detach()
    finally:
        backing.close()
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
def clone(inst: Instance, meta: statedir.Meta, ram_fd: int, on_step: StepFn | None = None,
          start: Callable[[], None] | None = None) -> tuple[dict[str, Any], Figures]:
    """Start `inst` (a new Instance with the template's policy, not yet planned) as a clone of the template
    `meta`, whose sealed RAM is `ram_fd`: returns the guest's CLONED answer and figures. On failure the Instance is
    closed (MemvisorError says why)."""
    step = on_step or (lambda _s: None)
    began = time.monotonic()
    name = meta.sandbox_id.removeprefix(ID_PREFIX)
    hello = meta.sandbox.get("hello")
    if not isinstance(hello, dict):
        raise seal.SealError(f"template {name} has no HELLO of its guest")
    key = meta.key(statedir.host_key())
    inst.clone_ram_fd = ram_fd
    inst.resume_hello = hello
    try:
        step("start")
        (start or inst.start)()
        with QMP(inst.qmp_path) as qmp:
            step("load")
            park.load_stream(qmp, inst, folder(name) / f"{STREAM}.snap", key, meta.ident)
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
    stream = meta.streams[STREAM]
    return answer, Figures(round(time.monotonic() - began, 3), stream["plaintext_bytes"], stream["file_bytes"],
                           answer)
