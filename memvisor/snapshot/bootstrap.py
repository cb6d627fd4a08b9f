"""What opening the state directory does before anything in it can be trusted: the host key read, moved out of the
directory (an older memvisor kept it there, with an unauthenticated ledger that is migrated once, with it), or
made (only while nothing in the directory is wrapped under a key); the ledger checked (its MAC, its head) or
started; an interrupted key rotation refused. statedir.open() calls it; it knows nothing of manifests.
"""

from __future__ import annotations

import logging
from pathlib import Path

from memvisor.snapshot import keys, ledger
from memvisor.snapshot.files import StateError, read_own
from memvisor.snapshot.layout import LEDGER, LEGACY_KEY, wrapped_things

log = logging.getLogger("memvisor")


def _interrupted_rotation(key_path: Path) -> None:
    new = key_path.with_name(key_path.name + keys.NEW_SUFFIX)
    if new.exists() or new.is_symlink():
        raise StateError(f"a key rotation of {key_path} was interrupted ({new} exists)",
                         hint="finish it: memvisor key rotate (with the same --key-file)")


def _adopt_key(base: Path, key_path: Path, create_key: bool) -> keys.HostKey:
    """The host key: read; or moved out of the state directory (an older memvisor's); or, when `create_key` and
    nothing in the state directory is wrapped under a key, created. Migrates an older memvisor's ledger with its
    key."""
    legacy = base / LEGACY_KEY
    try:
        key = keys.read(key_path)
    except keys.KeyMissing as missing:
        if legacy.exists() or legacy.is_symlink():
            secret = bytearray(read_own(legacy, keys.KEY_BYTES, f"the old host key {legacy}", modes=(0o600,))[0])
            if len(secret) != keys.KEY_BYTES:
                raise StateError(f"the old host key {legacy} is {len(secret)} bytes, not {keys.KEY_BYTES}",
                                 hint=missing.hint) from None
            with keys.HostKey(key_path, secret) as old:
                book = ledger.LocalLedger(base, old, keys.head_path(key_path))
                try:
                    gens = book.legacy()
                    if gens is not None:  # authenticated from here on; trusted once, with the key it came with
                        (base / LEDGER).unlink()
                        book.initialize(gens)
                        log.warning("the ledger %s is authenticated from now on (its head is in %s)", base / LEDGER,
                                    book.head)
                finally:
                    book.close()
            keys.move_legacy(legacy, key_path)
            return keys.read(key_path)
        if not create_key:
            raise
        wrapped = wrapped_things(base)
        if wrapped:
            raise StateError(f"the key file {key_path} does not exist, but the state directory {base} holds "
                             f"{len(wrapped)} thing(s) wrapped under a key ({', '.join(wrapped[:3])}): nothing was "
                             "recreated", hint=missing.hint) from None
        (base / LEDGER).unlink(missing_ok=True)  # an empty ledger of an earlier key: nothing to keep
        return keys.create(key_path)
    if legacy.exists() or legacy.is_symlink():
        key.close()
        raise StateError(f"the state directory holds an old host key {legacy} besides the key file {key_path}",
                         hint=f"if {key_path} is the key this state directory's snapshots were wrapped with, remove "
                              f"{legacy}; else move {legacy} to {key_path}")
    return key


def open_key_and_ledger(base: Path, key_path: Path, create_key: bool) -> tuple[keys.HostKey, ledger.LocalLedger]:
    """The host key and the checked ledger of state directory `base` (see the module's docstring). StateError names
    the file that cannot be trusted."""
    _interrupted_rotation(key_path)
    key = _adopt_key(base, key_path, create_key)
    book = ledger.LocalLedger(base, key, keys.head_path(key_path))
    try:
        if not book.exists():
            wrapped = wrapped_things(base)
            if wrapped:
                raise StateError(f"the ledger {base / LEDGER} is missing, but the state directory holds "
                                 f"{', '.join(wrapped[:3])}: it was damaged or rolled back",
                                 hint="nothing is reset: restore the ledger, or remove the state directory to "
                                      "start over")
            book.initialize()
        elif book.legacy() is not None:
            raise StateError(f"the ledger {base / LEDGER} is an older memvisor's, unauthenticated, and no old "
                             "host key came with it: refusing to trust it",
                             hint="remove it together with every parked snapshot and template")
        book.all()  # the MAC and the head, checked now
    except BaseException:
        book.close()
        key.close()
        raise
    return key, book
