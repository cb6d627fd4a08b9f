"""Density benchmark: how many idle-agent sandboxes fit in a fixed host budget, enforced by the kernel.

All VMMs run in one memory cgroup with a hard limit (bench/cgroup.py; v1 here, v2 supported): the daemon is
moved into it before it starts any VMM. Each sandbox runs an "idle agent": it allocates and touches ~60% of its
RAM at start, then every BURST_EVERY seconds touches a working set of ~5% of its RAM and reports how long that
took. Sandboxes are added one by one, SETTLE seconds apart, until one fails: a VMM killed (the cgroup's
oom_kill counter, or a sandbox's command ending), a burst slower than --bound, or the daemon's admission
control refusing. Compared in one run:

    plain      QEMU as it comes: no swap, no balloon, no KSM
    memvisor   authenticated swap + zram, free-page reporting, the supervisor (budget = the cgroup's limit)
    memvisor+ksm   the same with KSM

Prints the count for each and the ratio to plain, writes a PNG of each sandbox's VMM RSS over time, and the
raw samples as JSON. Issue 9's goal: >= 3x the sandboxes of plain QEMU, with no VMM OOM-killed while the
supervisor runs.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.cgroup import MemoryCgroup
from bench.common import stop
from memvisor.host import ksm

AGENT = """
import sys, time
share, ws_share, every = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
total = int(open("/proc/meminfo").readline().split()[1]) // 1024  # MemTotal, MiB
mib, ws_mib = int(total * share), max(1, int(total * ws_share))
salt = open("/dev/urandom", "rb").read(4096)  # differs per sandbox: no page of one heap equals another's
chunks = []
for i in range(mib):
    c = bytearray(1 << 20)
    for off in range(0, 1 << 20, 4096):
        c[off:off + 8] = (i * 256 + off // 4096).to_bytes(8, "little")  # distinct within the heap...
        c[off + 8:off + 4096] = salt[8:]  # ... and across sandboxes, as real heaps are
    chunks.append(c)
print("READY", flush=True)
n = 0
while True:
    time.sleep(every)
    start = time.monotonic()
    for c in chunks[:ws_mib]:  # the hot working set; the rest of the heap stays cold
        for off in range(0, 1 << 20, 4096):
            c[off] = (c[off] + 1) & 255
    n += 1
    print("BURST", int((time.monotonic() - start) * 1000), flush=True)
"""
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {"policy": {"balloon": {"enable": False}}, "ksm": False, "supervise": False},
    "memvisor": {"policy": {"swap": {"size_mib": 512, "mode": "authenticated"}, "zram": {"percent": 25}},
                 "ksm": False, "supervise": True},
    "memvisor+ksm": {"policy": {"swap": {"size_mib": 512, "mode": "authenticated"}, "zram": {"percent": 25},
                                "ksm": {"enable": True}}, "ksm": True, "supervise": True},
}


@dataclass
class Agent:
    id: str
    pid: int
    bursts: list[tuple[float, int]] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    ended: str | None = None


@dataclass
class Outcome:
    config: str
    fitted: int
    failure: str
    rss: list[tuple[float, str, int]] = field(default_factory=list)  # (seconds, sandbox, VMM RSS bytes)
    worst_burst_ms: int = 0


def run_agent(client: httpx.Client, agent: Agent, share: float, ws_share: float, every: float) -> None:
    body = {"argv": ["python3", "-S", "-c", AGENT, str(share), str(ws_share), str(every)]}
    try:
        with client.stream("POST", f"/v1/sandboxes/{agent.id}/exec", json=body, timeout=None) as response:
            for line in response.iter_lines():
                item = json.loads(line)
                text = base64.b64decode(item.get("stdout", "")).decode(errors="replace")
                for word in text.split("\n"):
                    if word.startswith("READY"):
                        agent.ready.set()
                    elif word.startswith("BURST"):
                        agent.bursts.append((time.monotonic(), int(word.split()[1])))
                if "exit" in item or "error" in item:
                    agent.ended = json.dumps(item)
    except httpx.HTTPError as exc:
        agent.ended = f"stream lost: {exc}"
    agent.ended = agent.ended or "stream ended"
    agent.ready.set()


def measure(name: str, args: argparse.Namespace, workdir: Path) -> Outcome:
    config = CONFIGS[name]
    sock = workdir / f"{name}.sock"
    env = {**os.environ, "MEMVISOR_RUNTIME_DIR": str(workdir / f"{name}-run"), "MEMVISOR_SOCKET": str(sock)}
    cgroup = MemoryCgroup(f"memvisor-density-{os.getpid()}-{name.replace('+', '-')}", args.limit * 2**20)
    # The supervisor keeps the VMMs' resident memory under 90% of the cgroup's limit: it acts before the kernel.
    budget = str(args.limit * 9 // 10 if config["supervise"] else 10**7)
    # Started stopped, moved into the cgroup, then let go: no VMM can start outside it.
    daemon = subprocess.Popen(["sh", "-c", 'kill -STOP $$; exec "$@"', "sh", sys.executable, "-m", "memvisor", "-q",
                               "serve", "--on-exit", "stop", "--budget", budget], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    cgroup.add(daemon.pid)
    os.kill(daemon.pid, signal.SIGCONT)
    outcome = Outcome(name, 0, "")
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://memvisor", timeout=600)
    agents: list[Agent] = []
    start = time.monotonic()
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        policy = {"vm": {"memory_mib": args.memory, "floor_mib": args.floor}, **config["policy"]}
        ooms = cgroup.oom_kills()
        while len(agents) < args.max and not outcome.failure:
            made = client.post("/v1/sandboxes", json={"policy": policy})
            if made.status_code == 503:
                outcome.failure = "admission refused: " + made.json().get("detail", "")
                break
            if made.status_code != 201:
                outcome.failure = f"create failed ({made.status_code}): {made.text[:200]}"
                break
            agent = Agent(made.json()["id"], made.json()["vmm_pid"])
            agents.append(agent)
            threading.Thread(target=run_agent, args=(client, agent, 0.6, 0.05, args.every),
                             daemon=True).start()
            agent.ready.wait(args.settle * 4)
            settle_until = time.monotonic() + args.settle
            while time.monotonic() < settle_until and not outcome.failure:
                time.sleep(2)
                now = time.monotonic() - start
                for a in agents:
                    try:
                        outcome.rss.append((now, a.id, psutil.Process(a.pid).memory_info().rss))
                    except psutil.Error:
                        pass
                if cgroup.oom_kills() > ooms:
                    outcome.failure = f"the kernel OOM-killed a process in the cgroup ({len(agents)} sandboxes)"
                for a in agents:
                    if a.ended is not None:
                        outcome.failure = outcome.failure or f"sandbox {a.id}'s agent ended: {a.ended[:200]}"
                    late = [ms for t, ms in a.bursts if t > settle_until - args.settle and ms > args.bound * 1000]
                    if late:
                        outcome.failure = outcome.failure or f"sandbox {a.id}: a burst took {max(late)} ms"
            print(f"[{name}] {len(agents)} sandboxes, cgroup {cgroup.usage_bytes() >> 20} MiB of {args.limit} MiB"
                  f"{': ' + outcome.failure if outcome.failure else ''}", file=sys.stderr, flush=True)
        failed_one = outcome.failure and not outcome.failure.startswith(("admission", "create failed"))
        outcome.fitted = max(0, len(agents) - (1 if failed_one else 0))
        outcome.worst_burst_ms = max((ms for a in agents for _, ms in a.bursts), default=0)
        outcome.failure = outcome.failure or f"stopped at --max {args.max}"
    finally:
        client.close()
        stop(daemon, 300)
        cgroup.close()
    return outcome


def plot(outcomes: list[Outcome], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(outcomes), 1, figsize=(10, 3.2 * len(outcomes)), sharex=True, squeeze=False)
    for ax, o in zip(axes[:, 0], outcomes, strict=True):
        for sid in sorted({s for _, s, _ in o.rss}):
            points = [(t, r / 2**20) for t, s, r in o.rss if s == sid]
            ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1)
        ax.set_title(f"{o.config}: {o.fitted} sandboxes ({o.failure[:80]})", fontsize=9)
        ax.set_ylabel("VMM RSS (MiB)")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which to run (default: all three)")
    parser.add_argument("--limit", type=int, default=1536, help="the cgroup's hard limit in MiB (default 1536)")
    parser.add_argument("--memory", type=int, default=192, help="guest MiB (default 192)")
    parser.add_argument("--floor", type=int, default=64, help="guest floor MiB for the supervisor (default 64)")
    parser.add_argument("--max", type=int, default=20, help="stop adding sandboxes at this count (default 20)")
    parser.add_argument("--settle", type=float, default=30, help="seconds between additions (default 30)")
    parser.add_argument("--every", type=float, default=5, help="seconds between an agent's bursts (default 5)")
    parser.add_argument("--bound", type=float, default=10, help="a burst slower than this (s) is a failure")
    parser.add_argument("--out", type=Path, default=Path("density"), help="output prefix (.json, .png)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("density: needs root (memory cgroups)")
    workdir = Path(f"/var/lib/memvisor/density-{os.getpid()}")
    workdir.mkdir(parents=True)
    # Read the guest image once outside the cgroups: page cache is charged to the cgroup that first reads it,
    # which would bill the first configuration alone for ~80 MiB that every VMM shares.
    from memvisor.image import build

    image = build.ensure()
    for path in (image.vmlinux, image.initramfs):
        path.read_bytes()
    previous = ksm.set_tunables(pages_to_scan=2000, sleep_millisecs=50, run=1)
    outcomes = []
    try:
        for name in args.configs.split(","):
            outcomes.append(measure(name, args, workdir))
    finally:
        ksm.set_tunables(**previous)
        shutil.rmtree(workdir, ignore_errors=True)
    plain = next((o.fitted for o in outcomes if o.config == "plain"), 0)
    print(f"{'config':<14} {'sandboxes':>9} {'vs plain':>8} {'worst burst ms':>14}  stopped by")
    for o in outcomes:
        ratio = f"{o.fitted / plain:.2f}x" if plain else "-"
        print(f"{o.config:<14} {o.fitted:>9} {ratio:>8} {o.worst_burst_ms:>14}  {o.failure}")
    args.out.with_suffix(".json").write_text(json.dumps([o.__dict__ for o in outcomes]))
    plot(outcomes, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
