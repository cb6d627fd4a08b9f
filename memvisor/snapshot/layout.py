"""The state directory's layout: where it is, the names in it, and what in it is wrapped under a host key.

    ledger.json         the authenticated ledger (ledger.py)
    .lock               flock'd around the ledger's read-modify-write
    .inuse              flock'd shared by every process using the directory; `memvisor key rotate` exclusive
    <id>/               a sandbox's snapshot: <stream>.snap, kept files, meta.json (the manifest, last)
    templates/<name>/   a template's (template.py)
    lost/               the sandboxes a restarted daemon could not recover (service/lostbook.py)
    fleet/              a fleet daemon's own state directory (its staging area: statedir.open_fleet), apart from
                        this one's, so a host's own parked sandboxes survive its joining a fleet

Names only, and one question (`wrapped_things`: may a host key be made?); statedir.py owns the files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from memvisor import paths
from memvisor.host.runtime import SAFE_ID
from memvisor.snapshot import ledger
from memvisor.snapshot.files import StateError, fsync_dir, make_dir, own_dir, parse_json, read_own

LEDGER: Final = ledger.LEDGER
LOCK: Final = ledger.LOCK
INUSE: Final = ".inuse"
LEGACY_KEY: Final = "host.key"  # where an older memvisor kept the host key (moved out on first use)
TEMPLATES: Final = "templates"
LOST: Final = "lost"
FLEET: Final = "fleet"  # a fleet daemon's staging area (statedir.open_fleet): its own ledger-less State
RESERVED: Final = frozenset({TEMPLATES, LOST, FLEET})  # state-directory names that are never a sandbox's
META: Final = "meta.json"
SNAP_SUFFIX: Final = ".snap"
JSON_LIMIT: Final = 16 << 20


def root(create: bool = True) -> Path:
    """The state directory, after checking it is memvisor's own (a directory, not a symlink, owned by this user,
    mode 0700); created with its parents when `create`. Without `create`, a missing one is returned unchecked
    (there is nothing in it to trust)."""
    env = os.environ.get("MEMVISOR_STATE_DIR")
    path = Path(env) if env else paths.state_home() / "state"
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if make_dir(path):
                fsync_dir(path.parent)
        except OSError as exc:
            raise StateError(f"cannot create the state directory {path}: {exc.strerror}") from None
    own_dir(path, "the state directory",
            hint=f"it must be a directory owned by uid {os.geteuid()} with mode 0700 (chmod 700 {path}), or set "
                 "MEMVISOR_STATE_DIR")
    return path


def wrapped_things(base: Path) -> list[str]:
    """What in state directory `base` is wrapped under a host key (committed snapshots, templates, generations in
    the ledger): a host key may be made only when this is empty."""
    found: list[str] = []
    if not base.is_dir():
        return found
    for entry in sorted(base.iterdir()):
        if SAFE_ID.fullmatch(entry.name) and entry.name not in RESERVED and (entry / META).exists():
            found.append(f"the snapshot of sandbox {entry.name}")
    templates = base / TEMPLATES
    if templates.is_dir() and not templates.is_symlink():
        found += [f"template {t.name}" for t in sorted(templates.iterdir()) if (t / META).exists()]
    path = base / LEDGER
    if path.exists() or path.is_symlink():
        try:
            doc = parse_json(read_own(path, JSON_LIMIT)[0], path)
            if not isinstance(doc, dict) or doc.get("generations") != {}:
                found.append(f"the generations in {path}")
        except StateError:
            found.append(f"the ledger {path}")
    return found
