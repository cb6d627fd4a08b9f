"""Rotating a fleet's key (service/fleetkeys.py) against a real etcd and a store directory: every bundle rewrapped
from the old key to the new (a second run finds them done), the fleet's key check moved, keys that are not the
fleet's refused; and a state directory holding the new key with the old one as previous opens what either wrapped."""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.errors import MemvisorError
from memvisor.fleet.etcd import Etcd, Put
from memvisor.fleet.records import Layout
from memvisor.fleet.store import DirectoryStore
from memvisor.service import fleetd, fleetkeys
from memvisor.snapshot import files, keys, seal, statedir
from memvisor.snapshot.manifest import KeptFile, Manifest
from tests.fleet_etcd import EtcdServer, fleet_key, running_etcd


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd of this test's own (not conftest's shared one): fleetkeys.rotate works under the default prefix."""
    with running_etcd(tmp_path / "etcd") as server:
        yield server


def wrapped_manifest(key: Path, sandbox_id: str, secret: bytearray) -> Manifest:
    host = keys.read(key)
    wrap = host.derive(keys.WRAP)
    try:
        m = Manifest(kind="sandbox", id=sandbox_id, generation=1, parked_at=1.0,
                     streams={"vm": {"plaintext_bytes": 1, "file_bytes": 2, "allocated_bytes": 0}},
                     files={"swap.img": KeptFile(3, 0, "confidential")}, sandbox={"name": sandbox_id},
                     template=None, wrapped_key=base64.b64encode(bytes(60)).decode())
        wrapped = seal.wrap_key(wrap, secret, m.ident, m.kind, m.digest())
        return dataclasses.replace(m, wrapped_key=base64.b64encode(wrapped).decode())
    finally:
        files.zero(wrap)
        host.close()


def unwraps(key: Path, m: Manifest) -> bytes | None:
    host = keys.read(key)
    wrap = host.derive(keys.WRAP)
    try:
        return bytes(seal.unwrap_key(wrap, m.wrapped(), m.ident, m.kind, m.digest()))
    except seal.SealError:
        return None
    finally:
        files.zero(wrap)
        host.close()


def test_rotation_rewraps_every_bundle_and_moves_the_key_check(own_etcd: EtcdServer, tmp_path: Path) -> None:
    old, new = fleet_key(tmp_path / "old.key"), fleet_key(tmp_path / "new.key")
    store_dir = tmp_path / "store"
    store_dir.mkdir(mode=0o700)
    store = DirectoryStore(store_dir)
    payload = tmp_path / "vm.snap"
    payload.write_bytes(b"sealed stream")
    secrets = {sid: bytearray(os.urandom(32)) for sid in ("aaaa0001", "aaaa0002")}
    for sid, secret in secrets.items():
        store.put(sid, 1, {"vm.snap": payload}, wrapped_manifest(old, sid, secret).to_bytes())
    client = Etcd(own_etcd.url)
    layout = Layout()
    old_host = keys.read(old)
    check = old_host.derive(fleetd.KEY_CHECK)
    client.txn([], [Put(layout.key_check, bytes(check).hex().encode())])  # the fleet runs on the old key
    old_host.close()

    stranger = fleet_key(tmp_path / "stranger.key")
    with pytest.raises(MemvisorError, match="is the key of the fleet"):
        fleetkeys.rotate(own_etcd.url, store_dir, stranger, fleet_key(tmp_path / "other.key"))

    done = fleetkeys.rotate(own_etcd.url, store_dir, new, old)
    assert (done.rewrapped, done.already, done.refused) == (2, 0, {})
    for sid, secret in secrets.items():
        m = Manifest.from_bytes(store.manifest(sid, 1), sid)
        assert unwraps(new, m) == bytes(secret) and unwraps(old, m) is None
        assert store.manifest(sid, 1) != wrapped_manifest(old, sid, secret).to_bytes()
    again = fleetkeys.rotate(own_etcd.url, store_dir, new, old)  # finishing a cut-short rotation: nothing left to do
    assert (again.rewrapped, again.already) == (0, 2)
    held = client.get(layout.key_check)
    new_host = keys.read(new)
    assert held is not None and held.value == bytes(new_host.derive(fleetd.KEY_CHECK)).hex().encode()
    new_host.close()
    client.close()


def test_a_state_with_the_previous_key_opens_what_either_wrapped(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = fleet_key(tmp_path / "old.key"), fleet_key(tmp_path / "new.key")
    state_dir = tmp_path / "state"
    monkeypatch.setenv("MEMVISOR_STATE_DIR", str(state_dir))
    secret = bytearray(os.urandom(32))
    under_old = wrapped_manifest(old, "bbbb0001", secret)
    under_new = wrapped_manifest(new, "bbbb0002", secret)
    plain = statedir.open_fleet(new, generations=None)  # type: ignore[arg-type]  # (not used here)
    with plain:
        assert bytes(plain.unwrap(under_new)) == bytes(secret)
        with pytest.raises(seal.SealError):
            plain.unwrap(under_old)
    both = statedir.open_fleet(new, generations=None, previous_key_file=old)  # type: ignore[arg-type]
    with both:
        assert bytes(both.unwrap(under_old)) == bytes(both.unwrap(under_new)) == bytes(secret)
