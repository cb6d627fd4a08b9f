"""zram: a compressed swap device in guest RAM, in front of the disk swap. Guest only, stdlib only."""

from __future__ import annotations

import errno

SYS = "/sys/block/zram0"


def setup(algorithm: str, size_bytes: int) -> str:
    """Configure /dev/zram0 (the zram module must be loaded) and return its device path."""
    with open(f"{SYS}/comp_algorithm") as f:
        offered = f.read().replace("[", "").replace("]", "").split()
    if algorithm not in offered:
        raise OSError(errno.EOPNOTSUPP,
                      f"zram algorithm {algorithm} is not available (kernel offers {', '.join(offered)})")
    with open(f"{SYS}/comp_algorithm", "w") as f:
        f.write(algorithm)
    with open(f"{SYS}/disksize", "w") as f:
        f.write(str(size_bytes))
    return "/dev/zram0"
