"""Prometheus families of the parked sandboxes in the state directory (for `memvisor stats --serve` and the
daemon's /metrics: memvisor/host/exporter.py takes them as its `extra`)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from memvisor.snapshot import statedir


def parked_families() -> Iterator[Metric]:
    """Parked sandboxes (docs/parking.md): how many, and per sandbox what it takes on disk and since when."""
    metas = statedir.committed()
    yield GaugeMetricFamily("memvisor_parked_sandboxes", "Parked sandboxes (no VMM, no host memory)",
                            value=len(metas))
    size = GaugeMetricFamily("memvisor_parked_snapshot_bytes", "What a parked sandbox takes on disk: its sealed "
                             "snapshot and kept disks", labels=["sandbox"])
    since = GaugeMetricFamily("memvisor_parked_since_seconds", "When the sandbox was parked (Unix time)",
                              labels=["sandbox"])
    for meta in metas:
        size.add_metric([meta.sandbox_id], meta.disk_bytes())
        since.add_metric([meta.sandbox_id], meta.parked_at)
    yield from (size, since)
