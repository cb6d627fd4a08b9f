"""Reclaim benchmark: the VMM's host RSS over time while the guest allocates then frees memory, with the
free-page-reporting balloon (the default) and without it.

The guest allocates MiB of distinct memory, holds it, frees it, and idles; the host samples the VMM's RSS every
half second. Reported: RSS before, at peak and after; the seconds from the free until RSS is back within 10% of
the starting RSS. Goal (issue #4): back within 10% within 10 s of the free. Not a test: prints a table, writes
a PNG.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from memvisor import policy
from memvisor.host.sandbox import Instance
from memvisor.image import build
from memvisor.image.build import Image

MIB = 2**20
WORKLOAD = """
import time
time.sleep(4)
print("ALLOC", flush=True)
chunks = [bytearray(b"x" * (1 << 20)) for _ in range({mib})]
print("HELD", flush=True)
time.sleep(5)
del chunks
print("FREED", flush=True)
time.sleep({idle})
"""


def trace(image: Image, balloon: bool, memory: int, mib: int, idle: float) -> dict[str, Any]:
    """Run the workload while a watcher thread samples the VMM's RSS every half second."""
    samples: list[tuple[float, float]] = []
    events: dict[str, float] = {}
    pol = policy.merge(("bench", {"memory_mib": memory, "balloon": balloon}))
    with Instance(pol, image) as vm:
        assert vm.process is not None
        proc = psutil.Process(vm.process.pid)
        t0 = time.monotonic()
        stop = threading.Event()

        def on_out(data: bytes) -> None:
            for word in (b"ALLOC", b"HELD", b"FREED"):
                if word in data:
                    events[word.decode().lower()] = time.monotonic() - t0

        def watch() -> None:
            while not stop.wait(0.5):
                samples.append((time.monotonic() - t0, proc.memory_info().rss / MIB))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            vm.run(["python3", "-S", "-c", WORKLOAD.format(mib=mib, idle=idle)], on_stdout=on_out)
        finally:
            stop.set()
            watcher.join()
    start_rss = max(r for t, r in samples if t <= events["alloc"])
    peak = max(r for _, r in samples)
    after = [(t, r) for t, r in samples if t >= events["freed"]]
    back = next((t - events["freed"] for t, r in after if r <= start_rss * 1.10), None)
    return {"balloon": balloon, "samples": samples, "events": events, "start_mib": start_rss, "peak_mib": peak,
            "end_mib": after[-1][1] if after else None, "seconds_back_within_10pct": back}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", type=int, default=512, help="guest MiB (default 512)")
    parser.add_argument("--mib", type=int, default=300, help="MiB the guest allocates (default 300)")
    parser.add_argument("--idle", type=float, default=15, help="seconds to watch after the free (default 15)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    image = build.ensure()
    runs = [trace(image, True, args.memory, args.mib, args.idle), trace(image, False, args.memory, args.mib, args.idle)]
    print(f"\nreclaim benchmark: a {args.memory} MiB guest allocates {args.mib} MiB, holds 5 s, frees it")
    print(f"{'balloon':>8} {'start MiB':>10} {'peak MiB':>9} {'end MiB':>8} {'back within 10% after':>22}")
    for r in runs:
        back = f"{r['seconds_back_within_10pct']:.1f} s" if r["seconds_back_within_10pct"] is not None else "never"
        print(f"{'on' if r['balloon'] else 'off':>8} {r['start_mib']:10.0f} {r['peak_mib']:9.0f} "
              f"{r['end_mib']:8.0f} {back:>22}")
    print("goal: back within 10% of the starting RSS within 10 s of the free (balloon on)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reclaim.json").write_text(json.dumps(runs, indent=2))
    plot(runs, args.out / "reclaim.png")


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for r in runs:
        ax.plot([t for t, _ in r["samples"]], [m for _, m in r["samples"]],
                label=f"free-page reporting {'on' if r['balloon'] else 'off'}")
        ax.axvline(r["events"]["freed"], color="gray", linewidth=0.6, linestyle=":")
    ax.set_xlabel("seconds since VMM start")
    ax.set_ylabel("VMM RSS (MiB)")
    ax.set_title("Host RSS while the guest allocates, then frees")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
