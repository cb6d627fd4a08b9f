"""zram: a compressed swap device in guest RAM, in front of the disk swap. Guest only, stdlib only."""

from __future__ import annotations

import os

SYS = "/sys/block/zram0"


def setup(algorithm: str, size_bytes: int) -> str:
    """Configure /dev/zram0 (the zram module must be loaded) and return its device path."""
    with open(f"{SYS}/comp_algorithm") as f:
        offered = f.read().replace("[", "").replace("]", "").split()
    if algorithm not in offered:
        raise OSError(95, f"zram algorithm {algorithm} is not available (kernel offers {', '.join(offered)})")
    with open(f"{SYS}/comp_algorithm", "w") as f:
        f.write(algorithm)
    with open(f"{SYS}/disksize", "w") as f:
        f.write(str(size_bytes))
    return "/dev/zram0"


def stats() -> dict[str, int]:
    """mm_stat: orig_data_size, compr_data_size, mem_used_total (bytes) — Documentation/admin-guide/blockdev/zram."""
    if not os.path.exists(f"{SYS}/mm_stat"):
        return {}
    with open(f"{SYS}/mm_stat") as f:
        fields = [int(x) for x in f.read().split()]
    return {"orig_data_size": fields[0], "compr_data_size": fields[1], "mem_used_total": fields[2]}
