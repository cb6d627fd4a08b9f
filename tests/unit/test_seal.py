"""The sealed stream format: round trips, and every tampering refused with a SealError that names no key."""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from memvisor.snapshot import seal
from memvisor.snapshot.seal import CHUNK_BYTES, Ident, SealError, SealWriter

MiB = 1 << 20
IDENT = Ident("abc", 3)


@pytest.fixture
def key() -> bytes:
    return bytes(seal.new_key())


def write(path: Path, key: bytes, data: bytes, ident: Ident = IDENT, stream: str = "vm",
          pieces: int = 1) -> SealWriter:
    """Seal `data` into `path`, handed to the writer in `pieces` uneven parts."""
    with SealWriter(path, key, ident, stream) as w:
        step = max(1, len(data) // pieces + 7)
        for i in range(0, len(data), step):
            w.write(memoryview(data)[i:i + step])
    return w


def records(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of each chunk record (length prefix included) of a well-formed file."""
    raw = path.read_bytes()
    out, pos = [], len(seal.MAGIC)
    while pos < len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        out.append((pos, 4 + n))
        pos += 4 + n
    return out


def no_key_in(exc: BaseException, *keys: bytes) -> None:
    text = f"{exc} {exc!r} {getattr(exc, 'hint', '')}"
    for k in keys:
        for form in (k.hex(), repr(k), base64.b64encode(k).decode(), str(list(k))):
            assert form not in text


@pytest.mark.parametrize("size", [0, 1, CHUNK_BYTES, CHUNK_BYTES * 5 // 2])
@pytest.mark.parametrize("pieces", [1, 5])
def test_round_trip(tmp_path: Path, key: bytes, size: int, pieces: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "vm.snap"
    w = write(path, key, data, pieces=pieces)
    assert w.plaintext_bytes == size
    assert w.file_bytes == path.stat().st_size
    assert path.stat().st_mode & 0o777 == 0o600
    # Full chunks, then a final one with the rest (empty when the size is a multiple of a chunk).
    assert len(records(path)) == size // CHUNK_BYTES + 1
    assert b"".join(seal.read_chunks(path, key, IDENT, "vm")) == data
    assert seal.verify(path, key, IDENT, "vm") == size


def test_streams_of_one_snapshot_use_distinct_nonces(tmp_path: Path, key: bytes) -> None:
    data = bytes(1000)
    write(tmp_path / "vm.snap", key, data, stream="vm")
    write(tmp_path / "ram.snap", key, data, stream="ram")
    assert (tmp_path / "vm.snap").read_bytes() != (tmp_path / "ram.snap").read_bytes()


def test_unknown_stream_is_refused(tmp_path: Path, key: bytes) -> None:
    with pytest.raises(ValueError, match="unknown snapshot stream 'disk'"):
        SealWriter(tmp_path / "disk.snap", key, IDENT, "disk")
    assert not (tmp_path / "disk.snap").exists()
    with pytest.raises(ValueError, match="unknown snapshot stream"):
        seal.verify(tmp_path / "disk.snap", key, IDENT, "disk")


def test_writer_never_overwrites(tmp_path: Path, key: bytes) -> None:
    (tmp_path / "vm.snap").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        SealWriter(tmp_path / "vm.snap", key, IDENT, "vm")
    assert (tmp_path / "vm.snap").read_bytes() == b"x"


def test_aborted_writer_leaves_no_file(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "vm.snap"
    with pytest.raises(RuntimeError), SealWriter(path, key, IDENT, "vm") as w:
        w.write(os.urandom(CHUNK_BYTES * 2 + 5))
        raise RuntimeError("migration failed")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_write_can_never_be_closed_into_a_valid_stream(tmp_path: Path, key: bytes,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vm.snap"
    w = SealWriter(path, key, IDENT, "vm")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w, "_seal", full)
    with pytest.raises(OSError):
        w.write(os.urandom(CHUNK_BYTES))
    with pytest.raises(SealError, match="a write failed earlier"):
        w.close()
    assert not path.exists()


def test_write_after_close(tmp_path: Path, key: bytes) -> None:
    w = write(tmp_path / "vm.snap", key, b"x")
    with pytest.raises(ValueError, match="write after close"):
        w.write(b"y")
    w.close()  # a second close does nothing


def sealed(tmp_path: Path, key: bytes, size: int = CHUNK_BYTES * 5 // 2) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "vm.snap"
    write(path, key, data)
    return path, data


def refused(path: Path, key: bytes, match: str | None, ident: Ident = IDENT, stream: str = "vm") -> SealError:
    with pytest.raises(SealError, match=match) as info:
        seal.verify(path, key, ident, stream)
    no_key_in(info.value, key)
    assert "\n" not in str(info.value)
    return info.value


def test_every_flipped_byte_is_refused(tmp_path: Path, key: bytes) -> None:
    path, _ = sealed(tmp_path, key, size=40)
    good = path.read_bytes()
    for pos in range(len(good)):
        bad = bytearray(good)
        bad[pos] ^= 0x01
        path.write_bytes(bytes(bad))
        refused(path, key, None)


@pytest.mark.parametrize("where", ["first", "middle", "tag"])
def test_flipped_byte_in_a_big_chunk(tmp_path: Path, key: bytes, where: str) -> None:
    path, _ = sealed(tmp_path, key)
    offset, length = records(path)[1]
    pos = {"first": offset + 4, "middle": offset + length // 2, "tag": offset + length - 1}[where]
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 0x80
    path.write_bytes(bytes(raw))
    refused(path, key, r"^vm.snap: chunk 1 failed authentication \(changed, reordered, or another sandbox's")


def test_no_chunk_is_yielded_before_its_tag_is_checked(tmp_path: Path, key: bytes) -> None:
    path, data = sealed(tmp_path, key)
    offset, _ = records(path)[1]
    raw = bytearray(path.read_bytes())
    raw[offset + 10] ^= 1
    path.write_bytes(bytes(raw))
    got = []
    with pytest.raises(SealError, match="chunk 1 failed"):
        for chunk in seal.read_chunks(path, key, IDENT, "vm"):
            got.append(chunk)
    assert got == [data[:CHUNK_BYTES]]


def test_dropped_final_chunk(tmp_path: Path, key: bytes) -> None:
    path, _ = sealed(tmp_path, key)
    offset, _ = records(path)[-1]
    os.truncate(path, offset)
    refused(path, key, r"^vm.snap is truncated: no final chunk after 2 chunks \(2 MiB\)$")


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 1000, -1])
def test_cut_mid_chunk(tmp_path: Path, key: bytes, cut: int) -> None:
    path, _ = sealed(tmp_path, key)
    offset, length = records(path)[1]
    os.truncate(path, offset + (cut if cut > 0 else length + cut))
    refused(path, key, r"^vm.snap is truncated")


def test_cut_to_the_magic(tmp_path: Path, key: bytes) -> None:
    path, _ = sealed(tmp_path, key)
    os.truncate(path, len(seal.MAGIC))
    refused(path, key, r"no final chunk after 0 chunks")
    os.truncate(path, 3)
    refused(path, key, r"^vm.snap is not a sealed snapshot \(bad magic\)$")


def test_swapped_chunks(tmp_path: Path, key: bytes) -> None:
    path, _ = sealed(tmp_path, key)
    raw = path.read_bytes()
    (a, alen), (b, blen) = records(path)[:2]
    path.write_bytes(raw[:a] + raw[b:b + blen] + raw[a:a + alen] + raw[b + blen:])
    refused(path, key, r"chunk 0 failed authentication")


@pytest.mark.parametrize("ident, stream", [
    (Ident("abd", 3), "vm"),  # another sandbox's snapshot
    (Ident("abc", 2), "vm"),  # an older generation (even under the same key, which would be a bug)
    (Ident("abc", 4), "vm"),
    (IDENT, "ram"),  # the vm stream read as the ram stream
])
def test_another_snapshot_or_stream(tmp_path: Path, key: bytes, ident: Ident, stream: str) -> None:
    path, _ = sealed(tmp_path, key)
    refused(path, key, r"chunk 0 failed authentication", ident=ident, stream=stream)


def test_another_key(tmp_path: Path, key: bytes) -> None:
    path, _ = sealed(tmp_path, key)
    refused(path, bytes(seal.new_key()), r"chunk 0 failed authentication")


@pytest.mark.parametrize("extra", [
    lambda raw, last: raw[last[0]:last[0] + last[1]],  # a copy of the final chunk
    lambda raw, last: b"\x00",
    lambda raw, last: b"\x10\x00\x00\x00" + bytes(16),
    lambda raw, last: b"\xff\xff\xff\xff",
])
def test_data_after_the_final_chunk(tmp_path: Path, key: bytes,
                                    extra: Callable[[bytes, tuple[int, int]], bytes]) -> None:
    path, _ = sealed(tmp_path, key)
    raw = path.read_bytes()
    path.write_bytes(raw + extra(raw, records(path)[-1]))
    refused(path, key, r"^vm.snap has data after its final chunk")


@pytest.mark.parametrize("length, match", [
    (0xFFFFFFFF, r"^vm.snap: chunk 0 length 4294967295 is over the limit"),
    (CHUNK_BYTES + 17, r"is over the limit"),
    (15, r"chunk 0 length 15 is shorter than its 16-byte tag"),
])
def test_bad_length_prefix(tmp_path: Path, key: bytes, length: int, match: str) -> None:
    path, _ = sealed(tmp_path, key)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, len(seal.MAGIC), length)
    path.write_bytes(bytes(raw))
    refused(path, key, match)


def test_missing_file(tmp_path: Path, key: bytes) -> None:
    refused(tmp_path / "vm.snap", key, r"cannot read .*vm.snap")


DIGEST = bytes(range(32))


def test_key_wrap_round_trip() -> None:
    host, key = seal.new_key(), seal.new_key()
    assert isinstance(key, bytearray)  # so its owner can zero it
    wrapped = seal.wrap_key(host, key, IDENT, "sandbox", DIGEST)
    assert len(wrapped) == seal.WRAPPED_BYTES
    assert bytes(key) not in wrapped
    assert seal.wrap_key(host, key, IDENT, "sandbox", DIGEST) != wrapped  # a random nonce each time
    assert seal.unwrap_key(host, wrapped, IDENT, "sandbox", DIGEST) == key


@pytest.mark.parametrize("change", ["id", "generation", "kind", "digest", "host key", "flip", "short"])
def test_key_unwrap_refusals(change: str) -> None:
    """The wrap binds the kind, id, generation and manifest digest: any other is refused."""
    host, key = seal.new_key(), seal.new_key()
    wrapped = seal.wrap_key(host, key, IDENT, "sandbox", DIGEST)
    ident, other_host, kind, digest = IDENT, host, "sandbox", DIGEST
    if change == "id":
        ident = Ident("abd", 3)
    elif change == "generation":
        ident = Ident("abc", 2)
    elif change == "kind":
        kind = "template"
    elif change == "digest":
        digest = bytes(31) + b"\x01"
    elif change == "host key":
        other_host = seal.new_key()
    elif change == "flip":
        wrapped = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
    else:
        wrapped = wrapped[:-1]
    with pytest.raises(SealError, match=rf"^the snapshot key of {kind} {ident.sandbox_id} generation "
                                        rf"{ident.generation} does not unwrap: ") as info:
        seal.unwrap_key(other_host, wrapped, ident, kind, digest)
    no_key_in(info.value, bytes(key), bytes(host), bytes(other_host))


def test_a_template_stream_never_verifies_as_a_sandbox_stream(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "template-vm.snap"
    write(path, key, b"device state", stream="template-vm")
    assert seal.verify(path, key, IDENT, "template-vm") == len(b"device state")
    for stream in ("vm", "template-ram"):
        with pytest.raises(SealError, match="failed authentication"):
            seal.verify(path, key, IDENT, stream)
    assert len(set(seal.STREAMS.values())) == len(seal.STREAMS) == 4


def test_the_writer_zeroes_its_plaintext_buffer(tmp_path: Path, key: bytes) -> None:
    w = SealWriter(tmp_path / "vm.snap", key, IDENT, "vm")
    w.write(b"secret guest page" * 100)
    assert bytes(w._buffer[:17]) == b"secret guest page"
    w.close()
    assert not any(w._buffer)


def test_bad_key_lengths_name_no_key(tmp_path: Path) -> None:
    short = os.urandom(16)
    for call in (lambda: SealWriter(tmp_path / "vm.snap", short, IDENT, "vm"),
                 lambda: seal.wrap_key(short, seal.new_key(), IDENT, "sandbox", DIGEST),
                 lambda: seal.wrap_key(seal.new_key(), short, IDENT, "sandbox", DIGEST),
                 lambda: seal.unwrap_key(short, bytes(seal.WRAPPED_BYTES), IDENT, "sandbox", DIGEST)):
        with pytest.raises(ValueError, match="must be 32 bytes, not 16") as info:
            call()
        no_key_in(info.value, short)
    assert not (tmp_path / "vm.snap").exists()


def test_reprs_name_no_key(tmp_path: Path, key: bytes) -> None:
    w = SealWriter(tmp_path / "vm.snap", key, IDENT, "vm")
    try:
        text = repr(w) + repr(IDENT) + repr(vars(w).get("ident"))
        assert key.hex() not in text and repr(key) not in text
    finally:
        w.abort()


@pytest.mark.parametrize("sandbox_id, gen", [("", 1), ("abc", -1), ("abc", 1 << 64), ("abc", True)])
def test_ident_is_checked(sandbox_id: str, gen: int) -> None:
    with pytest.raises(ValueError):
        Ident(sandbox_id, gen)
