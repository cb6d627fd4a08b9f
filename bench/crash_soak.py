"""Crash soak: `memvisor serve` SIGKILLed at random instants, again and again, with sandboxes mid-command,
mid-park and mid-resume; counts sandboxes that went missing (issue 26's goal: 0 silently gone in 20 kills).

One daemon on a private socket, runtime and state directory, with --sandboxes sandboxes (160 MiB guests, 64 MiB
of swap), each holding a marker in a process's memory and in tmpfs. Each round: with the daemon up (and one
sandbox parked beforehand, if none is), start the round's work in background threads — a long command in one
sandbox, a park of a running one, a resume of the parked one — wait a random time (0 to --max-delay seconds),
SIGKILL the daemon, start a new one, and check every sandbox known before the kill (a running one by an exec that
looks at its marker; a parked one is looked at once a later round resumes it):
    gone      not listed by the new daemon at all (a silent 404): must be 0
    lost      listed `lost`, with its reason (counted, printed; not a pass: nothing may be lost either)
    bad       listed running or parked but its marker process or file is not intact after an exec
    running / parked   how the rest were found
The passing figure is 0 gone, 0 lost and 0 bad. `make soak-crash` runs 20 rounds; tests/vm/test_crash.py runs one
kill (and a loop of delays into a resume) in `make test`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

POLICY = {"vm": {"memory_mib": 160}, "swap": {"size_mib": 64}}
HOLDER = ("echo \"$1\" > /tmp/marker; python3 -c 'import sys, time; m = sys.argv[1] * 4096; time.sleep(1 << 20)' "
          "\"$1\" </dev/null >/dev/null 2>&1 & echo $! > /tmp/pid")
LOOK = "kill -0 $(cat /tmp/pid) && echo alive; cat /tmp/marker"


class Daemon:
    """`memvisor serve` on this soak's private directories."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.socket = Path(env["MEMVISOR_SOCKET"])
        self.proc = subprocess.Popen([sys.executable, "-m", "memvisor", "-q", "serve", "--on-exit", "stop"],
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(Path(env["MEMVISOR_LOG_DIR"]) / "daemon.log", "ab"))
        deadline = time.monotonic() + 120
        while True:
            try:
                with self.client() as api:
                    api.get("/v1/sandboxes")
                return
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not start (see its log)") from None
                time.sleep(0.1)

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://memvisor",
                            timeout=300)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=300)


def sh(api: httpx.Client, key: str, script: str, *args: str) -> tuple[int | None, str]:
    out = b""
    end: dict[str, Any] = {}
    with api.stream("POST", f"/v1/sandboxes/{key}/exec",
                    json={"argv": ["sh", "-c", script, "sh", *args], "root": True}) as response:
        if response.status_code != 200:
            return None, response.read().decode()
        for line in response.iter_lines():
            item = json.loads(line)
            out += base64.b64decode(item.get("stdout", ""))
            end = item.get("exit", end)
    return end.get("exit_code"), out.decode()


def quietly(fn: Any) -> threading.Thread:
    def run() -> None:
        try:
            fn()
        except httpx.HTTPError:
            pass  # the daemon is killed under it
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sandboxes", type=int, default=3)
    parser.add_argument("--max-delay", type=float, default=5.0, help="seconds: the kill comes at a random instant "
                        "up to this long after the round's work started")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="memvisor-crash-soak-"))
    env = {**os.environ, "MEMVISOR_SOCKET": str(work / "serve.sock"), "MEMVISOR_RUNTIME_DIR": str(work / "run"),
           "MEMVISOR_STATE_DIR": str(work / "state"), "MEMVISOR_LOG_DIR": str(work / "logs"),
           "MEMVISOR_KEY_FILE": str(work / "keys" / "host.key"), "MEMVISOR_CONFIG": str(work / "none.toml")}
    (work / "logs").mkdir()
    os.environ.update(env)
    totals: Counter[str] = Counter()
    daemon = Daemon(env)
    ids: list[str] = []
    try:
        with daemon.client() as api:
            for i in range(args.sandboxes):
                made = api.post("/v1/sandboxes", json={"name": f"soak-{i}", "policy": POLICY})
                made.raise_for_status()
                ids.append(made.json()["id"])
                sh(api, ids[-1], HOLDER, f"marker-{ids[-1]}")
        print(f"{'round':>5} {'delay':>6}  {'work':<46} {'running':>7} {'parked':>6} {'lost':>4} {'gone':>4} "
              f"{'bad':>3}")
        for round_ in range(1, args.rounds + 1):
            with daemon.client() as api:
                states = {s["id"]: s["state"] for s in api.get("/v1/sandboxes").json()}
                if "parked" not in states.values() and len(ids) > 2:  # something to resume in this round
                    key = rng.choice(ids)
                    api.post(f"/v1/sandboxes/{key}/park", json={}).raise_for_status()
                    states[key] = "parked"
            running = [i for i in ids if states.get(i) == "running"]
            parked = [i for i in ids if states.get(i) == "parked"]
            rng.shuffle(running)
            plan = []
            threads = []
            if running:
                key = running.pop()
                plan.append(f"cmd {key}")
                threads.append(quietly(lambda k=key, d=daemon: sh(d.client(), k, "sleep 600")))
            if running:
                key = running.pop()
                plan.append(f"park {key}")
                threads.append(quietly(lambda k=key, d=daemon: d.client().post(f"/v1/sandboxes/{k}/park", json={})))
            if parked:
                key = rng.choice(parked)
                plan.append(f"resume {key}")
                threads.append(quietly(lambda k=key, d=daemon: d.client().post(f"/v1/sandboxes/{k}/resume", json={})))
            delay = rng.uniform(0, args.max_delay)
            time.sleep(delay)
            daemon.kill()
            for thread in threads:
                thread.join(timeout=60)
            daemon = Daemon(env)
            seen: Counter[str] = Counter()
            with daemon.client() as api:
                listed = {s["id"]: s for s in api.get("/v1/sandboxes").json()}
                for key in ids:
                    found = listed.get(key)
                    if found is None:
                        seen["gone"] += 1
                        print(f"      sandbox {key} is GONE (not listed)")
                        continue
                    if found["state"] == "lost":
                        seen["lost"] += 1
                        print(f"      sandbox {key} is lost: {found['lost']}")
                        continue
                    seen[found["state"]] += 1
                    if found["state"] == "parked":
                        continue
                    code, out = sh(api, key, LOOK)
                    if code != 0 or out.split()[:2] != ["alive", f"marker-{key}"]:
                        seen["bad"] += 1
                        print(f"      sandbox {key} is not intact: exit {code}: {out.strip()[:200]}")
                ids = [key for key in ids if key in listed and listed[key]["state"] != "lost"]
            totals.update(seen)
            print(f"{round_:>5} {delay:>5.2f}s  {', '.join(plan):<46} {seen['running']:>7} {seen['parked']:>6} "
                  f"{seen['lost']:>4} {seen['gone']:>4} {seen['bad']:>3}", flush=True)
            if not ids:
                print("no sandbox left to kill around")
                break
    finally:
        with daemon.client() as api:
            for key in ids:
                api.delete(f"/v1/sandboxes/{key}")
        daemon.stop()
    kills = min(round_, args.rounds)
    print(f"\n{kills} kills: {totals['gone']} sandboxes silently gone, {totals['lost']} lost, {totals['bad']} not "
          f"intact (of {kills * args.sandboxes} sandbox-rounds); logs in {work / 'logs'}")
    return 0 if totals["gone"] == totals["lost"] == totals["bad"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
