"""The daemon's sandboxes: create (boot and wait for the agent), look up, run commands, stop.

VMMs are spawned from one long-lived thread: memvisor's VMMs die with the thread that spawned them
(PR_SET_PDEATHSIG, host/launch.py), and a request-handling thread may end at any time. A crashed daemon takes its
VMMs with it; the next start sweeps their runtime directories and says so.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from memvisor import policy as pol
from memvisor.errors import MemvisorError
from memvisor.host import runtime
from memvisor.host.sandbox import Instance
from memvisor.image.build import Image
from memvisor.service import need
from memvisor.service.supervisor import Supervisor

log = logging.getLogger("memvisor")
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
MAX_SANDBOXES = 256
MIB = 1 << 20


class NotFound(MemvisorError):
    """No sandbox by that id or name."""


class Conflict(MemvisorError):
    """The request clashes with the current state (a name in use, too many sandboxes)."""


@dataclass
class Entry:
    """One sandbox the daemon owns."""

    id: str
    name: str
    policy: pol.Policy
    vm: Instance
    created: float = field(default_factory=time.time)
    state: str = "booting"  # booting | running | stopping
    execs: int = 0  # commands run so far


class Registry:
    """Every sandbox of this daemon, by id."""

    def __init__(self, image: Callable[[], Image], supervisor: Supervisor | None = None) -> None:
        self._image = image
        self.supervisor = supervisor
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="memvisor-spawner")
        removed = runtime.sweep()
        if removed:
            log.warning("removed %d sandbox(es) left by a daemon or command that is gone: %s", len(removed),
                        ", ".join(removed))

    def create(self, policy: pol.Policy, name: str | None = None, debug: bool = False) -> Entry:
        """Boot a sandbox and wait until its agent is up; raises MemvisorError (GuestError) if it cannot.
        `debug`: kernel messages on its console (host/sandbox.py DEBUG_KERNEL_ARGS)."""
        if name is not None and not NAME.fullmatch(name):
            raise MemvisorError(f"sandbox name {name!r} is not allowed",
                                hint="use 1-63 of a-z 0-9 _ . - starting with a letter or digit")
        vm = Instance(policy, self._image(), on_warning=log.warning, debug=debug)
        entry = Entry(vm.id, name or vm.id, policy, vm)
        with self._lock:
            if len(self._entries) >= MAX_SANDBOXES:
                raise Conflict(f"this daemon already runs {MAX_SANDBOXES} sandboxes")
            if any(e.name == entry.name for e in self._entries.values()):
                raise Conflict(f"a sandbox named {entry.name!r} already exists")
            self._entries[entry.id] = entry  # holds the name while admission decides
        if self.supervisor is not None:
            try:  # outside the registry's lock: admission may wait for room, and a stop must be able to make it
                # Without a balloon nothing can squeeze it: it is admitted at its maximum, which it will hold.
                size = policy.memory_mib * MIB
                floor = (policy.memory_floor_mib or 0) * MIB if policy.balloon else size
                self.supervisor.admit(entry.id, size, floor, need.estimate(policy))
            except BaseException:
                with self._lock:
                    self._entries.pop(entry.id, None)
                raise
        try:
            self._spawner.submit(vm.start).result()
            vm.wait_ready()
        except BaseException:
            self._drop(entry)
            raise
        entry.state = "running"
        if self.supervisor is not None and policy.balloon:
            self.supervisor.attach(entry.id, vm)
        log.info("sandbox %s (%s) is up: %s", entry.id, entry.name, policy.summary())
        return entry

    def get(self, key: str) -> Entry:
        """By id or name; NotFound otherwise."""
        with self._lock:
            entry = self._entries.get(key) or next((e for e in self._entries.values() if e.name == key), None)
        if entry is None:
            raise NotFound(f"no sandbox {key!r}", hint="list them with `memvisor ps` or GET /v1/sandboxes")
        return entry

    def list(self) -> list[Entry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.created)

    def stop(self, key: str) -> Entry:
        """Power the sandbox off and release everything it had."""
        entry = self.get(key)
        entry.state = "stopping"
        try:
            entry.vm.shutdown()
        finally:
            self._drop(entry)
        log.info("sandbox %s (%s) stopped", entry.id, entry.name)
        return entry

    def close(self) -> None:
        """Stop every sandbox (the daemon is ending) and say so."""
        for entry in self.list():
            log.warning("stopping sandbox %s (%s): the daemon is ending", entry.id, entry.name)
            try:
                self.stop(entry.id)
            except MemvisorError as exc:
                log.warning("sandbox %s: %s", entry.id, exc)
        if self.supervisor is not None:
            self.supervisor.close()
        self._spawner.shutdown(wait=True)

    def _drop(self, entry: Entry) -> None:
        with self._lock:
            self._entries.pop(entry.id, None)
        if self.supervisor is not None:
            self.supervisor.release(entry.id)
        # Teardown (quit, kill, remove files) runs on the spawner thread too: never from a thread that may
        # have been the VMM's parent and be gone already.
        self._spawner.submit(entry.vm.close).result()
