"""A daemon's place in a fleet (`memvisor serve --fleet`, docs/fleet.md): its membership under an etcd lease,
the fence it moves its sandboxes through, the bundle store, the fleet key, and what a resume here must match.

Everything is checked when the daemon starts, before any sandbox is touched: etcd answers, the store is a directory
of this user's, the fleet key file is a key, the node's name is not held by a live node. Then a thread keeps the
node record current (its room, its counts) every few seconds, and rejoins the fleet when the lease was lost (etcd
was unreachable for longer than the lease's TTL): a new lease, and every sandbox running here taken back into the
fence under it.

This module knows the fleet layer (memvisor/fleet) and the daemon's needs; the registry (registry.py) decides when
to park, resume or forward; nothing in memvisor/fleet imports this.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memvisor.errors import MemvisorError
from memvisor.fleet import membership, placement
from memvisor.fleet.catalog import Catalog
from memvisor.fleet.errors import EtcdUnavailable, FleetConfigError, LeaseLost
from memvisor.fleet.etcd import Etcd, TLSFiles
from memvisor.fleet.fence import Fence, FleetGenerations
from memvisor.fleet.records import Layout, NodeRecord, SandboxRecord, State
from memvisor.fleet.store import DirectoryStore
from memvisor.host.runtime import SAFE_ID
from memvisor.host.vmm import qemu
from memvisor.snapshot import files, keys

log = logging.getLogger("memvisor")
TTL = 10  # seconds: a node that stops answering leaves the fleet this long after (its lease)
REFRESH_S = 3.0  # how often the node record is rewritten
PEER_TOKEN = "peer-api-token v1"  # what the fleet key derives the daemons' shared bearer token with
KEY_CHECK = "fleet-key-check v1"  # ... and the value in etcd that tells a daemon holding another key
MACHINE = "q35"


@dataclass(frozen=True)
class Options:
    """`memvisor serve --fleet ...`: how this daemon joins its fleet."""

    url: str  # etcd://HOST:PORT[,HOST:PORT...]
    node: str
    store: Path
    key_file: Path
    advertise: str  # this daemon's API as the others reach it (http://127.0.0.1:PORT, https://NODE_IP:PORT)
    tls: TLSFiles | None = None  # to etcd
    peer_ca: Path | None = None  # what signs the other daemons' TLS certificates
    ttl: int = TTL  # seconds: how long after this daemon stops answering the fleet sees it gone
    previous_key_file: Path | None = None  # the key before a rotation (memvisor fleet rotate-key)


def default_node() -> str:
    """This host's name, as a node name (the first label)."""
    return socket.gethostname().split(".")[0].lower()


def compat(image_key: str) -> dict[str, str]:
    """What a snapshot taken here records, and what a resume here must match: the migration stream is QEMU's, so
    the same QEMU version, machine type and CPU model, and the guest image whose kernel the snapshot runs."""
    accel = qemu.QemuBackend().accel()
    return {"qemu_version": membership.qemu_version(), "machine": MACHINE,
            "cpu_model": "host" if accel == "kvm" else "max", "image": image_key}


def mismatches(recorded: object, here: dict[str, str]) -> list[str]:
    """What of a snapshot's recorded host (`compat()` where it was parked) this host does not match."""
    if not isinstance(recorded, dict):
        return ["the snapshot records no host to match (it was parked by a daemon outside a fleet)"]
    labels = {"qemu_version": "QEMU version", "machine": "machine type", "cpu_model": "CPU model",
              "image": "guest image"}
    return [f"{labels[k]} {recorded.get(k)!s} here is {here[k]}" for k in labels if recorded.get(k) != here[k]]


class Fleet:
    """This daemon's membership of a fleet. `generations` (this object, fenced by the current lease) is the
    snapshot layer's Generations for the open state directory (statedir.open_fleet)."""

    def __init__(self, options: Options, budget_bytes: int, image_key: str,
                 counts: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)) -> None:
        """`counts`: (running, parked, held bytes) as the registry sees them now, for the node record."""
        self.options = options
        self.node = options.node
        self.budget_bytes = budget_bytes
        self.counts = counts
        self.layout = Layout()
        self.compat = compat(image_key)
        self.etcd = Etcd(options.url, options.tls)
        try:
            self.etcd.check()
            self._first_key()
            self._check_key(options.key_file)
            if options.previous_key_file is not None:
                self._check_key(options.previous_key_file)
            options.store.parent.mkdir(parents=True, exist_ok=True)
            self.store = DirectoryStore(options.store, create=True)
            self._check_same_key()
            self._attach(self._join())
        except BaseException:
            self.etcd.close()
            raise
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.on_rejoin: Callable[[], None] | None = None  # the registry takes its running sandboxes back
        self._thread = threading.Thread(target=self._refresh_loop, name="memvisor-fleet", daemon=True)
        self._thread.start()
        log.warning("memvisor serve: node %s joined the fleet at %s (store %s)", self.node, options.url,
                    options.store)

    # -- start-up checks ------------------------------------------------------------------------------------------
    def _first_key(self) -> None:
        """The fleet key is made by the fleet's first daemon if its file does not exist (mode 0600, in a directory
        of its own): every other daemon must be given a copy (the same file on one machine). Never once the fleet
        has a key: a daemon that cannot find it is refused instead."""
        path = self.options.key_file
        if os.path.lexists(path):
            return
        if self.etcd.get(self.layout.key_check) is not None:
            raise FleetConfigError(f"--fleet-key-file {path} does not exist, and the fleet at {self.options.url} has a "
                                   "key already", hint="copy the fleet's key file from one of its nodes (never "
                                   "through the store)")
        secret = bytearray(os.urandom(keys.KEY_BYTES))
        try:
            keys.write_new(path, secret)
        finally:
            files.zero(secret)
        log.warning("created the fleet key %s: give every other daemon of the fleet a copy (--fleet-key-file), and "
                    "keep it out of the store", path)

    @staticmethod
    def _check_key(path: Path) -> None:
        """The fleet key file must be a key (32 bytes, mode 0600 or 0400, this user's, no symlink): a one-line
        error naming it otherwise. It is read again, and held, by statedir.open_fleet."""
        try:
            keys.read(path).close()
        except files.StateError as exc:
            raise FleetConfigError(f"--fleet-key-file: {exc.message}",
                                   hint="make one with `head -c 32 /dev/urandom > FILE; chmod 600 FILE` and give "
                                        "every daemon of the fleet the same file (never put it in the store)") from None

    def _derived(self, purpose: str, path: Path | None = None) -> str:
        with keys.read(path or self.options.key_file) as key:
            return key.derive_hex(purpose)

    def _check_same_key(self) -> None:
        """Every daemon of a fleet must hold the same fleet key (else what one parks no other can resume): the
        first one writes a value derived from it to etcd, the others compare theirs, and a daemon holding another
        key is refused at its start, before it touches anything."""
        from memvisor.fleet.etcd import Put, absent

        mine = self._derived(KEY_CHECK).encode()
        path = self.layout.key_check
        result = self.etcd.txn([absent(path)], [Put(path, mine)])
        if result.succeeded:
            return
        held = self.etcd.get(path)
        accepted = [mine]
        if self.options.previous_key_file is not None:  # a rotation under way: the fleet may still be on the old key
            accepted.append(self._derived(KEY_CHECK, self.options.previous_key_file).encode())
        if held is None or not any([hmac.compare_digest(held.value, k) for k in accepted]):
            raise FleetConfigError(f"--fleet-key-file {self.options.key_file} is not the key of the fleet at "
                                   f"{self.options.url}: its nodes park under another one",
                                   hint="give every daemon of a fleet the same key file")

    def peer_keys(self) -> list[str]:
        """The key (hex) the daemons of the fleet sign their requests to each other with, derived from the fleet
        key (never configured or stored apart): this daemon's first, then during a rotation the previous key's,
        which the daemons not yet restarted still sign with."""
        found = [self._derived(PEER_TOKEN)]
        if self.options.previous_key_file is not None:
            found.append(self._derived(PEER_TOKEN, self.options.previous_key_file))
        return found

    # -- the node record ------------------------------------------------------------------------------------------
    def _record(self) -> NodeRecord:
        running, parked, held = self.counts()
        return NodeRecord(name=self.node, api=self.options.advertise, budget=self.budget_bytes, held=held,
                          running=running, parked=parked, qemu_version=self.compat["qemu_version"],
                          machine=self.compat["machine"], cpu_model=self.compat["cpu_model"],
                          image=self.compat["image"])

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                if not self.member.lease.alive and self.member.lease.state == "expired":
                    self._rejoin()
                else:
                    self.member.update(self._record())
            except (EtcdUnavailable, LeaseLost) as exc:
                log.warning("fleet: %s", exc.message)
            except Exception:  # a bug here must not stop the daemon
                log.exception("fleet: refreshing the node record failed")

    def _rejoin(self) -> None:
        """The lease expired (etcd was out of reach longer than its TTL): join again under a new lease, and have
        the registry take its running sandboxes back into the fence (Fence.adopt)."""
        log.warning("fleet: node %s lost its lease: joining the fleet again", self.node)
        member = self._join()
        with self._lock:
            old = self.member
            self._attach(member)
        old.lease.stop()
        if self.on_rejoin is not None:
            self.on_rejoin()

    def _join(self) -> membership.Member:
        return membership.join(self.etcd, self._record(), ttl=self.options.ttl, layout=self.layout,
                               wait=self.options.ttl + 2)

    def _attach(self, member: membership.Member) -> None:
        """Act under `member`'s lease: the fence, the catalog and the generations all compare it."""
        self.member = member
        self.fence = Fence(self.etcd, self.node, member.lease, self.layout)
        self.catalog = Catalog(self.etcd, self.node, member.lease, self.layout)
        self._generations = FleetGenerations(self.etcd, self.layout, self.node, member.lease)

    def close(self, leave: bool = True) -> None:
        """Stop refreshing; `leave`: revoke the lease (the node record goes at once; a drained node), else let it
        expire (a daemon that leaves its sandboxes running for the next one)."""
        self._stop.set()
        self._thread.join(timeout=10)
        if leave:
            try:
                self.member.leave()
            except MemvisorError as exc:
                log.warning("fleet: leaving: %s", exc.message)
        else:
            self.member.lease.stop()
        self.etcd.close()

    # -- the snapshot layer's Generations -------------------------------------------------------------------------
    def current(self, key: str) -> int | None:
        return self._generations.current(key)

    def advance(self, key: str, expected: int | None) -> int:
        return self._generations.advance(key, expected)

    def forget(self, key: str) -> None:
        self._generations.forget(key)

    def all(self) -> dict[str, int]:
        return self._generations.all()

    # -- the fleet as a whole -------------------------------------------------------------------------------------
    def nodes(self) -> list[NodeRecord]:
        return membership.nodes(self.etcd, self.layout)

    def node_record(self, name: str) -> NodeRecord | None:
        return next((n for n in self.nodes() if n.name == name), None)

    def find(self, key: str) -> SandboxRecord | None:
        """A sandbox of the fleet by id or name (None: the fleet has none)."""
        record = self.fence.get(key) if SAFE_ID.fullmatch(key) else None
        if record is not None:
            return record
        return next((r for r in self.fence.list() if r.name == key), None)

    def place(self, memory: int) -> NodeRecord:
        """The other node with the most room for a new sandbox of this image (PlacementRefused, naming the fleet's
        room, if none has it)."""
        needs = placement.Needs(memory, image=self.compat["image"])
        return placement.place(self.nodes(), needs, exclude=(self.node,))

    def describe(self) -> dict[str, Any]:
        """The fleet as `memvisor fleet ls` shows it: every node with its room, every sandbox wherever it is (a
        sandbox whose owner's lease expired shows state `unreachable`), and this node's lease (alive, unreachable:
        etcd does not answer its keepalives, expired: it is joining again)."""
        nodes = self.nodes()
        live = {n.name for n in nodes}
        sandboxes = []
        for record in self.fence.list():
            doc = dataclasses.asdict(record)
            doc["state"] = str(record.state)
            if record.node is not None and record.node not in live and record.state != State.PARKED:
                doc["state"] = "unreachable"
            sandboxes.append(doc)
        return {"node": self.node, "lease": self.member.lease.state,
                "nodes": [{**dataclasses.asdict(n), "room": n.room} for n in nodes],
                "sandboxes": sandboxes, "templates": [dataclasses.asdict(t) for t in self.catalog.list()]}

