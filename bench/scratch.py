"""Scratch disk benchmark: plain against confidential (policy scratch_mode; docs/image.md, "The scratch disk").

- Throughput: in a 256 MiB guest, the workload writes MiB of data (more than the guest's RAM, `dd conv=fsync`)
  to a file on its root, which lives on the scratch disk, then drops the guest's caches and reads it back; MiB/s
  of each phase, timed in the guest.
- Tags: guest RAM the confidential scratch's tag store holds (brd's count of its pages, /dev/ram1) before and
  after the write, per GiB written.
- Boot: time to command (host, from VMM start to the command's start) with no scratch disk, a plain one and a
  confidential one; runs alternate so host noise hits each alike; and the guest's own time for its scratch step.

Not a test: prints a table, writes JSON and a PNG. Under TCG the crypto runs emulated: do not read these ratios
as KVM ratios. Data is zeros (what a workload writes does not change the cipher's cost; /dev/urandom would be
the bottleneck under TCG).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from memvisor import policy
from memvisor.host.sandbox import Instance
from memvisor.host.vmm.qemu import QemuBackend
from memvisor.image import build
from memvisor.image.build import Image

GIB = 2**30
PAGES = "/sys/kernel/debug/ramdisk_pages/ram1"
SCRIPT = """
up() { cut -d' ' -f1 /proc/uptime; }
tags() { cat {pages} 2>/dev/null || echo 0; }
f=/home/sandbox/bench.data
t0=$(up); b0=$(tags)
dd if=/dev/zero of=$f bs=1M count={mib} conv=fsync 2>/dev/null
t1=$(up)
sync; sleep 1; b1=$(tags)  # dm-integrity writes its tag buffers back a little after the data
echo 3 > /proc/sys/vm/drop_caches
t2=$(up)
dd if=$f of=/dev/null bs=1M 2>/dev/null
t3=$(up)
echo RESULT $t0 $t1 $t2 $t3 $b0 $b1
"""
BOOT_MODES = ("none", "plain", "confidential")


def scratch_policy(mode: str, memory: int, scratch_mib: int) -> policy.Policy:
    layer: dict[str, object] = {"memory_mib": memory, "root": True, "timeout": 900}
    if mode != "none":
        layer.update(scratch_mib=scratch_mib, scratch_mode=mode)
    return policy.merge(("bench", layer))


def throughput(image: Image, mode: str, memory: int, scratch_mib: int, mib: int) -> dict[str, float]:
    with Instance(scratch_policy(mode, memory, scratch_mib), image) as vm:
        result = vm.exec(["sh", "-c", SCRIPT.replace("{pages}", PAGES).replace("{mib}", str(mib))], uid=0)
    line = next((x for x in result.stdout.decode().splitlines() if x.startswith("RESULT ")), None)
    if result.exit_code != 0 or line is None:
        sys.exit(f"bench: {mode} failed: exit {result.exit_code}, {result.stdout!r} {result.stderr!r}")
    t0, t1, t2, t3 = (float(x) for x in line.split()[1:5])
    pages_before, pages_after = (int(x) for x in line.split()[5:7])
    return {"write_mib_s": mib / (t1 - t0), "read_mib_s": mib / (t3 - t2),
            "tags_setup_bytes": pages_before * 4096.0,
            "tags_bytes_per_gib": (pages_after - pages_before) * 4096.0 * GIB / (mib << 20)}


def boot(image: Image, mode: str, memory: int, scratch_mib: int) -> dict[str, float]:
    with Instance(scratch_policy(mode, memory, scratch_mib), image) as vm:
        result = vm.run(["true"])
    rep = result.report
    guest = rep["guest"]
    return {"time_to_command_s": rep["time_to_command_seconds"],
            "init_started_uptime": guest["init_started_uptime"],
            "command_started_uptime": guest["command_started_uptime"],
            "setup_scratch_s": guest["init_steps"].get("setup_scratch", 0.0)}


def median_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", type=int, default=256, help="guest MiB (default 256)")
    parser.add_argument("--scratch", type=int, default=1024, help="scratch disk MiB (default 1024)")
    parser.add_argument("--mib", type=int, default=384, help="MiB written and read back (default 384)")
    parser.add_argument("--runs", type=int, default=2, help="throughput runs per mode (default 2)")
    parser.add_argument("--boot-runs", type=int, default=5, help="boots per mode (default 5)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    if args.runs < 1 or args.boot_runs < 1:
        parser.error("--runs and --boot-runs must be at least 1")

    image = build.ensure()
    speed: dict[str, list[dict[str, float]]] = {"plain": [], "confidential": []}
    for _ in range(args.runs):
        for mode in speed:
            speed[mode].append(throughput(image, mode, args.memory, args.scratch, args.mib))
            print(f"{mode}: {speed[mode][-1]}", file=sys.stderr)
    boots: dict[str, list[dict[str, float]]] = {m: [] for m in BOOT_MODES}
    for _ in range(args.boot_runs):
        for mode in BOOT_MODES:
            boots[mode].append(boot(image, mode, args.memory, args.scratch))
            print(f"boot {mode}: {boots[mode][-1]}", file=sys.stderr)
    results = {"throughput": {m: median_rows(r) for m, r in speed.items()},
               "boot": {m: median_rows(r) for m, r in boots.items()}}
    report(args, results)
    args.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"memory_mib": args.memory, "scratch_mib": args.scratch, "mib": args.mib,
                           "runs": args.runs, "boot_runs": args.boot_runs, **results,
                           "samples": {"throughput": speed, "boot": boots}}
    (args.out / "scratch.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(results, args.out / "scratch.png")


def report(args: argparse.Namespace, results: dict[str, dict[str, dict[str, float]]]) -> None:
    speed, boots = results["throughput"], results["boot"]
    print(f"\nscratch benchmark: {args.mib} MiB written and read back in a {args.memory} MiB guest, "
          f"{args.scratch} MiB scratch disk, {QemuBackend().accel().upper()}, median of {args.runs} run(s)")
    print(f"{'mode':14} {'write MiB/s':>11} {'read MiB/s':>10} {'tags MiB/GiB written':>21} {'tags at boot':>12}")
    for mode, r in speed.items():
        print(f"{mode:14} {r['write_mib_s']:11.1f} {r['read_mib_s']:10.1f} {r['tags_bytes_per_gib'] / 2**20:21.2f} "
              f"{r['tags_setup_bytes'] / 2**20:10.2f} M")
    conf, plain = speed["confidential"], speed["plain"]
    print(f"confidential: write {conf['write_mib_s'] / plain['write_mib_s']:.2f}x plain, "
          f"read {conf['read_mib_s'] / plain['read_mib_s']:.2f}x plain")
    print(f"\nboot, median of {args.boot_runs}: {'time to command':>15} {'guest: init at':>14} {'command at':>10} "
          f"{'scratch step':>12}")
    for mode, r in boots.items():
        print(f"  {mode:29} {r['time_to_command_s']:13.2f} s {r['init_started_uptime']:12.2f} s "
              f"{r['command_started_uptime']:8.2f} s {r['setup_scratch_s']:10.2f} s")
    base = boots["none"]["time_to_command_s"]
    for mode in ("plain", "confidential"):
        print(f"  {mode} scratch costs {boots[mode]['time_to_command_s'] - base:+.2f} s of boot "
              f"(guest: {boots[mode]['command_started_uptime'] - boots['none']['command_started_uptime']:+.2f} s)")


def plot(results: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed, boots = results["throughput"], results["boot"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.4, 1]})
    modes = list(speed)
    xs = range(len(modes))
    ax1.bar([x - 0.2 for x in xs], [speed[m]["write_mib_s"] for m in modes], width=0.4, label="write (fsync)")
    ax1.bar([x + 0.2 for x in xs], [speed[m]["read_mib_s"] for m in modes], width=0.4, label="read (caches dropped)")
    ax1.set_xticks(list(xs), modes)
    ax1.set_ylabel("MiB/s (timed in the guest)")
    ax1.set_title("Scratch disk throughput")
    ax1.legend()
    names = list(boots)
    ax2.bar(names, [boots[m]["time_to_command_s"] for m in names], color="tab:gray")
    ax2.set_ylabel("seconds, VMM start to command")
    ax2.set_title("Boot to command")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
