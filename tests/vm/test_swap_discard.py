"""Freed swap goes back to the host: with `swap_discard`, a running sandbox that swaps out and then frees that
memory leaves fewer allocated blocks in the host's swap file, while it keeps running; without it, they stay.

Asserted from the host (the file's allocated blocks), the guest (its swap device reports discard) and the VMM
command line (discard=unmap only when asked)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

from memvisor import policy
from memvisor.host.sandbox import Instance
from memvisor.image.build import Image

# Fill 150 MiB in a 128 MiB guest (most of it goes to swap), free it, and stay up a while.
ALLOC_FREE = """
import time
chunks = [bytearray(b"%d" % i * (1 << 20)) for i in range(150)]
print("ALLOCATED", flush=True)
time.sleep(3)
del chunks
print("FREED", flush=True)
time.sleep(25)
print("DONE", flush=True)
"""


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def run_alloc_free(image: Image, discard: bool) -> tuple[int, int, str, dict[str, object]]:
    """(allocated bytes once the memory was swapped out, the least seen after it was freed, the VMM argv,
    the guest's swap device report)."""
    pol = policy.merge(("test", {"memory_mib": 128, "swap_size_mib": 512, "swap_mode": "encrypted",
                                 "swap_discard": discard, "timeout": 300}))
    seen: dict[str, int] = {}
    with Instance(pol, image) as vm:
        def stdout(data: bytes) -> None:
            if b"ALLOCATED" in data:
                seen["full"] = allocated(vm.swap_path)
            if b"FREED" in data:
                # Poll while the guest sleeps after freeing: the drop must come while the sandbox runs.
                deadline = time.monotonic() + 20
                least = allocated(vm.swap_path)
                while time.monotonic() < deadline and least > seen["full"] // 4:
                    time.sleep(0.5)
                    least = min(least, allocated(vm.swap_path))
                seen["least"] = least
                assert vm.process is not None and vm.process.poll() is None
        result = vm.run(["python3", "-S", "-c", ALLOC_FREE], on_stdout=stdout)
        assert vm.process is not None
        argv = " ".join(psutil.Process(vm.process.pid).cmdline()) if vm.process.poll() is None else " ".join(vm.argv)
    assert result.exit_code == 0, result.stderr
    disk = next(d for d in result.report["swap"]["devices"] if d["kind"] == "disk")
    return seen["full"], seen["least"], argv, disk


def test_freed_swap_shrinks_the_host_file_while_the_sandbox_runs(image: Image) -> None:
    full, least, argv, disk = run_alloc_free(image, discard=True)
    assert disk["discard"] is True
    assert "discard=unmap" in argv
    assert full > 40 * 2**20, f"only {full >> 20} MiB reached the swap file"
    assert least < full // 4, f"host file still holds {least >> 20} of {full >> 20} MiB after the guest freed it"


def test_without_discard_freed_swap_stays_allocated(image: Image) -> None:
    full, least, argv, disk = run_alloc_free(image, discard=False)
    assert disk["discard"] is False
    assert "discard=ignore" in argv
    assert full > 40 * 2**20
    assert least >= full * 0.9, "blocks were given back although discard is off"

