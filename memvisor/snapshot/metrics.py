"""Prometheus families of the parked sandboxes in the state directory (for `memvisor stats --serve` and the
daemon's /metrics: memvisor/host/exporter.py takes them as its `extra`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from memvisor.errors import MemvisorError
from memvisor.snapshot import statedir
from memvisor.snapshot.manifest import Manifest

log = logging.getLogger("memvisor")


def _parked(state: statedir.State | None) -> tuple[list[Manifest], list[statedir.Problem]]:
    if state is not None:
        return state.committed()
    try:
        opened = statedir.open_to_read()
        if opened is None:
            return [], []
        with opened:
            return opened.committed()
    except MemvisorError as exc:  # no key yet, or a state directory it cannot trust: nothing to count
        log.warning("parked sandboxes are not counted: %s", exc)
        return [], []


def parked_families(state: statedir.State | None = None) -> Iterator[Metric]:
    """Parked sandboxes (docs/parking.md): how many, and per sandbox what it takes on disk (allocated blocks) and
    since when; and how many cannot be resumed as they are (a damaged manifest, a kept disk replaced...).
    `state`: the daemon's open state directory (default: opened read-only for this scrape)."""
    metas, problems = _parked(state)
    yield GaugeMetricFamily("memvisor_parked_sandboxes", "Parked sandboxes (no VMM, no host memory)",
                            value=len(metas))
    yield GaugeMetricFamily("memvisor_parked_problems", "Parked sandboxes that cannot be resumed as they are "
                            "(their manifest or files are not as memvisor wrote them)", value=len(problems))
    size = GaugeMetricFamily("memvisor_parked_snapshot_bytes", "What a parked sandbox takes on disk: the allocated "
                             "blocks of its sealed snapshot and kept disks", labels=["sandbox"])
    since = GaugeMetricFamily("memvisor_parked_since_seconds", "When the sandbox was parked (Unix time)",
                              labels=["sandbox"])
    for meta in metas:
        size.add_metric([meta.id], meta.disk_bytes())
        since.add_metric([meta.id], meta.parked_at)
    yield from (size, since)
