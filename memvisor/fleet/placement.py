"""Placement: which node of the fleet should take a sandbox. Pure functions over node records (no etcd, no I/O),
so the daemon can decide from one read of <prefix>nodes/ and tests can state every case.

A node can take a sandbox if it matches what the sandbox needs, field by field (a parked sandbox resumes only
under the QEMU version, machine type and CPU model that froze it, from the same guest image, with the templates
its RAM is built on), and its room (budget - held) covers the sandbox's memory floor. Of those, the one with the
most room wins (ties: fewer running sandboxes, then the name), which spreads load without any state of our own.
When none can, PlacementRefused says what the fleet has: each node's room and what does not match.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from memvisor.fleet.errors import PlacementRefused
from memvisor.fleet.records import NodeRecord


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


@dataclass(frozen=True)
class Needs:
    """What a sandbox needs of a node: `memory` bytes of room (its floor), and, for each field that is not None,
    an exact match (a new sandbox from the default image needs only memory and image)."""

    memory: int
    qemu_version: str | None = None
    machine: str | None = None
    cpu_model: str | None = None
    image: str | None = None
    templates: frozenset[str] = field(default_factory=frozenset)

    def describe(self) -> str:
        """A short account of the needs, for messages."""
        parts = [_mib(self.memory)]
        for label, value in (("qemu", self.qemu_version), ("machine", self.machine), ("cpu", self.cpu_model),
                             ("image", self.image)):
            if value is not None:
                parts.append(f"{label} {value}")
        if self.templates:
            parts.append(f"templates {', '.join(sorted(self.templates))}")
        return ", ".join(parts)


def mismatches(node: NodeRecord, needs: Needs) -> list[str]:
    """What about `node` a sandbox with `needs` cannot run with (empty: it matches); room is not checked here."""
    found = []
    for label, have, want in (("QEMU version", node.qemu_version, needs.qemu_version),
                              ("machine type", node.machine, needs.machine),
                              ("CPU model", node.cpu_model, needs.cpu_model),
                              ("guest image", node.image, needs.image)):
        if want is not None and have != want:
            found.append(f"{label} {have}, not {want}")
    missing = sorted(needs.templates - set(node.templates))
    if missing:
        found.append(f"no template {', '.join(missing)}")
    return found


def fleet_room(nodes: Sequence[NodeRecord]) -> int:
    """The fleet's room: the sum of every node's."""
    return sum(node.room for node in nodes)


def candidates(nodes: Sequence[NodeRecord], needs: Needs, exclude: Collection[str] = ()) -> list[NodeRecord]:
    """Every node that matches and has the room, best first (most room, then fewer running, then by name)."""
    fit = [n for n in nodes if n.name not in exclude and n.room >= needs.memory and not mismatches(n, needs)]
    return sorted(fit, key=lambda n: (-n.room, n.running, n.name))


def place(nodes: Sequence[NodeRecord], needs: Needs, exclude: Collection[str] = ()) -> NodeRecord:
    """The node with the most room that matches `needs` (leaving out `exclude`, e.g. the node asking, when it has
    already found it cannot admit the sandbox); PlacementRefused naming the fleet's room and each mismatch."""
    found = candidates(nodes, needs, exclude)
    if found:
        return found[0]
    considered = [n for n in nodes if n.name not in exclude]
    if not considered:
        raise PlacementRefused(f"no node of the fleet can take a sandbox ({needs.describe()}): the fleet has no "
                               f"{'other ' if exclude else ''}live node",
                               hint="start memvisor serve --fleet on another host, or free room here")
    why = []
    for node in sorted(considered, key=lambda n: n.name):
        reasons = mismatches(node, needs)
        if node.room < needs.memory:
            reasons.insert(0, f"room {_mib(node.room)}")
        why.append(f"{node.name}: {'; '.join(reasons)}")
    raise PlacementRefused(f"no node of the fleet can take a sandbox ({needs.describe()}): the fleet's room is "
                           f"{_mib(fleet_room(considered))} on {len(considered)} node(s) ({' | '.join(why)})",
                           hint="park or stop sandboxes, add a host, or match the node's QEMU, machine, CPU and image")
