"""Membership: a node is in the fleet while its record lives under its lease.

join() writes <prefix>nodes/<name> (records.py) attached to a fresh lease that a background thread keeps alive
(etcd.Lease, every TTL/3). When the node stops answering, etcd drops the lease and, with it, the record: the
fleet needs no failure detector of its own. The same lease is what the fence compares in every write
(fence.py), so a node whose record has gone can no longer commit or claim anything.

A name is held by at most one live node: join() creates the key only if it is absent, in one transaction.

This module does not decide placement (placement.py) or touch sandboxes (fence.py).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from typing import Final

from memvisor import proc
from memvisor.errors import MemvisorError
from memvisor.fleet.errors import FleetError, LeaseLost, NodeNameTaken, RecordError
from memvisor.fleet.etcd import Etcd, Get, Put, absent, lease_is
from memvisor.fleet.lease import Lease
from memvisor.fleet.records import Layout, NodeRecord, check_node_name

DEFAULT_TTL: Final = 10  # seconds: a node that stops answering leaves the fleet this long after
_QEMU_VERSION = re.compile(r"QEMU emulator version (\S+)")


def qemu_version(binary: str = "qemu-system-x86_64") -> str:
    """QEMU's version as `BINARY --version` prints it (e.g. "7.2.22"): a resume must run under the same QEMU its
    snapshot was taken by, so node records carry it."""
    out = proc.run([binary, "--version"], timeout=10).stdout.decode(errors="replace")
    found = _QEMU_VERSION.search(out)
    if found is None:
        raise MemvisorError(f"cannot read the version of {binary} from its --version: {out.strip()[:200]!r}")
    return found.group(1)


class Member:
    """This node's membership: its name, its lease (kept alive), and its record, which update() rewrites.

    leave() (or the end of a `with`) revokes the lease, so the record disappears at once."""

    def __init__(self, etcd: Etcd, layout: Layout, record: NodeRecord, lease: Lease) -> None:
        self.etcd = etcd
        self.layout = layout
        self.name = record.name
        self.key = layout.node(record.name)
        self.lease = lease
        self.record = dataclasses.replace(record, lease=lease.id)

    def __repr__(self) -> str:
        return f"Member({self.name!r}, {self.lease!r})"

    def __enter__(self) -> Member:
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()

    def update(self, record: NodeRecord) -> NodeRecord:
        """Rewrite this node's record (its room and counts change); the name cannot change. LeaseLost if the
        lease has gone (the key is then etcd's to delete, not ours to recreate)."""
        if record.name != self.name:
            raise FleetError(f"node {self.name} cannot rename itself to {record.name!r}")
        self.lease.check()
        new = dataclasses.replace(record, updated=time.time(), lease=self.lease.id)
        result = self.etcd.txn([lease_is(self.key, self.lease.id)], [Put(self.key, new.to_json(), self.lease.id)])
        if not result.succeeded:
            raise LeaseLost(f"the record of node {self.name} is no longer under its lease {self.lease.id:x}",
                            hint="the lease expired: the node must rejoin the fleet")
        self.record = new
        return new

    def leave(self) -> None:
        """Leave the fleet: revoke the lease (the record goes with it). Idempotent."""
        self.lease.revoke()


def join(etcd: Etcd, record: NodeRecord, *, ttl: int = DEFAULT_TTL, layout: Layout | None = None,
         wait: float = 0.0, on_lost: Callable[[LeaseLost], None] | None = None) -> Member:
    """Join the fleet as `record.name`: a new lease of `ttl` seconds, kept alive, and the record under it.

    NodeNameTaken if a live node holds the name; with `wait`, keep trying that long first (a node restarted
    after a crash finds its old lease still alive for up to its TTL). `on_lost` is called if the lease expires."""
    layout = layout or Layout()
    check_node_name(record.name)
    key = layout.node(record.name)
    lease = Lease(etcd, ttl, on_lost=on_lost)
    deadline = time.monotonic() + wait
    try:
        while True:
            stamped = dataclasses.replace(record, updated=time.time(), lease=lease.id)
            result = etcd.txn([absent(key)], [Put(key, stamped.to_json(), lease.id)], [Get(key)])
            if result.succeeded:
                return Member(etcd, layout, stamped, lease)
            holder = result.responses[0].records
            if time.monotonic() >= deadline:
                raise _taken(etcd, record.name, holder[0].value if holder else b"", key, ttl)
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
    except BaseException:
        lease.revoke()
        raise


def _taken(etcd: Etcd, name: str, value: bytes, key: str, ttl: int) -> NodeNameTaken:
    try:
        api = NodeRecord.from_json(value, key).api
    except RecordError:
        api = "unknown"
    return NodeNameTaken(f"node name {name!r} is held by a live node of the fleet at {etcd.url} (API {api})",
                         hint=f"give this daemon another --node, or stop that one; a crashed one's lease expires "
                              f"within its TTL ({ttl} s by default)")


def nodes(etcd: Etcd, layout: Layout | None = None) -> list[NodeRecord]:
    """Every live node's record, by name. (A node whose lease expired is not here: etcd deleted its record.)"""
    layout = layout or Layout()
    return [NodeRecord.from_json(r.value, r.key, r.lease) for r in etcd.get_prefix(layout.nodes)]
