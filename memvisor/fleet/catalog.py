"""The fleet's templates (docs/fleet.md): which template bundle in the store each template name is, so that any node
clones a template another made (its bundle fetched on first use) and resumes a parked clone of it.

One record per name at <prefix>templates/<name> (records.TemplateRecord). A name is taken once: publish() writes it
only if absent, in one transaction that also compares this node's lease (a node that left the fleet cannot
publish); remove() deletes it only if it still names the same template id. A template never changes (it is
removed and made again under a new id), so nothing else moves.
"""

from __future__ import annotations

import dataclasses
import time

from memvisor.fleet.errors import FenceLost, LeaseLost
from memvisor.fleet.etcd import Delete, Etcd, Get, Put, absent, lease_is, value_is
from memvisor.fleet.lease import Lease
from memvisor.fleet.records import Layout, TemplateRecord


class Catalog:
    """The fleet's template names, as one node (`node`, holding `lease`) sees and changes them."""

    def __init__(self, etcd: Etcd, node: str, lease: Lease, layout: Layout | None = None) -> None:
        self.etcd = etcd
        self.node = node
        self.lease = lease
        self.layout = layout or Layout()

    def get(self, name: str) -> TemplateRecord | None:
        row = self.etcd.get(self.layout.template(name))
        return TemplateRecord.from_json(row.value, row.key) if row else None

    def list(self) -> list[TemplateRecord]:
        return [TemplateRecord.from_json(r.value, r.key) for r in self.etcd.get_prefix(self.layout.templates)]

    def publish(self, record: TemplateRecord) -> TemplateRecord:
        """Take `record.name` for this template; FenceLost if the fleet has a template of that name already."""
        self.lease.check()
        key = self.layout.template(record.name)
        record = dataclasses.replace(record, node=self.node, updated=time.time())
        result = self.etcd.txn([absent(key), lease_is(self.layout.node(self.node), self.lease.id)],
                               [Put(key, record.to_json())], [Get(key)])
        if result.succeeded:
            return record
        rows = result.responses[0].records
        if not rows:
            raise LeaseLost(f"node {self.node} cannot publish template {record.name}: its lease expired",
                            hint="the node must rejoin the fleet")
        held = TemplateRecord.from_json(rows[0].value, rows[0].key)
        if result.uncertain and held.id == record.id:
            return held
        raise FenceLost(f"the fleet has a template named {record.name} already (made on node {held.node})",
                        hint=f"remove it first (memvisor template rm {record.name}) or choose another name")

    def remove(self, record: TemplateRecord) -> None:
        """Forget the name, if it still names this very template."""
        key = self.layout.template(record.name)
        row = self.etcd.get(key)
        if row is None:
            return
        if TemplateRecord.from_json(row.value, row.key).id != record.id:
            raise FenceLost(f"template {record.name} of the fleet is another one now", hint="read it again")
        if not self.etcd.txn([value_is(key, row.value)], [Delete(key)]).succeeded:
            raise FenceLost(f"template {record.name} changed while it was removed", hint="read it again")
