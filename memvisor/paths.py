"""Where memvisor keeps things on the host: the image cache, per-sandbox runtime directories, the config file.

Every location can be moved with an environment variable (documented in docs/configuration.md) so tests and
unprivileged users can run side by side with a system install.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Downloaded packages and built images: $MEMVISOR_CACHE_DIR, else $XDG_CACHE_HOME/memvisor."""
    if "MEMVISOR_CACHE_DIR" in os.environ:
        return Path(os.environ["MEMVISOR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memvisor"


def runtime_root() -> Path:
    """Per-sandbox runtime directories: $MEMVISOR_RUNTIME_DIR, else /var/lib/memvisor/run (root) or
    $XDG_STATE_HOME/memvisor/run (~/.local/state/memvisor/run).

    On disk, not in /run: a sandbox's swap file lives here, and on tmpfs the guest's swapped-out pages would
    land back in host RAM.
    """
    if "MEMVISOR_RUNTIME_DIR" in os.environ:
        return Path(os.environ["MEMVISOR_RUNTIME_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/memvisor/run")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "memvisor" / "run"


def default_config() -> Path:
    """The config file read when --config is not given: $MEMVISOR_CONFIG, else
    $XDG_CONFIG_HOME/memvisor/config.toml (~/.config/memvisor/config.toml)."""
    if "MEMVISOR_CONFIG" in os.environ:
        return Path(os.environ["MEMVISOR_CONFIG"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "memvisor" / "config.toml"
