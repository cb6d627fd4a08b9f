"""Freed swap goes back to the host: with `swap_discard`, a running sandbox that swaps out and then frees that
memory leaves fewer allocated blocks in the host's swap file, while it keeps running; without it, they stay.
Confidential swap discards too, and nothing the host writes over a discarded or a live block is served.

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
from tests.vm.lab import BLOCK, Lab, SwapFile, lab_policy

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



def test_confidential_discards_and_never_serves_what_the_host_writes(image: Image) -> None:
    """Confidential swap gives freed swap back too, and whatever the host writes over a block is never served:
    over a discarded block, the guest writes before it ever reads it again; over a live block, the tag only the
    guest holds (dm-integrity's own SHA-256 here: it passes discards only when it hashes itself) refuses it.

    16 MiB of swap, nearly full: region d out, a filler around it, d freed (its clusters are discarded: the host
    file gets holes there), the host writes d's old ciphertext and random bytes over all of d's blocks, region f
    goes out into those very blocks and reads back intact; then the host writes the old ciphertext (a replay)
    and random bytes over some of f's live blocks, and exactly those pages fail."""
    with Instance(lab_policy("confidential", swap_mib=16, discard=True), image) as vm:
        lab = Lab(vm)
        swap = SwapFile(lab, "confidential")
        [disk] = lab.swap["devices"]  # 16 MiB: one segment
        assert disk["discard"] is True and "allow_discards" in disk["table"][1]
        assert "internal_hash:sha256" in disk["table"][0] and "meta_device:" in disk["table"][0]
        lab("alloc", "d", 1536)
        d = lab.out("d")
        lab("alloc", "filler", 2304)
        lab.out("filler")
        old = {slot: swap.read(swap.data(slot), BLOCK) for slot in d}
        assert swap.holes(d) == []
        lab("free", "d")
        # Discards run after the free, asynchronously; the last freed slots (up to 64 per CPU) may wait in the
        # kernel's swap-slot cache, so one or two of d's 6 clusters may not be free yet.
        deadline = time.monotonic() + 30
        while len(discarded := swap.holes(d)) < len(d) - 512 and time.monotonic() < deadline:
            time.sleep(0.2)
        for i, slot in enumerate(d):
            swap.write(swap.data(slot), old[slot] if i % 2 else os.urandom(BLOCK))
        lab("alloc", "f", 1024)
        lab("write", "f", "C")
        f = lab.out("f")
        reused = set(f) & set(discarded)
        first = lab("check", "f")["pages"]
        assert lab.out("f") == f  # the checked pages out again, to the same slots
        replayed = [i for i, slot in enumerate(f) if i % 4 == 0 and slot in old]
        forged = list(range(1, len(f), 4))
        for i in replayed:
            swap.write(swap.data(f[i]), old[f[i]])
        for i in forged:
            swap.write(swap.data(f[i]), os.urandom(BLOCK))
        second = lab("check", "f")["pages"]
        lab.close()
    assert len(discarded) >= len(d) - 512, f"only {len(discarded)} of {len(d)} freed blocks left the host file"
    assert len(reused) >= 512, f"f reused only {len(reused)} discarded blocks: the check would prove little"
    assert first == ["C"] * 1024, "host-written data in a discarded block was served"
    assert len(replayed) >= 128
    bad = set(replayed) | set(forged)
    assert [p for i, p in enumerate(second) if i in bad] == ["SIGBUS"] * len(bad)
    assert [p for i, p in enumerate(second) if i not in bad] == ["C"] * (1024 - len(bad))
