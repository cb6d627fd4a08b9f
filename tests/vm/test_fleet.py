"""A fleet on one machine (docs/fleet.md): a real etcd on loopback and daemons as separate hosts (own sockets,
ports, runtime and state directories) sharing one store directory and one fleet key, on real guests.

- A sandbox parked on one host resumes on another with its files, processes and memory (a counter that kept
  counting); the host that parked it cannot resume it again; two hosts claiming one at once: one wins, one 409.
- A bundle changed in the store (a flipped byte, another sandbox's, an older generation's, an edited manifest) is
  refused and stays parked; a daemon with another fleet key is refused at its start.
- Faults: etcd out of reach, a full store, a host killed mid-park, a host that stops answering and comes back.
- A rolling restart of every daemon loses nothing.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.fleet_etcd import fleet_key, free_port
from tests.vm.conftest import memvisor_argv, wait_for
from tests.vm.fleetlab import COUNTER, LOCAL, LOOK, FleetLab, Node, create, ok, park, sh

TTL = "6"  # short leases: a silent host leaves the fleet within seconds (longer than an etcd pause below)


def start(lab: FleetLab, name: str, *extra: str, store: Path | None = None) -> Node:
    return lab.start(name, "--fleet-ttl", TTL, *extra, store=store)


def mark(api: httpx.Client, key: str, marker: str) -> int:
    ok(api, key, COUNTER.replace("$MARK", marker))
    time.sleep(0.5)
    return look(api, key, marker)


def look(api: httpx.Client, key: str, marker: str) -> int:
    """The counter, after checking the process still runs and holds the marker."""
    words = ok(api, key, LOOK).split()
    assert words[:2] == ["alive", marker], words
    return int(words[2])


def fleet(api: httpx.Client) -> dict[str, Any]:
    view: dict[str, Any] = api.get("/v1/fleet").json()
    return view


def healthy(api: httpx.Client) -> bool:
    """The node answers, with a live lease, and is listed in the fleet."""
    try:
        view = fleet(api)
    except (httpx.HTTPError, ValueError):
        return False
    return view.get("lease") == "alive" and view["node"] in {n["name"] for n in view.get("nodes", [])}


def record(api: httpx.Client, key: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in fleet(api)["sandboxes"] if s["id"] == key)
    return found


def bundle(lab: FleetLab, key: str, generation: int) -> Path:
    return lab.store / "bundles" / key / str(generation)


def refused(api: httpx.Client, key: str, *why: str) -> None:
    """An exec that resumes the sandbox is refused (409) for one of the reasons `why`; it stays parked."""
    status, body, _ = sh(api, key, "true")
    assert status == 409 and any(w in body["detail"] for w in why), (status, body)
    assert record(api, key)["state"] == "parked"


def test_a_parked_sandbox_resumes_on_any_host_once_and_a_changed_bundle_never(lab: FleetLab, tmp_path: Path) -> None:
    a, b = start(lab, "a"), start(lab, "b")
    with a.api() as on_a, b.api() as on_b:
        first = create(on_a, "first")["id"]
        other = create(on_a, "other")["id"]
        before = mark(on_a, first, "first-marker")
        park(on_a, first)
        assert record(on_b, first)["state"] == "parked" and bundle(lab, first, 1).is_dir()
        assert not (a.folder / "state" / first).exists(), "a parked sandbox costs its host nothing"

        # Any host resumes it, with its memory and processes: the counter went on from where it was.
        after = look(on_b, first, "first-marker")
        assert after > before, (before, after)
        assert record(on_a, first)["node"] == "b" and not bundle(lab, first, 1).exists()
        assert on_a.get(f"/v1/sandboxes/{first}").json()["node"] == "b"  # a forwards it to its owner
        # The host that parked it cannot resume it again: the fence names b now.
        r = on_a.post(f"/v1/sandboxes/{first}/resume", json={}, headers=LOCAL)
        assert r.status_code == 409, r.text

        # Two hosts claiming one parked sandbox at once: one resumes it, the other is told 409.
        park(on_a, first)  # forwarded to b, its owner
        answers: list[int] = []

        def claim(node: Node) -> None:
            with node.api() as api:
                answers.append(api.post(f"/v1/sandboxes/{first}/resume", json={}, headers=LOCAL).status_code)

        racers = [threading.Thread(target=claim, args=(n,)) for n in (a, b)]
        for t in racers:
            t.start()
        for t in racers:
            t.join(timeout=120)
        assert sorted(answers) == [200, 409], answers
        winner = record(on_a, first)["node"]
        look(on_a if winner == "a" else on_b, first, "first-marker")

        # A bundle changed in the store is refused, and the sandbox stays parked.
        park(on_a, first)
        gen = record(on_a, first)["generation"]
        park(on_a, other)
        folder = bundle(lab, first, gen)
        aside = tmp_path / "aside"
        shutil.copytree(folder, aside)
        snap = folder / "vm.snap"
        data = bytearray(snap.read_bytes())
        data[len(data) // 2] ^= 1
        snap.write_bytes(bytes(data))
        refused(on_b, first, "failed authentication")
        shutil.copyfile(aside / "vm.snap", snap)
        (folder / "manifest").write_bytes((aside / "manifest").read_bytes().replace(b'"name":"first"',
                                                                                       b'"name":"firsT"'))
        refused(on_b, first, "not the one the fence recorded")
        shutil.copyfile(aside / "manifest", folder / "manifest")
        theirs = bundle(lab, other, record(on_a, other)["generation"])
        shutil.copyfile(theirs / "vm.snap", snap)  # another sandbox's stream under this one's manifest
        refused(on_b, first, "failed authentication", "not the", "recorded")
        shutil.copyfile(aside / "vm.snap", snap)
        # An older generation's bundle put back in the current one's place.
        look(on_b, first, "first-marker")
        park(on_b, first)
        newer = record(on_a, first)["generation"]
        shutil.rmtree(bundle(lab, first, newer))
        shutil.copytree(aside, bundle(lab, first, newer))
        refused(on_a, first, "not the one the fence recorded")
        assert record(on_a, first)["state"] == "parked"

        # A daemon holding another fleet key is refused at its start, naming the file.
        wrong = fleet_key(tmp_path / "wrong.key")
        (lab.root / "c").mkdir()
        proc = subprocess.run(lab.argv("c", free_port(), key=wrong), env=lab.env_of("c"), capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode != 0 and f"{wrong} is not the key of the fleet" in proc.stderr, proc.stderr

        for key in (first, other):
            assert on_a.delete(f"/v1/sandboxes/{key}").status_code == 200
        assert fleet(on_a)["sandboxes"] == [] and not list((lab.store / "bundles").iterdir())


def test_faults_lose_nothing(lab: FleetLab, tmp_path: Path) -> None:
    """etcd out of reach; a full store; a host killed mid-park; a host that stops answering and comes back."""
    a, b = start(lab, "a"), start(lab, "b")
    with a.api() as on_a, b.api() as on_b:
        busy = create(on_a, "busy")["id"]
        idle = create(on_a, "idle")["id"]
        mark(on_a, busy, "busy-marker")
        mark(on_a, idle, "idle-marker")
        park(on_a, idle)

        # etcd out of reach: running sandboxes answer; what needs the fence fails clearly and loses nothing.
        lab.etcd.pause()
        try:
            look(on_a, busy, "busy-marker")
            r = on_a.post(f"/v1/sandboxes/{busy}/park", json={})
            assert r.status_code == 503 and "etcd" in r.json()["detail"], r.text
            status, body, _ = sh(on_b, idle, "true")
            assert status == 503 and "etcd" in body["detail"], body
            r = on_a.post("/v1/sandboxes", json={"name": "new", "policy": {"vm": {"memory_mib": 128}}})
            assert r.status_code == 503, r.text
            look(on_a, busy, "busy-marker")
        finally:
            lab.etcd.resume()
        # All works again once etcd answers (a lease that expired meanwhile is replaced: the node joins again and
        # takes its sandboxes back into the fence).
        wait_for(lambda: healthy(on_a) and healthy(on_b), 60, "both nodes to be back in the fleet")
        park(on_a, busy)
        look(on_b, busy, "busy-marker")  # resumed on b

        # A host killed in the middle of a park: the fence still names the older generation (its partial bundle
        # is never resumed); its VM runs on, and its next daemon takes it back.
        generation = record(on_a, busy)["generation"]

        def park_on_b() -> None:
            with b.api() as api:
                try:
                    api.post(f"/v1/sandboxes/{busy}/park", json={})
                except httpx.HTTPError:
                    pass

        thread = threading.Thread(target=park_on_b)
        thread.start()
        wait_for(lambda: record(on_a, busy)["state"] == "parking", 60, "the park to begin")
        time.sleep(1.0)
        b.kill()
        thread.join(timeout=60)
        now = record(on_a, busy)
        assert now["state"] == "parking" and now["generation"] == generation, now
        wait_for(lambda: "b" not in {n["name"] for n in fleet(on_a)["nodes"]}, 30, "b's lease to expire")
        assert record(on_a, busy)["state"] == "unreachable"
        status, body, _ = sh(on_a, busy, "true")
        assert status == 409 and "unreachable" in body["detail"], body
        b = start(lab, "b")
        wait_for(lambda: record(on_a, busy)["state"] == "running", 60, "b to take it back")
        look(on_a, busy, "busy-marker")  # forwarded to b

        # A host that stops answering (a partition): its running sandbox shows unreachable and is never resumed
        # elsewhere; what it parked resumes anywhere; back, it takes up what it still runs.
        b.signal(signal.SIGSTOP)
        try:
            wait_for(lambda: record(on_a, busy)["state"] == "unreachable", 30, "b to leave the fleet")
            status, body, _ = sh(on_a, busy, "true")
            assert status == 409 and "unreachable" in body["detail"], body
            look(on_a, idle, "idle-marker")  # parked by a before: resumes on a
        finally:
            b.signal(signal.SIGCONT)
        wait_for(lambda: record(on_a, busy)["state"] == "running", 60, "b to rejoin and take it back")
        look(on_a, busy, "busy-marker")

        # A full store: the park fails (507) and the sandbox runs on.
        tiny = tmp_path / "tiny"
        tiny.mkdir(mode=0o700)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "memvisor-test", str(tiny)], check=True)
        try:
            c = start(lab, "c", store=tiny)
            with c.api() as on_c:
                full = create(on_c, "full")["id"]
                r = on_c.post(f"/v1/sandboxes/{full}/park", json={})
                assert r.status_code == 507, r.text
                assert ok(on_c, full, "echo still") == "still\n"
                assert on_c.delete(f"/v1/sandboxes/{full}").status_code == 200
            assert c.stop() == 0
        finally:
            subprocess.run(["umount", str(tiny)], check=True)
        for key in (busy, idle):
            assert on_a.delete(f"/v1/sandboxes/{key}").status_code == 200


def test_a_rolling_restart_of_every_host_loses_nothing(lab: FleetLab) -> None:
    """Four sandboxes on two hosts; each daemon in turn SIGTERMed (it drains: parks into the store) and started
    again; `memvisor fleet drain` and `fleet ls` as a user runs them. Every sandbox answers afterwards."""
    a, b = start(lab, "a"), start(lab, "b")
    marks: dict[str, str] = {}
    with a.api() as on_a, b.api() as on_b:
        for api, name in ((on_a, "a1"), (on_a, "a2"), (on_b, "b1"), (on_b, "b2")):
            key = create(api, name)["id"]
            marks[key] = f"{name}-marker"
            mark(api, key, marks[key])
    for name in ("a", "b"):
        node = lab.nodes[name]
        assert node.stop() == 0
        assert "parking sandbox" in node.log()
        start(lab, name)
    with a.api() as on_a:
        states = {s["id"]: s["state"] for s in fleet(on_a)["sandboxes"]}
        assert set(states) == set(marks), states
        for key, marker in marks.items():
            look(on_a, key, marker)  # each resumes on a (or is forwarded to where it runs)
    env = lab.env_of("a")
    drained = subprocess.run(memvisor_argv("fleet", "drain", "a", "--json"), env=env, capture_output=True,
                             text=True, timeout=600)
    assert drained.returncode == 0, drained.stderr
    listed = subprocess.run(memvisor_argv("fleet", "ls", "--json"), env=env, capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert {s["state"] for s in json.loads(listed.stdout)["sandboxes"]} == {"parked"}
    with lab.nodes["b"].api() as on_b:
        for key, marker in marks.items():
            look(on_b, key, marker)
            assert on_b.delete(f"/v1/sandboxes/{key}").status_code == 200


def test_a_template_made_on_one_host_clones_on_another(lab: FleetLab) -> None:
    """A template made on a is the fleet's: b clones it (its bundle fetched on first use), a parked clone resumes on
    a, and the template cannot be removed while the fleet has a clone of it."""
    a, b = start(lab, "a"), start(lab, "b")
    with a.api() as on_a, b.api() as on_b:
        source = create(on_a, "warm", {"vm": {"memory_mib": 160}, "template": {"ready": True}})["id"]
        ok(on_a, source, "echo warm-state > /tmp/warm")
        made = on_a.post("/v1/templates", json={"name": "warm", "source": source})
        assert made.status_code == 201, made.text
        assert [t["name"] for t in fleet(on_b)["templates"]] == ["warm"]
        made = on_b.post("/v1/sandboxes", json={"name": "clone", "template": "warm"})
        assert made.status_code == 201, made.text
        clone = made.json()["id"]
        assert ok(on_b, clone, "cat /tmp/warm; test -e /run/memvisor/forked && echo forked") == "warm-state\nforked\n"
        park(on_b, clone)
        assert record(on_a, clone)["template"] == "warm"
        assert ok(on_a, clone, "cat /tmp/warm") == "warm-state\n"  # resumed on a, which made the template
        r = on_b.delete("/v1/templates/warm")
        assert r.status_code == 409 and clone in r.json()["detail"], r.text
        assert on_a.delete(f"/v1/sandboxes/{clone}").status_code == 200
        assert on_b.delete("/v1/templates/warm").status_code == 200
        assert fleet(on_a)["templates"] == [] and not list((lab.store / "bundles").iterdir())
