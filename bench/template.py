"""Templates benchmark (issue 21): cold boot + warm-up against a clone of a warm template, for 1, 4 and 8 sandboxes.

The workload: a Python process that imports a set of modules and loads --data MiB (default 100) of data (random
bytes, so nothing compresses or merges), then waits. Cold: each sandbox boots and runs the warm-up itself. Clone:
one template is made of a sandbox that ran it (not counted), then each sandbox is a clone. For each count:
  - seconds to the first exec output (create + warm-up + `echo` cold; create + `echo` for a clone), the median
  - host memory: the sum of the VMMs' PSS and of their guest RAM's PSS alone (without QEMU's own, which under
    TCG is ~150 MiB per VMM), and the growth of the host's used memory (MemTotal - MemAvailable) from before the
    first sandbox; for clones, each of the three also counts the template's sealed RAM once (the memfd's
    resident bytes: host memory whether a clone maps a page of it or not)
Goals under TCG: clone start <= 0.1x cold boot + warm-up; 8 clones <= 0.35x the memory of 8 cold sandboxes.
Both run the same templatable policy (guest RAM in a memfd, no balloon), so the devices and the accounting are
the same. The registry runs in this process (no HTTP). Prints a table, writes template.json and template.png to --out.
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
from memvisor.host import stats
from memvisor.image import build
from memvisor.service import templates
from memvisor.service.registry import Entry, Registry

WARM = ("import json, decimal, email.message, http.client, xml.dom.minidom, sqlite3, csv, statistics, time; "
        "data = open('/dev/urandom', 'rb').read({mib} << 20); open('/tmp/ready', 'w').write('ready'); "
        "time.sleep(1e9)")
WARM_UP = ("python3 -c \"{code}\" </dev/null >/dev/null 2>&1 & "
           "while [ ! -e /tmp/ready ]; do sleep 0.1; done; echo warm")


def first_output(entry: Entry) -> float:
    """Seconds from now until an `echo` in the sandbox gives its output."""
    assert entry.vm is not None
    seen: list[float] = []
    start = time.monotonic()
    entry.vm.exec(["echo", "hi"], on_stdout=lambda _b: seen.append(time.monotonic()))
    return (seen[0] if seen else time.monotonic()) - start


def used_bytes() -> int:
    host = stats.host()
    return int(host["memtotal_bytes"] - host["memavailable_bytes"])


def memory(entries: list[Entry]) -> tuple[int, int]:
    """(the VMMs' PSS, their guest RAM's PSS) in bytes."""
    total = guest = 0
    for e in entries:
        assert e.vm is not None and e.vm.process is not None
        pid = e.vm.process.pid
        total += psutil.Process(pid).memory_full_info().pss
        guest += stats.memfd_ram(pid)[1]  # guest RAM: a memfd, the template's for a clone
    return total, guest


def measure(reg: Registry, policy: pol.Policy, count: int, data: int, clone: bool) -> dict[str, Any]:
    warm_up = ["sh", "-c", WARM_UP.format(code=WARM.format(mib=data))]
    base = used_bytes()
    entries: list[Entry] = []
    starts: list[float] = []
    try:
        for _ in range(count):
            began = time.monotonic()
            if clone:
                entry = reg.create(policy, template_name="bench")
            else:
                entry = reg.create(policy)
                assert entry.vm is not None
                result = entry.vm.exec(warm_up, uid=0)
                assert result.exit_code == 0, result.stderr
            starts.append(time.monotonic() - began + first_output(entry))
            entries.append(entry)
        time.sleep(2)
        pss, guest_pss = memory(entries)
        grown = used_bytes() - base
        if clone:  # the template's sealed RAM is host memory too, held once whoever maps it (made before `base`)
            shared = templates.resident(reg.templates.get("bench"))
            pss, guest_pss, grown = pss + shared, guest_pss + shared, grown + shared
    finally:
        for entry in entries:
            reg.stop(entry.id)
    return {"count": count, "clone": clone, "start_seconds": starts, "median_start": statistics.median(starts),
            "pss_bytes": pss, "guest_pss_bytes": guest_pss, "host_used_growth_bytes": grown}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'sandboxes':>9} {'how':>6} {'start s':>8} {'PSS':>9} {'guest PSS':>10} {'host used':>10}"]
    for r in rows:
        lines.append(f"{r['count']:>9} {'clone' if r['clone'] else 'cold':>6} {r['median_start']:>8.2f} "
                     f"{r['pss_bytes'] / 2**20:>8.0f}M {r['guest_pss_bytes'] / 2**20:>9.0f}M "
                     f"{r['host_used_growth_bytes'] / 2**20:>9.0f}M")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for clone, label in ((False, "cold boot + warm-up"), (True, "clone")):
        mine = [r for r in rows if r["clone"] is clone]
        counts = [r["count"] for r in mine]
        left.plot(counts, [r["median_start"] for r in mine], marker="o", label=label)
        right.plot(counts, [r["pss_bytes"] / 2**20 for r in mine], marker="o", label=f"{label}: VMM PSS")
        right.plot(counts, [r["guest_pss_bytes"] / 2**20 for r in mine], marker="x", linestyle="--",
                   label=f"{label}: guest RAM PSS")
    left.set_xlabel("sandboxes")
    left.set_ylabel("seconds to the first output (TCG)")
    left.legend(fontsize=8)
    right.set_xlabel("sandboxes")
    right.set_ylabel("MiB")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--memory", type=int, default=256, help="guest MiB (default 256)")
    parser.add_argument("--data", type=int, default=100, help="MiB of data the warm-up loads (default 100)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="memvisor-template-bench-", dir="/var/tmp"))
    os.environ["MEMVISOR_STATE_DIR"] = str(work / "state")
    os.environ["MEMVISOR_RUNTIME_DIR"] = str(work / "run")
    (work / "run").mkdir(mode=0o700)
    image = build.ensure()
    policy = pol.merge(("bench", {"memory_mib": args.memory, "templatable": True}))
    reg = Registry(lambda: image, None, on_exit="stop")
    rows: list[dict[str, Any]] = []
    try:
        for count in args.counts:
            rows.append(measure(reg, policy, count, args.data, clone=False))
        made = time.monotonic()
        reg.template_from_command("bench", policy, ["sh", "-c", WARM_UP.format(code=WARM.format(mib=args.data))])
        print(f"template made in {time.monotonic() - made:.1f} s")
        for count in args.counts:
            rows.append(measure(reg, policy, count, args.data, clone=True))
        reg.templates.remove("bench")
    finally:
        reg.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"templates benchmark: {args.memory} MiB guests, {args.data} MiB of warm data, TCG")
    print(table(rows))
    for count in args.counts:
        cold = next(r for r in rows if r["count"] == count and not r["clone"])
        warm = next(r for r in rows if r["count"] == count and r["clone"])
        print(f"{count} sandbox(es): clone start {warm['median_start'] / cold['median_start']:.2f}x cold (goal <= 0.1)"
              f", memory {warm['pss_bytes'] / cold['pss_bytes']:.2f}x (goal <= 0.35 at 8), guest RAM "
              f"{warm['guest_pss_bytes'] / max(1, cold['guest_pss_bytes']):.2f}x")
    (args.out / "template.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "template.png")


if __name__ == "__main__":
    main()
