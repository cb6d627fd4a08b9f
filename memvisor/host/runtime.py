"""Per-sandbox runtime directories (<runtime root>/<id>/) and the sweep that removes stale ones.

A runtime directory holds `state.json` (who owns it, the VMM pid, the policy, the file list), the console log,
the VMM's own log and the QMP socket. It is removed at teardown. If a one-shot memvisor is SIGKILLed, the VMM dies
with it (PR_SET_PDEATHSIG) and the next memvisor command sweeps the directory: a directory is stale when its
owner process is gone (pid and start time both checked, so a reused pid does not keep it alive).

A daemon's sandbox outlives its owner (`outlives_owner`): its state.json also records what the next daemon needs
to take it over (the VMM's inherited descriptors, the guest's HELLO, the daemon's own record of it), and no sweep
touches it; the next daemon, and only a daemon, adopts it or reports it lost (memvisor/service/recovery.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from memvisor import paths
from memvisor.errors import MemvisorError

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
    # A daemon's sandbox: left running when its owner dies, for the next daemon to adopt (never swept).
    outlives_owner: bool = False
    # What the next owner takes over from the VMM (pidfd_getfd): name -> [fd number in the VMM, st_dev, st_ino]
    # ("channel" and "console" are memvisor's own ends, which the VMM inherits and never touches).
    kept_fds: dict[str, list[int]] = field(default_factory=dict)
    hello: dict[str, Any] | None = None  # the guest's HELLO (a resumed or adopted guest sends no other)
    clone: bool = False  # its RAM maps a template's (memvisor does not own it)
    service: dict[str, Any] = field(default_factory=dict)  # the daemon's own record of it (opaque here)

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


SAFE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
TEMPLATE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,29}")  # a template's name: a state-directory and an etcd key


def checked_root(create: bool = False) -> Path | None:
    """The runtime root, after checking it is memvisor's own: a real directory (not a symlink) owned by this
    user, with no access for others (0700). None if it does not exist (and `create` is false)."""
    root = paths.runtime_root()
    if create:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MemvisorError(f"cannot use the runtime directory {root}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077:
        log.warning("tightening the runtime directory %s to mode 0700 (it was %s)", root, stat.filemode(st.st_mode))
        os.chmod(root, 0o700)  # our own directory, made by an older memvisor or another umask
        st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise MemvisorError(
            f"the runtime directory {root} is not memvisor's own (owner uid {st.st_uid}, mode "
            f"{stat.filemode(st.st_mode)}): refusing to trust what is in it",
            hint=f"it must be a directory owned by uid {os.geteuid()} with mode 0700 (chmod 700 {root}), or set "
                 "MEMVISOR_RUNTIME_DIR")
    return root


def create(sandbox_id: str) -> Path:
    """Make the sandbox's runtime directory (mode 0700)."""
    if not SAFE_ID.fullmatch(sandbox_id):
        raise MemvisorError(f"sandbox id {sandbox_id!r} is not 1-32 of a-z, 0-9, '_' and '-'")
    root = checked_root(create=True)
    assert root is not None
    path = root / sandbox_id
    path.mkdir(mode=0o700)
    return path


def write_json(path: Path, doc: object, durable: bool = False) -> None:
    """Atomically (re)write a JSON file in a runtime directory, for readers in other processes (ps, stats);
    `durable`: fsynced before the rename (what must outlive a crash of the daemon, and of the host)."""
    tmp = path.with_suffix(".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
        f.write(json.dumps(doc, indent=2) + "\n")
        if durable:
            f.flush()
            os.fsync(f.fileno())
    tmp.replace(path)


def write_state(state: SandboxState) -> None:
    """Atomically and durably (re)write state.json."""
    write_json(Path(state.runtime_dir) / STATE, state.to_json(), durable=True)


def read_state(path: Path) -> SandboxState | None:
    """A sandbox's state, if its directory and state file are this user's own (never trust a planted one)."""
    try:
        for item in (path, path / STATE):
            st = os.lstat(item)
            if st.st_uid != os.geteuid() or stat.S_ISLNK(st.st_mode):
                log.warning("ignoring %s: not owned by uid %d", item, os.geteuid())
                return None
        doc = json.loads((path / STATE).read_text())
        if not isinstance(doc, dict):
            return None
        known = set(SandboxState.__dataclass_fields__)
        return SandboxState(**{k: v for k, v in doc.items() if k in known})
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
    return the ids removed. A daemon's sandboxes (`outlives_owner`) are left for the next daemon."""
    if sweep_socket():
        log.warning("removed the socket of a memvisor daemon that is gone: %s", paths.service_socket())
    root = checked_root()
    removed: list[str] = []
    if root is None:
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
        if same_process(state.owner_pid, state.owner_started) or state.outlives_owner:
            continue  # alive; or a daemon's sandbox, which only a daemon adopts or reports lost
        if state.vmm_pid is not None:
            kill_vmm(state)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(state.id)
    return removed


def kill_vmm(state: SandboxState) -> None:
    """SIGKILL the VMM a dead owner left behind, if that pid is still that VMM: same start time, and its
    process name is the sandbox's (checked and signalled through one pidfd, so the pid cannot be reused
    in between)."""
    assert state.vmm_pid is not None
    try:
        pidfd = os.pidfd_open(state.vmm_pid)
    except OSError:
        return
    try:
        if not same_process(state.vmm_pid, state.vmm_started):
            return
        if not is_vmm(state.vmm_pid, state):
            log.warning("not killing pid %d: it is not sandbox %s's VMM", state.vmm_pid, state.id)
            return
        log.warning("killing VMM pid %d left behind by sandbox %s", state.vmm_pid, state.id)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def is_vmm(pid: int, state: SandboxState) -> bool:
    """Whether process `pid` is named as sandbox `state`'s VMM (QEMU's -name process=, cut to 15 characters);
    check its start time too (same_process), through a pidfd held across both checks."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return False
    return bool(comm) and (state.vmm_name or "memvisor-").startswith(comm)


def live() -> list[SandboxState]:
    """Every running sandbox (after a sweep), oldest first."""
    sweep()
    root = checked_root()
    states = [s for p in root.iterdir() if p.is_dir() and (s := read_state(p))] if root is not None else []
    return sorted(states, key=lambda s: s.created)


def orphans() -> list[SandboxState]:
    """The sandboxes a dead daemon left (`outlives_owner`, owner gone), oldest first: for the next daemon to adopt
    or report lost. Call it holding daemon_lock()."""
    root = checked_root()
    if root is None:
        return []
    states = [s for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (s := read_state(p))
              and s.outlives_owner and not same_process(s.owner_pid, s.owner_started)]
    return sorted(states, key=lambda s: s.created)


DAEMON_LOCK = "daemon.lock"


def daemon_lock() -> int:
    """Take the runtime root for this daemon: an exclusive flock on <root>/daemon.lock, held until the returned
    fd is closed (or the process dies). MemvisorError if another live daemon holds it: two daemons must never
    adopt the same orphans."""
    root = checked_root(create=True)
    assert root is not None
    while True:
        fd = os.open(root / DAEMON_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MemvisorError(f"another memvisor daemon (pid {holder}) owns the runtime directory {root}",
                                hint="stop it first, or give this one its own MEMVISOR_RUNTIME_DIR") from None
        # A daemon that ends unlinks the file before it lets the lock go: a lock taken on that unlinked file
        # is no lock, so it must still be the file at that name.
        try:
            if os.fstat(fd).st_ino == os.lstat(root / DAEMON_LOCK).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def daemon_unlock(fd: int) -> None:
    """Give the runtime root up (a daemon's clean exit): the lock file goes, then the lock."""
    root = checked_root()
    if root is not None:
        with contextlib.suppress(OSError):
            os.unlink(root / DAEMON_LOCK)
    os.close(fd)


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
