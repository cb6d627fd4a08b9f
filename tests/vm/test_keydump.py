"""The swap key never leaves the guest kernel (issue 12): after set-up, a dump of the whole guest RAM holds the key
only inside the kernel's own cipher state, in freed memory included.

The guest runs in the test-only hand-over mode (host/sandbox.py `key_handover`): it also writes the key to a disk
of the test's, with O_DIRECT straight from the page the key was generated in, so the hand-over leaves no copy of
its own. The dump is QMP `dump-guest-memory` (paused guest, every physical page).

What is allowed, and why:
  - encrypted (aes-xts-plain64, a 64-byte key = two AES-256 keys): the raw key bytes may appear only as the first
    round keys of an AES-256 encryption key schedule, or as the last round key of a decryption schedule (the
    kernel's `struct crypto_aes_ctx` and aesni's equivalent); every occurrence is checked by expanding the key.
  - authenticated and confidential (aegis128): the cipher's context is the raw 16-byte key itself, so at most
    one copy.
Never: the whole XTS key in one piece, the key as hex text, or any other copy (a Python buffer, a freed ioctl
or keyring buffer). A copy that is still referenced makes the test fail (tried: a Python `bytes` of the key
kept alive fails it). A copy freed early may be overwritten before the dump (freed pages are reused at once and
zeroed on allocation; pymalloc reuses a freed block for the next object of its size), so this test cannot prove
that no transient copy ever existed: guest/swapstack.py keeps the key in one page it zeroes, and never in a str.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memvisor import policy
from memvisor.host.sandbox import Instance
from memvisor.host.vmm.qmp import QMP
from memvisor.image.build import Image


def _sbox() -> list[int]:
    """The AES S-box, computed (FIPS-197 5.1.1): the multiplicative inverse in GF(2^8), then the affine map."""
    box = [0] * 256
    p = q = 1
    while True:
        p = p ^ ((p << 1) & 0xFF) ^ (0x1B if p & 0x80 else 0)  # p *= 3
        q ^= q << 1
        q ^= q << 2
        q ^= q << 4
        q &= 0xFF
        if q & 0x80:
            q ^= 0x09  # q /= 3
        x = q ^ (q << 1 | q >> 7) ^ (q << 2 | q >> 6) ^ (q << 3 | q >> 5) ^ (q << 4 | q >> 4)
        box[p] = (x ^ 0x63) & 0xFF
        if p == 1:
            break
    box[0] = 0x63
    return box


SBOX = _sbox()


def aes256_schedule(key: bytes) -> bytes:
    """The 240-byte AES-256 encryption key schedule (FIPS-197 5.2), as the kernel stores it in memory."""
    assert len(key) == 32
    words = [list(key[i:i + 4]) for i in range(0, 32, 4)]
    rcon = 1
    for i in range(8, 60):
        temp = list(words[i - 1])
        if i % 8 == 0:
            temp = [SBOX[b] for b in temp[1:] + temp[:1]]
            temp[0] ^= rcon
            rcon = (rcon << 1) ^ (0x11B if rcon & 0x80 else 0)
        elif i % 8 == 4:
            temp = [SBOX[b] for b in temp]
        words.append([a ^ b for a, b in zip(words[i - 8], temp, strict=True)])
    return bytes(b for w in words for b in w)


def test_aes256_schedule_matches_fips197() -> None:
    """FIPS-197 appendix A.3: the last round key of the example key's schedule."""
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    assert SBOX[0x53] == 0xED and SBOX[0x00] == 0x63
    assert aes256_schedule(key)[224:].hex() == "fe4890d1e6188d0b046df344706c631e"


def occurrences(ram: bytes, needle: bytes) -> list[int]:
    found, at = [], ram.find(needle)
    while at >= 0:
        found.append(at)
        at = ram.find(needle, at + 1)
    return found


def unexplained_xts_copies(ram: bytes, key: bytes) -> list[str]:
    """Every place a 16-byte piece of a 64-byte XTS key lies in `ram` that is not inside an AES-256 key schedule
    of one of its halves; plus a note if no schedule was found at all (then the key handed over is not the one
    in use, and the test would prove nothing)."""
    bad, schedules = [], 0
    for half in (key[:32], key[32:]):
        enc = aes256_schedule(half)
        for piece in (0, 16):
            for at in occurrences(ram, half[piece:piece + 16]):
                start = at - piece
                if ram[start:start + 240] == enc:  # round keys 0 and 1 of an encryption schedule
                    schedules += 1
                    continue
                if piece == 0 and ram[at - 224:at - 208] == enc[224:240]:  # a decryption schedule's last round
                    continue
                bad.append(f"key bytes {piece}..{piece + 16} of a half at guest-dump offset {at:#x}")
    if schedules == 0:
        bad.append("no AES-256 schedule of the key found: the handed-over key is not the one dm-crypt uses")
    return bad


def dump_ram(vm: Instance, path: Path) -> bytes:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with QMP(vm.qmp_path, "memvisor-test") as qmp:
            qmp.dump_memory(fd)
    finally:
        os.close(fd)
    return path.read_bytes()


@pytest.mark.parametrize("mode", ["encrypted", "authenticated", "confidential"])
def test_the_swap_key_exists_only_in_the_guest_kernels_cipher_state(image: Image, tmp_path: Path,
                                                                     mode: str) -> None:
    handover = tmp_path / "key"
    handover.write_bytes(bytes(4096))
    pol = policy.merge(("test", {"memory_mib": 128, "swap_mode": mode, "swap_size_mib": 64}))
    with Instance(pol, image, key_handover=handover) as vm:
        ready = vm.wait_ready()
        assert ready is not None and ready["swap"]["effective"] == mode
        size = 64 if mode == "encrypted" else 16  # memvisor/guest/swapstack.py: XTS, AEADS[0]
        key = handover.read_bytes()[:size]
        assert key != bytes(size), "the guest did not hand its key over"
        ram = dump_ram(vm, tmp_path / "ram.elf")
    assert len(ram) > 128 << 20
    as_text = [ram.count(text.encode()) for text in (key.hex(), key.hex().upper())]
    assert as_text == [0, 0], "the key as hex text is in guest RAM"
    if mode == "encrypted":
        whole = ram.count(key)
        assert whole == 0, f"the whole XTS key lies in guest RAM in one piece, {whole} time(s)"
        assert unexplained_xts_copies(ram, key) == []
    else:
        copies = ram.count(key)
        assert copies == 1, f"aegis128's context holds the key once; found {copies} copies"
