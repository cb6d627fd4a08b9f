"""Daemon soak: `memvisor serve`, ten sandboxes, commands into any of them for an hour, the supervisor watched.

What a user of the service does, through the same client the CLI uses: start the daemon on a private socket
and runtime directory, create --sandboxes sandboxes, then until --duration passes run commands in random
sandboxes from --workers threads at once. The commands check their own output (an echo, a checksum of stdin, a
command killed by its --timeout, a short memory burst that makes an idle guest ask for memory back), so a wrong
answer counts as a failure as much as an error does. Every --sample seconds `memvisor stats --json` (another
process, as a user would run it) records each sandbox's balloon target and the supervisor's reason.

Prints, per kind of command, how many ran and how many went wrong ("0 of N" is the only pass), the supervisor's
decisions it saw (how many distinct targets per sandbox, the reasons), and checks that stopping the daemon
leaves no VMM, socket or runtime file behind. Exit status 1 if anything went wrong.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import psutil

from bench.common import stop
from memvisor.errors import MemvisorError
from memvisor.service.client import Client

BURST = "b = bytearray({mib} << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint(len(b) >> 20)"


def one_command(client: Client, sid: str, kind: str, rng: random.Random) -> str | None:
    """Run one command of `kind` in sandbox `sid`; return what went wrong, or None."""
    out, err = bytearray(), bytearray()
    if kind == "echo":
        word = f"w{rng.randrange(10**9)}"
        done = client.exec(sid, {"argv": ["echo", word]}, out.extend, err.extend)
        return None if done.get("code") == 0 and out == f"{word}\n".encode() else f"echo: {done} {bytes(out)!r}"
    if kind == "stdin":
        data = rng.randbytes(rng.randrange(1, 256 * 1024))
        done = client.exec(sid, {"argv": ["sha256sum"], "stdin": base64.b64encode(data).decode()},
                           out.extend, err.extend)
        ok = done.get("code") == 0 and out.decode().split()[:1] == [hashlib.sha256(data).hexdigest()]
        return None if ok else f"stdin: {done} {bytes(out[:80])!r}"
    if kind == "timeout":
        done = client.exec(sid, {"argv": ["sleep", "30"], "timeout": 1}, out.extend, err.extend)
        return None if done.get("timed_out") else f"timeout: {done}"
    mib = rng.choice((16, 32, 48))
    done = client.exec(sid, {"argv": ["python3", "-S", "-c", BURST.format(mib=mib)]}, out.extend, err.extend)
    ok = done.get("code") == 0 and out.strip() == str(mib).encode()
    return None if ok else f"burst: {done} {bytes(err[-200:])!r}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3600, help="seconds of commands (default 3600)")
    parser.add_argument("--sandboxes", type=int, default=10, help="how many sandboxes (default 10)")
    parser.add_argument("--memory", type=int, default=128, help="guest MiB (default 128)")
    parser.add_argument("--floor", type=int, default=48, help="guest floor MiB (default 48)")
    parser.add_argument("--budget", type=int, default=0,
                        help="the daemon's budget in MiB (default: what the floors need plus 70 MiB per VMM)")
    parser.add_argument("--workers", type=int, default=3, help="commands in flight at once (default 3)")
    parser.add_argument("--sample", type=float, default=20, help="seconds between `memvisor stats` (default 20)")
    parser.add_argument("--swap-mode", default="authenticated")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    budget = args.budget or args.sandboxes * (args.floor + 70) + 64
    work = Path(tempfile.mkdtemp(prefix="memvisor-serve-soak-", dir="/var/tmp"))
    env = {**os.environ, "MEMVISOR_RUNTIME_DIR": str(work / "run"), "MEMVISOR_SOCKET": str(work / "serve.sock"),
           "MEMVISOR_LOG_DIR": str(work / "logs"), "MEMVISOR_CONFIG": str(work / "none.toml")}
    memvisor = [sys.executable, "-m", "memvisor", "-q"]
    daemon = subprocess.Popen([*memvisor, "serve", "--on-exit", "stop", "--budget", str(budget)], env=env,
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb"))  # noqa: SIM115
    ran: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    failures: list[str] = []
    targets: dict[str, set[int]] = defaultdict(set)
    reasons: Counter[str] = Counter()
    lock = threading.Lock()
    leftovers: list[str] = []
    vmm_pids: list[int] = []
    started = time.monotonic()
    try:
        deadline = time.monotonic() + 60
        while not (work / "serve.sock").exists():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"serve-soak: the daemon did not start; see {work / 'serve.log'}")
            time.sleep(0.2)
        client = Client(work / "serve.sock")
        policy = {"vm": {"memory_mib": args.memory, "floor_mib": args.floor},
                  "swap": {"mode": args.swap_mode, "size_mib": 256}, "zram": {"percent": 25}}
        ids = []
        for n in range(args.sandboxes):
            made = client.create(policy, name=f"soak{n}")
            ids.append(made["id"])
            vmm_pids.append(made["vmm_pid"])
            print(f"serve-soak: created {made['id']} ({n + 1}/{args.sandboxes})", file=sys.stderr, flush=True)
        end = time.monotonic() + args.duration

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < end:
                sid, kind = rng.choice(ids), rng.choice(("echo", "echo", "stdin", "timeout", "burst"))
                try:
                    problem = one_command(client, sid, kind, rng)
                except MemvisorError as exc:
                    problem = f"{kind}: {exc.message}"
                with lock:
                    ran[kind] += 1
                    if problem:
                        failed[kind] += 1
                        failures.append(f"{sid}: {problem}"[:300])
                time.sleep(rng.uniform(0, 2))

        threads = [threading.Thread(target=worker, args=(args.seed * 100 + i,), daemon=True)
                   for i in range(args.workers)]
        for t in threads:
            t.start()
        while time.monotonic() < end:
            time.sleep(min(args.sample, max(0.0, end - time.monotonic())))
            shot = subprocess.run([*memvisor, "stats", "--json"], env=env, capture_output=True, text=True,
                                  timeout=60)
            if shot.returncode != 0:
                failures.append(f"memvisor stats failed: {shot.stderr.strip()[:200]}")
                failed["stats"] += 1
                continue
            ran["stats"] += 1
            for sb in json.loads(shot.stdout).get("sandboxes", []):
                decision = sb.get("supervisor") or {}
                if decision:
                    targets[sb["id"]].add(decision["target_bytes"] >> 20)
                    reasons[decision["reason"].split(" (")[0]] += 1
            done = sum(ran.values()) - ran["stats"]
            print(f"serve-soak: {time.monotonic() - started:.0f} s, {done} commands, {sum(failed.values())} "
                  "went wrong", file=sys.stderr, flush=True)
        for t in threads:
            t.join(timeout=120)
        client.close()
    finally:
        if not stop(daemon, 120):
            leftovers.append("the daemon did not stop within 120 s of SIGTERM")
        leftovers += [f"VMM {pid} still running" for pid in vmm_pids if psutil.pid_exists(pid)
                      and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if (work / "serve.sock").exists():
            leftovers.append("the socket is still there")
        run_dir = work / "run"
        if run_dir.exists():
            leftovers += [f"left behind: {p}" for p in run_dir.rglob("*") if p.is_file()]
    print(f"\n{'command':<10} {'ran':>6} {'went wrong':>10}")
    for kind in sorted(ran):
        print(f"{kind:<10} {ran[kind]:>6} {failed[kind]:>10}")
    print(f"{'all':<10} {sum(ran.values()):>6} {sum(failed.values()):>10}   ({sum(failed.values())} of "
          f"{sum(ran.values())} went wrong, {time.monotonic() - started:.0f} s, {args.sandboxes} sandboxes)")
    print("supervisor: distinct balloon targets seen per sandbox: "
          + ", ".join(f"{len(v)}" for _, v in sorted(targets.items())))
    print("supervisor reasons seen: " + "; ".join(f"{r} ×{n}" for r, n in reasons.most_common()))
    for line in failures[:20] + leftovers:
        print("  " + line)
    if args.json:
        args.json.write_text(json.dumps({"ran": ran, "failed": failed, "failures": failures, "leftovers": leftovers,
                                         "targets": {k: sorted(v) for k, v in targets.items()},
                                         "reasons": reasons, "seconds": time.monotonic() - started}))
    bad = sum(failed.values()) + len(leftovers)
    if not bad:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"serve-soak: kept {work} (serve.log, logs/)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
