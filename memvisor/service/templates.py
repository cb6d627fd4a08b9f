"""The daemon's templates (docs/templates.md): each one's committed files, its sealed RAM once loaded, and the
sandboxes cloned from it (running or parked), which keep it from being removed.

snapshot/template.py freezes and clones; the registry (service/registry.py) decides when.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

from memvisor import policy as pol
from memvisor.errors import MemvisorError
from memvisor.service.errors import Conflict, NotFound
from memvisor.snapshot import statedir, template
from memvisor.snapshot.manifest import Manifest

log = logging.getLogger("memvisor")


@dataclass
class TemplateEntry:
    name: str
    meta: Manifest
    policy: pol.Policy
    ram_fd: int | None = None  # the sealed memfd of its RAM, once made or loaded
    clones: set[str] = field(default_factory=set)  # ids of the sandboxes cloned from it, running or parked
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def image(self) -> object:
        return self.meta.sandbox.get("image")


def resident(entry: TemplateEntry) -> int:
    """The bytes of host memory the template's sealed memfd holds (0 while it is not loaded)."""
    fd = entry.ram_fd
    if fd is None:
        return 0
    try:
        return os.fstat(fd).st_blocks * 512
    except OSError:
        return 0


class Templates:
    """Every template in the state directory, by name."""

    def __init__(self, state: statedir.State) -> None:
        self.state = state
        self._entries: dict[str, TemplateEntry] = {}
        self._lock = threading.Lock()

    def adopt(self) -> None:
        """List every complete template (a daemon's start); remove partial ones and ones the ledger no longer has,
        and say so; one that is damaged is not listed (nor removed)."""
        metas, problems = template.scan(self.state)
        for problem in problems:
            log.warning("%s", problem.note() if problem.removed else f"template {problem.id} is not usable: "
                        f"{problem.why}")
        for meta in metas:
            name = template.name_of(meta)
            try:
                policy = pol.merge(("template", pol.layer_from_mapping(meta.sandbox.get("policy") or {},
                                                                        f"template {name}")))
            except MemvisorError as exc:
                log.warning("template %s is not listed: its policy: %s", name, exc)
                continue
            self._entries[name] = TemplateEntry(name, meta, policy)
        if metas:
            log.warning("%d template(s) found: %s", len(self._entries), ", ".join(sorted(self._entries)))

    def add(self, entry: TemplateEntry) -> None:
        with self._lock:
            self._entries[entry.name] = entry

    def get(self, name: str) -> TemplateEntry:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise NotFound(f"no template {name!r}", hint="list them with `memvisor template ls`")
        return entry

    def list(self) -> list[TemplateEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda t: t.name)

    def ram(self, entry: TemplateEntry) -> int:
        """The template's sealed RAM memfd, rebuilt from its sealed files on first use by this daemon."""
        with entry.lock:
            if entry.ram_fd is None:
                entry.ram_fd = template.open_ram(self.state, entry.meta, entry.policy.memory_mib)
                log.info("template %s: RAM loaded (%d MiB)", entry.name, template.ram_bytes(entry.meta) >> 20)
            return entry.ram_fd

    def resident_bytes(self) -> int:
        """What the loaded templates' RAM holds in host memory (their memfds), each counted once."""
        return sum(resident(t) for t in self.list())

    def remove(self, name: str) -> TemplateEntry:
        """Delete a template no sandbox uses; Conflict while clones run or are parked."""
        entry = self.get(name)
        with entry.lock:
            if entry.clones:
                raise Conflict(f"template {name} is used by {len(entry.clones)} sandbox(es): "
                               f"{', '.join(sorted(entry.clones))}", hint="stop them first")
            with self._lock:
                self._entries.pop(name, None)
            template.remove(self.state, name, entry.meta)
            if entry.ram_fd is not None:
                os.close(entry.ram_fd)
                entry.ram_fd = None
        log.info("template %s removed", name)
        return entry

    def close(self) -> None:
        for entry in self.list():
            if entry.ram_fd is not None:
                os.close(entry.ram_fd)
                entry.ram_fd = None
