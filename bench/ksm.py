"""KSM benchmark: N identical idle sandboxes with and without --ksm, sampled over time.

For each phase: start N sandboxes running `sleep`, sample every few seconds the share of their guest RAM that
KSM has merged (ksm_merging_pages from /proc/PID/ksm_stat, over the guest RAM size and over the guest RAM that
is resident), host memory saved (pages_sharing) and ksmd's CPU time. ksmd runs with pages_to_scan=5000,
sleep_millisecs=20 (FACTS.md) during the run; every tunable is restored afterwards.
Goal (issue #4): >= 90% of identical idle guest memory merged within 60 s. Not a test: prints a table, writes
a PNG.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from memvisor.host import ksm, runtime, stats
from memvisor.image import build

MIB = 2**20


def start(n: int, use_ksm: bool, memory: int, seconds: int) -> list[subprocess.Popen[bytes]]:
    args = ["--ksm"] if use_ksm else []
    return [subprocess.Popen([sys.executable, "-m", "memvisor", "-q", "run", *args, "--memory", str(memory), "--",
                              "sleep", str(seconds)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            for _ in range(n)]


def phase(n: int, use_ksm: bool, memory: int, duration: float, interval: float) -> list[dict[str, Any]]:
    procs = start(n, use_ksm, memory, int(duration) + 120)
    samples: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 120
        while len([s for s in runtime.live() if s.vmm_pid]) < n:  # all VMMs started
            if time.monotonic() > deadline:
                sys.exit("bench: sandboxes did not start")
            time.sleep(0.5)
        # t=0 when every guest has booted (its agent has sent stats at least once)
        while len([s for s in stats.collect()["sandboxes"] if s.get("guest")]) < n:
            time.sleep(0.5)
        cpu0 = ksm.state().cpu_seconds or 0.0
        t0 = time.monotonic()
        while time.monotonic() - t0 <= duration:
            snap = stats.collect()
            sbs = snap["sandboxes"]
            merging = sum(s["ksm"]["merging_pages"] for s in sbs) * ksm.PAGE_SIZE
            resident = sum(s.get("guest_ram_rss_bytes") or 0 for s in sbs)
            samples.append({
                "t": round(time.monotonic() - t0, 1),
                "merged_share_of_guest_ram": merging / (n * memory * MIB),
                "merged_share_of_resident": merging / resident if resident else 0.0,
                "resident_mib": resident / MIB,
                "saved_mib": snap["host"]["ksm"]["saved_bytes"] / MIB,
                "ksmd_cpu_s": (ksm.state().cpu_seconds or 0.0) - cpu0,
            })
            print(f"{'ksm' if use_ksm else 'no-ksm'} {samples[-1]}", file=sys.stderr)
            time.sleep(interval)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=4, help="sandboxes (default 4)")
    parser.add_argument("--memory", type=int, default=256, help="guest MiB (default 256)")
    parser.add_argument("--duration", type=float, default=60, help="seconds sampled after boot (default 60)")
    parser.add_argument("--interval", type=float, default=5, help="seconds between samples (default 5)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    reason = ksm.merge_supported()
    if reason:
        sys.exit(f"bench: {reason}")
    build.ensure()
    previous = ksm.set_tunables(pages_to_scan=5000, sleep_millisecs=20, run=1)
    try:
        results = {"ksm": phase(args.n, True, args.memory, args.duration, args.interval),
                   "no-ksm": phase(args.n, False, args.memory, args.duration, args.interval)}
    finally:
        ksm.set_tunables(**previous)

    print(f"\nKSM benchmark: {args.n} identical idle sandboxes of {args.memory} MiB, ksmd pages_to_scan=5000 "
          f"sleep_millisecs=20")
    print(f"{'t (s)':>6} {'merged/guest RAM':>17} {'merged/resident':>16} {'resident MiB':>13} {'saved MiB':>10} "
          f"{'ksmd CPU s':>10} | {'no-ksm merged':>13}")
    for a, b in zip(results["ksm"], results["no-ksm"], strict=False):
        print(f"{a['t']:6.0f} {a['merged_share_of_guest_ram']:17.1%} {a['merged_share_of_resident']:16.1%} "
              f"{a['resident_mib']:13.0f} {a['saved_mib']:10.0f} {a['ksmd_cpu_s']:10.2f} | "
              f"{b['merged_share_of_guest_ram']:13.1%}")
    last = results["ksm"][-1]
    print(f"after {last['t']:.0f} s: {last['merged_share_of_resident']:.0%} of resident guest memory merged "
          f"(goal: >= 90% of identical idle memory within 60 s), {last['saved_mib']:.0f} MiB saved")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ksm.json").write_text(json.dumps({"n": args.n, "memory_mib": args.memory, **results}, indent=2))
    plot(results, args.out / "ksm.png")


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, style in (("ksm", "-"), ("no-ksm", "--")):
        ts = [s["t"] for s in results[name]]
        ax.plot(ts, [100 * s["merged_share_of_resident"] for s in results[name]], style,
                label=f"{name}: merged / resident guest RAM")
        ax.plot(ts, [100 * s["merged_share_of_guest_ram"] for s in results[name]], style, alpha=0.5,
                label=f"{name}: merged / guest RAM")
    ax.axhline(90, color="gray", linewidth=0.8)
    ax.set_xlabel("seconds after all guests booted")
    ax.set_ylabel("% merged")
    ax.set_ylim(0, 100)
    ax.set_title("KSM on identical idle sandboxes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
