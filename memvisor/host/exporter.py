"""A Prometheus exporter for `memvisor stats`: the same figures, collected fresh on every scrape.

Served with prometheus-client's own HTTP server (`memvisor stats --serve ADDR:PORT`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from memvisor.host import stats

# (metric name, help, path into a sandbox's stats dict)
SANDBOX_GAUGES = (
    ("memvisor_vmm_rss_bytes", "Resident memory of the VMM process", ("vmm_rss_bytes",)),
    ("memvisor_guest_ram_rss_bytes", "Resident part of the VMM's guest-RAM mapping", ("guest_ram_rss_bytes",)),
    ("memvisor_guest_memory_bytes", "Guest RAM size given to the sandbox", ("memory_bytes",)),
    ("memvisor_ksm_merging_pages", "Pages of this VMM merged by KSM", ("ksm", "merging_pages")),
    ("memvisor_ksm_profit_bytes", "KSM profit of this VMM (ksm_process_profit)", ("ksm", "profit_bytes")),
    ("memvisor_balloon_actual_bytes", "Guest RAM not taken by the balloon (QMP query-balloon)",
     ("balloon_actual_bytes",)),
    ("memvisor_guest_memtotal_bytes", "Guest MemTotal", ("guest", "memtotal_bytes")),
    ("memvisor_guest_memavailable_bytes", "Guest MemAvailable", ("guest", "memavailable_bytes")),
    ("memvisor_guest_pswpin_pages", "Guest pages swapped in (vmstat pswpin)", ("guest", "pswpin")),
    ("memvisor_guest_pswpout_pages", "Guest pages swapped out (vmstat pswpout)", ("guest", "pswpout")),
    ("memvisor_guest_zram_ratio", "Guest zram compression ratio", ("guest", "zram_ratio")),
    ("memvisor_supervisor_target_bytes", "The supervisor's balloon target for the guest",
     ("supervisor", "target_bytes")),
    ("memvisor_supervisor_floor_bytes", "The guest RAM the supervisor never takes back", ("supervisor", "floor_bytes")),
    ("memvisor_supervisor_need_bytes", "What the guest needs: the RAM it cannot give back plus a margin",
     ("supervisor", "need_bytes")),
    ("memvisor_supervisor_deflations", "Times the guest took memory back from its balloon rather than OOM-kill",
     ("supervisor", "deflations")),
    ("memvisor_guest_unreclaimable_bytes", "Guest memory that nothing can reclaim (kernel, PID 1, mlocked, zram)",
     ("guest", "unreclaimable_bytes")),
    ("memvisor_guest_oom_kills", "Processes the guest's OOM killer ended since boot", ("guest", "oom_kills")),
    ("memvisor_guest_swap_tags_bytes", "Guest RAM holding the confidential swap's integrity tags (its tag store)",
     ("guest", "swap_tags_bytes")),
)
HOST_GAUGES = (
    ("memvisor_host_memtotal_bytes", "Host MemTotal", ("memtotal_bytes",)),
    ("memvisor_host_memavailable_bytes", "Host MemAvailable", ("memavailable_bytes",)),
    ("memvisor_host_ksm_saved_bytes", "Host memory saved by KSM (pages_sharing x page size)", ("ksm", "saved_bytes")),
    ("memvisor_host_ksm_running", "1 if ksmd is running", ("ksm", "run")),
    ("memvisor_host_ksmd_cpu_seconds", "CPU time ksmd has used", ("ksm", "ksmd_cpu_seconds")),
)


def _get(doc: dict[str, object], path: tuple[str, ...]) -> float | None:
    value: object = doc
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class StatsCollector(Collector):
    """Collects memvisor stats on each scrape; `extra` adds families of a layer above this one (the parked
    sandboxes of memvisor/snapshot, the daemon's own), which this host-layer module must not import."""

    def __init__(self, extra: Callable[[], Iterator[Metric]] | None = None) -> None:
        self.extra = extra

    def collect(self) -> Iterator[Metric]:
        snapshot = stats.collect()
        for name, help_, path in SANDBOX_GAUGES:
            family = GaugeMetricFamily(name, help_, labels=["sandbox"])
            for sb in snapshot["sandboxes"]:
                sb = {**sb, "memory_bytes": sb.get("memory_mib", 0) * stats.MIB}
                value = _get(sb, path)
                if value is not None:
                    family.add_metric([sb["id"]], value)
            yield family
        swap = GaugeMetricFamily("memvisor_guest_swap_used_bytes", "Guest swap in use per device",
                                 labels=["sandbox", "device", "priority"])
        for sb in snapshot["sandboxes"]:
            for dev in (sb.get("guest") or {}).get("swap", []):
                swap.add_metric([sb["id"], dev["device"], str(dev["priority"])], dev["used_bytes"])
        yield swap
        yield from _memctl_families(snapshot["sandboxes"])
        for name, help_, path in HOST_GAUGES:
            value = _get(snapshot["host"], path)
            if value is not None:
                yield GaugeMetricFamily(name, help_, value=value)
        yield GaugeMetricFamily("memvisor_sandboxes", "Running sandboxes", value=len(snapshot["sandboxes"]))
        if self.extra is not None:
            yield from self.extra()


def _memctl_families(sandboxes: list[dict[str, Any]]) -> Iterator[Metric]:
    """memctl counters (docs/memctl.md), per sandbox and function code; rejects per reason."""
    families = {key: CounterMetricFamily(f"memvisor_memctl_{key}", help_, labels=["sandbox", "code"])
                for key, help_ in (("requests", "memctl requests the host applied, per function code"),
                                   ("ranges", "guest-physical ranges those requests named"),
                                   ("bytes", "bytes of guest RAM those requests covered"))}
    rejects = CounterMetricFamily("memvisor_memctl_rejects", "memctl requests refused, per reason",
                                  labels=["sandbox", "reason"])
    locked = GaugeMetricFamily("memvisor_memctl_locked_bytes", "guest RAM memctl holds locked in host memory",
                               labels=["sandbox"])
    for sb in sandboxes:
        counters = sb.get("memctl")
        if not isinstance(counters, dict):
            continue
        for key, family in families.items():
            for code, value in (counters.get(key) or {}).items():
                family.add_metric([sb["id"], code], value)
        for reason, value in (counters.get("rejects") or {}).items():
            rejects.add_metric([sb["id"], reason], value)
        locked.add_metric([sb["id"]], counters.get("locked_bytes", 0))
    yield from (*families.values(), rejects, locked)


def serve(address: str, port: int, extra: Callable[[], Iterator[Metric]] | None = None) -> None:
    """Serve /metrics until interrupted."""
    REGISTRY.register(StatsCollector(extra))
    start_http_server(port, addr=address)
    while True:
        time.sleep(3600)
