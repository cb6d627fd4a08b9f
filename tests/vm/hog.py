"""A memory hog that runs inside the guest (sent as `python3 -S -c SOURCE MIB MARKER HOLD`).

It fills MIB MiB with pages that each repeat MARKER, prints `FILLED <seconds>`, waits HOLD seconds (the host
looks at or tampers with the swap file meanwhile), reads everything back and prints
`VERIFIED <MiB> bad <MiB whose contents changed> <seconds>`. bench/swap.py uses it too. Only builtins and
the modules the guest image has at boot.
"""

import sys
import time

mib, marker, hold = int(sys.argv[1]), sys.argv[2].encode(), float(sys.argv[3])
page = bytearray((marker * (4096 // len(marker) + 1))[:4096])
one_mib = page * 256
# 1 MiB at a time: a single huge allocation would be refused up front by the overcommit heuristic, while this
# is real pressure (reclaim, swap, or the OOM killer). Touching it all pushes the oldest pages out to swap.
start = time.monotonic()
chunks = [page * 256 for _ in range(mib)]
filled = time.monotonic()
print("FILLED", round(filled - start, 3), flush=True)
time.sleep(hold)
start = time.monotonic()
bad = sum(1 for chunk in chunks if chunk != one_mib)
print("VERIFIED", mib, "bad", bad, round(time.monotonic() - start, 3), flush=True)
