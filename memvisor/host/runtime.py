"""Per-sandbox runtime directories (<runtime root>/<id>/) and the sweep that removes stale ones.

A runtime directory holds `state.json` (who owns it, the VMM pid, the policy, the file list), the console log,
the VMM's own log and the QMP socket. It is removed at teardown. If memvisor itself is SIGKILLed, the VMM dies
with it (PR_SET_PDEATHSIG) and the next memvisor command sweeps the directory: a directory is stale when its
owner process is gone (pid and start time both checked, so a reused pid does not keep it alive).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from memvisor import paths

log = logging.getLogger("memvisor")
STATE = "state.json"
ORPHAN_GRACE_S = 60  # a directory with no state file yet may be one being created right now
LOGS_KEPT = 50  # console logs of failed sandboxes kept in paths.log_dir(); older ones are removed


@dataclass
class SandboxState:
    """What `memvisor ps` and the sweep know of a sandbox (runtime state, not policy)."""

    id: str
    owner_pid: int
    owner_started: float
    created: float
    runtime_dir: str
    policy: dict[str, Any]
    summary: str
    vmm_pid: int | None = None
    vmm_started: float | None = None
    vmm_name: str = ""
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def process_start_time(pid: int) -> float | None:
    """The start time of process `pid` (seconds since the epoch), or None if it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def same_process(pid: int | None, started: float | None) -> bool:
    """True if `pid` is alive and is the process that started at `started` (not a reused pid)."""
    if pid is None or started is None:
        return False
    now = process_start_time(pid)
    return now is not None and abs(now - started) < 0.5


def new_id() -> str:
    """A short random sandbox id."""
    return secrets.token_hex(4)


def create(sandbox_id: str) -> Path:
    """Make the sandbox's runtime directory (mode 0700)."""
    root = paths.runtime_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = root / sandbox_id
    path.mkdir(mode=0o700)
    return path


def write_state(state: SandboxState) -> None:
    """Atomically (re)write state.json."""
    path = Path(state.runtime_dir) / STATE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    tmp.replace(path)


def read_state(path: Path) -> SandboxState | None:
    try:
        return SandboxState(**json.loads((path / STATE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def sweep_socket() -> bool:
    """Remove the daemon's unix socket if no daemon answers on it (a SIGKILLed `memvisor serve` leaves it);
    True if it was removed."""
    path = paths.service_socket()
    if not path.is_socket():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return False
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def sweep() -> list[str]:
    """Remove runtime directories whose owner is gone, killing a VMM left behind, and a dead daemon's socket;
    return the ids removed."""
    if sweep_socket():
        log.warning("removed the socket of a memvisor daemon that is gone: %s", paths.service_socket())
    root = paths.runtime_root()
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        if not path.is_dir():
            continue
        state = read_state(path)
        if state is None:
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > ORPHAN_GRACE_S:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path.name)
            continue
        if same_process(state.owner_pid, state.owner_started):
            continue
        if same_process(state.vmm_pid, state.vmm_started):
            assert state.vmm_pid is not None
            log.warning("killing VMM pid %d left behind by sandbox %s", state.vmm_pid, state.id)
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.vmm_pid, signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(state.id)
    return removed


def live() -> list[SandboxState]:
    """Every running sandbox (after a sweep), oldest first."""
    sweep()
    root = paths.runtime_root()
    states = [s for p in root.iterdir() if p.is_dir() and (s := read_state(p))] if root.is_dir() else []
    return sorted(states, key=lambda s: s.created)


def remove(path: Path) -> None:
    """Delete a runtime directory at teardown."""
    shutil.rmtree(path, ignore_errors=True)


def keep_log(source: Path, name: str) -> Path:
    """Copy `source` into the log directory as `name` (mode 0600; the directory 0700) and prune the oldest
    logs beyond LOGS_KEPT; return the copy's path."""
    folder = paths.log_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = folder / name
    tmp = target.with_suffix(".tmp")
    with source.open("rb") as src, open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as dst:
        shutil.copyfileobj(src, dst)
    tmp.replace(target)
    logs = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:-LOGS_KEPT]:
        with contextlib.suppress(OSError):
            old.unlink()
    return target
