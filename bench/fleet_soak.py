"""Fleet soak: sandboxes parked and resumed across the hosts of a one-machine fleet, all at once, round after round;
counts what went wrong (the passing figure is 0 of N).

A one-machine fleet (tests/vm/fleetlab.py: a real etcd on loopback, --nodes daemons as separate hosts sharing one
store directory and one fleet key). --sandboxes sandboxes (160 MiB guests), each running a counter that keeps
counting in its own memory. Each round, every sandbox at the same time (one thread each):
  park     through a random node (forwarded to the one that runs it): must answer 200, parked;
  claim    half the time every node claims it at once (POST resume, answered by that node itself): exactly one
           must win (200), every other must be told 409; else an exec through a random node resumes it there;
  look     an exec through a random node: the counter process is alive, its marker intact, and its count is
           higher than the last round's (it kept its memory and went on counting).
Every --restart-every rounds, one daemon is stopped with SIGTERM (it drains: parks what it runs into the store) and
started again. At the end every sandbox is removed and the store must hold no bundle.

Counted per step: `wrong` (an answer other than the one above), `stalled` (no answer within --step-timeout seconds
(default 180): a park of a 160 MiB guest takes ~3 s here), and after the end `left` (bundles left in the store).
`make soak-fleet` runs 4 sandboxes on 2 nodes for 20 rounds; tests/vm/test_fleet_soak.py runs 2 rounds of it in
`make test`.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.vm.fleetlab import COUNTER, LOCAL, LOOK, FleetLab, Node, create, ok, sh


@dataclass
class Tally:
    """What happened, per step; `notes` say what each wrong answer was."""

    steps: Counter[str] = field(default_factory=Counter)
    wrong: Counter[str] = field(default_factory=Counter)
    stalled: Counter[str] = field(default_factory=Counter)
    left: int = 0
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, step: str) -> None:
        with self.lock:
            self.steps[step] += 1

    def bad(self, step: str, note: str, *, stalled: bool = False) -> None:
        with self.lock:
            self.steps[step] += 1
            (self.stalled if stalled else self.wrong)[step] += 1
            self.notes.append(f"{step}: {note}"[:400])
            print(f"      {'STALLED' if stalled else 'WRONG'} {step}: {note}"[:400], flush=True)

    @property
    def total(self) -> int:
        return sum(self.steps.values())

    @property
    def failures(self) -> int:
        return sum(self.wrong.values()) + sum(self.stalled.values()) + self.left


@dataclass
class Sandbox:
    id: str
    marker: str
    count: int = 0


class Soak:
    """The soak's rounds over a started lab."""

    def __init__(self, lab: FleetLab, rng: random.Random, step_timeout: float) -> None:
        self.lab = lab
        self.rng = rng
        self.timeout = step_timeout
        self.tally = Tally()

    def api(self, node: Node) -> httpx.Client:
        return node.api(self.timeout)

    def failed(self, step: str, what: str, exc: httpx.HTTPError) -> None:
        """No answer: a stall if it timed out, else a wrong answer (the daemon closed the connection...)."""
        self.tally.bad(step, f"{what}: {exc!r}", stalled=isinstance(exc, httpx.TimeoutException))

    def any_node(self) -> Node:
        return self.rng.choice(list(self.lab.nodes.values()))

    def look(self, box: Sandbox, node: Node) -> bool:
        """An exec through `node`: the counter is alive, holds its marker and counted on."""
        try:
            with self.api(node) as api:
                status, end, out = sh(api, box.id, LOOK)
        except httpx.HTTPError as exc:
            self.failed("look", f"{box.id} through {node.name}", exc)
            return False
        words = out.split()
        if status != 200 or end.get("exit_code") != 0 or words[:2] != ["alive", box.marker] or len(words) < 3 \
                or not words[2].isdigit() or int(words[2]) <= box.count:
            self.tally.bad("look", f"{box.id} through {node.name}: HTTP {status} {end} {out.strip()!r} "
                                   f"(count was {box.count})")
            return False
        box.count = int(words[2])
        self.tally.ok("look")
        return True

    def park(self, box: Sandbox, node: Node) -> bool:
        try:
            with self.api(node) as api:
                r = api.post(f"/v1/sandboxes/{box.id}/park", json={})
        except httpx.HTTPError as exc:
            self.failed("park", f"{box.id} through {node.name}", exc)
            return False
        if r.status_code != 200 or r.json().get("state") != "parked":
            self.tally.bad("park", f"{box.id} through {node.name}: HTTP {r.status_code} {r.text}")
            return False
        self.tally.ok("park")
        return True

    def claim(self, box: Sandbox) -> bool:
        """Every node claims the parked sandbox at once: one 200, the rest 409 (no answer is a failure too)."""
        answers: dict[str, int | httpx.HTTPError] = {}

        def one(node: Node) -> None:
            try:
                with self.api(node) as api:
                    answers[node.name] = api.post(f"/v1/sandboxes/{box.id}/resume", json={},
                                                  headers=LOCAL).status_code
            except httpx.HTTPError as exc:
                answers[node.name] = exc

        racers = [threading.Thread(target=one, args=(n,)) for n in self.lab.nodes.values()]
        for t in racers:
            t.start()
        for t in racers:
            t.join()
        lost = [a for a in answers.values() if isinstance(a, httpx.HTTPError)]
        if lost:
            self.failed("claim", f"{box.id}: {answers}", lost[0])
            return False
        codes = sorted(a for a in answers.values() if isinstance(a, int))
        if codes != [200] + [409] * (len(self.lab.nodes) - 1):
            self.tally.bad("claim", f"{box.id}: {answers} (one 200, the rest 409 expected)")
            return False
        self.tally.ok("claim")
        return True

    def cycle(self, box: Sandbox) -> None:
        """One round for one sandbox; stops at its first wrong step (the next round starts from what is)."""
        try:
            if not self.park(box, self.any_node()):
                return
            if self.rng.random() < 0.5 and not self.claim(box):
                return
            self.look(box, self.any_node())
        except Exception as exc:  # counted, never lost with its thread (an answer that is not JSON...)
            self.tally.bad("cycle", f"{box.id}: {exc!r}")

    def round(self, boxes: list[Sandbox]) -> None:
        threads = [threading.Thread(target=self.cycle, args=(box,)) for box in boxes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def restart(self, name: str) -> None:
        """SIGTERM: the daemon drains (parks what it runs into the store); then the same node starts again."""
        node = self.lab.nodes[name]
        code = node.stop(timeout=self.timeout * 4)
        if code != 0:
            self.tally.bad("restart", f"node {name} exited {code} on SIGTERM")
        else:
            self.tally.ok("restart")
        self.lab.start(name)


def run(lab: FleetLab, *, nodes: int, sandboxes: int, rounds: int, restart_every: int, seed: int | None,
        step_timeout: float) -> Tally:
    """Start `nodes` daemons in `lab`, run the soak, remove its sandboxes; the tally (its printout as it goes)."""
    rng = random.Random(seed)
    soak = Soak(lab, rng, step_timeout)
    names = [chr(ord("a") + i) for i in range(nodes)]
    for name in names:
        lab.start(name)
    boxes: list[Sandbox] = []
    for i in range(sandboxes):
        node = lab.nodes[names[i % nodes]]
        with soak.api(node) as api:
            box = Sandbox(create(api, f"soak-{i}")["id"], f"marker-{i}")
            ok(api, box.id, COUNTER.replace("$MARK", box.marker))
        boxes.append(box)
    time.sleep(0.5)
    for box in boxes:
        soak.look(box, soak.any_node())
    print(f"{'round':>5} {'seconds':>8} {'steps':>6} {'wrong':>6} {'stalled':>7}", flush=True)
    for n in range(1, rounds + 1):
        began = time.monotonic()
        soak.round(boxes)
        if restart_every and n % restart_every == 0 and n < rounds:
            soak.restart(names[(n // restart_every - 1) % nodes])
            for box in boxes:  # each resumes wherever the look lands
                soak.look(box, soak.any_node())
        t = soak.tally
        print(f"{n:>5} {time.monotonic() - began:>7.1f}s {t.total:>6} {sum(t.wrong.values()):>6} "
              f"{sum(t.stalled.values()):>7}", flush=True)
    with soak.api(lab.nodes[names[0]]) as api:
        for box in boxes:
            r = api.delete(f"/v1/sandboxes/{box.id}")
            if r.status_code != 200:
                soak.tally.bad("remove", f"{box.id}: HTTP {r.status_code} {r.text}")
        listed = api.get("/v1/fleet").json()["sandboxes"]
    if listed:
        soak.tally.bad("remove", f"the fleet still lists {[s['id'] for s in listed]}")
    bundles = lab.store / "bundles"
    left = sorted(str(p.relative_to(bundles)) for p in bundles.iterdir()) if bundles.exists() else []
    soak.tally.left = len(left)
    if left:
        soak.tally.notes.append(f"bundles left in the store: {left}")
    return soak.tally


def summary(tally: Tally) -> str:
    steps = ", ".join(f"{n} {step}" for step, n in sorted(tally.steps.items()))
    return (f"{tally.failures} of {tally.total} steps went wrong ({sum(tally.wrong.values())} wrong, "
            f"{sum(tally.stalled.values())} stalled, {tally.left} bundles left behind); steps: {steps}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="daemons (hosts) in the fleet (default 2, at most 8)")
    parser.add_argument("--sandboxes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--restart-every", type=int, default=5, metavar="N",
                        help="restart one daemon (SIGTERM: it drains) every N rounds; 0: never (default 5)")
    parser.add_argument("--step-timeout", type=float, default=180.0, metavar="S",
                        help="a step with no answer within S seconds counts as stalled (default 180)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    if not 2 <= args.nodes <= 8:
        parser.error(f"--nodes {args.nodes}: a fleet soak needs 2 to 8 nodes")
    if args.sandboxes < 1 or args.rounds < 1 or args.restart_every < 0 or args.step_timeout <= 0:
        parser.error("--sandboxes and --rounds must be at least 1, --restart-every 0 or more, --step-timeout > 0")
    lab = FleetLab(Path(tempfile.mkdtemp(prefix="memvisor-fleet-soak-")))
    try:
        tally = run(lab, nodes=args.nodes, sandboxes=args.sandboxes, rounds=args.rounds,
                    restart_every=args.restart_every, seed=args.seed, step_timeout=args.step_timeout)
    finally:
        lab.close()
    print("\n" + summary(tally) + f"; logs in {lab.root}")
    for note in tally.notes:
        print("  " + note)
    return 0 if tally.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
