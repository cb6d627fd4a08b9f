"""The fleet soak, small (bench/fleet_soak.py runs the full one: `make soak-fleet`): two sandboxes parked and
resumed across two hosts at once for three rounds, claimed by both hosts at once, with one host restarted (it
drains) between rounds. Nothing may go wrong, stall or be left in the store."""

from __future__ import annotations

from bench import fleet_soak
from tests.vm.fleetlab import FleetLab


def test_sandboxes_moved_between_hosts_at_once_lose_nothing(lab: FleetLab) -> None:
    tally = fleet_soak.run(lab, nodes=2, sandboxes=2, rounds=3, restart_every=2, seed=None, step_timeout=180)
    print(fleet_soak.summary(tally))  # kept by pytest on failure, with the notes below
    assert tally.failures == 0, tally.notes
    assert tally.steps["park"] >= 6 and tally.steps["look"] >= 6 and tally.steps["restart"] == 1, tally.steps
