"""The host key: the one secret that wraps every parked snapshot's key and authenticates the ledger.

It lives in a key file **outside** the state directory (a backup or a copy of the state directory must not carry
the key that opens it): `memvisor serve --key-file PATH`, else $MEMVISOR_KEY_FILE, else /etc/memvisor/host.key
(root) or $XDG_CONFIG_HOME/memvisor/host.key. docs/configuration.md says how to hold it in systemd-creds or a
tmpfs-mounted secret. The file is checked on its descriptor (no symlink, a regular file of this user's, mode 0600
or 0400, exactly 32 bytes) in a directory nobody else can write.

The key is never used directly: HKDF-SHA256 derives one subkey per purpose (WRAP: snapshot keys; LEDGER: the
ledger's and its head's MACs), so no two uses share a key. Key bytes live in bytearrays that close() zeroes;
the `cryptography` package's own copies are out of Python's reach.

This module reads, creates and moves the key file. When it may be created (never while the state directory holds
anything wrapped under a key) is statedir.py's decision; rotation is rotate.py's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from memvisor import paths
from memvisor.snapshot import files
from memvisor.snapshot.files import StateError

log = logging.getLogger("memvisor")
KEY_BYTES: Final = 32
MODES: Final = (0o600, 0o400)  # 0400: a read-only secret (systemd-creds, a mounted secret)
WRAP: Final = "snapshot-key-wrap v1"
LEDGER: Final = "ledger-mac v1"
NEW_SUFFIX: Final = ".new"  # a rotation's new key, written aside before anything is rewrapped


class KeyMissing(StateError):
    """The key file does not exist."""


def locate(explicit: Path | None = None) -> Path:
    """Where the key file is: `explicit` (serve's --key-file), else $MEMVISOR_KEY_FILE, else the default
    (paths.key_file())."""
    if explicit is not None:
        return explicit
    env = os.environ.get("MEMVISOR_KEY_FILE")
    return Path(env) if env else paths.key_file()


def head_path(key_path: Path) -> Path:
    """Where the ledger's head is kept: $MEMVISOR_LEDGER_HEAD, else beside the key file (<key file>.head), out of
    the state directory's reach."""
    env = os.environ.get("MEMVISOR_LEDGER_HEAD")
    return Path(env) if env else key_path.with_name(key_path.name + ".head")


class HostKey:
    """The host key, read from its file: derives subkeys; close() zeroes it. Never shows its bytes."""

    def __init__(self, path: Path, secret: bytearray) -> None:
        if len(secret) != KEY_BYTES:
            raise ValueError(f"a host key is {KEY_BYTES} bytes, not {len(secret)}")
        self.path = path
        self._secret: bytearray | None = secret

    def derive(self, purpose: str) -> bytearray:
        """The subkey for `purpose` (WRAP, LEDGER): 32 bytes the caller zeroes (files.zero) when done."""
        if self._secret is None:
            raise ValueError(f"the host key {self.path} is closed")
        return bytearray(HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                              info=b"memvisor " + purpose.encode()).derive(self._secret))

    def derive_hex(self, purpose: str) -> str:
        """The subkey for `purpose` as hex text, for values that are kept as text (a fleet's key check, its peers'
        MAC key); the bytes it came from are zeroed."""
        sub = self.derive(purpose)
        try:
            return bytes(sub).hex()
        finally:
            files.zero(sub)

    def same_as(self, other: HostKey) -> bool:
        """Whether `other` holds the same key (rotation: the new key is not the old one)."""
        import hmac

        return self._secret is not None and other._secret is not None and hmac.compare_digest(self._secret,
                                                                                                other._secret)

    def close(self) -> None:
        files.zero(self._secret)
        self._secret = None

    def __enter__(self) -> HostKey:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HostKey({str(self.path)!r})"


def open_dir(folder: Path, what: str) -> int:
    """An fd of `folder`, checked to be a directory no one but its owner (this user or root) can write."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StateError(f"cannot open the directory of {what}, {folder}: {exc.strerror}") from None
    st = os.fstat(fd)
    if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o022:
        os.close(fd)
        raise StateError(f"the directory of {what}, {folder}, can be written by others (owner uid {st.st_uid}, "
                         f"mode {st.st_mode & 0o7777:04o}): they could replace it",
                         hint=f"chmod go-w {folder}, or keep the key file in a directory only you can write")
    return fd


def read(path: Path) -> HostKey:
    """The host key in `path`, every check made on the open file; KeyMissing if there is none, StateError (naming
    the file and what to do) if it is not a key memvisor may trust."""
    hint = (f"every parked snapshot's key is wrapped under {path}: restore it from where you keep it (nothing is "
            "recreated while parked state exists)")
    try:
        dir_fd = open_dir(path.parent, f"the key file {path}")
    except FileNotFoundError:
        raise KeyMissing(f"the key file {path} does not exist (nor its directory)", hint=hint) from None
    try:
        try:
            fd = files.open_nofollow(path.name, os.O_RDONLY, f"the key file {path}", dir_fd=dir_fd)
        except FileNotFoundError:
            raise KeyMissing(f"the key file {path} does not exist", hint=hint) from None
        try:
            files.check_fd(fd, f"the key file {path}", modes=MODES, size=KEY_BYTES)
            secret = bytearray(KEY_BYTES)
            with open(fd, "rb", buffering=0, closefd=False) as f:
                got = f.readinto(secret)
            if got != KEY_BYTES:
                files.zero(secret)
                raise StateError(f"the key file {path} gave {got} bytes, not {KEY_BYTES}", hint=hint)
        finally:
            os.close(fd)
    except StateError as exc:
        if exc.hint or isinstance(exc, KeyMissing):
            raise
        raise StateError(exc.message, hint=hint) from None
    finally:
        os.close(dir_fd)
    return HostKey(path, secret)


def _make_dir(folder: Path) -> None:
    """The key file's directory: made 0700 if missing (its parents as the umask says)."""
    if folder.is_dir():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    if files.make_dir(folder):
        files.fsync_dir(folder.parent)


def write_new(path: Path, secret: bytearray | bytes) -> None:
    """Write `secret` to the new key file `path` (mode 0600, never over an existing file: link(2) fails if one
    appeared), durably."""
    _make_dir(path.parent)
    os.close(open_dir(path.parent, f"the key file {path}"))
    tmp = files.write_temp(path, secret, 0o600)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise StateError(f"the key file {path} appeared while memvisor was creating it",
                         hint="another memvisor is starting with the same key file: start one at a time") from None
    finally:
        tmp.unlink(missing_ok=True)
    files.fsync_dir(path.parent)


def create(path: Path) -> HostKey:
    """A new random host key in `path` (which must not exist). The caller decides that one may be made."""
    secret = bytearray(KEY_BYTES)
    with open("/dev/urandom", "rb", buffering=0) as rng:
        if rng.readinto(secret) != KEY_BYTES:
            raise StateError("/dev/urandom gave a short read")
    try:
        write_new(path, secret)
    finally:
        files.zero(secret)
    log.warning("created the host key %s (it wraps every parked snapshot's key: keep it, and back it up apart "
                "from the state directory)", path)
    return read(path)


def move_legacy(legacy: Path, path: Path) -> None:
    """An older memvisor kept the key in the state directory (`legacy`): move it to the key file `path`, which must
    not exist, and remove it from the state directory."""
    try:
        data, _ = files.read_own(legacy, KEY_BYTES, f"the old host key {legacy}", modes=(0o600,))
    except StateError as exc:
        raise StateError(exc.message, hint=f"move it to {path} by hand (mode 0600), or remove it together with the "
                                           "parked state it wraps") from None
    if len(data) != KEY_BYTES:
        raise StateError(f"the old host key {legacy} is {len(data)} bytes, not {KEY_BYTES}")
    secret = bytearray(data)
    try:
        write_new(path, secret)
    finally:
        files.zero(secret)
    legacy.unlink()
    files.fsync_dir(legacy.parent)
    log.warning("moved the host key from the state directory (%s) to %s: a copy of the state directory no longer "
                "carries its key; back the key file up apart from it", legacy, path)
