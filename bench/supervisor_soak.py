"""Supervisor soak: the daemon in a memory cgroup, sandboxes added until admission refuses, each keeping a live
heap it reads, for minutes; counts what must never happen.

What a user of the service does, with the CLI a user runs: `memvisor serve` started inside a memory cgroup with
a hard limit (bench/cgroup.py), its budget 90% of that limit; `memvisor create` (--memory 192 --swap-size 512
--swap-mode authenticated --zram-pct 25 by default) every --settle seconds until admission refuses; in each
sandbox, through `memvisor exec`, a Python workload that builds --heap MiB of small objects, then reads the same
5% of them every 5 s and prints a heartbeat every second. After the first refusal one more create is tried
every --retry seconds. The run lasts --duration seconds from the first workload's start.

Counted per run:
    panics        guest kernels that panicked (their console logs, kept by the daemon)
    guest OOM     processes the guest kernels' OOM killers ended (/proc/vmstat oom_kill of each guest at the end,
                  plus workloads whose exec reported an OOM kill or died of SIGKILL)
    host OOM      processes the host kernel's OOM killer ended in the cgroup (its oom_kill counter)
    late beats    heartbeats that arrived more than 2 s after the previous one (a starved or stalled guest)
    refusals      creates refused by admission (HTTP 503)
    lost          workloads that ended for any other reason

The passing figure is 0 panics, 0 guest OOM kills and 0 host OOM kills in every run (exit status 1 otherwise).
Needs root (memory cgroups). `make soak-supervisor` runs 5 runs of 10 minutes; tests/vm/test_supervisor_soak.py
runs a small one (3 sandboxes, 2 minutes) in `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.cgroup import MemoryCgroup
from bench.common import stop

# ~`mib` MiB of small objects (bytes of ~250 bytes: pymalloc's 256-byte class), then the same 5% read every
# `every` s, a heartbeat every second. Each sandbox's objects differ (a random salt), as real heaps do.
WORKLOAD = """
import os, sys, time
mib, every = int(sys.argv[1]), float(sys.argv[2])
salt = os.urandom(16)
n = mib * (1 << 20) // 256
heap = [salt + i.to_bytes(8, "little") + bytes(192) for i in range(n)]
hot = heap[: max(1, n // 20)]
print("READY", flush=True)
beat, next_read = 0, time.monotonic() + every
while True:
    if time.monotonic() >= next_read:
        total = sum(o[16] for o in hot)
        next_read += every
    print("BEAT", beat, flush=True)
    beat += 1
    time.sleep(1)
"""
LATE_S = 2.0
OOM_EXIT = 137


@dataclass
class Workload:
    sandbox: str
    proc: subprocess.Popen[str]
    ready: threading.Event = field(default_factory=threading.Event)
    beats: int = 0
    late: int = 0
    worst_gap_s: float = 0.0
    ended: str | None = None
    oom_killed: bool = False


@dataclass
class RunCounts:
    run: int
    sandboxes: int = 0
    panics: int = 0
    guest_oom_kills: int = 0
    host_oom_kills: int = 0
    late_beats: int = 0
    beats: int = 0
    worst_gap_s: float = 0.0
    refusals: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.panics == 0 and self.guest_oom_kills == 0 and self.host_oom_kills == 0


def watch(work: Workload) -> None:
    """Read a workload's output: heartbeats (and their gaps), then how it ended."""
    assert work.proc.stdout is not None
    last = None
    for line in work.proc.stdout:
        now = time.monotonic()
        if line.startswith("READY"):
            work.ready.set()
            last = now
        elif line.startswith("BEAT"):
            work.beats += 1
            if last is not None:
                gap = now - last
                work.worst_gap_s = max(work.worst_gap_s, gap)
                work.late += gap > LATE_S
            last = now
    rc = work.proc.wait()
    err = work.proc.stderr.read() if work.proc.stderr else ""
    work.oom_killed = rc == OOM_EXIT or "OOM killer" in err
    work.ended = f"exit {rc}: {err.strip()[-300:]}"
    work.ready.set()


def cli(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memvisor", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_run(index: int, args: argparse.Namespace, workdir: Path) -> RunCounts:
    counts = RunCounts(index)
    base = workdir / f"run{index}"
    consoles = base / "consoles"
    env = {**os.environ, "MEMVISOR_RUNTIME_DIR": str(base / "run"), "MEMVISOR_SOCKET": str(base / "serve.sock"),
           "MEMVISOR_KEEP_CONSOLE": str(consoles)}
    cgroup = MemoryCgroup(f"memvisor-soak-{os.getpid()}-{index}", args.limit << 20)
    log_path = base / "daemon.log"
    base.mkdir(parents=True)
    with log_path.open("w") as log:
        # Started stopped, moved into the cgroup, then let go: no VMM can start outside it.
        daemon = subprocess.Popen(["sh", "-c", 'kill -STOP $$; exec "$@"', "sh", sys.executable, "-m", "memvisor",
                                   "serve", "--on-exit", "stop", "--budget", str(args.limit * 9 // 10)], env=env,
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    time.sleep(0.5)
    cgroup.add(daemon.pid)
    os.kill(daemon.pid, signal.SIGCONT)
    oom_before = cgroup.oom_kills()
    works: list[Workload] = []
    try:
        deadline = time.monotonic() + 60
        while not Path(env["MEMVISOR_SOCKET"]).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        policy = ["--memory", str(args.memory), *args.policy.split()]
        debug = ["--debug"] if args.debug else []
        started: float | None = None
        next_try = time.monotonic()
        refused = False
        while started is None or time.monotonic() - started < args.duration:
            if time.monotonic() >= next_try and len(works) < args.max:
                made = cli(env, "create", *policy, *debug)
                if made.returncode == 0:
                    sid = made.stdout.strip()
                    proc = subprocess.Popen([sys.executable, "-m", "memvisor", "exec", sid, "--", "python3", "-S",
                                             "-c", WORKLOAD, str(args.heap), "5"], env=env, text=True,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE)
                    work = Workload(sid, proc)
                    works.append(work)
                    threading.Thread(target=watch, args=(work,), daemon=True).start()
                    work.ready.wait(300)
                    started = started or time.monotonic()
                    print(f"[run {index}] {len(works)} sandbox(es); cgroup {cgroup.usage_bytes() >> 20} MiB of "
                          f"{args.limit} MiB", file=sys.stderr, flush=True)
                elif "no room" in made.stderr:
                    counts.refusals += 1
                    refused = True
                    last = made.stderr.strip().splitlines()[-1]  # the error, after --debug's own log lines
                    print(f"[run {index}] refused: {last[:300]}", file=sys.stderr, flush=True)
                else:
                    counts.notes.append(f"create failed: {made.stderr.strip().splitlines()[-1:]}")
                    refused = True
                next_try = time.monotonic() + (args.retry if refused else args.settle)
            if started is None and refused:
                counts.notes.append("the first sandbox was refused")
                break
            time.sleep(1)
        counts.sandboxes = len(works)
        # Each guest's own count of OOM kills (a guest that died cannot be asked: its console says why).
        for work in works:
            if work.ended is None:
                out = cli(env, "exec", work.sandbox, "--", "grep", "^oom_kill ", "/proc/vmstat", timeout=120)
                match = re.search(r"oom_kill (\d+)", out.stdout)
                counts.guest_oom_kills += int(match.group(1)) if match else 0
    finally:
        for work in works:
            if work.proc.poll() is None:
                work.proc.terminate()
        stop(daemon, 300)
        for work in works:
            work.proc.wait()
        counts.host_oom_kills = cgroup.oom_kills() - oom_before
        cgroup.close()
    for work in works:
        counts.beats += work.beats
        counts.late_beats += work.late
        counts.worst_gap_s = max(counts.worst_gap_s, round(work.worst_gap_s, 1))
        if work.ended is not None and work.proc.returncode not in (-signal.SIGTERM, 143):
            if work.oom_killed:
                counts.guest_oom_kills += 1
            else:
                counts.lost += 1
            counts.notes.append(f"{work.sandbox}: {work.ended}")
    for console in sorted(consoles.glob("*.log")) if consoles.exists() else []:
        text = console.read_text(errors="replace")
        if "Kernel panic" in text:
            counts.panics += 1
            line = next(t for t in text.splitlines() if "Kernel panic" in t)
            counts.notes.append(f"{console.stem}: {line.strip()[:200]}")
    return counts


def table(runs: list[RunCounts]) -> str:
    head = (f"{'run':>3} {'sandboxes':>9} {'panics':>6} {'guest OOM':>9} {'host OOM':>8} {'late beats':>10} "
            f"{'beats':>6} {'worst gap s':>11} {'refusals':>8} {'lost':>4}")
    rows = [head]
    for r in runs:
        rows.append(f"{r.run:>3} {r.sandboxes:>9} {r.panics:>6} {r.guest_oom_kills:>9} {r.host_oom_kills:>8} "
                    f"{r.late_beats:>10} {r.beats:>6} {r.worst_gap_s:>11} {r.refusals:>8} {r.lost:>4}")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs, one after another (default 5)")
    parser.add_argument("--duration", type=float, default=600, help="seconds per run from the first workload")
    parser.add_argument("--limit", type=int, default=1536, help="the cgroup's hard limit, MiB (default 1536)")
    parser.add_argument("--memory", type=int, default=192, help="guest MiB (default 192)")
    parser.add_argument("--policy", default="--swap-size 512 --swap-mode authenticated --zram-pct 25",
                        help="the other `memvisor create` flags")
    parser.add_argument("--heap", type=int, default=75, help="MiB of small objects each workload keeps")
    parser.add_argument("--max", type=int, default=12, help="never more sandboxes than this")
    parser.add_argument("--settle", type=float, default=20, help="seconds between creates (default 20)")
    parser.add_argument("--retry", type=float, default=60, help="seconds between creates once refused")
    parser.add_argument("--debug", action="store_true", help="guests log OOM reports on their consoles")
    parser.add_argument("--keep", type=Path, help="copy the daemon logs and consoles here")
    parser.add_argument("--json", type=Path, help="write the counts here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("supervisor soak: needs root (memory cgroups)")
    from memvisor.image import build

    image = build.ensure()
    for path in (image.vmlinux, image.stage0, image.rootfs):  # page cache charged outside the run's cgroup
        path.read_bytes()
    workdir = Path(tempfile.mkdtemp(prefix="soak-supervisor-", dir="/var/lib/memvisor"))
    runs: list[RunCounts] = []
    try:
        for i in range(1, args.runs + 1):
            runs.append(one_run(i, args, workdir))
            print(table(runs[-1:]), file=sys.stderr, flush=True)
    finally:
        if args.keep:
            shutil.copytree(workdir, args.keep, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("run", "*.sock"))
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(runs))
    for r in runs:
        for note in r.notes:
            print(f"run {r.run}: {note}")
    failed = sum(not r.passed for r in runs)
    print(f"{failed} of {len(runs)} runs had a panic or a kill")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
