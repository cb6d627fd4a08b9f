"""The fleet soak, small (bench/fleet_soak.py runs the full one: `make soak-fleet`): two sandboxes parked and
resumed across two hosts at once for three rounds, claimed by both hosts at once, with one host restarted (it
drains) between rounds. Nothing may go wrong, stall or be left in the store."""

from __future__ import annotations

from pathlib import Path

from bench import fleet_soak
from memvisor.image.build import Image
from tests.vm.fleetlab import FleetLab


def test_sandboxes_moved_between_hosts_at_once_lose_nothing(image: Image, tmp_path: Path) -> None:
    lab = FleetLab(tmp_path / "fleet")
    try:
        tally = fleet_soak.run(lab, nodes=2, sandboxes=2, rounds=3, restart_every=2, seed=None, step_timeout=180)
    finally:
        lab.close()
    print(fleet_soak.summary(tally))  # kept by pytest on failure, with the notes below
    assert tally.failures == 0, tally.notes
    assert tally.steps["park"] >= 6 and tally.steps["look"] >= 6 and tally.steps["restart"] == 1, tally.steps
    for node in lab.nodes.values():  # nothing of any host left behind
        left = list(node.runtime.iterdir()) if node.runtime.exists() else []
        assert not left, f"{node.name} left {left}"
