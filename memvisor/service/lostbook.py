"""Sandboxes the daemon could not recover, kept as `lost` until a user removes them (`memvisor stop ID`): a
record per sandbox in <state>/lost/<id>.json (root-only, written atomically), so a second restart still says
what happened instead of answering 404.

A record holds what is known of the sandbox (name, created, template) and why it is lost; nothing in it is
trusted beyond display: it names no file to open and grants nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from memvisor.errors import MemvisorError
from memvisor.host.runtime import SAFE_ID
from memvisor.snapshot import files, layout

log = logging.getLogger("memvisor")
FOLDER = layout.LOST
RECORD_LIMIT = 64 << 10


def _folder(create: bool = False) -> Path:
    path = layout.root(create=create) / FOLDER
    if create and files.make_dir(path):
        files.fsync_dir(path.parent)
    return path


def write(sandbox_id: str, name: str, reason: str, created: float | None = None,
          template: str | None = None) -> None:
    """Record sandbox `sandbox_id` as lost, with why."""
    if not SAFE_ID.fullmatch(sandbox_id):
        raise MemvisorError(f"sandbox id {sandbox_id!r} is not an id")
    folder = _folder(create=True)
    files.own_dir(folder, "the lost-sandbox records", hint=f"remove {folder} or chmod 700 it")
    files.write_json_atomic(folder / f"{sandbox_id}.json", {
        "id": sandbox_id, "name": name, "reason": reason, "at": time.time(), "created": created,
        "template": template})


def read_all() -> list[dict[str, Any]]:
    """Every lost sandbox's record (malformed ones are logged and skipped)."""
    folder = _folder()
    try:
        if not files.own_dir(folder, "the lost-sandbox records", hint=f"remove {folder}"):
            return []
        names = sorted(os.listdir(folder))
    except (MemvisorError, OSError) as exc:
        log.warning("cannot read the lost-sandbox records: %s", exc)
        return []
    records = []
    for name in names:
        sandbox_id = name.removesuffix(".json")
        if not name.endswith(".json") or not SAFE_ID.fullmatch(sandbox_id):
            continue
        try:
            data, _ = files.read_own(folder / name, RECORD_LIMIT)
            doc = files.parse_json(data, folder / name)
        except (MemvisorError, OSError) as exc:
            log.warning("skipping the lost-sandbox record %s: %s", name, exc)
            continue
        if not isinstance(doc, dict) or doc.get("id") != sandbox_id or not isinstance(doc.get("reason"), str):
            log.warning("skipping the lost-sandbox record %s: malformed", name)
            continue
        records.append(doc)
    return records


def remove(sandbox_id: str) -> None:
    """Forget a lost sandbox (the user removed it); the folder goes once it is empty."""
    folder = _folder()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / f"{sandbox_id}.json")
        files.fsync_dir(folder)
    with contextlib.suppress(OSError):  # not empty, or already gone
        folder.rmdir()
