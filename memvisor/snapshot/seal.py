"""The sealed stream format of a parked sandbox's snapshot: encryption, authentication and framing, nothing else.

A snapshot is a few named streams (STREAMS: "vm" is QEMU's migration stream, "ram" the guest memory kept outside
it; a template's are "template-vm" and "template-ram", so no template stream ever verifies as a sandbox's), each in
a file of its own, all sealed under one fresh random AES-256-GCM key per snapshot (a *generation*). That key is
stored only wrapped (`wrap_key`, under a subkey of the host key, keys.py) with the snapshot's kind, id, generation
and manifest digest in the wrap's associated data, so the wrap authenticates the whole manifest (manifest.py).
A stream file is:

    b"MVSEAL01"  then chunks  [u32 little-endian L][L bytes: ciphertext || 16-byte tag]

Each chunk seals at most CHUNK_BYTES of plaintext; the last one is marked final (its plaintext may be empty, so
a writer can always close with one). The AAD of a chunk binds the magic, stream name, sandbox id, generation,
chunk index and final flag, so a flipped byte, a reordered, dropped or appended chunk, a truncated file, another
stream's, sandbox's or generation's file are all refused with a SealError naming the file and chunk.

Nonces are (stream number, chunk index) and never repeat under one key: the key is fresh for every generation
(`new_key`, never reused for a second snapshot), the stream number is unique per stream name (STREAMS), each
stream is written once per snapshot (SealWriter creates its file O_EXCL), and the chunk index only increments.

This module owns no files beyond the one a SealWriter writes and never decides where snapshots live or which
generation is current (statedir.py does); it must never put a key into a message, a repr or a log. Keys it makes
are bytearrays (the caller zeroes them when done), and a SealWriter's plaintext goes through one buffer of its own,
zeroed when it closes; the plaintext chunks read_chunks yields and AESGCM's internal copies of keys are immutable
objects of the `cryptography` package that Python cannot overwrite (freed at once, not zeroed).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import BinaryIO, Final, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from memvisor.errors import MemvisorError

MAGIC: Final = b"MVSEAL01"
CHUNK_BYTES: Final = 1 << 20  # plaintext per chunk: big enough for ~3 GB/s, small enough to verify before use
TAG_BYTES: Final = 16
MAX_RECORD: Final = CHUNK_BYTES + TAG_BYTES  # the largest length prefix accepted, checked before reading
KEY_BYTES: Final = 32  # AES-256
NONCE_BYTES: Final = 12
KEY_LABEL: Final = b"memvisor-snapshot-key/2"  # AAD label of a wrapped key: never valid as a chunk's AAD
WRAPPED_BYTES: Final = NONCE_BYTES + KEY_BYTES + TAG_BYTES

# Stream name -> the number in its nonces. Fixed forever: a number must never be reused for another name,
# or two streams of one snapshot would share nonces under one key. A template's streams have names (and so AAD
# labels) of their own.
STREAMS: Final[Mapping[str, int]] = MappingProxyType({"vm": 1, "ram": 2, "template-vm": 3, "template-ram": 4})
assert len(set(STREAMS.values())) == len(STREAMS)

_LENGTH = struct.Struct("<I")
_MiB = 1 << 20


class SealError(MemvisorError):
    """A sealed file or wrapped key fails its checks: changed, truncated, reordered, or not this snapshot's."""


@dataclass(frozen=True)
class Ident:
    """Which snapshot a stream or wrapped key belongs to; bound into every AAD. Holds no key, by design."""

    sandbox_id: str
    generation: int

    def __post_init__(self) -> None:
        if not isinstance(self.sandbox_id, str) or not self.sandbox_id:
            raise ValueError(f"a snapshot's sandbox id must be a non-empty str, not {self.sandbox_id!r}")
        if isinstance(self.generation, bool) or not isinstance(self.generation, int) \
                or not 0 <= self.generation < 1 << 64:
            raise ValueError(f"a snapshot's generation must be an int in [0, 2**64), not {self.generation!r}")


def stream_number(stream: str) -> int:
    """The nonce number of stream name `stream`; ValueError for a name not in STREAMS."""
    try:
        return STREAMS[stream]
    except KeyError:
        raise ValueError(f"unknown snapshot stream {stream!r} (known: {', '.join(STREAMS)})") from None


def _fields(*fields: bytes) -> bytes:
    """Length-prefixed concatenation (u32 LE length + bytes each), so no two field lists encode the same."""
    return b"".join(_LENGTH.pack(len(f)) + f for f in fields)


def _chunk_aad(ident: Ident, stream: str, index: int, final: bool) -> bytes:
    return _fields(MAGIC, stream.encode(), ident.sandbox_id.encode(), struct.pack("<Q", ident.generation),
                   struct.pack("<Q", index), struct.pack("<B", final))


def _nonce(number: int, index: int) -> bytes:
    return struct.pack("<IQ", number, index)


def _aead(key: bytes | bytearray, what: str) -> AESGCM:
    # Only the length is ever named: the key itself must not reach a message.
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        size = len(key) if isinstance(key, bytes | bytearray | memoryview) else type(key).__name__
        raise ValueError(f"the {what} must be {KEY_BYTES} bytes, not {size}")
    return AESGCM(key)


def _size(n: int) -> str:
    if n < _MiB:
        return f"{n} bytes"
    return f"{n // _MiB} MiB" if n % _MiB == 0 else f"{n / _MiB:.1f} MiB"


def _chunks(n: int) -> str:
    return f"{n} chunk" if n == 1 else f"{n} chunks"


def new_key() -> bytearray:
    """A fresh random AES-256-GCM key for one snapshot (generation); never use it for a second one. A bytearray
    read straight from the kernel's RNG, so the caller can zero it when done."""
    key = bytearray(KEY_BYTES)
    with open("/dev/urandom", "rb", buffering=0) as rng:
        if rng.readinto(key) != KEY_BYTES:
            raise OSError("/dev/urandom gave a short read")
    return key


def wrap_key(wrapping: bytes | bytearray, key: bytes | bytearray, ident: Ident, kind: str, digest: bytes) -> bytes:
    """`key` sealed under `wrapping` (the host key's WRAP subkey) for snapshot `ident` of `kind` whose manifest
    digest is `digest`: a random 12-byte nonce, then ciphertext || tag.

    A random nonce is safe here: one wrap per park (or rotation), far below the 2**32 wraps per host key that
    random 96-bit nonces allow."""
    _aead(key, "snapshot key")
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _aead(wrapping, "host key").encrypt(nonce, bytes(key), _key_aad(ident, kind, digest))


def unwrap_key(wrapping: bytes | bytearray, wrapped: bytes, ident: Ident, kind: str, digest: bytes) -> bytearray:
    """The snapshot key that `wrap_key(wrapping, key, ident, kind, digest)` returned `wrapped` for; SealError if
    it is damaged, or was wrapped for another kind, sandbox, generation, manifest or host key."""
    aead = _aead(wrapping, "host key")
    where = f"the snapshot key of {kind} {ident.sandbox_id} generation {ident.generation} does not unwrap"
    if len(wrapped) != WRAPPED_BYTES:
        raise SealError(f"{where}: it is {len(wrapped)} bytes, not {WRAPPED_BYTES}")
    try:
        return bytearray(aead.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _key_aad(ident, kind, digest)))
    except InvalidTag:
        raise SealError(f"{where}: its manifest was changed, or it is another host key's, or another kind's, "
                        "sandbox's or generation's", hint="the snapshot cannot be resumed as it is") from None


def _key_aad(ident: Ident, kind: str, digest: bytes) -> bytes:
    return _fields(KEY_LABEL, kind.encode(), ident.sandbox_id.encode(), struct.pack("<Q", ident.generation),
                   digest)


class SealWriter:
    """Writes one stream of a snapshot to a new file (O_EXCL, mode 0600), sealing it chunk by chunk.

    `close()` writes the final chunk and fsyncs; leaving a `with` block by an exception, or `abort()`, removes
    the file without a final chunk, so an interrupted stream can never verify. The directory entry is made
    durable by the caller's commit (statedir writes meta.json last and fsyncs the directory)."""

    def __init__(self, path: Path, key: bytes | bytearray, ident: Ident, stream: str) -> None:
        self._number = stream_number(stream)
        self._aead = _aead(key, "snapshot key")
        self.path = path
        self.ident = ident
        self.stream = stream
        self._index = 0
        self._buffer = bytearray(CHUNK_BYTES)  # one chunk's plaintext, reused (never regrown) and zeroed at the end
        self._fill = 0
        self._plaintext = 0
        self._file_bytes = 0
        self._done = False
        self._failed = False
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        self._file: BinaryIO = open(fd, "wb")  # closed by close() or abort()
        try:
            self._emit_raw(MAGIC)
        except BaseException:
            self.abort()
            raise

    def __repr__(self) -> str:
        return f"SealWriter({str(self.path)!r}, {self.ident!r}, stream={self.stream!r})"

    @property
    def plaintext_bytes(self) -> int:
        """Plaintext bytes written so far (all of the stream once closed)."""
        return self._plaintext

    @property
    def file_bytes(self) -> int:
        """Bytes in the file so far: magic, length prefixes, ciphertext and tags."""
        return self._file_bytes

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append `data` to the stream; full chunks are sealed and written as they fill."""
        if self._done:
            raise ValueError(f"{self.path.name}: write after close")
        view = memoryview(data).cast("B")
        self._plaintext += len(view)
        try:
            if self._fill:
                take = min(len(view), CHUNK_BYTES - self._fill)
                self._buffer[self._fill:self._fill + take] = view[:take]
                self._fill += take
                view = view[take:]
                if self._fill < CHUNK_BYTES:
                    return
                with memoryview(self._buffer) as full:
                    self._seal(full, final=False)
                self._fill = 0
            # Whole chunks straight from the caller's buffer: no copy of a large write.
            while len(view) >= CHUNK_BYTES:
                self._seal(view[:CHUNK_BYTES], final=False)
                view = view[CHUNK_BYTES:]
            self._buffer[:len(view)] = view
            self._fill = len(view)
        except BaseException:
            self._failed = True  # the file may end mid-record: it must never get a final chunk
            raise

    def close(self) -> None:
        """Seal the rest as the final chunk, flush and fsync. A second call does nothing; after a failed
        write it removes the file and raises instead."""
        if self._done:
            return
        if self._failed:
            self.abort()
            raise SealError(f"{self.path.name}: a write failed earlier; the stream was removed, not sealed")
        try:
            with memoryview(self._buffer) as whole:
                self._seal(whole[:self._fill], final=True)
            self._forget()
            self._file.flush()
            os.fsync(self._file.fileno())
            # Written and durable: its pages need not stay in the page cache, where they would be charged to
            # the daemon's memory (cgroup) for every parked sandbox. A resume reads it once.
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._file.close()

    def abort(self) -> None:
        """Close without a final chunk and remove the file (an aborted stream must never verify)."""
        if self._done:
            return
        self._done = True
        self._forget()
        try:
            self._file.close()
        except OSError:
            pass  # a failed flush of a stream being thrown away
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> SealWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _forget(self) -> None:
        """Zero the plaintext buffer (the sealed chunks are all that may remain)."""
        self._buffer[:] = bytes(len(self._buffer))
        self._fill = 0

    def _seal(self, plaintext: memoryview, final: bool) -> None:
        sealed = self._aead.encrypt(_nonce(self._number, self._index), plaintext,
                                    _chunk_aad(self.ident, self.stream, self._index, final))
        self._emit_raw(_LENGTH.pack(len(sealed)))
        self._emit_raw(sealed)
        self._index += 1

    def _emit_raw(self, data: bytes) -> None:
        self._file.write(data)
        self._file_bytes += len(data)


def _length(raw: bytes, name: str, index: int, total: int) -> int:
    """The length prefix `raw` of chunk `index`, bounded before anything is read or allocated for it."""
    if len(raw) < _LENGTH.size:
        raise SealError(f"{name} is truncated: the length of chunk {index} is cut short after "
                        f"{_chunks(index)} ({_size(total)})")
    length: int = _LENGTH.unpack(raw)[0]
    if length > MAX_RECORD:
        raise SealError(f"{name}: chunk {index} length {length} is over the limit ({MAX_RECORD} bytes)")
    if length < TAG_BYTES:
        raise SealError(f"{name}: chunk {index} length {length} is shorter than its {TAG_BYTES}-byte tag")
    return length


def read_chunks(path: Path, key: bytes | bytearray, ident: Ident, stream: str) -> Iterator[bytes]:
    """Yield the verified plaintext chunks of stream `stream` of snapshot `ident` from `path`, in order.

    No chunk is yielded before its tag is checked, but the stream as a whole is only proven complete when the
    iterator ends: a consumer that acts on chunks as they come (feeding QEMU) must treat a SealError at any
    point as "discard everything". SealError names the file and chunk."""
    number = stream_number(stream)
    aead = _aead(key, "snapshot key")
    name = path.name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise SealError(f"cannot read {path}: {exc.strerror}") from None
    with open(fd, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise SealError(f"{name} is not a sealed snapshot (bad magic)")
        index, total = 0, 0
        header = f.read(_LENGTH.size)
        if not header:
            raise SealError(f"{name} is truncated: no final chunk after 0 chunks (0 bytes)")
        length = _length(header, name, index, total)
        while True:
            body = f.read(length)
            if len(body) != length:
                raise SealError(f"{name} is truncated: chunk {index} is cut short ({len(body)} of {length} bytes) "
                                f"after {_chunks(index)} ({_size(total)})")
            # The final chunk is the one at the end of the file: its AAD says so, which refuses both a dropped
            # final chunk and anything appended after it.
            header = f.read(_LENGTH.size)
            final = not header
            plain = _open(aead, number, ident, stream, index, final, body)
            if plain is None:
                _diagnose(aead, number, ident, stream, index, final, body, name, total)
            yield plain
            total += len(plain)
            if final:
                return
            index += 1
            length = _length(header, name, index, total)


def _open(aead: AESGCM, number: int, ident: Ident, stream: str, index: int, final: bool,
          body: bytes) -> bytes | None:
    try:
        return aead.decrypt(_nonce(number, index), body, _chunk_aad(ident, stream, index, final))
    except InvalidTag:
        return None


def _diagnose(aead: AESGCM, number: int, ident: Ident, stream: str, index: int, final: bool, body: bytes,
              name: str, total: int) -> NoReturn:
    """Raise the SealError for chunk `index`, which failed with final flag `final`: if it opens with the other
    flag, the file was cut after it or had data appended; otherwise the chunk itself is not this stream's."""
    other = _open(aead, number, ident, stream, index, not final, body)
    if other is not None and final:
        raise SealError(f"{name} is truncated: no final chunk after {_chunks(index + 1)} "
                        f"({_size(total + len(other))})")
    if other is not None:
        raise SealError(f"{name} has data after its final chunk (chunk {index})")
    raise SealError(f"{name}: chunk {index} failed authentication (changed, reordered, or another sandbox's or "
                    "generation's snapshot)")


def verify(path: Path, key: bytes | bytearray, ident: Ident, stream: str) -> int:
    """Check every chunk of `path` (a full pass) and return the stream's plaintext bytes; SealError if any
    check fails."""
    total = 0
    for chunk in read_chunks(path, key, ident, stream):
        total += len(chunk)
    return total
