"""Fleet benchmark (issue 27): what a park into the fleet's store costs per GiB of guest memory, and how a resume
on another host compares with one on the host that parked it.

A one-machine fleet (tests/vm/fleetlab.py: a real etcd on loopback, daemons A and B as two hosts with their own
directories, one store directory on the local disk, one fleet key). For each guest size (--sizes, default 256, 1024
and 1024 MiB), a sandbox on A gets --live MiB (default 64, 64, 512) of random data held in RAM by a process (the
park waits until it is all read); then, --cycles times (default 3):
  - park on A: the request to the answer, through the API (PARK, the sealed stream, the bundle into the store, the
    fence's commit), as seconds, as seconds per GiB of guest RAM (what E2B publishes: ~4 s/GiB to pause) and per
    GiB written (the bundle: only the pages the guest uses are saved, so a park's cost follows what it holds);
  - a local resume: an exec of `true` through A (A claims it, fetches the bundle from the store, resumes it);
  - park on A again, then a cross-host resume: the same exec through B (B claims, fetches, resumes).
Goal: cross-host resume <= 1.2x a local one with a local-directory store. E2B's published figures (~4 s/GiB to
pause, ~1 s to resume on any node) are printed beside ours; theirs are on KVM hardware, ours under QEMU TCG on 2
cores. Prints a table, writes fleet.json and fleet.png to --out. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.vm.fleetlab import LOCAL, FleetLab, create, ok, park

HOLD = ("python3 -c 'import time; d = open(\"/dev/urandom\", \"rb\").read({n} << 20); "
        "open(\"/tmp/held\", \"w\").close(); time.sleep(1e9)' </dev/null >/dev/null 2>&1 &")
HELD = "for i in $(seq 600); do test -f /tmp/held && exit 0; sleep 0.5; done; exit 1"  # the data is all in RAM
E2B = {"pause_s_per_gib": 4.0, "resume_s": 1.0}  # e2b.dev's published figures (docs/fleet.md cites them)


def timed_exec(node: Any, key: str) -> float:
    began = time.monotonic()
    with node.api() as api:
        ok(api, key, "true", LOCAL)
    return time.monotonic() - began


def timed_park(node: Any, key: str) -> float:
    began = time.monotonic()
    with node.api() as api:
        park(api, key, LOCAL)
    return time.monotonic() - began


def bundle_bytes(lab: FleetLab, key: str) -> int:
    folder = lab.store / "bundles" / key
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())


def run_size(lab: FleetLab, memory_mib: int, live_mib: int, cycles: int) -> dict[str, Any]:
    a, b = lab.nodes["a"], lab.nodes["b"]
    with a.api() as api:
        key = create(api, f"bench-{memory_mib}", {"vm": {"memory_mib": memory_mib}, "swap": {"size_mib": 256}})["id"]
        ok(api, key, HOLD.format(n=live_mib))
        ok(api, key, HELD)
    parks, local, cross, sizes = [], [], [], []
    for _ in range(cycles):
        parks.append(timed_park(a, key))
        sizes.append(bundle_bytes(lab, key))
        local.append(timed_exec(a, key))
        parks.append(timed_park(a, key))
        cross.append(timed_exec(b, key))
        parks.append(timed_park(b, key))
        local.append(timed_exec(b, key))  # b is now the host that parked it
        timed_park(b, key)
        timed_exec(a, key)  # back on a for the next cycle
    with a.api() as api:
        api.delete(f"/v1/sandboxes/{key}")
    park_s = statistics.median(parks)
    bundle = statistics.median(sizes)
    return {"memory_mib": memory_mib, "live_mib": live_mib, "park_s": park_s,
            "park_s_per_gib": park_s / (memory_mib / 1024), "bundle_bytes": bundle,
            "park_s_per_gib_written": park_s / (bundle / 2**30),
            "local_resume_s": statistics.median(local), "cross_resume_s": statistics.median(cross),
            "cross_over_local": statistics.median(cross) / statistics.median(local),
            "samples": {"park": parks, "local": local, "cross": cross}}


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['memory_mib']} MiB, {r['live_mib']} live" for r in results]
    xs = range(len(results))
    left.bar([x - 0.2 for x in xs], [r["park_s_per_gib"] for r in results], 0.4, label="memvisor (TCG)")
    left.bar([x + 0.2 for x in xs], [E2B["pause_s_per_gib"]] * len(results), 0.4, label="E2B (published)")
    left.set_xticks(list(xs), labels)
    left.set_ylabel("park seconds per GiB of guest RAM")
    left.legend()
    right.bar([x - 0.27 for x in xs], [r["local_resume_s"] for r in results], 0.27, label="same host")
    right.bar(list(xs), [r["cross_resume_s"] for r in results], 0.27, label="other host")
    right.bar([x + 0.27 for x in xs], [E2B["resume_s"]] * len(results), 0.27, label="E2B (published)")
    right.set_xticks(list(xs), labels)
    right.set_ylabel("resume to first exec output, s")
    right.legend()
    fig.suptitle("memvisor fleet: park into a shared store, resume anywhere (QEMU TCG, 2 cores)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,1024,1024",
                        help="guest RAM sizes in MiB (default 256,1024,1024)")
    parser.add_argument("--live", default="64,64,512", help="MiB of random data a process holds in RAM, one "
                        "value or one per size (default 64,64,512)")
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        lives = [int(s) for s in args.live.split(",")]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r} and --live {args.live!r} must be comma-separated MiB counts")
    lives = lives * len(sizes) if len(lives) == 1 else lives
    if len(lives) != len(sizes) or min(lives) < 0 or any(live >= size for live, size in zip(lives, sizes, strict=True)):
        parser.error(f"--live {args.live!r}: one value, or one per size in --sizes, each smaller than its size")
    lab = FleetLab(Path(tempfile.mkdtemp(prefix="memvisor-bench-fleet-")))
    results = []
    try:
        lab.start("a")
        lab.start("b")
        for size, live in zip(sizes, lives, strict=True):
            results.append(run_size(lab, size, live, args.cycles))
    finally:
        lab.close()
    columns = [("guest", "{memory_mib}MiB"), ("live", "{live_mib}MiB"), ("bundle", "{bundle_mib:.0f}MiB"),
               ("park", "{park_s:.2f}s"), ("park/GiB", "{park_s_per_gib:.2f}s"),
               ("/GiB written", "{park_s_per_gib_written:.2f}s"), ("E2B pause/GiB", "{e2b_pause:.1f}s"),
               ("resume here", "{local_resume_s:.2f}s"), ("resume there", "{cross_resume_s:.2f}s"),
               ("there/here", "{cross_over_local:.2f}x"), ("E2B resume", "{e2b_resume:.1f}s")]
    print(" ".join(f"{name:>13}" for name, _ in columns))
    for r in results:
        values = {**r, "bundle_mib": r["bundle_bytes"] / 2**20, "e2b_pause": E2B["pause_s_per_gib"],
                  "e2b_resume": E2B["resume_s"]}
        print(" ".join(f"{form.format(**values):>13}" for _, form in columns))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps({"results": results, "e2b": E2B}, indent=1) + "\n")
    plot(results, args.out / "fleet.png")
    print(f"wrote {args.out / 'fleet.json'} and {args.out / 'fleet.png'}")


if __name__ == "__main__":
    main()
