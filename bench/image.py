"""Image benchmark (issue 13): what one read-only image copy shared by every guest saves.

For each image and attachment, N guests (--counts, default 1 4 8) boot side by side, each reads a large part of
its image (every file of it, once), then sits idle for --settle seconds; then, per guest:
  - guest used memory: MemTotal - MemAvailable, and its Shmem and Cached (page cache)
  - on the host: the VMM's RSS and PSS, and its anonymous RSS (guest RAM it really holds)
and for all N together the host's cost: the VMMs' anonymous memory plus the image files' pages in the host page
cache, counted once (fincore): Σ anon + shared cache; and the image's part of it ("image cost"): with a shared
image, each VMM's anonymous memory after the read minus before it (booted, idle) plus the image's host page
cache once; with an initramfs, the copy each guest holds from boot on (its Shmem); "dropped": the same once
each guest has dropped its reclaimable caches (drop_caches) and free-page reporting gave the pages back to the
host (what the balloon and the supervisor can take back). Also boot-to-command: wall
seconds from starting a VMM to the end of a first `true` in it, median over the guests (meaningful at N = 1;
under TCG, N guests share 2 CPUs).

Attachments: initramfs (a private copy of the root in each guest's RAM; memvisor's image only), pmem (the erofs
file as an emulated NVDIMM, DAX), blk (the erofs file as a read-only virtio-blk disk). Images: memvisor's default image,
and --large (a user image built here from --large-packages unless it exists: ~470 MiB of files).

Goals: the default image costs each guest <= 2 MiB of RAM for its root (vs ~16.5 MiB as an initramfs), the host
total grows by < 5 MiB per extra guest of the same large image, and boot is no slower. Prints a table, writes
image.json and image.png to --out. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from memvisor import policy
from memvisor.host.sandbox import Instance
from memvisor.image import build, store, userbuild
from memvisor.image.build import Image

# Every file of the image (or only those over --min-file-kib KiB), once.
READ = "find / -xdev -type f {size} -print0 2>/dev/null | xargs -0 cat > /dev/null 2>&1; echo done"
LARGE_PACKAGES = ("gcc", "g++", "git", "python3-numpy", "perl")


def fincore_bytes(path: Path) -> int:
    """Bytes of `path` in the host page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]) if out else 0


def drop_host_cache(paths: list[Path]) -> None:
    """Evict the image files from the host page cache (POSIX_FADV_DONTNEED), so each run starts cold."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def meminfo(vm: Instance) -> dict[str, int]:
    out = vm.exec(["cat", "/proc/meminfo"], uid=0).stdout.decode()
    return {line.split(":")[0]: int(line.split()[1]) for line in out.splitlines() if line.split()[1:]}


def drop_caches(vm: Instance) -> None:
    vm.exec(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], uid=0)


def vmm_memory(pid: int) -> dict[str, int]:
    proc = psutil.Process(pid)
    full = proc.memory_full_info()
    anon = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) << 10
    return {"rss": full.rss, "pss": full.pss, "anon": anon}


def one_run(image: Image, rootfs: str, user_image: str | None, count: int, memory: int, settle: float,
            min_kib: int = 0) -> dict[str, Any]:
    """N guests side by side; returns per-guest figures and the host total."""
    files = [image.rootfs] + ([store.get(user_image).rootfs] if user_image else [])
    drop_host_cache(files)
    pol = policy.merge(("bench", {"memory_mib": memory, "rootfs": rootfs, "balloon": True,
                                  **({"image": user_image} if user_image else {})}))
    vms = [Instance(pol, image) for _ in range(count)]
    boot: list[float] = [0.0] * count
    errors: list[str] = []

    started = [0.0] * count
    for i, vm in enumerate(vms):  # from this thread: a VMM dies with the thread that started it (PDEATHSIG)
        started[i] = time.monotonic()
        vm.start()

    def in_each(step: Callable[[int], None]) -> None:
        def guarded(i: int) -> None:
            try:
                step(i)
            except Exception as exc:  # noqa: BLE001 - a benchmark reports and stops
                errors.append(f"guest {i}: {exc}")
        threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise SystemExit(f"bench: {rootfs}/{user_image or 'default'} x{count}: {'; '.join(errors)}")

    def boot_one(i: int) -> None:
        vms[i].exec(["true"])
        boot[i] = time.monotonic() - started[i]

    def read_all(i: int) -> None:
        size = f"-size +{min_kib}k" if min_kib else ""
        got = vms[i].exec(["sh", "-c", READ.format(size=size)], uid=0).stdout.decode()
        if "done" not in got:
            raise RuntimeError(f"the read command said {got[-200:]!r}")

    def anon_now() -> list[int]:
        return [vmm_memory(vm.process.pid)["anon"] for vm in vms if vm.process is not None]

    try:
        in_each(boot_one)
        time.sleep(settle)
        before = anon_now()  # booted and idle: what a guest costs without touching its image
        in_each(read_all)
        time.sleep(settle)
        guests = []
        for vm, idle in zip(vms, before, strict=True):
            info = meminfo(vm)
            assert vm.process is not None
            guests.append({"used_kib": info["MemTotal"] - info["MemAvailable"], "shmem_kib": info["Shmem"],
                           "cached_kib": info["Cached"], "anon_idle": idle, **vmm_memory(vm.process.pid)})
        cache = sum(fincore_bytes(f) for f in files)
        # What of it the guest can give back: its reclaimable caches dropped, the freed pages reported to the
        # host (free-page reporting), as under memory pressure or when the supervisor squeezes it.
        in_each(lambda i: drop_caches(vms[i]))
        time.sleep(settle)
        for guest, anon in zip(guests, anon_now(), strict=True):
            guest["anon_dropped"] = anon
    finally:
        for vm in vms:
            vm.close()
    anon = sum(g["anon"] for g in guests)
    # What reading the image cost the host: each VMM's growth (its guest's page cache, for blk) plus the image
    # in the host's page cache, once.
    if rootfs == "initramfs":  # paid at boot: the root's copy in each guest's RAM (tmpfs: it cannot drop it)
        image_cost = dropped_cost = sum(g["shmem_kib"] << 10 for g in guests)
    else:
        image_cost = sum(g["anon"] - g["anon_idle"] for g in guests) + cache
        dropped_cost = sum(max(0, g["anon_dropped"] - g["anon_idle"]) for g in guests) + cache
    return {"rootfs": rootfs, "image": user_image or "default", "count": count, "guests": guests,
            "boot_s": statistics.median(boot), "image_cache_bytes": cache, "host_total_bytes": anon + cache,
            "image_cost_bytes": image_cost, "image_cost_dropped_bytes": dropped_cost}


def ensure_large(name: str, packages: tuple[str, ...]) -> str:
    try:
        store.get(name)
    except Exception:  # noqa: BLE001 - not built yet
        print(f"building the large image {name} ({' '.join(packages)})", file=sys.stderr)
        userbuild.build_image(userbuild.BuildSpec(name=name, packages=packages))
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 8], help="guests side by side")
    parser.add_argument("--memory", type=int, default=256, help="guest MiB (default 256)")
    parser.add_argument("--settle", type=float, default=5.0, help="idle seconds before measuring")
    parser.add_argument("--large", default="bench-large", help="name of the large image (built if missing)")
    parser.add_argument("--large-packages", nargs="+", default=list(LARGE_PACKAGES))
    parser.add_argument("--no-large", action="store_true", help="measure memvisor's default image only")
    parser.add_argument("--only-large", action="store_true", help="measure the large image only")
    parser.add_argument("--min-file-kib", type=int, default=0,
                        help="read only files over this size (default 0: every file); fewer, larger files show "
                             "what the bytes cost apart from each file's kernel state")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="where to write image.json/png")
    args = parser.parse_args()

    image = build.ensure()  # once: the whole run measures one image
    plans: list[tuple[str, str | None]] = [] if args.only_large else [("initramfs", None), ("pmem", None),
                                                                        ("blk", None)]
    if not args.no_large:
        large = ensure_large(args.large, tuple(args.large_packages))
        plans += [("pmem", large), ("blk", large)]
    results = []
    for rootfs, user_image in plans:
        for count in args.counts:
            res = one_run(image, rootfs, user_image, count, args.memory, args.settle, args.min_file_kib)
            results.append(res)
            print(f"{res['image']:12} {rootfs:9} x{count}: done", file=sys.stderr)
    table(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "image.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / "image.png")


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    image = build.ensure()
    sizes = {} if args.only_large else {"default": image.rootfs.stat().st_size}
    if not args.no_large:
        sizes[args.large] = store.get(args.large).rootfs.stat().st_size
    what = f"every file over {args.min_file_kib} KiB" if args.min_file_kib else "every file"
    print(f"\nimage benchmark: {args.memory} MiB guests, each read {what} of its image, then idle "
          f"{args.settle:g} s; medians per guest")
    print("image sizes (erofs): " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sizes.items()))
    head = (f"{'image':12} {'root':9} {'N':>2} {'used':>7} {'shmem':>7} {'cache':>7} {'VMM rss':>8} "
            f"{'VMM pss':>8} {'VMM anon':>8} {'host total':>10} {'image cost':>10} {'dropped':>8} {'boot s':>6}")
    print(head)
    print("-" * len(head))
    by_plan: dict[tuple[str, str], dict[int, tuple[int, int, int]]] = {}
    for r in results:
        g = r["guests"]

        def med(key: str, guests: list[dict[str, Any]] = g) -> float:
            return float(statistics.median(x[key] for x in guests))

        total = r["host_total_bytes"]
        by_plan.setdefault((r["image"], r["rootfs"]), {})[r["count"]] = (total, r["image_cost_bytes"],
                                                                          r["image_cost_dropped_bytes"])
        print(f"{r['image']:12} {r['rootfs']:9} {r['count']:2} {med('used_kib') / 1024:6.1f}M "
              f"{med('shmem_kib') / 1024:6.1f}M {med('cached_kib') / 1024:6.1f}M {med('rss') / 2**20:7.1f}M "
              f"{med('pss') / 2**20:7.1f}M {med('anon') / 2**20:7.1f}M {total / 2**20:9.1f}M "
              f"{r['image_cost_bytes'] / 2**20:9.1f}M {r['image_cost_dropped_bytes'] / 2**20:7.1f}M "
              f"{r['boot_s']:6.2f}")
    print("\ngrowth per extra guest, from the smallest to the largest N: host total (VMMs + image cache), and "
          "the image's part of it (goal: < 5 MiB)")
    for (img, root), totals in by_plan.items():
        ns = sorted(totals)
        if len(ns) > 1:
            span = ns[-1] - ns[0]
            host = (totals[ns[-1]][0] - totals[ns[0]][0]) / span
            cost = (totals[ns[-1]][1] - totals[ns[0]][1]) / span
            dropped = (totals[ns[-1]][2] - totals[ns[0]][2]) / span
            print(f"  {img:12} {root:9} host {host / 2**20:7.1f} MiB, image {cost / 2**20:7.1f} MiB per guest "
                  f"({dropped / 2**20:.1f} MiB once the guests drop their caches)")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    plans: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        plans.setdefault(f"{r['image']} / {r['rootfs']}", []).append((r["count"], r["host_total_bytes"] / 2**20))
    for label, points in plans.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("guests side by side")
    ax.set_ylabel("host memory: Σ VMM anon + image page cache (MiB)")
    ax.set_title("memvisor: one shared read-only image vs a copy per guest")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
