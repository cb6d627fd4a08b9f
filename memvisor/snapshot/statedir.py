"""The root-only state directory that outlives the daemon: parked sandboxes' snapshots and templates, with the
ledger of their generations (its layout: layout.py). Its key is elsewhere (keys.py), and so is the ledger's head
(ledger.py); opening it checks both (bootstrap.py).

A snapshot is resumable only when its manifest is canonical, its wrapped key unwraps with the manifest's digest
in the associated data (so every byte of it is authentic), its generation is the ledger's, and every file is there
as recorded (a kept disk checked on its descriptor). `State.scan()` sorts the rest into Problems: partial (no
manifest: a park cut short) and stale (an older generation) are removed; damaged (a manifest that is not
authentic), unknown (an id or generation the ledger does not have) and files (a stream or kept file missing,
replaced or changed in size or links) are kept and listed, never removed by a scan: the sandbox stays parked and
resumes once what is wrong is put right.

This module owns those files and their durability. It must not seal or unseal streams (seal.py), talk to QEMU,
or decide when to park; it never follows a symlink and never removes a directory that is not this user's own.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from memvisor.host.runtime import SAFE_ID
from memvisor.snapshot import bootstrap, files, keys, ledger, seal
from memvisor.snapshot.files import StateError as StateError  # the names callers know this module by
from memvisor.snapshot.files import fsync_dir, make_dir, own_dir, read_own, remove_tree, write_atomic
from memvisor.snapshot.layout import FLEET as FLEET
from memvisor.snapshot.layout import INUSE as INUSE
from memvisor.snapshot.layout import JSON_LIMIT as JSON_LIMIT
from memvisor.snapshot.layout import LEDGER as LEDGER
from memvisor.snapshot.layout import LEGACY_KEY as LEGACY_KEY
from memvisor.snapshot.layout import LOCK as LOCK
from memvisor.snapshot.layout import LOST as LOST
from memvisor.snapshot.layout import META as META
from memvisor.snapshot.layout import RESERVED as RESERVED
from memvisor.snapshot.layout import SNAP_SUFFIX as SNAP_SUFFIX
from memvisor.snapshot.layout import TEMPLATES as TEMPLATES
from memvisor.snapshot.layout import root as root
from memvisor.snapshot.layout import wrapped_things as wrapped_things
from memvisor.snapshot.manifest import Manifest

log = logging.getLogger("memvisor")

TMP_GRACE_S: Final = 60  # a temp file in the root this young may be another process's write in progress
PROBLEM_KINDS: Final = ("partial", "stale", "damaged", "unknown", "files")
Meta = Manifest  # the name earlier callers used


class SnapshotProblem(StateError):
    """A committed snapshot that cannot be resumed as it is: `kind` is one of PROBLEM_KINDS. The sandbox stays
    parked."""

    def __init__(self, kind: str, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.kind = kind


@dataclass(frozen=True)
class Problem:
    """What scan() found wrong with one entry of the state directory."""

    id: str  # the directory's name: a sandbox id, or a template's name under templates/
    kind: str  # PROBLEM_KINDS
    why: str
    removed: bool = False  # partial and stale ones are removed
    manifest: Manifest | None = None  # the authentic manifest, when what is wrong is elsewhere (files, ledger)

    def note(self) -> str:
        """One line for the log."""
        return f"{'removed' if self.removed else 'kept'} {self.why}"


def _check_id(sandbox_id: str) -> None:
    if not isinstance(sandbox_id, str) or not SAFE_ID.fullmatch(sandbox_id) or sandbox_id in RESERVED:
        raise StateError(f"sandbox id {sandbox_id!r} is not 1-32 of a-z, 0-9, '_' and '-' (and not "
                         f"{' or '.join(sorted(RESERVED))})")


class State:
    """An open state directory: its root, the host key and the ledger (ledger.Generations). A daemon or SDK program
    opens one (`open()`), holds it while it runs, and closes it (zeroing the key material). Methods re-read the disk:
    another process may share the directory."""

    def __init__(self, base: Path, key: keys.HostKey, generations: ledger.Generations, inuse: int | None,
                 previous_wrap: bytearray | None = None) -> None:
        """`generations`: the local ledger (which this object closes), or a fleet's (etcd: open_fleet).
        `previous_wrap`: the wrapping key of a fleet's key before a rotation (this object zeroes it), which
        snapshots not yet rewrapped still unwrap with."""
        self.root = base
        self.key = key
        self.generations = generations
        self.ledger = generations if isinstance(generations, ledger.LocalLedger) else None
        self._inuse = inuse
        self._wrap = key.derive(keys.WRAP)
        self._previous_wrap = previous_wrap

    def close(self) -> None:
        """Zero the keys and let `memvisor key rotate` run (the shared lock goes)."""
        files.zero(self._wrap)
        files.zero(self._previous_wrap)
        if self.ledger is not None:
            self.ledger.close()
        self.key.close()
        if self._inuse is not None:
            os.close(self._inuse)
            self._inuse = None

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"State({str(self.root)!r}, key={str(self.key.path)!r})"

    @property
    def ledger_name(self) -> str:
        """Where the generations are kept, for messages."""
        return f"the ledger {self.ledger.path}" if self.ledger is not None else "the fleet's generations (etcd)"

    # -- the snapshot key ----------------------------------------------------------------------------------
    def wrap(self, manifest: Manifest, snapshot_key: bytearray) -> Manifest:
        """`manifest` with `snapshot_key` wrapped under the host key, bound to its kind, id, generation and
        digest."""
        import base64
        import dataclasses

        wrapped = seal.wrap_key(self._wrap, snapshot_key, manifest.ident, manifest.kind, manifest.digest())
        return dataclasses.replace(manifest, wrapped_key=base64.b64encode(wrapped).decode())

    def unwrap(self, manifest: Manifest) -> bytearray:
        """The snapshot key of `manifest` (the caller zeroes it); SealError if the manifest is not the one it was
        wrapped with, or the key is another host's."""
        args = (manifest.wrapped(), manifest.ident, manifest.kind, manifest.digest())
        if self._previous_wrap is not None:
            with contextlib.suppress(seal.SealError):  # a fleet mid-rotation: either key may have wrapped it
                return seal.unwrap_key(self._wrap, *args)
            return seal.unwrap_key(self._previous_wrap, *args)
        return seal.unwrap_key(self._wrap, *args)

    def authentic(self, manifest: Manifest) -> None:
        """SealError unless the wrap authenticates every byte of `manifest`."""
        files.zero(self.unwrap(manifest))

    # -- reading manifests ---------------------------------------------------------------------------------
    def read_manifest(self, folder: Path, kind: str, ident: str | None, what: str) -> Manifest | None:
        """The authentic manifest in `folder`, of `kind` and id `ident` (None: any), or None if there is none;
        SnapshotProblem "damaged" if it is not authentic or not what it must be. The generation is not checked."""
        try:
            data, _ = read_own(folder / META, JSON_LIMIT, f"the manifest of {what}", modes=(0o600,))
        except FileNotFoundError:
            return None
        except StateError as exc:
            raise self._damaged(what, exc.message) from None
        try:
            manifest = Manifest.from_bytes(data, f"{folder / META}")
            self.authentic(manifest)
        except (StateError, seal.SealError) as exc:
            raise self._damaged(what, exc.message) from None
        if manifest.kind != kind:
            raise self._damaged(what, f"{folder / META} is a {manifest.kind}'s manifest, not a {kind}'s: a "
                                      f"{manifest.kind} is never resumed as a {kind}")
        if ident is not None and manifest.id != ident:
            raise self._damaged(what, f"{folder / META} is the manifest of {manifest.id}, not {ident}")
        return manifest

    @staticmethod
    def _damaged(what: str, why: str) -> SnapshotProblem:
        return SnapshotProblem("damaged", f"the manifest of {what} is not authentic ({why}); it stays parked",
                               hint="put the file back as memvisor wrote it, or remove it (stop the sandbox)")

    def check_current(self, manifest: Manifest, what: str, current: int | None) -> None:
        """SnapshotProblem unless `manifest` is of generation `current` (the ledger's)."""
        if current is None:
            raise SnapshotProblem("unknown", f"the snapshot of {what} (generation {manifest.generation}) is not in "
                                             f"{self.ledger_name}: it is never resumed; it stays parked",
                                  hint="if it was restored from an older copy, remove it (stop the sandbox)")
        if manifest.generation < current:
            raise SnapshotProblem("stale", f"the snapshot of {what} is generation {manifest.generation} but the "
                                           f"ledger is at {current}: an old snapshot is never resumed",
                                  hint="it is removed by the next scan")
        if manifest.generation > current:
            raise SnapshotProblem("unknown", f"the snapshot of {what} is generation {manifest.generation}, newer "
                                             f"than the ledger's {current}: it is never resumed; it stays parked")

    def check_files(self, folder: Path, manifest: Manifest, what: str) -> None:
        """SnapshotProblem "files" unless every stream file is a regular file of its recorded size and every kept
        file passes open_kept's checks (opened and closed again)."""
        for name, sizes in sorted(manifest.streams.items()):
            try:
                st = os.lstat(folder / f"{name}{SNAP_SUFFIX}")
            except FileNotFoundError:
                raise SnapshotProblem("files", f"{what}: {name}{SNAP_SUFFIX} is missing; it stays parked") from None
            if not stat.S_ISREG(st.st_mode):
                raise SnapshotProblem("files", f"{what}: {name}{SNAP_SUFFIX} is not a regular file; it stays parked")
            if st.st_size != sizes["file_bytes"]:
                raise SnapshotProblem("files", f"{what}: {name}{SNAP_SUFFIX} is {st.st_size} bytes, not the "
                                               f"{sizes['file_bytes']} recorded (cut or replaced); it stays parked")
        for fd in self.open_kept(folder, manifest, what).values():
            os.close(fd)

    def open_kept(self, folder: Path, manifest: Manifest, what: str) -> dict[str, int]:
        """Open every kept file of `manifest` read-write, without following a symlink, relative to `folder`'s
        descriptor, and check it on its descriptor: a regular file of this user's, mode 0600, exactly one link,
        its recorded size. Returns name -> fd (the caller owns them); SnapshotProblem "files" naming the file
        and the check otherwise (nothing stays open)."""
        opened: dict[str, int] = {}
        try:
            dir_fd = files.open_nofollow(folder, os.O_RDONLY | os.O_DIRECTORY, f"the directory of {what}")
        except (FileNotFoundError, StateError) as exc:
            raise SnapshotProblem("files", f"{what}: its directory {folder} cannot be opened ({exc}); it stays "
                                           "parked") from None
        try:
            for name, kept in sorted(manifest.files.items()):
                label = f"the kept disk {name} of {what}"
                try:
                    fd = files.open_nofollow(name, os.O_RDWR, label, dir_fd=dir_fd)
                except FileNotFoundError:
                    raise SnapshotProblem("files", f"{label} is missing; it stays parked") from None
                opened[name] = fd
                files.check_fd(fd, label, modes=(0o600,), links=1, size=kept.bytes)
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException as exc:
            for fd in opened.values():
                os.close(fd)
            if isinstance(exc, StateError) and not isinstance(exc, SnapshotProblem):
                raise SnapshotProblem("files", f"{exc.message}; it stays parked",
                                      hint="put the file back as it was (memvisor checks the file itself, never "
                                           "a link to it), or stop the sandbox") from None
            raise
        finally:
            os.close(dir_fd)
        return opened

    # -- sandboxes -----------------------------------------------------------------------------------------
    def sandbox_dir(self, sandbox_id: str, create: bool = False) -> Path:
        """<root>/<id>: the directory of a sandbox's snapshot; with `create`, made (mode 0700) if needed and
        checked to be this user's own."""
        _check_id(sandbox_id)
        path = self.root / sandbox_id
        if create:
            if make_dir(path):
                fsync_dir(self.root)
            own_dir(path, f"the state directory of sandbox {sandbox_id}",
                    hint=f"remove it, or chmod 700 {path} if it is memvisor's")
        return path

    def stream_path(self, sandbox_id: str, stream: str) -> Path:
        """<root>/<id>/<stream>.snap; ValueError for a stream name not in seal.STREAMS."""
        seal.stream_number(stream)
        return self.sandbox_dir(sandbox_id) / f"{stream}{SNAP_SUFFIX}"

    def commit_to(self, folder: Path, manifest: Manifest) -> None:
        """Write `manifest` (wrapped) as `folder`'s meta.json, last and atomically, which makes the snapshot
        complete (and the directory entries of its files durable; their contents the writers fsynced).
        StateError if the ledger is not at its generation or a file is missing or of another size."""
        Manifest.from_bytes(manifest.to_bytes(), f"the manifest of {manifest.id}")  # never write what load refuses
        self.authentic(manifest)
        current = self.generations.current(manifest.id)
        if current != manifest.generation:
            raise StateError(f"cannot commit generation {manifest.generation} of {manifest.id}: the ledger is at "
                             f"{current}")
        try:
            self.check_files(folder, manifest, manifest.id)
        except SnapshotProblem as exc:
            raise StateError(f"cannot commit the snapshot of {manifest.id}: {exc.message}") from None
        write_atomic(folder / META, manifest.to_bytes())

    def commit(self, manifest: Manifest) -> None:
        """commit_to() the sandbox's own directory."""
        self.commit_to(self.sandbox_dir(manifest.id, create=True), manifest)

    def load(self, sandbox_id: str) -> Manifest | None:
        """The committed, authentic, current snapshot of `sandbox_id` with every file in place, or None if it has
        none; SnapshotProblem otherwise (it stays parked). Stream contents are checked by seal.verify()."""
        folder = self.sandbox_dir(sandbox_id)
        what = f"sandbox {sandbox_id}"
        if not own_dir(folder, f"the state directory of {what}", hint=f"remove {folder}"):
            return None
        manifest = self.read_manifest(folder, "sandbox", sandbox_id, what)
        if manifest is None:
            return None
        self.check_current(manifest, what, self.generations.current(sandbox_id))
        self.check_files(folder, manifest, what)
        return manifest

    def uncommit(self, sandbox_id: str, generation: int) -> bool:
        """Retire the snapshot of generation `generation` of `sandbox_id` once its resumed guest runs on: meta.json
        is removed durably, the ledger moves past `generation` (so even a copy of the directory is refused), the
        stream files are deleted. The kept files stay: the running guest uses them, and its next park keeps them
        again. Idempotent, and safe for crash recovery: True if that snapshot is no longer committed (now or
        already); False, changing nothing, if the committed manifest authentically is another generation's."""
        folder = self.sandbox_dir(sandbox_id)
        if not own_dir(folder, f"the state directory of sandbox {sandbox_id}", hint=f"remove {folder}"):
            return True
        try:
            manifest = self.read_manifest(folder, "sandbox", sandbox_id, f"sandbox {sandbox_id}")
        except SnapshotProblem:
            manifest = None  # not authentic: never resumable; the running guest is the truth
        if manifest is not None and manifest.generation != generation:
            return False
        with contextlib.suppress(FileNotFoundError):
            (folder / META).unlink()
        fsync_dir(folder)
        if self.generations.current(sandbox_id) == generation:
            with contextlib.suppress(ledger.Stale):
                self.generations.advance(sandbox_id, generation)
        for name in seal.STREAMS:
            (folder / f"{name}{SNAP_SUFFIX}").unlink(missing_ok=True)
        return True

    def remove(self, sandbox_id: str) -> None:
        """Delete the snapshot directory of `sandbox_id` (meta.json first, so a removal cut short leaves a partial
        snapshot, never a damaged complete one). The ledger keeps its generation, so an old copy stays refused;
        forget() drops that. StateError if the directory is not this user's own."""
        folder = self.sandbox_dir(sandbox_id)
        if not own_dir(folder, f"the state directory of sandbox {sandbox_id}",
                       hint=f"it was not made by memvisor: remove {folder} by hand"):
            return
        with contextlib.suppress(FileNotFoundError):
            (folder / META).unlink()
            fsync_dir(folder)
        if not remove_tree(folder):
            raise StateError(f"cannot remove the snapshot of sandbox {sandbox_id} in {folder}")

    def forget(self, sandbox_id: str) -> None:
        """Drop `sandbox_id` from the ledger (it is gone for good): none of its snapshots is resumable after this."""
        _check_id(sandbox_id)
        self.generations.forget(sandbox_id)

    def _examine(self, folder: Path, sandbox_id: str, gens: dict[str, int]) -> Manifest | Problem:
        what = f"sandbox {sandbox_id}"
        manifest: Manifest | None = None
        try:
            manifest = self.read_manifest(folder, "sandbox", sandbox_id, what)
            if manifest is None:
                return Problem(sandbox_id, "partial", f"a partial snapshot of sandbox {sandbox_id} (no meta.json)")
            self.check_current(manifest, what, gens.get(sandbox_id))
            self.check_files(folder, manifest, what)
        except SnapshotProblem as exc:
            if exc.kind == "stale":
                assert manifest is not None
                return Problem(sandbox_id, "stale", f"a stale snapshot of sandbox {sandbox_id} (generation "
                                                    f"{manifest.generation}; the ledger is at "
                                                    f"{gens.get(sandbox_id)}), which is never resumed")
            return Problem(sandbox_id, exc.kind, exc.message, manifest=manifest)
        return manifest

    def scan(self, running: Collection[str] = ()) -> tuple[list[Manifest], list[Problem]]:
        """Every complete snapshot (authentic, of the ledger's generation, every file in place), and a Problem for
        every other sandbox directory: partial and stale ones are removed (for an id in `running`, a sandbox whose
        VMM runs on, only its manifest and streams: its kept disks are in use); damaged, unknown and files ones are
        kept. Call it when no park is in progress (the daemon's start): a park in progress looks partial. Entries
        that are not a sandbox's directory of this user's are left alone."""
        gens = self.generations.all()
        manifests: list[Manifest] = []
        problems: list[Problem] = []
        with os.scandir(self.root) as it:
            names = sorted(entry.name for entry in it)
        for name in names:
            path = self.root / name
            if name in (LEDGER, LOCK, INUSE) or name in RESERVED:
                continue
            if files.is_temp(name):
                # Another process may be writing the ledger right now: only old ones are leftovers.
                if files.remove_temp(path, TMP_GRACE_S):
                    problems.append(Problem(name, "partial", f"a leftover temporary file {name}", removed=True))
                continue
            st = os.lstat(path)
            if not SAFE_ID.fullmatch(name) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                log.warning("ignoring %s in the state directory: not a sandbox directory of uid %d", path,
                            os.geteuid())
                continue
            found = self._examine(path, name, gens)
            if isinstance(found, Manifest):
                for inner in sorted(os.listdir(path)):
                    if files.is_temp(inner) and files.remove_temp(path / inner, 0):
                        problems.append(Problem(name, "partial", f"a leftover temporary file {name}/{inner}",
                                                removed=True))
                manifests.append(found)
                continue
            if found.kind in ("partial", "stale"):
                if name in running:  # its kept disks are in use: only the snapshot goes
                    drop_snapshot(path)
                    if found.kind == "stale":
                        problems.append(Problem(name, "stale", found.why + " (its kept disks stay: it runs)", True))
                elif remove_tree(path):
                    problems.append(Problem(name, found.kind, found.why, removed=True))
                continue
            problems.append(found)
        return manifests, problems

    def committed(self) -> tuple[list[Manifest], list[Problem]]:
        """Every parked sandbox's snapshot, read only (for `memvisor ps` and the metrics, which must not remove what
        a daemon's park is still writing, as scan() would): the complete ones, and the problems of the others
        (partial ones, which may be a park in progress or a running sandbox's disks, are left out)."""
        manifests: list[Manifest] = []
        problems: list[Problem] = []
        gens = self.generations.all()
        for path in sorted(self.root.iterdir()):
            name = path.name
            if name in RESERVED or not SAFE_ID.fullmatch(name) or path.is_symlink() or not path.is_dir():
                continue
            found = self._examine(path, name, gens)
            if isinstance(found, Manifest):
                manifests.append(found)
            elif found.kind != "partial":
                problems.append(found)
        return manifests, problems


def drop_snapshot(folder: Path) -> None:
    """Remove a snapshot's manifest (first: a manifest without its streams would be a partial snapshot) and
    streams, leaving its kept files; durably."""
    with contextlib.suppress(FileNotFoundError):
        (folder / META).unlink()
    for name in seal.STREAMS:
        (folder / f"{name}{SNAP_SUFFIX}").unlink(missing_ok=True)
    fsync_dir(folder)


def open(key_file: Path | None = None, create_key: bool = False, hold: bool = True) -> State:
    """Open the state directory with its host key and ledger (both checked now: a key file that was replaced, or a
    ledger that was rolled back, is a StateError naming the file: bootstrap.py). `key_file`: serve's --key-file
    (default: $MEMVISOR_KEY_FILE, then paths.key_file()). `create_key`: make the key if there is none and nothing
    in the state directory is wrapped (serve, and an SDK program's first park). `hold`: keep a shared lock on the
    directory until close(), which `memvisor key rotate` waits for (ps and the metrics read without it)."""
    base = root(create=True)
    key_path = keys.locate(key_file)
    inuse: int | None = None
    if hold:
        inuse = os.open(base / INUSE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(inuse, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(inuse)
            raise StateError(f"the host key of {base} is being rotated (memvisor key rotate)",
                             hint="start again once it has finished") from None
    try:
        key, book = bootstrap.open_key_and_ledger(base, key_path, create_key)
    except BaseException:
        if inuse is not None:
            os.close(inuse)
        raise
    return State(base, key, book, inuse)


def open_fleet(key_file: Path, generations: ledger.Generations, previous_key_file: Path | None = None) -> State:
    """The state directory of a fleet daemon (memvisor serve --fleet): a local staging area for the bundles it
    parks into and resumes from the fleet's store. Its key is the fleet key (`key_file`, read-only: never made
    here), which every daemon of the fleet holds, and its generations are the fleet's (etcd), not a local ledger:
    freshness a host's disk cannot roll back, and any host may resume what another parked."""
    outer = root(create=True)
    base = outer / FLEET  # apart from the host's own snapshots, which stay under its host key
    if files.make_dir(base):
        files.fsync_dir(outer)
    files.own_dir(base, "the fleet's state directory", hint=f"remove {base} or chmod 700 it")
    key = keys.read(key_file)
    previous_wrap = None
    if previous_key_file is not None:
        try:
            with keys.read(previous_key_file) as previous:
                previous_wrap = previous.derive(keys.WRAP)
        except BaseException:
            key.close()
            raise
    return State(base, key, generations, None, previous_wrap=previous_wrap)


def open_to_read(key_file: Path | None = None) -> State | None:
    """The state directory opened to read (`memvisor ps`, the metrics), or None when there is nothing to read: no
    state directory, or no key and nothing wrapped under one. StateError if it cannot be trusted."""
    base = root(create=False)
    if not base.is_dir():
        return None
    try:
        return open(key_file, hold=False)
    except keys.KeyMissing:
        if wrapped_things(base):
            raise
        return None
