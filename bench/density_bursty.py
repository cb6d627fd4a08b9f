"""The density benchmark's bursty workload (issue 20): sandboxes that are idle but for a short command now and then.

Each sandbox gets its data at creation (one exec writes DATA_MIB MiB of /dev/urandom to /tmp/data, on the guest's
tmpfs-backed root: distinct in every sandbox, so KSM cannot merge it), then a host thread per sandbox sleeps a
random interval (uniform in --interval, seeded per sandbox from --seed, counted from the end of the previous
command) and runs WORK on that data (about a second under TCG on a quiet host), timing it from the request to its
exit line: a resume of a parked sandbox is part of it. Between commands the sandbox runs nothing, so a daemon
with --park-after-idle parks it.

Sandboxes are added one by one until one fails: the cgroup's oom_kill counter rises, a command fails (non-zero
exit, a guest OOM kill, an error line, a lost stream) or takes longer than --bound (one still running past the
bound counts at once), or a create is refused (503) or fails. This module owns the workload and its samples; the
daemon, the cgroup and the table are bench/density.py's.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from bench.cgroup import MemoryCgroup

DATA_MIB = 32
SETUP = ["sh", "-c", f"head -c {DATA_MIB << 20} /dev/urandom > /tmp/data"]
WORK = ["sh", "-c", "sha256sum /tmp/data && md5sum /tmp/data"]  # ~1 s for 32 MiB on this host's TCG, quiet
SAMPLE_S = 2.0
JOIN_S = 30.0  # how long the end of a run waits for commands in flight


@dataclass
class Exec:
    """One command's figures: when it was asked for (seconds into the run), how long it took end to end, the
    resume inside that if the sandbox was parked, and why it failed (None: exit 0)."""

    sandbox: str
    at: float
    seconds: float
    resume_seconds: float | None
    error: str | None


@dataclass
class BurstyRun:
    """What a bursty run saw. samples: (seconds, cgroup bytes, of them page cache, running, parked, in between:
    booting, parking, resuming or stopping)."""

    added: int = 0
    failure: str = ""
    samples: list[tuple[float, int, int, int, int, int]] = field(default_factory=list)
    execs: list[Exec] = field(default_factory=list)
    parks: int = 0
    parked_at_end: int = 0


@dataclass
class Sandbox:
    id: str
    rng: random.Random
    busy_since: float | None = None  # monotonic start of the command in flight
    failure: str | None = None
    thread: threading.Thread | None = None


def run_exec(client: httpx.Client, sandbox: str, argv: list[str], origin: float) -> Exec:
    """Run one command through the daemon's exec stream (NDJSON: stdout/stderr in base64, then one exit or error
    line) and time it from the request to the last line."""
    start = time.monotonic()
    end: dict[str, object] | None = None
    stderr = b""
    error: str | None = None
    try:
        with client.stream("POST", f"/v1/sandboxes/{sandbox}/exec", json={"argv": argv}) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:200]}"
            else:
                for line in response.iter_lines():
                    item = json.loads(line)
                    stderr += base64.b64decode(item.get("stderr", ""))
                    if "exit" in item or "error" in item:
                        end = item
    except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: the client was closed at the end of the run
        error = f"stream lost: {exc}"
    seconds = time.monotonic() - start
    resume: float | None = None
    if error is None:
        if end is None:
            error = "the stream ended without an exit"
        elif "error" in end:
            error = f"error: {end['error']}"
        else:
            result = end["exit"]
            assert isinstance(result, dict)
            resume = result.get("resume_seconds")
            if result.get("exit_code") != 0 or result.get("oom_kills"):
                tail = stderr.decode(errors="replace").strip()[-200:]
                error = f"exit {json.dumps(result)}{': ' + tail if tail else ''}"
    return Exec(sandbox, start - origin, seconds, resume, error)


def bursts(client: httpx.Client, box: Sandbox, run: BurstyRun, interval: tuple[float, float], bound: float,
           origin: float, stop: threading.Event, closed: threading.Event) -> None:
    """One sandbox's commands until the run stops or one of them fails."""
    while not stop.wait(box.rng.uniform(*interval)):
        box.busy_since = time.monotonic()
        result = run_exec(client, box.id, WORK, origin)
        box.busy_since = None
        if closed.is_set():
            return  # it outlived the run's end: the daemon's teardown ended it, not the workload
        run.execs.append(result)
        if result.error is not None:
            box.failure = f"sandbox {box.id}: a command failed after {result.seconds:.1f} s: {result.error}"
            return
        if result.seconds > bound:
            resume = f", {result.resume_seconds:.1f} s of it resuming" if result.resume_seconds else ""
            box.failure = f"sandbox {box.id}: a command took {result.seconds:.1f} s{resume}"
            return


def states(client: httpx.Client) -> tuple[int, int, int, int]:
    """(running, parked, in between: booting, parking, resuming or stopping; parks so far) from GET
    /v1/sandboxes."""
    items = client.get("/v1/sandboxes").raise_for_status().json()
    count = {s: sum(1 for i in items if i["state"] == s) for s in ("running", "parked")}
    return count["running"], count["parked"], len(items) - sum(count.values()), sum(i["parks"] for i in items)


def grow(client: httpx.Client, cgroup: MemoryCgroup, policy: dict[str, object], args: argparse.Namespace,
         name: str, limit: int, settle: float) -> BurstyRun:
    """Add sandboxes `settle` seconds apart until one fails or there are `limit`; return what was seen."""
    run = BurstyRun()
    boxes: list[Sandbox] = []
    stop, closed = threading.Event(), threading.Event()  # no new commands; results no longer recorded
    origin = time.monotonic()
    ooms = cgroup.oom_kills()
    sampler = threading.Thread(target=sample, args=(client, cgroup, run, origin, stop), daemon=True)
    sampler.start()
    try:
        while len(boxes) < limit and not run.failure:
            made = client.post("/v1/sandboxes", json={"policy": policy})
            if made.status_code == 503:
                run.failure = "admission refused: " + made.json().get("detail", "")
                break
            if made.status_code != 201:
                run.failure = f"create failed ({made.status_code}): {made.text[:200]}"
                break
            box = Sandbox(made.json()["id"], random.Random(f"{args.seed}/{len(boxes)}"))
            boxes.append(box)
            setup = run_exec(client, box.id, SETUP, origin)
            if setup.error is not None:
                run.failure = f"sandbox {box.id}: writing its data failed: {setup.error}"
            else:
                box.thread = threading.Thread(target=bursts, args=(client, box, run, args.interval, args.bound,
                                                                   origin, stop, closed), daemon=True)
                box.thread.start()
            settle_until = time.monotonic() + settle
            while time.monotonic() < settle_until and not run.failure:
                time.sleep(SAMPLE_S)
                run.failure = check(cgroup, boxes, ooms, args.bound)
            running, parked, moving, run.parks = states(client)
            worst = max((e.seconds for e in run.execs), default=0.0)
            moving_ = f", {moving} booting, parking or resuming" if moving else ""
            print(f"[{name}] {len(boxes)} sandboxes ({running} running, {parked} parked{moving_}, {run.parks} "
                  f"parks), cgroup {cgroup.usage_bytes() >> 20} MiB of {cgroup.limit_bytes >> 20} MiB "
                  f"({page_cache(cgroup) >> 20} MiB page cache), "
                  f"{len(run.execs)} commands, worst {worst:.1f} s{': ' + run.failure if run.failure else ''}",
                  file=sys.stderr, flush=True)
        run.added = len(boxes)
        _, run.parked_at_end, _, run.parks = states(client)
    finally:
        stop.set()
        sampler.join(JOIN_S)
        deadline = time.monotonic() + JOIN_S
        for box in boxes:
            if box.thread is not None:
                box.thread.join(max(0.0, deadline - time.monotonic()))
        closed.set()
    return run


def page_cache(cgroup: MemoryCgroup) -> int:
    """The page cache charged to the cgroup (the parked snapshots the daemon wrote, until the kernel reclaims
    them): part of its usage, but not what the sandboxes hold."""
    key = "file" if cgroup.v2 else "total_cache"
    for line in (cgroup.path / "memory.stat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def check(cgroup: MemoryCgroup, boxes: list[Sandbox], ooms: int, bound: float) -> str:
    """The first failure seen, or ""."""
    if cgroup.oom_kills() > ooms:
        return f"the kernel OOM-killed a process in the cgroup ({len(boxes)} sandboxes)"
    for box in boxes:
        if box.failure:
            return box.failure
        since = box.busy_since
        if since is not None and time.monotonic() - since > bound:
            return f"sandbox {box.id}: a command has run for more than {bound:.0f} s"
    return ""


def sample(client: httpx.Client, cgroup: MemoryCgroup, run: BurstyRun, origin: float, stop: threading.Event) -> None:
    """Every SAMPLE_S seconds until the run stops, creates and their admission waits included."""
    while not stop.wait(SAMPLE_S):
        try:
            running, parked, moving, _ = states(client)
        except (httpx.HTTPError, RuntimeError):
            continue
        run.samples.append((time.monotonic() - origin, cgroup.usage_bytes(), page_cache(cgroup), running, parked,
                            moving))
