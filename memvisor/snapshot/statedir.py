"""The root-only state directory that outlives the daemon: parked sandboxes' snapshots, the host key, the ledger.

Layout (<root> is $MEMVISOR_STATE_DIR, else <state home>/state; a directory of this user's, mode 0700):

    host.key            32 random bytes, 0600: wraps each snapshot's own key (seal.wrap_key)
    ledger.json         {"generations": {sandbox id: n}}: the one generation of each sandbox that may be resumed
    .lock               flock'd around the ledger's read-modify-write
    <id>/<stream>.snap  the sealed streams (seal.py)
    <id>/swap.img ...   other kept files
    <id>/meta.json      the commit point, written last: a directory without it holds a partial snapshot

seal.py proves that a stream belongs to (sandbox, generation); the ledger says which generation is current, and
so is what refuses an old snapshot. That is why a damaged ledger is an error, never reset: a reset ledger would
make stale snapshots resumable again.

This module owns those files and their durability (temp file, fsync, rename, fsync the directory). It must not
seal or unseal streams (seal.py), talk to QEMU, or decide when to park; it never follows a symlink and never
removes a directory that is not this user's own.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn

from memvisor import paths
from memvisor.errors import MemvisorError
from memvisor.host.runtime import SAFE_ID
from memvisor.snapshot import seal

log = logging.getLogger("memvisor")

HOST_KEY: Final = "host.key"
LEDGER: Final = "ledger.json"
LOCK: Final = ".lock"
TEMPLATES: Final = "templates"  # snapshot/template.py's directory (not a sandbox id: those are hex)
META: Final = "meta.json"
SNAP_SUFFIX: Final = ".snap"
JSON_LIMIT: Final = 16 << 20  # ledger.json and meta.json are small; a bigger one is not ours
TMP_GRACE_S: Final = 60  # a temp file in the root this young may be another process's write in progress
_TMP = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")  # write_atomic's temp names: .<name>.<16 hex>.tmp
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a kept file's name: no '/', no leading '.'


class StateError(MemvisorError):
    """The state directory or a file in it is not what memvisor wrote: wrong owner or mode, or malformed."""


def _check_id(sandbox_id: str) -> None:
    if not isinstance(sandbox_id, str) or not SAFE_ID.fullmatch(sandbox_id):
        raise StateError(f"sandbox id {sandbox_id!r} is not 1-32 of a-z, 0-9, '_' and '-'")


def own_dir(path: Path, what: str, hint: str) -> bool:
    """True if `path` is a real directory owned by this user with mode exactly 0700, False if it does not exist;
    StateError otherwise (never trust what another user could have planted or read)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StateError(f"cannot use {what} {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700:
        raise StateError(f"{what} {path} is not memvisor's own (owner uid {st.st_uid}, mode "
                         f"{stat.filemode(st.st_mode)}): refusing to trust what is in it", hint=hint)
    return True


def make_dir(path: Path) -> bool:
    """mkdir `path` with mode exactly 0700 (whatever the umask); True if this call created it."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return False
    os.chmod(path, 0o700)
    return True


def root(create: bool = True) -> Path:
    """The state directory, after checking it is memvisor's own (a directory, not a symlink, owned by this user,
    mode 0700); created with its parents when `create`. Without `create`, a missing one is returned unchecked
    (there is nothing in it to trust)."""
    env = os.environ.get("MEMVISOR_STATE_DIR")
    path = Path(env) if env else paths.state_home() / "state"
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if make_dir(path):
                fsync_dir(path.parent)
        except OSError as exc:
            raise StateError(f"cannot create the state directory {path}: {exc.strerror}") from None
    own_dir(path, "the state directory",
             hint=f"it must be a directory owned by uid {os.geteuid()} with mode 0700 (chmod 700 {path}), or set "
                  "MEMVISOR_STATE_DIR")
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes, mode: int) -> Path:
    """A new, fsynced temp file next to `path` holding `data` with exactly `mode`; removed if anything fails."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # exactly `mode`: the umask must not loosen or tighten it
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so a reader (or a crash) sees the old file or the new one, never a mix: a temp
    file in the same directory, fsync, rename over `path`, fsync the directory."""
    tmp = _write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, doc: object) -> None:
    """write_atomic() of `doc` as indented JSON (mode 0600)."""
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())


def read_own(path: Path, limit: int) -> tuple[bytes, os.stat_result]:
    """The contents of regular file `path`, which must be this user's own and at most `limit` bytes (checked on
    the open file, so it cannot be swapped in between); FileNotFoundError passes through."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise StateError(f"cannot read {path}: {why}") from None
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise StateError(f"{path} is not memvisor's own (owner uid {st.st_uid}, mode "
                             f"{stat.filemode(st.st_mode)}): refusing to trust it")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise StateError(f"{path} is over {limit} bytes: it is not one memvisor wrote")
    return data, st


def _read_host_key(path: Path) -> bytes | None:
    hint = ("every parked snapshot's key is wrapped under it: restore it from a backup, or remove it together with "
            "the parked snapshots, which cannot be resumed without it")
    try:
        data, st = read_own(path, seal.KEY_BYTES)
    except FileNotFoundError:
        return None
    except StateError as exc:
        raise StateError(exc.message, hint=hint) from None
    if stat.S_IMODE(st.st_mode) != 0o600:
        raise StateError(f"the host key {path} has mode {stat.filemode(st.st_mode)}, not 0600: it may have been "
                         "read by others", hint=f"chmod 600 {path} if it cannot have been; else {hint}")
    if len(data) != seal.KEY_BYTES:
        raise StateError(f"the host key {path} is {len(data)} bytes, not {seal.KEY_BYTES}", hint=hint)
    return data


def host_key() -> bytes:
    """The host key (<root>/host.key), created with 32 random bytes on first use. Never overwritten: two
    processes creating it at once both end up with the one that was linked in first. StateError if it is not
    32 bytes, not mode 0600 or not this user's own."""
    base = root()
    path = base / HOST_KEY
    key = _read_host_key(path)
    if key is not None:
        return key
    tmp = _write_temp(path, seal.new_key(), 0o600)
    try:
        os.link(tmp, path)  # unlike rename, fails if the key exists: the first process's key wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(base)
    key = _read_host_key(path)
    if key is None:
        raise StateError(f"the host key {path} vanished while it was being created")
    return key


@contextlib.contextmanager
def _locked(base: Path) -> Iterator[None]:
    """Hold the exclusive flock on <root>/.lock (released when the fd closes, also if we are killed)."""
    fd = os.open(base / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def parse_json(data: bytes, source: Path) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StateError(f"{source} is not valid JSON: {exc}") from None


def _read_ledger(base: Path) -> dict[str, int]:
    path = base / LEDGER
    try:
        data, _ = read_own(path, JSON_LIMIT)
    except FileNotFoundError:
        return {}
    doc = parse_json(data, path)
    gens = doc.get("generations") if isinstance(doc, dict) else None
    if not isinstance(gens, dict) or set(doc) != {"generations"} or not all(
            isinstance(k, str) and SAFE_ID.fullmatch(k) and type(v) is int and v >= 1 for k, v in gens.items()):
        raise StateError(f"the ledger {path} is malformed: it must be {{\"generations\": {{sandbox id: n >= 1}}}}",
                         hint="it is not reset automatically, since that would let old snapshots be resumed: "
                              "restore it, or remove it together with every parked snapshot")
    return gens


def _write_ledger(base: Path, gens: dict[str, int]) -> None:
    write_json_atomic(base / LEDGER, {"generations": dict(sorted(gens.items()))})


def next_generation(sandbox_id: str) -> int:
    """Advance the ledger's generation of `sandbox_id` (1 for a new id) and return it; from here on, any older
    snapshot of it is stale. Locked, so two processes never hand out the same generation."""
    _check_id(sandbox_id)
    base = root()
    with _locked(base):
        gens = _read_ledger(base)
        gens[sandbox_id] = gens.get(sandbox_id, 0) + 1
        _write_ledger(base, gens)
        return gens[sandbox_id]


def generation(sandbox_id: str) -> int | None:
    """The ledger's current generation of `sandbox_id`, or None if it has none. (No lock needed: the ledger is
    replaced atomically.)"""
    _check_id(sandbox_id)
    return _read_ledger(root(create=False)).get(sandbox_id)


def forget(sandbox_id: str) -> None:
    """Drop `sandbox_id` from the ledger (when the sandbox is gone for good): none of its snapshots is resumable
    after this."""
    _check_id(sandbox_id)
    base = root()
    with _locked(base):
        gens = _read_ledger(base)
        if gens.pop(sandbox_id, None) is not None:
            _write_ledger(base, gens)


def sandbox_dir(sandbox_id: str, create: bool = False) -> Path:
    """<root>/<id>: the directory of a sandbox's snapshot; with `create`, made (mode 0700) if needed and checked
    to be this user's own."""
    _check_id(sandbox_id)
    base = root(create=create)
    path = base / sandbox_id
    if create:
        if make_dir(path):
            fsync_dir(base)
        own_dir(path, f"the state directory of sandbox {sandbox_id}",
                 hint=f"remove it, or chmod 700 {path} if it is memvisor's")
    return path


def stream_path(sandbox_id: str, stream: str) -> Path:
    """<root>/<id>/<stream>.snap; ValueError for a stream name not in seal.STREAMS."""
    seal.stream_number(stream)
    return sandbox_dir(sandbox_id) / f"{stream}{SNAP_SUFFIX}"


@dataclass
class Meta:
    """A committed snapshot (<root>/<id>/meta.json): what resume needs besides the stream and kept files.

    `streams`: stream name -> {"plaintext_bytes", "file_bytes"}; `files`: kept file name -> byte size;
    `sandbox`: the caller's own (policy, HELLO, ...), stored as given."""

    sandbox_id: str
    generation: int
    wrapped_key: str  # base64 of seal.wrap_key(host key, snapshot key, self.ident)
    parked_at: float  # time.time() at the park
    streams: dict[str, dict[str, int]]
    files: dict[str, int] = field(default_factory=dict)
    sandbox: dict[str, Any] = field(default_factory=dict)

    @property
    def ident(self) -> seal.Ident:
        """The snapshot's identity, as bound into its AADs."""
        return seal.Ident(self.sandbox_id, self.generation)

    def key(self, host_key: bytes) -> bytes:
        """The snapshot key, unwrapped with `host_key`; SealError if it does not unwrap."""
        return seal.unwrap_key(host_key, base64.b64decode(self.wrapped_key), self.ident)

    def disk_bytes(self) -> int:
        """What the parked sandbox takes on disk: its sealed streams and its kept files."""
        return sum(s["file_bytes"] for s in self.streams.values()) + sum(self.files.values())

    def to_json(self) -> dict[str, Any]:
        """The meta.json document."""
        return asdict(self)

    @classmethod
    def from_json(cls, doc: object, source: str = META) -> Meta:
        """A Meta from a meta.json document, every field checked; StateError naming `source` if malformed."""
        def bad(why: str) -> NoReturn:
            raise StateError(f"{source} is malformed: {why}")

        if not isinstance(doc, dict):
            bad("not a JSON object")
        want = {f for f in cls.__dataclass_fields__}
        if set(doc) != want:
            bad(f"its keys are {sorted(doc)}, not {sorted(want)}")
        sandbox_id, gen, wrapped = doc["sandbox_id"], doc["generation"], doc["wrapped_key"]
        if not isinstance(sandbox_id, str) or not SAFE_ID.fullmatch(sandbox_id):
            bad(f"sandbox_id {sandbox_id!r} is not a sandbox id")
        if type(gen) is not int or not 1 <= gen < 1 << 64:
            bad(f"generation {gen!r} is not an int >= 1")
        try:
            if not isinstance(wrapped, str) or len(base64.b64decode(wrapped, validate=True)) != seal.WRAPPED_BYTES:
                bad(f"wrapped_key is not the base64 of {seal.WRAPPED_BYTES} bytes")
        except binascii.Error:
            bad("wrapped_key is not base64")
        if type(doc["parked_at"]) not in (int, float):
            bad(f"parked_at {doc['parked_at']!r} is not a number")
        streams, files = doc["streams"], doc["files"]
        if not isinstance(streams, dict) or not all(
                name in seal.STREAMS and isinstance(sizes, dict) and set(sizes) == {"plaintext_bytes", "file_bytes"}
                and all(type(n) is int and n >= 0 for n in sizes.values()) for name, sizes in streams.items()):
            bad(f"streams must map names in {sorted(seal.STREAMS)} to {{plaintext_bytes, file_bytes}} sizes")
        if not isinstance(files, dict) or not all(
                isinstance(name, str) and _FILE_NAME.fullmatch(name) and name != META
                and not name.endswith(SNAP_SUFFIX) and type(n) is int and n >= 0 for name, n in files.items()):
            bad("files must map plain file names (not meta.json or *.snap) to byte sizes")
        if not isinstance(doc["sandbox"], dict):
            bad("sandbox is not a JSON object")
        return cls(sandbox_id=sandbox_id, generation=gen, wrapped_key=wrapped, parked_at=float(doc["parked_at"]),
                   streams={k: dict(v) for k, v in streams.items()}, files=dict(files), sandbox=doc["sandbox"])


def missing(folder: Path, meta: Meta) -> str | None:
    """Why the files of `meta` in `folder` are not all there with the sizes it records, or None."""
    wanted = {f"{name}{SNAP_SUFFIX}": sizes["file_bytes"] for name, sizes in meta.streams.items()}
    wanted.update(meta.files)
    for name, size in sorted(wanted.items()):
        try:
            st = os.lstat(folder / name)
        except FileNotFoundError:
            return f"{name} is missing"
        if not stat.S_ISREG(st.st_mode):
            return f"{name} is not a regular file"
        if st.st_size != size:
            return f"{name} is {st.st_size} bytes, meta.json says {size}"
    return None


def commit(meta: Meta) -> None:
    """Make the snapshot described by `meta` complete by writing its meta.json, last and atomically (which also
    makes the directory entries of the stream and kept files durable; their contents the writer fsynced).
    StateError if the ledger is not at `meta.generation` or a file is missing or of another size."""
    doc = meta.to_json()
    Meta.from_json(doc, f"the meta of sandbox {meta.sandbox_id}")  # never write what load() would refuse
    current = generation(meta.sandbox_id)
    if current != meta.generation:
        raise StateError(f"cannot commit generation {meta.generation} of sandbox {meta.sandbox_id}: the ledger is "
                         f"at {current}")
    folder = sandbox_dir(meta.sandbox_id, create=True)
    why = missing(folder, meta)
    if why is not None:
        raise StateError(f"cannot commit the snapshot of sandbox {meta.sandbox_id}: {why}")
    write_json_atomic(folder / META, doc)


def _load(folder: Path, sandbox_id: str) -> Meta | None:
    try:
        data, _ = read_own(folder / META, JSON_LIMIT)
    except FileNotFoundError:
        return None
    meta = Meta.from_json(parse_json(data, folder / META), str(folder / META))
    if meta.sandbox_id != sandbox_id:
        raise StateError(f"{folder / META} names sandbox {meta.sandbox_id}, not {sandbox_id}")
    return meta


def load(sandbox_id: str) -> Meta | None:
    """The committed snapshot of `sandbox_id`, or None if it has none. StateError if its meta.json is malformed
    or its generation is not the ledger's (an old snapshot is never resumed). The files are checked by scan(),
    their contents by seal.verify()."""
    folder = sandbox_dir(sandbox_id)
    if not own_dir(folder, f"the state directory of sandbox {sandbox_id}", hint=f"remove {folder}"):
        return None
    meta = _load(folder, sandbox_id)
    if meta is None:
        return None
    current = generation(sandbox_id)
    if current != meta.generation:
        raise StateError(f"the snapshot of sandbox {sandbox_id} is generation {meta.generation} but the ledger is "
                         f"at {current}: an old snapshot is never resumed", hint="it is removed by the next scan")
    return meta


def uncommit(sandbox_id: str) -> None:
    """Consume the snapshot of `sandbox_id` once a resumed VM has loaded it (from then on its guest changes the
    kept disks): meta.json is removed durably, its generation retired in the ledger (so even a copy of the old
    directory is refused), and its stream files deleted to free the space. The kept files stay: the resumed VM
    uses them, and a later park keeps them again."""
    folder = sandbox_dir(sandbox_id)
    if not own_dir(folder, f"the state directory of sandbox {sandbox_id}", hint=f"remove {folder}"):
        return
    try:
        meta = _load(folder, sandbox_id)
    except StateError:
        meta = None  # a malformed meta.json was never resumable: just remove it
    with contextlib.suppress(FileNotFoundError):
        (folder / META).unlink()
    fsync_dir(folder)
    if meta is not None and generation(sandbox_id) == meta.generation:
        next_generation(sandbox_id)
    for name in seal.STREAMS:
        (folder / f"{name}{SNAP_SUFFIX}").unlink(missing_ok=True)


def _examine(folder: Path, sandbox_id: str, ledger: dict[str, int]) -> tuple[Meta | None, str]:
    """(meta, "") for a complete, current snapshot in `folder`; else (None, what is wrong with it)."""
    try:
        meta = _load(folder, sandbox_id)
    except StateError as exc:
        return None, f"a snapshot of sandbox {sandbox_id} with a damaged meta.json ({exc.message})"
    if meta is None:
        return None, f"a partial snapshot of sandbox {sandbox_id} (no meta.json)"
    current = ledger.get(sandbox_id)
    if current is None:
        return None, f"a snapshot of sandbox {sandbox_id} that the ledger does not know (generation {meta.generation})"
    if meta.generation < current:
        return None, (f"a stale snapshot of sandbox {sandbox_id} (generation {meta.generation}; the ledger is at "
                      f"{current}), which is never resumed")
    if meta.generation > current:
        return None, (f"a snapshot of sandbox {sandbox_id} newer than the ledger (generation {meta.generation}; the "
                      f"ledger is at {current})")
    why = missing(folder, meta)
    if why is not None:
        return None, f"a partial snapshot of sandbox {sandbox_id} ({why})"
    return meta, ""


def remove_tree(folder: Path) -> bool:
    """rmtree `folder` if it is a real directory (never a symlink) of this user's; True if removed."""
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        log.warning("not removing %s: not a directory owned by uid %d", folder, os.geteuid())
        return False
    try:
        shutil.rmtree(folder)  # fd-based on Linux: does not follow symlinks inside it
    except OSError as exc:
        log.warning("could not remove %s: %s", folder, exc)
        return False
    fsync_dir(folder.parent)
    return True


def _remove_temp(path: Path, label: str, min_age_s: float) -> str | None:
    """Unlink a leftover write_atomic temp file of this user's at least `min_age_s` old; the note, or None."""
    try:
        st = os.lstat(path)
        if st.st_uid != os.geteuid() or time.time() - st.st_mtime < min_age_s:
            return None
        path.unlink()
    except OSError:
        return None
    return f"removed a leftover temporary file {label}"


def scan() -> tuple[list[Meta], list[str]]:
    """Every complete snapshot (meta.json valid, of the ledger's generation, every file there with its recorded
    size), after removing partial and stale ones; plus one line for each thing removed.

    Call it when no park is in progress (at the daemon's start): a park in progress looks exactly like a partial
    snapshot. Entries that are not a sandbox's directory of this user's are left alone."""
    base = root()
    ledger = _read_ledger(base)
    metas: list[Meta] = []
    notes: list[str] = []
    with os.scandir(base) as it:
        names = sorted(entry.name for entry in it)
    for name in names:
        path = base / name
        if name in (HOST_KEY, LEDGER, LOCK, TEMPLATES):
            continue
        if _TMP.fullmatch(name):
            # Another process may be writing the ledger or host key right now: only old ones are leftovers.
            if note := _remove_temp(path, name, TMP_GRACE_S):
                notes.append(note)
            continue
        st = os.lstat(path)
        if not SAFE_ID.fullmatch(name) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            log.warning("ignoring %s in the state directory: not a sandbox directory of uid %d", path, os.geteuid())
            continue
        meta, why = _examine(path, name, ledger)
        if meta is None:
            if remove_tree(path):
                notes.append(f"removed {why}")
            continue
        for inner in sorted(os.listdir(path)):
            if _TMP.fullmatch(inner) and (note := _remove_temp(path / inner, f"{name}/{inner}", 0)):
                notes.append(note)
        metas.append(meta)
    return metas, notes


def remove(sandbox_id: str) -> None:
    """Delete the snapshot directory of `sandbox_id` (meta.json first, so a removal cut short leaves a partial
    snapshot, never a damaged complete one). The ledger keeps its generation, so an old copy of the snapshot
    stays refused; forget() drops that. StateError if the directory is not this user's own."""
    folder = sandbox_dir(sandbox_id)
    if not own_dir(folder, f"the state directory of sandbox {sandbox_id}",
                    hint=f"it was not made by memvisor: remove {folder} by hand"):
        return
    with contextlib.suppress(FileNotFoundError):
        (folder / META).unlink()
        fsync_dir(folder)
    if not remove_tree(folder):
        raise StateError(f"cannot remove the snapshot of sandbox {sandbox_id} in {folder}")


def committed() -> list[Meta]:
    """Every parked sandbox's committed snapshot, read only (for `memvisor ps` and the exporter, which must not
    remove what a daemon's park is still writing, as scan() would): stale or malformed ones are left out."""
    base = root(create=False)
    if not base.is_dir():
        return []
    found = []
    for path in sorted(base.iterdir()):
        if not path.is_dir() or not SAFE_ID.fullmatch(path.name) or path.name == TEMPLATES:
            continue
        try:
            meta = load(path.name)
        except MemvisorError:
            continue
        if meta is not None:
            found.append(meta)
    return found
