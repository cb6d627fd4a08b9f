"""Rotating a fleet's key (`memvisor fleet rotate-key`, docs/fleet.md): every bundle in the store rewrapped under
the new key, and the fleet's key check in etcd moved to it.

The procedure, with the fleet running:
1. give every daemon the new key as --fleet-key-file and the old one as --fleet-key-previous (a rolling restart):
   each parks under the new key and still resumes what the old one wrapped;
2. run `memvisor fleet rotate-key` on any machine that reaches etcd and the store: each bundle's snapshot key is
   unwrapped with the old key and wrapped again with the new one, and its manifest replaced atomically (the wrap
   binds the manifest's digest, which does not change; the fence's record names that digest, so nothing in etcd
   moves but the key check). A bundle already under the new key is left alone: a rotation cut short is finished by
   running it again;
3. drop --fleet-key-previous (another rolling restart), and retire the old key and every copy of it.
A daemon started with only the old key after step 2 is refused at its start.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

from memvisor.errors import MemvisorError
from memvisor.fleet.etcd import Etcd, Put, TLSFiles, value_is
from memvisor.fleet.records import Layout
from memvisor.fleet.store import DirectoryStore
from memvisor.service.fleetd import KEY_CHECK
from memvisor.snapshot import files, keys
from memvisor.snapshot.manifest import Manifest
from memvisor.snapshot.rotate import rewrap

log = logging.getLogger("memvisor")


@dataclass(frozen=True)
class Rotated:
    rewrapped: int  # bundles moved to the new key now
    already: int  # bundles that were under it already (a rotation finished earlier, or parked since)
    refused: dict[str, str]  # bundles neither key opens: id/generation -> why (left as they are)


def rotate(url: str, store_dir: Path, new_file: Path, old_file: Path, tls: TLSFiles | None = None) -> Rotated:
    """Rewrap every bundle of the store at `store_dir` from the key in `old_file` to the one in `new_file`, then
    move the fleet's key check in etcd (`url`) to the new key. MemvisorError, changing nothing, if etcd's check
    names neither key."""
    new, old = keys.read(new_file), keys.read(old_file)
    etcd = Etcd(url, tls)
    try:
        etcd.check()
        layout = Layout()
        held = etcd.get(layout.key_check)
        new_check, old_check = new.derive_hex(KEY_CHECK).encode(), old.derive_hex(KEY_CHECK).encode()
        if held is not None and not any([hmac.compare_digest(held.value, v) for v in (new_check, old_check)]):
            raise MemvisorError(f"neither {new_file} nor {old_file} is the key of the fleet at {url}",
                                hint="give the fleet's current key as --previous-key-file")
        new_wrap, old_wrap = new.derive(keys.WRAP), old.derive(keys.WRAP)
        try:
            done = _rewrap_all(DirectoryStore(store_dir), new_wrap, old_wrap)
        finally:
            files.zero(new_wrap)
            files.zero(old_wrap)
        if held is None or held.value != new_check:
            guard = [value_is(layout.key_check, held.value)] if held is not None else []
            if not etcd.txn(guard, [Put(layout.key_check, new_check)]).succeeded:
                raise MemvisorError("the fleet's key check changed while the bundles were rewrapped",
                                    hint="run the rotation again")
        return done
    finally:
        etcd.close()
        new.close()
        old.close()


def _rewrap_all(store: DirectoryStore, new_wrap: bytearray, old_wrap: bytearray) -> Rotated:
    rewrapped = already = 0
    refused: dict[str, str] = {}
    for bundle in store.list():
        where = f"{bundle.id}/{bundle.generation}"
        try:
            manifest = Manifest.from_bytes(store.manifest(bundle.id, bundle.generation), f"bundle {where}")
            rewritten = rewrap(manifest, old_wrap, new_wrap)
            if rewritten is None:
                already += 1
                continue
            store.rewrite_manifest(bundle.id, bundle.generation, rewritten.to_bytes())
            rewrapped += 1
        except MemvisorError as exc:
            refused[where] = exc.message
            log.warning("bundle %s is left as it is: %s", where, exc.message)
    return Rotated(rewrapped, already, refused)
