"""Every unit test gets a state directory and a host key file of its own: nothing here may reach the host's real
/etc/memvisor or ~/.config/memvisor (memvisor/snapshot/keys.py creates a key file where it finds none)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.fleet.etcd import Etcd
from memvisor.fleet.records import Layout
from tests.fleet_etcd import EtcdServer, running_etcd


@pytest.fixture(autouse=True)
def private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMVISOR_STATE_DIR", str(tmp_path / "deep" / "state"))
    monkeypatch.setenv("MEMVISOR_KEY_FILE", str(tmp_path / "keys" / "host.key"))
    monkeypatch.delenv("MEMVISOR_LEDGER_HEAD", raising=False)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real etcd on loopback for the fleet's unit tests; each test keeps to a key prefix of its own."""
    with running_etcd(tmp_path_factory.mktemp("etcd")) as s:
        yield s


@pytest.fixture
def etcd(server: EtcdServer) -> Iterator[Etcd]:
    with server.client() as client:
        yield client


@pytest.fixture
def layout() -> Layout:
    """The fleet's key layout under a prefix of this test's own."""
    return Layout(f"/t/{uuid.uuid4().hex[:8]}/")
