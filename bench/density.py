"""Density benchmark: how many sandboxes fit in a fixed host budget, enforced by the kernel.

All VMMs run in one memory cgroup with a hard limit (bench/cgroup.py; v1 here, v2 supported): the daemon is
moved into it before it starts any VMM. Sandboxes are added one by one, --settle seconds apart, until one fails
or there are --max; the one added last is not counted if the failure is a kill or a slow or failed command
(it is the one that did not fit: a resume refused for want of room is a failed command), and a create refused
(503) counts the ones that were running. Two workloads:

"agent" (issue 9): each sandbox runs an idle agent: it allocates and touches ~60% of its RAM at start, then
every --every seconds touches a working set of ~5% of its RAM and reports how long that took. The agent is one
command that never ends, so these sandboxes are never parked. A run fails on a VMM killed (the cgroup's
oom_kill counter, or an agent's command ending), a burst slower than --bound, or admission refused.

    plain          QEMU as it comes: no swap, no balloon, no KSM
    memvisor       authenticated swap + zram, free-page reporting, the supervisor (budget = 90% of the cgroup)
    memvisor+ksm   the same with KSM

"bursty" (issue 20; bench/density_bursty.py): like an agent's sandbox between tool calls: 32 MiB of random data
written at creation, then a short command on it (sha256sum + md5sum, ~1 s under TCG on a quiet host) at random
intervals (--interval, 30-120 s by default, seeded by --seed) and nothing otherwise. A command is timed from the
request to its exit, a resume included. A run fails on an OOM kill in the cgroup, a command failing or slower
than --bound, or a create refused.

    plain-bursty   plain QEMU, as "plain", with the bursty workload: nothing is ever parked
    parking        as "memvisor", and the daemon parks a sandbox idle for --park-after-idle seconds (10 by
                   default); a command on a parked sandbox resumes it first; when a sandbox does not fit the
                   budget the daemon parks the least recently used idle ones

Each row's ratio is against the plain run of the same workload, if it ran. Issue 9's figure (goal >= 3x, no VMM
OOM-killed while the supervisor runs) is the default, --configs plain,memvisor,memvisor+ksm; issue 20's (goal
>= 10x plain QEMU) is --configs plain-bursty,parking. The bursty configurations default to --settle 15 and
--max 80, the agent ones to 30 and 20. Prints the table, writes a PNG (agent: each VMM's RSS over time; bursty:
the cgroup's usage, the page cache in it, and the running and parked sandboxes over time), the raw samples as
JSON, and each daemon's warnings to OUT-CONFIG-daemon.log.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
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

from bench import density_bursty
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
PLAIN: dict[str, Any] = {"balloon": {"enable": False}}
MEMVISOR: dict[str, Any] = {"swap": {"size_mib": 512, "mode": "authenticated"}, "zram": {"percent": 25}}
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {"policy": PLAIN, "ksm": False, "supervise": False, "workload": "agent"},
    "memvisor": {"policy": MEMVISOR, "ksm": False, "supervise": True, "workload": "agent"},
    "memvisor+ksm": {"policy": {**MEMVISOR, "ksm": {"enable": True}}, "ksm": True, "supervise": True,
                     "workload": "agent"},
    "plain-bursty": {"policy": PLAIN, "ksm": False, "supervise": False, "workload": "bursty"},
    "parking": {"policy": MEMVISOR, "ksm": False, "supervise": True, "workload": "bursty", "park": True},
}
# Per workload: the configuration the others are compared with, and the defaults of --settle and --max.
WORKLOADS: dict[str, dict[str, Any]] = {
    "agent": {"plain": "plain", "settle": 30.0, "max": 20},
    "bursty": {"plain": "plain-bursty", "settle": 15.0, "max": 80},
}
DEFAULT_CONFIGS = "plain,memvisor,memvisor+ksm"


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
    rss: list[tuple[float, str, int]] = field(default_factory=list)  # agent: (seconds, sandbox, VMM RSS bytes)
    worst_burst_ms: int = 0  # agent
    bursty: density_bursty.BurstyRun | None = None


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
    workload = WORKLOADS[config["workload"]]
    limit = args.max or workload["max"]
    settle = args.settle or workload["settle"]
    sock = workdir / f"{name}.sock"
    env = {**os.environ, "MEMVISOR_RUNTIME_DIR": str(workdir / f"{name}-run"), "MEMVISOR_SOCKET": str(sock),
           "MEMVISOR_STATE_DIR": str(workdir / f"{name}-state")}  # parked snapshots go with the run
    cgroup = MemoryCgroup(f"memvisor-density-{os.getpid()}-{name.replace('+', '-')}", args.limit * 2**20)
    # The supervisor keeps the VMMs' resident memory under 90% of the cgroup's limit: it acts before the kernel.
    budget = str(args.limit * 9 // 10 if config["supervise"] else 10**7)
    serve = ["serve", "--on-exit", "stop", "--budget", budget]
    if config.get("park"):
        serve += ["--park-after-idle", str(args.park_after_idle)]
    log = Path(f"{args.out}-{name}-daemon.log").open("wb")
    # Started stopped, moved into the cgroup, then let go: no VMM can start outside it.
    daemon = subprocess.Popen(["sh", "-c", 'kill -STOP $$; exec "$@"', "sh", sys.executable, "-m", "memvisor", "-q",
                               *serve], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    time.sleep(0.5)
    cgroup.add(daemon.pid)
    os.kill(daemon.pid, signal.SIGCONT)
    outcome = Outcome(name, 0, "")
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://memvisor", timeout=600)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        policy = {"vm": {"memory_mib": args.memory, "floor_mib": args.floor}, **config["policy"]}
        if config["workload"] == "bursty":
            outcome.bursty = density_bursty.grow(client, cgroup, policy, args, name, limit, settle)
            outcome.failure, added = outcome.bursty.failure, outcome.bursty.added
        else:
            added = grow_agents(client, cgroup, policy, args, name, limit, settle, outcome)
        failed_one = outcome.failure and not outcome.failure.startswith(("admission", "create failed"))
        outcome.fitted = max(0, added - (1 if failed_one else 0))
        outcome.failure = outcome.failure or f"stopped at --max {limit}"
    finally:
        client.close()
        stop(daemon, 300)
        log.close()
        cgroup.close()
        shutil.rmtree(workdir / f"{name}-state", ignore_errors=True)
    return outcome


def grow_agents(client: httpx.Client, cgroup: MemoryCgroup, policy: dict[str, Any], args: argparse.Namespace,
                name: str, limit: int, settle: float, outcome: Outcome) -> int:
    """Add idle-agent sandboxes until one fails or there are `limit`; return how many were added."""
    agents: list[Agent] = []
    start = time.monotonic()
    ooms = cgroup.oom_kills()
    while len(agents) < limit and not outcome.failure:
        made = client.post("/v1/sandboxes", json={"policy": policy})
        if made.status_code == 503:
            outcome.failure = "admission refused: " + made.json().get("detail", "")
            break
        if made.status_code != 201:
            outcome.failure = f"create failed ({made.status_code}): {made.text[:200]}"
            break
        agent = Agent(made.json()["id"], made.json()["vmm_pid"])
        agents.append(agent)
        threading.Thread(target=run_agent, args=(client, agent, 0.6, 0.05, args.every), daemon=True).start()
        agent.ready.wait(settle * 4)
        settle_until = time.monotonic() + settle
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
                late = [ms for t, ms in a.bursts if t > settle_until - settle and ms > args.bound * 1000]
                if late:
                    outcome.failure = outcome.failure or f"sandbox {a.id}: a burst took {max(late)} ms"
        print(f"[{name}] {len(agents)} sandboxes, cgroup {cgroup.usage_bytes() >> 20} MiB of {args.limit} MiB"
              f"{': ' + outcome.failure if outcome.failure else ''}", file=sys.stderr, flush=True)
    outcome.worst_burst_ms = max((ms for a in agents for _, ms in a.bursts), default=0)
    return len(agents)


def plot(outcomes: list[Outcome], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(outcomes), 1, figsize=(10, 3.2 * len(outcomes)), squeeze=False)
    for ax, o in zip(axes[:, 0], outcomes, strict=True):
        if o.bursty is not None:
            samples = o.bursty.samples
            ax.plot([s[0] for s in samples], [s[1] / 2**20 for s in samples], color="black", linewidth=1,
                    label="cgroup usage")
            ax.plot([s[0] for s in samples], [s[2] / 2**20 for s in samples], color="grey", linewidth=1,
                    linestyle="--", label="of it page cache")
            ax.set_ylabel("cgroup (MiB)")
            ax.legend(loc="upper right", fontsize=8)
            counts = ax.twinx()
            counts.step([s[0] for s in samples], [s[3] for s in samples], where="post", label="running")
            counts.step([s[0] for s in samples], [s[4] for s in samples], where="post", label="parked")
            counts.set_ylabel("sandboxes")
            counts.yaxis.set_major_locator(MaxNLocator(integer=True))
            counts.legend(loc="upper left", fontsize=8)
        else:
            for sid in sorted({s for _, s, _ in o.rss}):
                points = [(t, r / 2**20) for t, s, r in o.rss if s == sid]
                ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1)
            ax.set_ylabel("VMM RSS (MiB)")
        ax.set_title(f"{o.config}: {o.fitted} sandboxes ({o.failure[:80]})", fontsize=9)
        ax.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(outcomes: list[Outcome]) -> None:
    """The table, each row against the plain run of its workload; a line more for each bursty run."""
    fitted = {o.config: o.fitted for o in outcomes}
    print(f"{'config':<14} {'sandboxes':>9} {'vs plain':>8} {'worst':>9}  stopped by")
    for o in outcomes:
        plain = fitted.get(WORKLOADS[CONFIGS[o.config]["workload"]]["plain"], 0)
        ratio = f"{o.fitted / plain:.2f}x" if plain else "-"
        worst = f"{o.worst_burst_ms} ms" if o.bursty is None else \
            f"{max((e.seconds for e in o.bursty.execs), default=0):.2f} s"
        print(f"{o.config:<14} {o.fitted:>9} {ratio:>8} {worst:>9}  {o.failure}")
    for o in outcomes:
        if o.bursty is None:
            continue
        execs = o.bursty.execs
        seconds = sorted(e.seconds for e in execs)
        resumes = sorted(e.resume_seconds for e in execs if e.resume_seconds is not None)
        line = f"  {o.config}: {len(execs)} commands"
        if seconds:
            line += f" (median {seconds[len(seconds) // 2]:.2f} s)"
        line += f", {len(resumes)} of them resumed a parked sandbox"
        if resumes:
            line += f" (resume median {resumes[len(resumes) // 2]:.2f} s, worst {resumes[-1]:.2f} s)"
        print(f"{line}; {o.bursty.parks} parks; {o.bursty.parked_at_end} of {o.bursty.added} parked at the end")


def interval(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    try:
        bounds = float(low), float(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH in seconds") from None
    if not 0 < bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 < LOW <= HIGH")
    return bounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"which to run, of {', '.join(CONFIGS)} (default: {DEFAULT_CONFIGS})")
    parser.add_argument("--limit", type=int, default=1536, help="the cgroup's hard limit in MiB (default 1536)")
    parser.add_argument("--memory", type=int, default=192, help="guest MiB (default 192)")
    parser.add_argument("--floor", type=int, default=64, help="guest floor MiB for the supervisor (default 64)")
    parser.add_argument("--max", type=int, help="stop adding sandboxes at this count (default 20; bursty: 80)")
    parser.add_argument("--settle", type=float, help="seconds between additions (default 30; bursty: 15)")
    parser.add_argument("--every", type=float, default=5, help="agent: seconds between bursts (default 5)")
    parser.add_argument("--bound", type=float, default=10,
                        help="a burst or bursty command slower than this (s) is a failure (default 10)")
    parser.add_argument("--interval", type=interval, default=(30.0, 120.0), metavar="LOW,HIGH",
                        help="bursty: seconds from a command's end to the next, uniform (default 30,120)")
    parser.add_argument("--seed", type=int, default=1, help="bursty: seed of the intervals (default 1)")
    parser.add_argument("--park-after-idle", type=int, default=10, metavar="SECONDS",
                        help="parking: the daemon's --park-after-idle (default 10)")
    parser.add_argument("--out", type=Path, default=Path("density"), help="output prefix (.json, .png)")
    args = parser.parse_args()
    names = args.configs.split(",")
    if unknown := [n for n in names if n not in CONFIGS]:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
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
        for name in names:
            outcomes.append(measure(name, args, workdir))
    finally:
        ksm.set_tunables(**previous)
        shutil.rmtree(workdir, ignore_errors=True)
    report(outcomes)
    args.out.with_suffix(".json").write_text(json.dumps([dataclasses.asdict(o) for o in outcomes]))
    plot(outcomes, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
