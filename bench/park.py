"""Parking benchmark (issue 20): what a park costs and saves, and how fast a parked sandbox comes back.

For each guest size (--sizes, default 256 and 1024 MiB), a sandbox of the daemon's registry (in this process, no
HTTP) with 256 MiB of authenticated swap gets --live MiB (default 64) of live data: a process that holds it in
RAM, written from /dev/urandom so it neither compresses nor merges. Then, --cycles times (default 3):
  - guest used memory just before the park, after dropping its caches as the park does: its RAM but its free
    pages (what it really holds, its kernel's reserved memory included; MemTotal - MemAvailable is kept beside
    it in the JSON); and the VMM's RSS
  - park seconds (PARK to the VMM gone: the guest's sync, free-page reporting's settle, the sealed stream), and
    the host CPU seconds memvisor's own process spent on it (user + system, all its threads: sealing, the
    manifest, the ledger; QEMU's own CPU is not in it)
  - snapshot bytes (the sealed stream) ÷ guest used memory; the kept swap file's allocated blocks apart
  - the host memory the sandbox holds while parked (its VMM's RSS: the process is gone, so 0 if nothing leaks)
  - resume to first exec output (an exec of `true` on the parked sandbox, resume included) ÷ a cold create to the
    first exec output of the same sandbox; and memvisor's CPU seconds for the resume (the manifest's
    authentication, every chunk verified twice, the kept disks' checks, the ledger)
Goals under TCG: snapshot <= 1.1x guest used memory; resume <= 0.2x cold. Prints a table, writes park.json and
park.png to --out. Also what zstd -1 would make of the stream, and at what CPU cost (memvisor does not
compress: see docs/parking.md). Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from memvisor import policy as pol
from memvisor.image import build
from memvisor.service.registry import Entry, Registry
from memvisor.snapshot import seal
from memvisor.snapshot.manifest import Manifest
from memvisor.snapshot.park import STREAM

HOLD = "import sys, time; d = open('/dev/urandom', 'rb').read({n} << 20); print('ready', flush=True); time.sleep(1e9)"


def used_kib(reg: Registry, entry: Entry, memory_mib: int) -> tuple[int, int]:
    """The guest's used memory in KiB after dropping its caches, as a park does: all its RAM but its free pages
    (the kernel's own reserved memory included, which MemTotal leaves out); and MemTotal - MemAvailable."""
    assert entry.vm is not None
    script = "sync; echo 3 > /proc/sys/vm/drop_caches; grep -E 'MemTotal|MemFree|MemAvailable' /proc/meminfo"
    out = entry.vm.exec(["sh", "-c", script], uid=0).stdout.decode().split()
    total, free, available = int(out[1]), int(out[4]), int(out[7])
    return (memory_mib << 10) - free, total - available


def cpu_seconds() -> float:
    """This process's CPU seconds so far, user + system, every thread."""
    times = os.times()
    return times.user + times.system


def compressibility(reg: Registry, meta: Manifest) -> dict[str, float]:
    """What zstd (level 1, one thread) would make of the parked stream: its bytes and the CPU seconds it took,
    read back through the seal (the plaintext never reaches the disk)."""
    import zstandard

    key = reg.state.unwrap(meta)
    compressor = zstandard.ZstdCompressor(level=1)
    plain = packed = 0
    cpu = 0.0
    for chunk in seal.read_chunks(reg.state.stream_path(meta.id, STREAM), key, meta.ident, STREAM):
        began = time.process_time()
        packed += len(compressor.compress(chunk))
        cpu += time.process_time() - began
        plain += len(chunk)
    return {"plaintext_bytes": float(plain), "zstd1_bytes": float(packed), "zstd1_cpu_seconds": cpu}


def first_output(reg: Registry, entry: Entry) -> tuple[float, float]:
    """Seconds until an exec of `echo` (on a parked sandbox: resume included) gives its output, and memvisor's CPU
    seconds for the resume."""
    start = time.monotonic()
    cpu = cpu_seconds()
    reg.ensure_running(entry)
    cpu = cpu_seconds() - cpu
    assert entry.vm is not None
    seen: list[float] = []
    entry.vm.exec(["echo", "hi"], on_stdout=lambda _b: seen.append(time.monotonic()))
    return (seen[0] if seen else time.monotonic()) - start, cpu


def measure(reg: Registry, size: int, live: int, cycles: int) -> dict[str, Any]:
    policy = pol.merge(("bench", {"memory_mib": size, "swap_size_mib": 256, "swap_mode": "authenticated"}))
    start = time.monotonic()
    entry = reg.create(policy)
    assert entry.vm is not None
    seen: list[float] = []
    entry.vm.exec(["echo", "hi"], on_stdout=lambda _b: seen.append(time.monotonic()))
    cold = seen[0] - start
    entry.vm.exec(["sh", "-c", f"python3 -c \"{HOLD.format(n=live)}\" </dev/null >/tmp/held 2>&1 &"
                   " while ! grep -q ready /tmp/held; do sleep 0.2; done"])
    rows: list[dict[str, float]] = []
    for _ in range(cycles):
        used, counted = (kib << 10 for kib in used_kib(reg, entry, size))
        assert entry.vm is not None and entry.vm.process is not None
        pid = entry.vm.process.pid
        rss = psutil.Process(pid).memory_info().rss
        began, cpu = time.monotonic(), cpu_seconds()
        reg.park(entry.id)
        park_s, park_cpu = time.monotonic() - began, cpu_seconds() - cpu
        assert entry.parked is not None
        stream = entry.parked.streams["vm"]["file_bytes"]
        held = psutil.Process(pid).memory_info().rss if psutil.pid_exists(pid) else 0
        kept = float(sum(f.allocated_bytes for f in entry.parked.files.values()))  # blocks, not sizes
        packing = compressibility(reg, entry.parked)
        resume, resume_cpu = first_output(reg, entry)
        rows.append({"used_bytes": float(used), "meminfo_used_bytes": float(counted), "vmm_rss_bytes": float(rss),
                     "park_seconds": park_s, "park_cpu_seconds": park_cpu,
                     "snapshot_bytes": float(stream), "kept_disk_bytes": kept, "parked_host_bytes": float(held),
                     "resume_seconds": resume, "resume_cpu_seconds": resume_cpu, "cold_seconds": cold, **packing})
    reg.stop(entry.id)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"memory_mib": size, "live_mib": live, "runs": rows, "median": med,
            "snapshot_per_used": med["snapshot_bytes"] / med["used_bytes"],
            "resume_per_cold": med["resume_seconds"] / med["cold_seconds"]}


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'guest':>6} {'used':>8} {'VMM rss':>8} {'park s':>7} {'park cpu':>8} {'snapshot':>9} "
             f"{'snap/used':>9} {'swap kept':>9} {'parked':>7} {'resume s':>8} {'res cpu':>7} {'cold s':>7} "
             f"{'res/cold':>8}"]
    for r in results:
        m = r["median"]
        lines.append(f"{r['memory_mib']:>5}M {m['used_bytes'] / 2**20:>7.1f}M {m['vmm_rss_bytes'] / 2**20:>7.1f}M "
                     f"{m['park_seconds']:>7.2f} {m['park_cpu_seconds']:>8.2f} {m['snapshot_bytes'] / 2**20:>8.1f}M "
                     f"{r['snapshot_per_used']:>9.2f} {m['kept_disk_bytes'] / 2**20:>8.1f}M "
                     f"{m['parked_host_bytes'] / 2**20:>6.1f}M {m['resume_seconds']:>8.2f} "
                     f"{m['resume_cpu_seconds']:>7.2f} {m['cold_seconds']:>7.2f} {r['resume_per_cold']:>8.2f}")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [f"{r['memory_mib']} MiB" for r in results]
    for i, key in enumerate(("used_bytes", "vmm_rss_bytes", "snapshot_bytes", "parked_host_bytes")):
        left.bar([x + i * 0.2 for x in range(len(results))], [r["median"][key] / 2**20 for r in results], 0.2,
                 label=key.replace("_bytes", "").replace("_", " "))
    left.set_xticks([x + 0.3 for x in range(len(results))], names)
    left.set_ylabel("MiB")
    left.set_title("memory: running vs parked")
    left.legend(fontsize=8)
    for i, key in enumerate(("cold_seconds", "resume_seconds", "park_seconds")):
        right.bar([x + i * 0.25 for x in range(len(results))], [r["median"][key] for r in results], 0.25,
                  label=key.replace("_seconds", ""))
    right.set_xticks([x + 0.25 for x in range(len(results))], names)
    right.set_ylabel("seconds (TCG)")
    right.set_title("to the first output: cold create vs resume")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="guest MiB")
    parser.add_argument("--live", type=int, default=64, help="MiB of live data in the guest (default 64)")
    parser.add_argument("--cycles", type=int, default=3, help="park/resume cycles per size (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="memvisor-park-bench-", dir="/var/tmp"))
    os.environ["MEMVISOR_STATE_DIR"] = str(work / "state")  # the benchmark's own parked sandboxes
    os.environ["MEMVISOR_KEY_FILE"] = str(work / "keys" / "host.key")  # and its own host key
    os.environ["MEMVISOR_RUNTIME_DIR"] = str(work / "run")
    (work / "run").mkdir(mode=0o700)
    image = build.ensure()
    reg = Registry(lambda: image, None, on_exit="stop")
    try:
        results = [measure(reg, size, args.live, args.cycles) for size in args.sizes]
    finally:
        reg.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"parking benchmark: {args.live} MiB of live data, 256 MiB authenticated swap, TCG, "
          f"median of {args.cycles} cycles")
    print(table(results))
    for r in results:
        m = r["median"]
        print(f"{r['memory_mib']} MiB: zstd -1 would make the {m['plaintext_bytes'] / 2**20:.1f} MiB stream "
              f"{m['zstd1_bytes'] / 2**20:.1f} MiB ({m['zstd1_bytes'] / m['plaintext_bytes']:.2f}x) for "
              f"{m['zstd1_cpu_seconds']:.2f} s of CPU")
        print(f"{r['memory_mib']} MiB: snapshot {r['snapshot_per_used']:.2f}x guest used memory (goal <= 1.1), "
              f"resume {r['resume_per_cold']:.2f}x cold (goal <= 0.2)")
    (args.out / "park.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "park.png")


if __name__ == "__main__":
    main()
