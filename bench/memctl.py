"""memctl benchmark: ranges the host applies per second, and a request's end-to-end latency in a real guest.

Host side: memvisor.host.memctl.Backing.handle on a 1 GiB memfd (touched first, so FREE frees real pages),
with batches of 1, 64 and 4096 page-sized ranges (every other page, so no two ranges merge), for --seconds
each: what the host's validator and system calls sustain, the codec's decode included.

End to end: a sandbox (memctl on, TCG here) whose root workload asks PID 1 to FREE 1, 64 and 4096 pages of
an mlocked buffer at once, --rounds times each: the time from the request on the socket to the answer
(PID 1 freezes the caller's cgroup, reads its page tables, sends MEMCTL, the host punches, the answer comes
back, PID 1 thaws). The pages are touched again before each round. Issue 10's goal: >= 50,000 ranges/s on
the host; the latency is reported as measured.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time

from memvisor import proto
from memvisor.host import memctl

BATCHES = (1, 64, 4096)
GUEST = r"""
import ctypes, json, mmap, socket, sys, time
rounds = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
out = {}
for pages in (1, 64, 4096):
    buf = mmap.mmap(-1, pages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(pages * 4096)) == 0
    times, ranges = [], []
    for _ in range(rounds):
        for i in range(0, pages * 4096, 4096):
            buf[i] = 1
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect("/run/memvisor/memctl.sock")
        t = time.perf_counter()
        s.send(json.dumps({"op": "advise", "code": "FREE", "address": addr, "length": pages * 4096}).encode())
        answer = json.loads(s.recv(65536))
        times.append(time.perf_counter() - t)
        s.close()
        assert answer["ok"], answer
        ranges.append(answer["ranges"])
    out[pages] = {"seconds": times, "ranges": ranges}
print("RESULT " + json.dumps(out))
"""


def host_rate(batch: int, seconds: float) -> tuple[float, int]:
    """Ranges applied per second with `batch` ranges per request (codec decode + validate + punch)."""
    backing = memctl.Backing(1024)
    try:
        ctypes.memset(backing.addr, 1, backing.size)
        ranges = [[2 * i * proto.PAGE, proto.PAGE] for i in range(batch)]
        frame = proto.encode(proto.Kind.MEMCTL, {"seq": 1, "code": "FREE", "ranges": ranges})
        decoder = proto.Decoder()
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            backing._tokens = float(memctl.BURST)  # the rate limit guards a sandbox, not this loop
            (parsed,) = decoder.feed(frame)
            assert isinstance(parsed, proto.Frame) and parsed.body is not None
            assert backing.handle(parsed.body)["ok"]
            done += batch
        elapsed = time.perf_counter() - start
        return done / elapsed, done
    finally:
        backing.close()


def guest_latency(rounds: int) -> dict[str, dict[str, list[float]]]:
    argv = [sys.executable, "-m", "memvisor", "-q", "run", "--memctl", "--no-balloon", "--root", "--memory", "256",
            "--", "python3", "-S", "-c", GUEST, str(rounds)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"memctl bench: the guest run failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, dict[str, list[float]]] = json.loads(line[7:])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="host-side seconds per batch size")
    parser.add_argument("--rounds", type=int, default=20, help="end-to-end requests per size")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    host = {batch: host_rate(batch, args.seconds) for batch in BATCHES}
    guest = guest_latency(args.rounds)
    print(f"{'batch (ranges or pages)':>24} {'host ranges/s':>14} {'e2e median ms':>14} {'e2e p95 ms':>11} "
          f"{'ranges per e2e request':>23}")
    for batch in BATCHES:
        rate, _ = host[batch]
        g = guest[str(batch)]
        times = sorted(g["seconds"])
        p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
        print(f"{batch:>24} {rate:>14,.0f} {statistics.median(times) * 1000:>14.2f} {p95 * 1000:>11.2f} "
              f"{statistics.median(g['ranges']):>23.0f}")
    worst = min(rate for rate, _ in host.values())
    print(f"goal >= 50,000 ranges/s on the host: {'met' if host[4096][0] >= 50_000 else 'NOT met'} "
          f"(batches of 4096: {host[4096][0]:,.0f}/s; slowest batch size: {worst:,.0f}/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"host": {str(b): r for b, (r, _) in host.items()}, "guest": guest}, f)


if __name__ == "__main__":
    main()
