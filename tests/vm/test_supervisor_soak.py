"""The supervisor soak, small (bench/supervisor_soak.py runs the full one: `make soak-supervisor`): the daemon in a
1 GiB memory cgroup, three 192 MiB sandboxes with authenticated swap and zram, each keeping a 75 MiB heap it
reads, for a minute. Nothing may panic and nothing may be killed, by the guests' OOM killers or the host's."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import supervisor_soak
from memvisor.image.build import Image


def test_three_loaded_sandboxes_in_a_tight_cgroup_lose_nothing(image: Image, tmp_path: Path) -> None:
    args = argparse.Namespace(limit=1024, memory=192, policy="--swap-size 512 --swap-mode authenticated --zram-pct 25",
                              heap=75, max=3, settle=10, retry=60, duration=60, debug=True)
    counts = supervisor_soak.one_run(1, args, tmp_path)
    print(supervisor_soak.table([counts]))  # kept by pytest on failure, with the notes below
    assert counts.sandboxes == 3, counts.notes
    assert (counts.panics, counts.guest_oom_kills, counts.host_oom_kills, counts.lost) == (0, 0, 0, 0), counts.notes
    assert counts.beats > 0
