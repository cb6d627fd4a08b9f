"""memvisor/fleet/membership.py against a real etcd: joining, a name held by a live node, updates, leaving, and a
node that stops answering disappearing with its lease."""

from __future__ import annotations

import dataclasses
import re
import threading
import time

import pytest

from memvisor.fleet.errors import FleetConfigError, LeaseLost, NodeNameTaken, RecordError
from memvisor.fleet.etcd import Etcd
from memvisor.fleet.membership import join, nodes, qemu_version
from memvisor.fleet.records import Layout, NodeRecord


def record(name: str, **changes: object) -> NodeRecord:
    base = NodeRecord(name, f"http://{name}:8080", budget=2 << 30, held=1 << 30, running=3, parked=1,
                      qemu_version="7.2.22", machine="q35", cpu_model="max", image="a" * 64,
                      templates=("t" * 64,))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_join_update_leave(etcd: Etcd, layout: Layout) -> None:
    with join(etcd, record("a"), layout=layout) as a, join(etcd, record("b"), layout=layout):
        found = nodes(etcd, layout)
        assert [n.name for n in found] == ["a", "b"]
        assert found[0] == dataclasses.replace(record("a"), updated=found[0].updated, lease=a.lease.id)
        assert found[0].room == 1 << 30 and time.time() - found[0].updated < 5
        a.update(record("a", held=2 << 30, running=4))
        assert nodes(etcd, layout)[0].room == 0 and nodes(etcd, layout)[0].running == 4
        with pytest.raises(Exception, match="cannot rename itself"):
            a.update(record("c"))
    assert nodes(etcd, layout) == []  # leaving revokes the lease: the records go at once


def test_a_name_is_held_by_one_live_node(etcd: Etcd, layout: Layout) -> None:
    with join(etcd, record("a"), layout=layout) as first:
        t0 = time.monotonic()
        with pytest.raises(NodeNameTaken) as info:
            join(etcd, record("a", api="http://elsewhere:1"), layout=layout)
        assert time.monotonic() - t0 < 0.5
        assert info.value.message == (f"node name 'a' is held by a live node of the fleet at {etcd.url} "
                                      "(API http://a:8080)")
        assert "another --node" in str(info.value.hint)
        assert [n.api for n in nodes(etcd, layout)] == ["http://a:8080"]
        # the refused join left no lease behind: only the first node's holds the key
        assert nodes(etcd, layout)[0].lease == first.lease.id
        # with `wait`, a restarted node takes the name once the old lease is gone
        threading.Timer(0.3, first.leave).start()
        with join(etcd, record("a", api="http://new:1"), layout=layout, wait=5) as second:
            assert [n.api for n in nodes(etcd, layout)] == ["http://new:1"] and second.lease.id != first.lease.id


def test_a_silent_node_disappears(etcd: Etcd, layout: Layout) -> None:
    lost: list[LeaseLost] = []
    a = join(etcd, record("a"), ttl=1, layout=layout, on_lost=lost.append)
    assert [n.name for n in nodes(etcd, layout)] == ["a"]  # (test_fleet_etcd: a kept lease outlives its TTL)
    a.lease.stop()  # the node dies: nobody refreshes
    t0 = time.monotonic()
    while nodes(etcd, layout):
        assert time.monotonic() - t0 < 3
        time.sleep(0.05)
    # its own view turns false too, and it may not write its record back
    a.lease._valid_until = 0
    with pytest.raises(LeaseLost):
        a.update(record("a"))
    a.leave()


def test_update_after_etcd_dropped_the_lease(etcd: Etcd, layout: Layout) -> None:
    a = join(etcd, record("a"), ttl=30, layout=layout)
    etcd.revoke(a.lease.id)
    with pytest.raises(LeaseLost):
        a.update(record("a", held=0))
    assert nodes(etcd, layout) == []
    a.leave()


def test_bad_names_and_records(etcd: Etcd, layout: Layout) -> None:
    for bad in ("", "A", "-a", "a/b", "a" * 64, "..", "a b"):
        with pytest.raises(FleetConfigError, match="node name"):
            join(etcd, record(bad), layout=layout)
    etcd.put(layout.node("x"), b'{"name": "x"}')
    with pytest.raises(RecordError, match=f"the record {layout.node('x')} in etcd has a bad or missing 'api'"):
        nodes(etcd, layout)
    with pytest.raises(FleetConfigError, match="fleet prefix"):
        Layout("memvisor")


def test_qemu_version() -> None:
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?\S*", qemu_version())
