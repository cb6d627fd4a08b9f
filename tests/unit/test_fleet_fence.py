"""memvisor/fleet/fence.py against a real etcd: every move of a sandbox's record, the race of two nodes claiming
one parked sandbox (exactly one wins), a node whose lease lapsed (it can neither commit nor claim, by etcd's
own check), a write whose reply was lost, the fleet's Generations, and the records' validation."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from memvisor.fleet.errors import FenceLost, LeaseLost, NoSuchSandbox, RecordError, Stale
from memvisor.fleet.etcd import Etcd, TxnResult
from memvisor.fleet.fence import Fence, FleetGenerations
from memvisor.fleet.membership import Member, join
from memvisor.fleet.records import Layout, NodeRecord, SandboxRecord, State

DIGEST = "ab" * 32


def node(name: str) -> NodeRecord:
    return NodeRecord(name, f"http://{name}:8080", budget=1 << 30, held=0, running=0, parked=0,
                      qemu_version="7.2.22", machine="q35", cpu_model="max", image="img", templates=())


@pytest.fixture
def members(etcd: Etcd, layout: Layout) -> Iterator[Callable[..., Member]]:
    """Join nodes (TTL 30 s unless asked: no keepalive runs during a test); all leave at the end."""
    joined: list[Member] = []

    def make(name: str, ttl: int = 30) -> Member:
        joined.append(join(etcd, node(name), ttl=ttl, layout=layout))
        return joined[-1]

    yield make
    for m in joined:
        m.leave()


@pytest.fixture
def fence(etcd: Etcd, layout: Layout, members: Callable[..., Member]) -> Callable[[str], Fence]:
    def make(name: str) -> Fence:
        m = members(name)
        return Fence(etcd, m.name, m.lease, layout)
    return make


def test_life_of_a_sandbox(fence: Callable[[str], Fence]) -> None:
    a, b = fence("a"), fence("b")
    rec = a.create("sb1", "web")
    assert (rec.node, rec.state, rec.generation, rec.digest, rec.lease) == ("a", State.RUNNING, 0, None, a.lease.id)
    assert a.get("sb1") == rec and b.get("sb1") == rec
    with pytest.raises(FenceLost, match="already in the fleet"):
        b.create("sb1", "other")
    # only the owner parks
    with pytest.raises(FenceLost, match="cannot begin parking sandbox sb1: it is running on node a"):
        b.begin_park("sb1")
    assert a.begin_park("sb1").state == State.PARKING
    assert a.abort_park("sb1").state == State.RUNNING  # the store was full: it keeps running
    a.begin_park("sb1")
    with pytest.raises(FenceLost, match="the fence is at generation 0, not 3"):
        a.commit_park("sb1", 3, 4, DIGEST)
    parked = a.commit_park("sb1", 0, 1, DIGEST)
    assert (parked.node, parked.state, parked.generation, parked.digest, parked.last_node) == \
        (None, State.PARKED, 1, DIGEST, "a")
    # any node resumes it, at the generation the fence names
    with pytest.raises(FenceLost, match="cannot resume generation 0 of sandbox sb1: the fence names generation 1"):
        b.claim_resume("sb1", 0)
    claimed = b.claim_resume("sb1", 1)
    assert (claimed.node, claimed.state, claimed.lease) == ("b", State.RESUMING, b.lease.id)
    with pytest.raises(FenceLost, match="it is resuming on node b"):
        a.claim_resume("sb1", 1)
    # the bundle was refused: it stays parked, at the same generation, for another node
    assert b.abort_resume("sb1").state == State.PARKED
    a.claim_resume("sb1", 1)
    running = a.finish_resume("sb1")
    assert (running.node, running.state, running.generation, running.last_node) == ("a", State.RUNNING, 1, "a")
    # generation 1's bundle is never resumed again: the sandbox left "parked"
    with pytest.raises(FenceLost, match="it is running on node a"):
        b.claim_resume("sb1", 1)
    with pytest.raises(FenceLost, match="only its owner removes a sandbox that runs"):
        b.delete("sb1")
    a.delete("sb1")
    assert a.get("sb1") is None
    with pytest.raises(NoSuchSandbox, match="the fleet has no sandbox sb1"):
        a.begin_park("sb1")


def test_list_and_delete_parked_by_anyone(fence: Callable[[str], Fence]) -> None:
    a, b = fence("a"), fence("b")
    for i in range(3):
        a.create(f"s{i}", f"n{i}")
    a.commit_park("s1", 0, 1, DIGEST)
    assert [(r.id, r.state) for r in b.list()] == [("s0", State.RUNNING), ("s1", State.PARKED), ("s2", State.RUNNING)]
    b.delete("s1")  # parked: nobody owns it, any live node may remove it
    assert [r.id for r in a.list()] == ["s0", "s2"]


def test_two_nodes_claiming_at_once_one_wins(fence: Callable[[str], Fence]) -> None:
    a, b, c = fence("a"), fence("b"), fence("c")
    rounds = 12
    for i in range(rounds):
        c.create(f"r{i}", "race")
        c.commit_park(f"r{i}", 0, 1, DIGEST)
    wins: dict[str, list[str]] = {"a": [], "b": []}
    losses: list[str] = []

    def claim(f: Fence, start: threading.Barrier) -> None:
        for i in range(rounds):
            start.wait()
            try:
                f.claim_resume(f"r{i}", 1)
                wins[f.node].append(f"r{i}")
            except FenceLost as exc:
                losses.append(exc.message)

    start = threading.Barrier(2)
    threads = [threading.Thread(target=claim, args=(f, start)) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins["a"] + wins["b"]) == sorted(f"r{i}" for i in range(rounds))  # each sandbox exactly once
    assert len(losses) == rounds
    assert all("resuming on node" in m or "its record changed meanwhile" in m for m in losses), losses
    for r in c.list():
        assert r.state == State.RESUMING and r.id in wins[r.node or ""]


def test_a_node_whose_lease_lapsed_cannot_commit_or_claim(etcd: Etcd, layout: Layout,
                                                          members: Callable[..., Member]) -> None:
    a_member, b_member = members("a"), members("b")
    a = Fence(etcd, "a", a_member.lease, layout)
    b = Fence(etcd, "b", b_member.lease, layout)
    a.create("sb", "x")
    b.create("other", "y")
    b.commit_park("other", 0, 1, DIGEST)
    # etcd drops a's lease (as when it expires) while a's own keepalive has not noticed yet (TTL 30 s):
    # the fence must hold on etcd's check alone
    etcd.revoke(a_member.lease.id)
    assert a_member.lease.alive
    assert etcd.get(layout.node("a")) is None
    moves: list[Callable[[], object]] = [lambda: a.commit_park("sb", 0, 1, DIGEST), lambda: a.claim_resume("other", 1),
                                         lambda: a.create("new", "z"), lambda: a.begin_park("sb")]
    for move in moves:
        with pytest.raises(LeaseLost, match="node a cannot .*: its lease .* is no longer the one on its node record"):
            move()
    assert a.get("sb").state == State.RUNNING and a.get("other").state == State.PARKED  # type: ignore[union-attr]
    assert a.get("new") is None
    # its sandbox shows lost; a restarted "a" (new lease) adopts it; the old incarnation still cannot act
    lost = b.mark_lost("sb")
    assert (lost.state, lost.node) == (State.LOST, "a")
    with pytest.raises(FenceLost, match="only one that runs can be lost"):
        b.mark_lost("sb")
    a2_member = members("a")
    a2 = Fence(etcd, "a", a2_member.lease, layout)
    adopted = a2.adopt("sb")
    assert (adopted.state, adopted.node, adopted.lease) == (State.RUNNING, "a", a2_member.lease.id)
    with pytest.raises(LeaseLost):
        a.begin_park("sb")


def test_mark_lost_needs_the_owner_gone(fence: Callable[[str], Fence], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = fence("a"), fence("b")
    a.create("sb", "x")
    with pytest.raises(FenceLost, match="sandbox sb is not lost: its owner a is a live node of the fleet"):
        b.mark_lost("sb")
    # the owner is back between the check and the transaction: etcd's compare on its node key refuses
    real_get = Etcd.get
    monkeypatch.setattr(Etcd, "get", lambda self, key: None if key.endswith("/nodes/a") else real_get(self, key))
    with pytest.raises(FenceLost, match="cannot mark as lost sandbox sb: what the move depends on changed meanwhile"):
        b.mark_lost("sb")
    monkeypatch.undo()
    assert b.get("sb").state == State.RUNNING  # type: ignore[union-attr]


def test_lapsed_lease_is_refused_before_asking_etcd(etcd: Etcd, layout: Layout,
                                                    members: Callable[..., Member]) -> None:
    m = members("a", ttl=1)
    f = Fence(etcd, "a", m.lease, layout)
    f.create("sb", "x")
    m.lease.stop()  # the keepalive dies with the node's network
    m.lease._valid_until = 0  # its TTL has passed since the last refresh that got through
    with pytest.raises(LeaseLost, match="is unreachable: etcd at .* did not answer a keepalive"):
        f.begin_park("sb")


def test_a_lost_reply_is_recognised_by_its_nonce(fence: Callable[[str], Fence],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The first try of a claim lands but its answer is lost; the retry then compares against our own write."""
    a, b = fence("a"), fence("b")
    a.create("sb", "x")
    a.commit_park("sb", 0, 1, DIGEST)
    real_txn = Etcd.txn

    def lost_reply(self: Etcd, *args: object, **kwargs: object) -> TxnResult:
        real_txn(self, *args, **kwargs)  # type: ignore[arg-type]
        return dataclasses.replace(real_txn(self, *args, **kwargs), uncertain=True)  # type: ignore[arg-type]

    monkeypatch.setattr(Etcd, "txn", lost_reply)
    assert b.claim_resume("sb", 1).node == "b"
    with pytest.raises(FenceLost, match="resuming on node b"):
        a.claim_resume("sb", 1)  # someone else's write is still a lost race


def test_generations(etcd: Etcd, layout: Layout, members: Callable[..., Member]) -> None:
    m = members("a")
    gens = FleetGenerations(etcd, layout, "a", m.lease)
    other = FleetGenerations(etcd, layout)  # unfenced: e.g. a tool that only reads
    assert gens.current("sb") is None and gens.all() == {}
    assert gens.advance("sb", None) == 1
    assert other.current("sb") == 1 and gens.advance("sb", 1) == 2
    with pytest.raises(Stale, match="the generation of sb is 2, not 1"):
        gens.advance("sb", 1)
    with pytest.raises(Stale, match="is 2, not None"):
        gens.advance("sb", None)
    gens.advance("tpl", None)
    assert gens.all() == {"sb": 2, "tpl": 1}
    gens.forget("sb")
    assert gens.current("sb") is None and other.all() == {"tpl": 1}
    # two advances racing from the same generation: exactly one wins
    results: list[object] = []
    start = threading.Barrier(2)

    def race(g: FleetGenerations) -> None:
        start.wait()
        try:
            results.append(g.advance("tpl", 1))
        except Stale as exc:
            results.append(exc)

    threads = [threading.Thread(target=race, args=(g,)) for g in (gens, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(type, results), key=str) == sorted([int, Stale], key=str) and 2 in results
    # fenced by the lease, like the fence
    etcd.revoke(m.lease.id)
    with pytest.raises(LeaseLost, match="lease is no longer on its record"):
        gens.advance("tpl", 2)
    assert other.current("tpl") == 2
    etcd.put(layout.generation("bad"), b"7")
    with pytest.raises(RecordError, match="never reset automatically"):
        other.current("bad")


def test_records_are_validated(etcd: Etcd, layout: Layout, fence: Callable[[str], Fence]) -> None:
    a = fence("a")
    good = a.create("sb", "x")
    assert SandboxRecord.from_json(good.to_json(), layout.sandbox("sb")) == good
    for bad, match in ((b"not json", "not JSON"), (b"[]", "not a JSON object"),
                       (dataclasses.replace(good, state=State.PARKED).to_json(), "a parked sandbox has no owner"),
                       (good.to_json().replace(b'"running"', b'"flying"'), "unknown state"),
                       (good.to_json().replace(b'"generation":0', b'"generation":-1'), "negative"),
                       (good.to_json().replace(b'"generation":0', b'"generation":true'), "bad or missing"),
                       (dataclasses.replace(good, id="zz").to_json(), "not its key's"),
                       (dataclasses.replace(good, digest="xyz").to_json(), "not SHA-256")):
        etcd.put(layout.sandbox("sb"), bad)
        with pytest.raises(RecordError, match=match):
            a.get("sb")
    # a newer daemon's extra field is ignored (rolling upgrades)
    etcd.put(layout.sandbox("sb"), good.to_json()[:-1] + b',"future":1}')
    assert a.get("sb") == good
    with pytest.raises(Exception, match="sandbox id '../x'"):
        a.get("../x")


def test_fence_layer_stays_off_the_daemon() -> None:
    import memvisor.fleet
    text = "\n".join(p.read_text() for p in Path(memvisor.fleet.__file__).parent.glob("*.py"))
    assert "memvisor.service" not in text and "memvisor.cli" not in text


def test_an_owner_gives_up_what_it_cannot_recover(fence: Callable[[str], Fence]) -> None:
    a, b = fence("a"), fence("b")
    a.create("s-lose", "lose")
    with pytest.raises(FenceLost):
        b.lose("s-lose")  # only its owner says nothing of it is left
    assert a.lose("s-lose").state == State.LOST
    assert a.adopt("s-lose").state == State.RUNNING  # and it may take it up again if it comes back
    a.delete("s-lose")
