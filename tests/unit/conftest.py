"""Every unit test gets a state directory and a host key file of its own: nothing here may reach the host's real
/etc/memvisor or ~/.config/memvisor (memvisor/snapshot/keys.py creates a key file where it finds none)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMVISOR_STATE_DIR", str(tmp_path / "deep" / "state"))
    monkeypatch.setenv("MEMVISOR_KEY_FILE", str(tmp_path / "keys" / "host.key"))
    monkeypatch.delenv("MEMVISOR_LEDGER_HEAD", raising=False)
