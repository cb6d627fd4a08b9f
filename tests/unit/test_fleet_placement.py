"""memvisor/fleet/placement.py: the node with the most room that matches, or a refusal naming the fleet's room
and every mismatch."""

from __future__ import annotations

import dataclasses

import pytest

from memvisor.fleet.errors import PlacementRefused
from memvisor.fleet.placement import Needs, candidates, fleet_room, mismatches, place
from memvisor.fleet.records import NodeRecord

MiB = 1 << 20


def node(name: str, room_mib: int, running: int = 0, **changes: object) -> NodeRecord:
    base = NodeRecord(name, f"http://{name}:1", budget=1024 * MiB, held=(1024 - room_mib) * MiB, running=running,
                      parked=0, qemu_version="7.2.22", machine="q35", cpu_model="max", image="img1",
                      templates=("tpl-a", "tpl-b"))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


RESUME = Needs(256 * MiB, qemu_version="7.2.22", machine="q35", cpu_model="max", image="img1",
               templates=frozenset({"tpl-a"}))


def test_most_room_that_matches_wins() -> None:
    fleet = [node("a", 300), node("b", 900, qemu_version="8.0.0"), node("c", 500), node("d", 200)]
    assert place(fleet, RESUME).name == "c"  # b has more room but another QEMU
    assert [n.name for n in candidates(fleet, RESUME)] == ["c", "a"]
    assert place(fleet, Needs(256 * MiB)).name == "b"  # a new sandbox needs only room
    assert place(fleet, RESUME, exclude={"c"}).name == "a"
    # ties: fewer running, then the name
    assert place([node("b", 500, running=1), node("a", 500, running=2), node("c", 500, running=1)],
                 RESUME).name == "b"


def test_room_is_budget_minus_held_and_never_negative() -> None:
    over = dataclasses.replace(node("a", 0), held=2048 * MiB)
    assert over.room == 0 and fleet_room([over, node("b", 100)]) == 100 * MiB
    assert place([node("a", 256)], RESUME).name == "a"  # exactly enough fits


def test_every_mismatch_is_named() -> None:
    odd = node("x", 900, qemu_version="8.0.0", machine="pc", cpu_model="host", image="img2", templates=("tpl-b",))
    assert mismatches(odd, RESUME) == ["QEMU version 8.0.0, not 7.2.22", "machine type pc, not q35",
                                       "CPU model host, not max", "guest image img2, not img1", "no template tpl-a"]
    assert mismatches(node("a", 1), RESUME) == []


def test_refusal_names_the_fleets_room() -> None:
    fleet = [node("b", 100), node("a", 900, machine="pc")]
    with pytest.raises(PlacementRefused) as info:
        place(fleet, RESUME)
    assert info.value.message == (
        "no node of the fleet can take a sandbox (256 MiB, qemu 7.2.22, machine q35, cpu max, image img1, "
        "templates tpl-a): the fleet's room is 1000 MiB on 2 node(s) (a: machine type pc, not q35 | "
        "b: room 100 MiB)")
    assert info.value.hint
    with pytest.raises(PlacementRefused, match="the fleet has no other live node"):
        place([node("a", 900)], RESUME, exclude={"a"})
    with pytest.raises(PlacementRefused, match="the fleet has no live node"):
        place([], Needs(MiB))
