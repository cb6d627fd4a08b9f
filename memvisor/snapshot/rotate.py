"""`memvisor key rotate`: a new host key, every parked snapshot and template rewrapped under it, the ledger and its
head re-authenticated, crash-safe.

The steps, each durable before the next: (1) the new key is written aside (<key file>.new, mode 0600); (2) every
manifest whose key still unwraps under the old key is rewrapped under the new one and rewritten atomically (its
digest, and so its binding, is unchanged); (3) the ledger and its head are re-MAC'd under the new key; (4) the
new key replaces the key file (rename). A rotation cut at any point leaves <key file>.new behind: the daemon
refuses to start until `memvisor key rotate` runs again, which takes the same new key, finds each manifest and the
ledger under whichever key it is under, and finishes.

It runs only while nothing else uses the state directory: the daemon and SDK programs hold a shared flock on
<state>/.inuse for as long as they run; rotation takes it exclusively or refuses.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from memvisor.snapshot import files, keys, ledger, seal, statedir
from memvisor.snapshot.files import StateError
from memvisor.snapshot.manifest import Manifest

log = logging.getLogger("memvisor")


@dataclass(frozen=True)
class Rotated:
    """What a rotation did."""

    key_file: Path
    sandboxes: int  # manifests rewrapped (or found rewrapped by an interrupted rotation)
    templates: int
    finished_earlier_run: bool  # it finished a rotation that had been cut short


def _manifests(base: Path) -> list[tuple[Path, str]]:
    """Every manifest in the state directory: (path, what)."""
    found = [(entry / statedir.META, f"sandbox {entry.name}") for entry in sorted(base.iterdir())
             if entry.name not in statedir.RESERVED and entry.is_dir() and not entry.is_symlink()
             and (entry / statedir.META).exists()]
    templates = base / statedir.TEMPLATES
    if templates.is_dir() and not templates.is_symlink():
        found += [(t / statedir.META, f"template {t.name}") for t in sorted(templates.iterdir())
                  if t.is_dir() and not t.is_symlink() and (t / statedir.META).exists()]
    return found


def rewrap(manifest: Manifest, old: bytearray, new: bytearray) -> Manifest | None:
    """The manifest with its snapshot key rewrapped from the old wrapping key to the new one, or None if it is
    under the new one already (a rotation cut short did it). The binding (ident, kind, digest) is unchanged.
    SealError if it unwraps under neither."""
    args = (manifest.wrapped(), manifest.ident, manifest.kind, manifest.digest())
    try:
        files.zero(seal.unwrap_key(new, *args))
        return None
    except seal.SealError:
        pass
    key = seal.unwrap_key(old, *args)
    try:
        wrapped = seal.wrap_key(new, key, *args[1:])
    finally:
        files.zero(key)
    return dataclasses.replace(manifest, wrapped_key=base64.b64encode(wrapped).decode())


def _rewrap(path: Path, what: str, old: bytearray, new: bytearray) -> None:
    data, _ = files.read_own(path, statedir.JSON_LIMIT, f"the manifest of {what}", modes=(0o600,))
    rewrapped = rewrap(Manifest.from_bytes(data, str(path)), old, new)
    if rewrapped is not None:
        files.write_atomic(path, rewrapped.to_bytes())


def rotate(key_file: Path | None = None) -> Rotated:
    """Rotate the host key of the state directory (see the module's docstring). StateError if a daemon or another
    program uses the directory, or if a manifest cannot be rewrapped (damaged: put it right or remove it first;
    nothing is replaced then)."""
    base = statedir.root(create=False)
    if not files.own_dir(base, "the state directory", hint="set MEMVISOR_STATE_DIR"):
        raise StateError(f"there is no state directory {base} to rotate the key of")
    key_path = keys.locate(key_file)
    new_path = key_path.with_name(key_path.name + keys.NEW_SUFFIX)
    if (base / statedir.LEGACY_KEY).exists():
        raise StateError(f"the state directory still holds an older memvisor's host key {base / statedir.LEGACY_KEY}",
                         hint="start `memvisor serve` once (it moves the key out), then rotate")
    fd = os.open(base / statedir.INUSE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(f"the state directory {base} is in use (a daemon, or a program parking sandboxes): the "
                             "key cannot be rotated under it",
                             hint="stop `memvisor serve` (its sandboxes park), then rotate") from None
        return _rotate(base, key_path, new_path)
    finally:
        os.close(fd)  # the lock goes with it


def _check_all(base: Path, old: keys.HostKey) -> None:
    """StateError unless every manifest unwraps under `old`: checked before anything is written, so a rotation is
    never left unfinishable by a manifest that was damaged before it began."""
    wrapping = old.derive(keys.WRAP)
    try:
        for path, what in _manifests(base):
            try:
                data, _ = files.read_own(path, statedir.JSON_LIMIT, f"the manifest of {what}", modes=(0o600,))
                manifest = Manifest.from_bytes(data, str(path))
                files.zero(seal.unwrap_key(wrapping, manifest.wrapped(), manifest.ident, manifest.kind,
                                           manifest.digest()))
            except (StateError, seal.SealError) as exc:
                raise StateError(f"cannot rotate: the manifest of {what} is not authentic ({exc.message}): nothing "
                                 "was changed", hint="put it right, or stop that sandbox (remove that template), "
                                                     "then rotate") from None
    finally:
        files.zero(wrapping)


def _rotate(base: Path, key_path: Path, new_path: Path) -> Rotated:
    resumed = new_path.exists() or new_path.is_symlink()
    old = keys.read(key_path)
    try:
        if not resumed:
            _check_all(base, old)
            fresh = bytearray(keys.KEY_BYTES)
            with open("/dev/urandom", "rb", buffering=0) as rng:
                rng.readinto(fresh)
            try:
                keys.write_new(new_path, fresh)
            finally:
                files.zero(fresh)
        new = keys.read(new_path)
        try:
            if old.same_as(new):
                raise StateError(f"{new_path} holds the same key as {key_path}", hint=f"remove {new_path}")
            counts = {"sandbox": 0, "template": 0}
            old_wrap, new_wrap = old.derive(keys.WRAP), new.derive(keys.WRAP)
            try:
                for path, what in _manifests(base):
                    try:
                        _rewrap(path, what, old_wrap, new_wrap)
                    except (StateError, seal.SealError) as exc:
                        raise StateError(f"cannot finish the rotation: the manifest of {what} cannot be rewrapped "
                                         f"({exc.message})", hint=f"it changed since the rotation began: remove "
                                         f"{path.parent} by hand, then run it again ({new_path} is kept)") from None
                    counts[what.split()[0]] += 1
            finally:
                files.zero(old_wrap)
                files.zero(new_wrap)
            book = ledger.LocalLedger(base, old, keys.head_path(key_path))
            try:
                if book.exists():
                    book.rekey(new)
            finally:
                book.close()
            os.replace(new_path, key_path)
            files.fsync_dir(key_path.parent)
        finally:
            new.close()
    finally:
        old.close()
    log.warning("rotated the host key %s: %d sandbox snapshot(s) and %d template(s) rewrapped, the ledger "
                "re-authenticated", key_path, counts["sandbox"], counts["template"])
    return Rotated(key_path, counts["sandbox"], counts["template"], resumed)
