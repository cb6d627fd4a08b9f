"""The generation fence: which node may run, park, resume or remove each sandbox, decided in etcd.

Every move of a sandbox is ONE transaction on its record (<prefix>sandboxes/<id>, records.py) that compares:
- the record's mod_revision with the one this node read (absent, for create): nobody moved it meanwhile; and
- the lease of this node's own key (<prefix>nodes/<name>) with this node's lease: the node is still a live
  member. etcd deletes the key when the lease expires (and a restarted node has a new lease), so a node whose
  lease lapsed, or a stale incarnation of it, can never commit; the check is etcd's, not the node's clock's.
The node's own view (Lease.alive) is checked first, only to fail fast.

The moves (owner = `node`; "me" is the Fence's node):
    create          absent                                    -> running, me, generation 0
    begin_park      running, me                               -> parking, me
    abort_park      parking, me                               -> running, me       (the store was full...)
    commit_park     running|parking, me, generation prev      -> parked, no owner, generation new (> prev), digest
    claim_resume    parked, generation g                      -> resuming, me      (one of racing nodes wins)
    abort_resume    resuming, me                              -> parked, no owner, same generation (bundle refused)
    finish_resume   resuming, me                              -> running, me
    adopt           running|lost, me                          -> running, me, under my current lease
    mark_lost       running|parking|resuming, owner's key gone -> lost            (any node)
    lose            running|parking|resuming, me              -> lost              (nothing of it is left)
    delete          owner me (any state), or parked (any node) -> no record
A resume can therefore only ever take the generation that the last committed park named, and only once: a host
killed mid-park leaves "parking" with the older generation, and its partial bundle is never claimed.

A move that finds the record elsewhere raises FenceLost (the daemon answers 409), NoSuchSandbox (404), or
LeaseLost when this node's own lease is the reason. A write whose reply was lost (a timeout, then failover) is
recognised by the nonce it carries before a failure is believed.

FleetGenerations is the fleet's side of the snapshot layer's Generations (current, advance, forget, all): one
counter per sandbox or template under <prefix>generations/, each advance one compare-and-swap, fenced by the
same lease.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Callable, Sequence

from memvisor.fleet.errors import FenceLost, LeaseLost, NoSuchSandbox, RecordError, Stale
from memvisor.fleet.etcd import Compare, Delete, Etcd, Get, Put, Record, absent, lease_is, mod_is
from memvisor.fleet.lease import Lease
from memvisor.fleet.records import DIGEST, Layout, SandboxRecord, State, check_id, check_node_name

Check = Callable[[SandboxRecord | None], None]
Make = Callable[[SandboxRecord | None], SandboxRecord | None]


def _where(record: SandboxRecord) -> str:
    if record.state == State.PARKED:
        return f"parked at generation {record.generation}"
    return f"{record.state} on node {record.node} (generation {record.generation})"


class Fence:
    """The fence as seen by one node (`node`, a live member holding `lease`)."""

    def __init__(self, etcd: Etcd, node: str, lease: Lease, layout: Layout | None = None) -> None:
        self.etcd = etcd
        self.node = check_node_name(node)
        self.lease = lease
        self.layout = layout or Layout()
        self.node_key = self.layout.node(node)

    def __repr__(self) -> str:
        return f"Fence({self.node!r}, {self.lease!r})"

    # -- reads --------------------------------------------------------------------------------------------------
    def _read(self, sandbox_id: str) -> tuple[SandboxRecord | None, int]:
        row = self.etcd.get(self.layout.sandbox(sandbox_id))
        return (SandboxRecord.from_json(row.value, row.key), row.mod_revision) if row else (None, 0)

    def get(self, sandbox_id: str) -> SandboxRecord | None:
        """The sandbox's record, or None."""
        return self._read(sandbox_id)[0]

    def list(self) -> list[SandboxRecord]:
        """Every sandbox of the fleet, by id."""
        return [SandboxRecord.from_json(r.value, r.key) for r in self.etcd.get_prefix(self.layout.sandboxes)]

    # -- the one way a record changes ---------------------------------------------------------------------------
    def _move(self, sandbox_id: str, verb: str, check: Check, make: Make,
              extra: Callable[[SandboxRecord | None], Sequence[Compare]] = lambda r: ()) -> SandboxRecord | None:
        """Read the record, check() it, and write make(it) (None: delete) in one transaction guarded by its
        mod_revision, this node's lease and `extra`; the written record."""
        self.lease.check()
        key = self.layout.sandbox(sandbox_id)
        current, revision = self._read(sandbox_id)
        check(current)
        new = make(current)
        if new is not None:
            new = dataclasses.replace(new, lease=self.lease.id if new.node else 0, updated=time.time(),
                                      nonce=secrets.token_hex(8))
        compares = [mod_is(key, revision) if current else absent(key), lease_is(self.node_key, self.lease.id),
                    *extra(current)]
        op: Put | Delete = Put(key, new.to_json()) if new is not None else Delete(key)
        result = self.etcd.txn(compares, [op], [Get(key), Get(self.node_key)])
        if result.succeeded:
            return new
        now_rows, node_rows = result.responses[0].records, result.responses[1].records
        now = SandboxRecord.from_json(now_rows[0].value, key) if now_rows else None
        if result.uncertain and self._landed(new, now):
            return new
        if not node_rows or node_rows[0].lease != self.lease.id:
            raise LeaseLost(f"node {self.node} cannot {verb} sandbox {sandbox_id}: its lease {self.lease.id:x} is "
                            "no longer the one on its node record (it expired)",
                            hint="the node must rejoin the fleet; nothing was changed")
        if now is not None and now != current:
            check(now)  # usually raises the precise reason (another node claimed it, its generation moved...)
        what = "its record changed" if now != current else "what the move depends on changed"  # e.g. an owner back
        raise FenceLost(f"node {self.node} cannot {verb} sandbox {sandbox_id}: {what} meanwhile"
                        + (f" (now {_where(now)})" if now else " (now gone)"),
                        hint="another node acted on it first; read it again")

    @staticmethod
    def _landed(new: SandboxRecord | None, now: SandboxRecord | None) -> bool:
        """Whether the record now is our own write (a retried transaction whose first try was applied)."""
        if new is None:
            return False  # a delete cannot be told from another's: report the conflict
        return now is not None and now.nonce == new.nonce

    # -- checks -------------------------------------------------------------------------------------------------
    def _exists(self, sandbox_id: str, record: SandboxRecord | None) -> SandboxRecord:
        if record is None:
            raise NoSuchSandbox(f"the fleet has no sandbox {sandbox_id}", hint="`memvisor fleet ls` lists them")
        return record

    def _mine(self, sandbox_id: str, verb: str, record: SandboxRecord | None, *states: State) -> SandboxRecord:
        record = self._exists(sandbox_id, record)
        if record.node != self.node or record.state not in states:
            raise FenceLost(f"node {self.node} cannot {verb} sandbox {sandbox_id}: it is {_where(record)}, not "
                            f"{'|'.join(states)} here", hint="its record moved on; read it again")
        return record

    # -- the moves ----------------------------------------------------------------------------------------------
    def create(self, sandbox_id: str, name: str, template: str | None = None) -> SandboxRecord:
        """Record a new sandbox running here, generation 0 (`template`: the template it is a clone of). FenceLost
        if the id is taken."""
        check_id(sandbox_id)

        def check(r: SandboxRecord | None) -> None:
            if r is not None:
                raise FenceLost(f"sandbox id {sandbox_id} is already in the fleet ({_where(r)})")

        new = self._move(sandbox_id, "create", check, lambda r: SandboxRecord(
            sandbox_id, name, self.node, State.RUNNING, 0, last_node=self.node, template=template))
        assert new is not None
        return new

    def begin_park(self, sandbox_id: str) -> SandboxRecord:
        """running here -> parking: the fleet shows the park, which still names the previous generation."""
        return self._owned_move(sandbox_id, "begin parking", (State.RUNNING,),
                                lambda r: dataclasses.replace(r, state=State.PARKING))

    def abort_park(self, sandbox_id: str) -> SandboxRecord:
        """parking here -> running (the park failed: the sandbox keeps running here)."""
        return self._owned_move(sandbox_id, "abort the park of", (State.PARKING,),
                                lambda r: dataclasses.replace(r, state=State.RUNNING))

    def commit_park(self, sandbox_id: str, prev_generation: int, new_generation: int, digest: str) -> SandboxRecord:
        """The park is in the store: running|parking here at `prev_generation` -> parked at `new_generation`
        with the manifest's `digest`, owned by nobody. FenceLost if this node no longer holds it at prev."""
        if not new_generation > prev_generation >= 0 or not DIGEST.fullmatch(digest):
            raise ValueError(f"commit_park({sandbox_id}, {prev_generation}, {new_generation}, {digest!r}): the new "
                             "generation must be above the previous one, and the digest SHA-256 hex")

        def check(r: SandboxRecord | None) -> None:
            r = self._mine(sandbox_id, "commit the park of", r, State.RUNNING, State.PARKING)
            if r.generation != prev_generation:
                raise FenceLost(f"node {self.node} cannot commit generation {new_generation} of sandbox "
                                f"{sandbox_id}: the fence is at generation {r.generation}, not {prev_generation}")

        return self._checked(sandbox_id, "commit the park of", check, lambda r: dataclasses.replace(
            self._exists(sandbox_id, r), node=None, state=State.PARKED, generation=new_generation, digest=digest,
            last_node=self.node))

    def claim_resume(self, sandbox_id: str, generation: int) -> SandboxRecord:
        """parked at `generation` -> resuming here. Of nodes racing for it, exactly one wins; the others get
        FenceLost (409), as does a node whose view of the generation is old."""

        def check(r: SandboxRecord | None) -> None:
            r = self._exists(sandbox_id, r)
            if r.state != State.PARKED:
                raise FenceLost(f"node {self.node} cannot resume sandbox {sandbox_id}: it is {_where(r)}",
                                hint="another node claimed it first, or it runs: send the request to its owner")
            if r.generation != generation:
                raise FenceLost(f"node {self.node} cannot resume generation {generation} of sandbox {sandbox_id}: "
                                f"the fence names generation {r.generation}", hint="an older snapshot is never resumed")

        return self._checked(sandbox_id, "resume", check, lambda r: dataclasses.replace(
            self._exists(sandbox_id, r), node=self.node, state=State.RESUMING))

    def abort_resume(self, sandbox_id: str) -> SandboxRecord:
        """resuming here -> parked again at the same generation (the bundle was refused or the resume failed:
        it stays parked, for a node that can honour it)."""
        return self._owned_move(sandbox_id, "abort the resume of", (State.RESUMING,),
                                lambda r: dataclasses.replace(r, node=None, state=State.PARKED))

    def finish_resume(self, sandbox_id: str) -> SandboxRecord:
        """resuming here -> running here."""
        return self._owned_move(sandbox_id, "finish the resume of", (State.RESUMING,),
                                lambda r: dataclasses.replace(r, state=State.RUNNING, last_node=self.node))

    def adopt(self, sandbox_id: str) -> SandboxRecord:
        """A node back in the fleet takes up a sandbox it still runs: running|lost here -> running here, under
        its current lease."""
        return self._owned_move(sandbox_id, "adopt", (State.RUNNING, State.LOST),
                                lambda r: dataclasses.replace(r, state=State.RUNNING))

    def mark_lost(self, sandbox_id: str) -> SandboxRecord:
        """Any node: a sandbox whose owner left the fleet (its node key is gone) while it ran, parked or
        resumed -> lost. It is never resumed elsewhere (its newest state is in the lost node's memory); the
        owner adopts it if it comes back."""
        layout = self.layout

        def check(r: SandboxRecord | None) -> None:
            r = self._exists(sandbox_id, r)
            if r.state not in (State.RUNNING, State.PARKING, State.RESUMING):
                raise FenceLost(f"sandbox {sandbox_id} is {_where(r)}: only one that runs can be lost")
            if r.node is not None and self.etcd.get(layout.node(r.node)) is not None:
                raise FenceLost(f"sandbox {sandbox_id} is not lost: its owner {r.node} is a live node of the fleet",
                                hint="send the request to its owner")

        def owner_gone(r: SandboxRecord | None) -> Sequence[Compare]:
            assert r is not None and r.node is not None
            return [absent(layout.node(r.node))]

        new = self._move(sandbox_id, "mark as lost", check,
                         lambda r: dataclasses.replace(self._exists(sandbox_id, r), state=State.LOST), owner_gone)
        assert new is not None
        return new

    def lose(self, sandbox_id: str) -> SandboxRecord:
        """running|parking|resuming here -> lost: this node, restarted, found nothing of it left to run (its VMM
        and its snapshot are gone); the fleet says so instead of forgetting it (a silent 404 elsewhere)."""
        return self._owned_move(sandbox_id, "give up", (State.RUNNING, State.PARKING, State.RESUMING),
                                lambda r: dataclasses.replace(r, state=State.LOST))

    def delete(self, sandbox_id: str) -> None:
        """Remove the record (the sandbox is gone for good; then its bundles may be removed): by its owner in any
        state, or by any node while it is parked."""

        def check(r: SandboxRecord | None) -> None:
            r = self._exists(sandbox_id, r)
            if r.node != self.node and r.state != State.PARKED:
                raise FenceLost(f"node {self.node} cannot remove sandbox {sandbox_id}: it is {_where(r)}",
                                hint="only its owner removes a sandbox that runs")

        self._move(sandbox_id, "remove", check, lambda r: None)

    def _owned_move(self, sandbox_id: str, verb: str, states: tuple[State, ...],
                    change: Callable[[SandboxRecord], SandboxRecord]) -> SandboxRecord:
        def check(r: SandboxRecord | None) -> None:
            self._mine(sandbox_id, verb, r, *states)

        return self._checked(sandbox_id, verb, check, lambda r: change(self._exists(sandbox_id, r)))

    def _checked(self, sandbox_id: str, verb: str, check: Check, make: Make) -> SandboxRecord:
        new = self._move(sandbox_id, verb, check, make)
        assert new is not None
        return new


class FleetGenerations:
    """The fleet's Generations (the snapshot layer's interface: current, advance, forget, all), in etcd: one
    counter per sandbox or template id at <prefix>generations/<id>, each change one transaction comparing the
    counter's mod_revision and, when a lease is given, that this node's key is still under it.

    Generations only go up and are never reused, even after forget() (the counter is then removed, and a new
    one would start at 1 again: forget only ids that will never come back, as the local ledger does)."""

    def __init__(self, etcd: Etcd, layout: Layout | None = None, node: str | None = None,
                 lease: Lease | None = None) -> None:
        if (node is None) != (lease is None):
            raise ValueError("FleetGenerations fences with a node and its lease, or with neither")
        self.etcd = etcd
        self.layout = layout or Layout()
        self.lease = lease
        self._fence = [lease_is(self.layout.node(node), lease.id)] if node and lease else []

    def _read(self, key: str) -> tuple[int | None, Record | None]:
        row = self.etcd.get(self.layout.generation(key))
        return (self._value(row), row) if row else (None, None)

    @staticmethod
    def _value(row: Record) -> int:
        try:
            doc = json.loads(row.value)
            value = doc["generation"] if isinstance(doc, dict) and isinstance(doc.get("nonce"), str) else None
        except ValueError:
            value = None
        if type(value) is not int or value < 1:
            raise RecordError(f"the generation at {row.key} in etcd is {row.value[:60]!r}, not "
                              '{"generation": n >= 1, "nonce": ...}',
                              hint="it is never reset automatically: that would let old snapshots be resumed")
        return value

    def current(self, key: str) -> int | None:
        """The generation of `key` that may be resumed, or None if it has none."""
        return self._read(key)[0]

    def advance(self, key: str, expected: int | None) -> int:
        """Move `key` from `expected` (None: it has none) to the next generation and return it; Stale if it is
        not at `expected` (another node moved it); LeaseLost if this node's lease is gone."""
        if self.lease is not None:
            self.lease.check()
        path = self.layout.generation(key)
        now, row = self._read(key)
        if now != expected:
            raise Stale(f"the generation of {key} is {now}, not {expected}: it moved meanwhile")
        new = (now or 0) + 1
        value = json.dumps({"generation": new, "nonce": secrets.token_hex(8)}).encode()  # ours alone: see below
        guard = mod_is(path, row.mod_revision) if row else absent(path)
        result = self.etcd.txn([guard, *self._fence], [Put(path, value)], [Get(path)])
        if result.succeeded:
            return new
        rows = result.responses[0].records
        if result.uncertain and rows and rows[0].value == value:
            return new  # our first try landed (the nonce tells our write from another node's same number)
        moved = self._value(rows[0]) if rows else None
        if moved == expected and self._fence:
            raise LeaseLost(f"cannot advance the generation of {key}: this node's lease is no longer on its record",
                            hint="the node must rejoin the fleet")
        raise Stale(f"the generation of {key} is {moved}, not {expected}: it moved meanwhile")

    def forget(self, key: str) -> None:
        """Drop `key`'s counter: none of its snapshots is resumable after this."""
        if self.lease is not None:
            self.lease.check()
        path = self.layout.generation(key)
        result = self.etcd.txn(self._fence, [Delete(path)])
        if not result.succeeded:
            raise LeaseLost(f"cannot forget the generation of {key}: this node's lease is no longer on its record",
                            hint="the node must rejoin the fleet")

    def all(self) -> dict[str, int]:
        """Every id and its current generation."""
        return {row.key.rsplit("/", 1)[1]: self._value(row) for row in self.etcd.get_prefix(self.layout.generations)}
