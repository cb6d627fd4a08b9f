"""Where memvisor keeps things on the host: the image cache, per-sandbox runtime directories, the config file.

Every location can be moved with an environment variable (documented in docs/configuration.md) so tests and
unprivileged users can run side by side with a system install.
"""

from __future__ import annotations

import hashlib
import os
import pwd
from pathlib import Path

from memvisor.errors import MemvisorError


def cache_dir() -> Path:
    """Downloaded packages and built images: $MEMVISOR_CACHE_DIR, else $XDG_CACHE_HOME/memvisor."""
    if "MEMVISOR_CACHE_DIR" in os.environ:
        return Path(os.environ["MEMVISOR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memvisor"


def state_home() -> Path:
    """memvisor's state on disk: /var/lib/memvisor (root), else $XDG_STATE_HOME/memvisor
    (~/.local/state/memvisor)."""
    if os.geteuid() == 0:
        return Path("/var/lib/memvisor")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "memvisor"


def runtime_root() -> Path:
    """Per-sandbox runtime directories: $MEMVISOR_RUNTIME_DIR, else <state home>/run.

    On disk, not in /run: a sandbox's swap file lives here, and on tmpfs the guest's swapped-out pages would
    land back in host RAM.
    """
    if "MEMVISOR_RUNTIME_DIR" in os.environ:
        return Path(os.environ["MEMVISOR_RUNTIME_DIR"])
    return state_home() / "run"


def log_dir() -> Path:
    """Console logs of sandboxes that failed or timed out, kept after teardown: $MEMVISOR_LOG_DIR, else
    <state home>/logs (/var/lib/memvisor/logs for root)."""
    if "MEMVISOR_LOG_DIR" in os.environ:
        return Path(os.environ["MEMVISOR_LOG_DIR"])
    return state_home() / "logs"


def default_config() -> Path:
    """The config file read when --config is not given: $MEMVISOR_CONFIG, else
    $XDG_CONFIG_HOME/memvisor/config.toml (~/.config/memvisor/config.toml)."""
    if "MEMVISOR_CONFIG" in os.environ:
        return Path(os.environ["MEMVISOR_CONFIG"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "memvisor" / "config.toml"


def key_file() -> Path:
    """The default host key file (memvisor/snapshot/keys.py; `serve --key-file` and $MEMVISOR_KEY_FILE move it):
    /etc/memvisor/host.key (root), else $XDG_CONFIG_HOME/memvisor/host.key. Never in the state directory: a copy
    of the parked snapshots must not carry the key that opens them."""
    if os.geteuid() == 0:
        return Path("/etc/memvisor/host.key")
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "memvisor" / "host.key"


def service_socket() -> Path:
    """The daemon's unix socket: $MEMVISOR_SOCKET, else /run/memvisor/serve.sock (root) or
    $XDG_RUNTIME_DIR/memvisor/serve.sock."""
    if "MEMVISOR_SOCKET" in os.environ:
        return Path(os.environ["MEMVISOR_SOCKET"])
    if os.geteuid() == 0:
        return Path("/run/memvisor/serve.sock")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/memvisor-{os.geteuid()}"
    return Path(base) / "memvisor" / "serve.sock"


VMM_UID_BASE = 0x60000000  # per-sandbox VMM uids (and gids) come from [BASE, BASE + RANGE): no user has them
VMM_UID_RANGE = 0x10000000


def vmm_user(sandbox_id: str) -> tuple[int, int] | None:
    """(uid, gid) the sandbox's VMM runs as when memvisor runs as root; None when memvisor is not root (the VMM
    then runs as memvisor's own user). By default each sandbox gets a uid of its own from a range no account
    uses, so one compromised VMM cannot open another's /proc files (its memfd, its swap fd, its memory);
    $MEMVISOR_VMM_USER names one existing user for all of them instead (weaker: same-uid VMMs can reach each
    other). MemvisorError if that user does not exist or is root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("MEMVISOR_VMM_USER")
    if not name:
        uid = VMM_UID_BASE + int.from_bytes(hashlib.sha256(sandbox_id.encode()).digest()[:4], "big") % VMM_UID_RANGE
        return uid, uid
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise MemvisorError(f"MEMVISOR_VMM_USER={name!r} does not exist",
                            hint="name an existing unprivileged user, or unset it for a uid per sandbox") from None
    if entry.pw_uid == 0:
        raise MemvisorError(f"MEMVISOR_VMM_USER={name!r} is root: the VMM must run unprivileged",
                            hint="name an unprivileged system user")
    return entry.pw_uid, entry.pw_gid
