"""The manifest of a parked sandbox or a template (<dir>/meta.json): everything a resume or a clone uses besides the
sealed streams, in one canonical, authenticated document.

    kind        "sandbox" | "template" (a template is never resumed as a sandbox: seal.py also gives its streams
                labels of their own)
    id, generation                      as bound into every chunk's AAD (seal.Ident)
    parked_at   seconds since the epoch
    streams     name -> {plaintext_bytes, file_bytes, allocated_bytes}
    files       kept file -> {bytes, allocated_bytes, protection}: the size a resume checks on the descriptor, what
                it holds on disk, and what guards its contents against the host (PROTECTIONS)
    template    a clone's template: {name, id, generation, digest} (that template's manifest digest), or null
    sandbox     the caller's: policy, name, image key, the guest's HELLO, created, execs, parks (a template's:
                policy, name, image, source, created, HELLO)
    wrapped_key the snapshot key wrapped under the host key (base64), with kind, id, generation and `digest()` in
                the wrap's associated data

The digest is SHA-256 of the canonical JSON (files.canonical) of everything but the wrapped key, so the wrap
authenticates every other byte; and a file is loaded only if its bytes are exactly the canonical form of what
they parse to, so no byte of meta.json can change (a space, a duplicate key, an escape) without being refused.

This module only serializes and checks the shape; statedir.py checks the wrap and the ledger's generation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from memvisor.host.runtime import SAFE_ID
from memvisor.snapshot import files, seal
from memvisor.snapshot.files import StateError

FILE_NAME: Final = "meta.json"
KINDS: Final = ("sandbox", "template")
# What guards a kept disk's contents while parked, strongest first: `confidential` (the guest's dm-integrity with
# its tags in guest RAM, so in the sealed stream: a changed, moved or older block is an I/O error in the guest),
# `authenticated` (tags on the disk itself: replay of an older block passes), `encrypted` (XTS: confidential, not
# authenticated), `plain` (none). docs/security.md lists what each leaves open.
PROTECTIONS: Final = ("confidential", "authenticated", "encrypted", "plain")
LIMIT: Final = 16 << 20
SNAP_SUFFIX: Final = ".snap"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a kept file's name: no '/', no leading '.'
_HEX64 = re.compile(r"[0-9a-f]{64}")
_STREAM_SIZES = ("plaintext_bytes", "file_bytes", "allocated_bytes")


@dataclass(frozen=True)
class KeptFile:
    """A file a parked sandbox keeps beside its streams (its swap and scratch disks)."""

    bytes: int  # its size, checked on the descriptor before QEMU gets it
    allocated_bytes: int  # what it held on disk at the park
    protection: str  # PROTECTIONS

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "allocated_bytes": self.allocated_bytes, "protection": self.protection}


@dataclass(frozen=True)
class TemplateRef:
    """Which template a clone was made of: a template made again under the same name has another id and digest."""

    name: str
    id: str
    generation: int
    digest: str  # hex SHA-256 of that template's manifest (Manifest.digest())

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "generation": self.generation, "digest": self.digest}


@dataclass(frozen=True)
class Manifest:
    """A committed snapshot's manifest (see the module's docstring)."""

    kind: str
    id: str
    generation: int
    parked_at: float
    streams: dict[str, dict[str, int]]
    files: dict[str, KeptFile] = field(default_factory=dict)
    sandbox: dict[str, Any] = field(default_factory=dict)
    template: TemplateRef | None = None
    wrapped_key: str = ""

    @property
    def sandbox_id(self) -> str:
        """The id (a sandbox's or a template's), as the callers of the earlier Meta knew it."""
        return self.id

    @property
    def ident(self) -> seal.Ident:
        """The snapshot's identity, as bound into its AADs."""
        return seal.Ident(self.id, self.generation)

    def body(self) -> dict[str, Any]:
        """Everything but the wrapped key: what the digest covers."""
        return {"kind": self.kind, "id": self.id, "generation": self.generation, "parked_at": self.parked_at,
                "streams": self.streams, "files": {k: v.to_json() for k, v in self.files.items()},
                "template": self.template.to_json() if self.template else None, "sandbox": self.sandbox}

    def digest(self) -> bytes:
        """SHA-256 of the canonical body: bound into the wrap of the snapshot key."""
        return hashlib.sha256(files.canonical(self.body())).digest()

    def wrapped(self) -> bytes:
        """The wrapped snapshot key's bytes."""
        return base64.b64decode(self.wrapped_key)

    def to_bytes(self) -> bytes:
        """meta.json's exact bytes."""
        return files.canonical({**self.body(), "wrapped_key": self.wrapped_key})

    def disk_bytes(self) -> int:
        """What the parked sandbox or template holds on disk: the allocated blocks of its streams and kept files
        (a sparse swap file counts what it holds, not its size)."""
        return sum(s["allocated_bytes"] for s in self.streams.values()) + sum(
            f.allocated_bytes for f in self.files.values())

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> Manifest:
        """The manifest in `data` (meta.json's bytes), every field checked and the bytes exactly canonical;
        StateError naming `source` otherwise. Not yet authenticated: statedir.py checks the wrap."""
        def bad(why: str) -> NoReturn:
            raise StateError(f"{source} is malformed: {why}")

        doc = files.parse_json(data, source)
        if not isinstance(doc, dict):
            bad("not a JSON object")
        want = {"kind", "id", "generation", "parked_at", "streams", "files", "template", "sandbox", "wrapped_key"}
        if set(doc) != want:
            bad(f"its keys are {sorted(doc)}, not {sorted(want)}")
        kind, ident, gen, parked_at = doc["kind"], doc["id"], doc["generation"], doc["parked_at"]
        if kind not in KINDS:
            bad(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(ident, str) or not SAFE_ID.fullmatch(ident):
            bad(f"id {ident!r} is not a sandbox or template id")
        if type(gen) is not int or not 1 <= gen < 1 << 64:
            bad(f"generation {gen!r} is not an int >= 1")
        if type(parked_at) not in (int, float):
            bad(f"parked_at {parked_at!r} is not a number")
        try:
            wrapped = doc["wrapped_key"]
            if not isinstance(wrapped, str) or len(base64.b64decode(wrapped, validate=True)) != seal.WRAPPED_BYTES:
                bad(f"wrapped_key is not the base64 of {seal.WRAPPED_BYTES} bytes")
        except binascii.Error:
            bad("wrapped_key is not base64")
        streams = doc["streams"]
        if not isinstance(streams, dict) or not all(
                name in seal.STREAMS and isinstance(sizes, dict) and set(sizes) == set(_STREAM_SIZES)
                and all(type(n) is int and n >= 0 for n in sizes.values()) for name, sizes in streams.items()):
            bad(f"streams must map names in {sorted(seal.STREAMS)} to {{{', '.join(_STREAM_SIZES)}}}")
        kept = doc["files"]
        if not isinstance(kept, dict) or not all(
                isinstance(name, str) and _NAME.fullmatch(name) and name != FILE_NAME
                and not name.endswith(SNAP_SUFFIX) and isinstance(f, dict)
                and set(f) == {"bytes", "allocated_bytes", "protection"} and f["protection"] in PROTECTIONS
                and type(f["bytes"]) is int and type(f["allocated_bytes"]) is int and f["bytes"] >= 0
                and f["allocated_bytes"] >= 0 for name, f in kept.items()):
            bad("files must map plain file names (not meta.json or *.snap) to {bytes, allocated_bytes, protection}")
        template = doc["template"]
        if template is not None and not (
                isinstance(template, dict) and set(template) == {"name", "id", "generation", "digest"}
                and isinstance(template["name"], str) and isinstance(template["id"], str)
                and SAFE_ID.fullmatch(template["id"]) and type(template["generation"]) is int
                and isinstance(template["digest"], str) and _HEX64.fullmatch(template["digest"])):
            bad("template must be null or {name, id, generation, digest}")
        if not isinstance(doc["sandbox"], dict):
            bad("sandbox is not a JSON object")
        manifest = cls(kind=kind, id=ident, generation=gen, parked_at=parked_at,
                       streams={k: dict(v) for k, v in streams.items()},
                       files={k: KeptFile(**v) for k, v in kept.items()}, sandbox=doc["sandbox"],
                       template=TemplateRef(**template) if template is not None else None, wrapped_key=wrapped)
        if manifest.to_bytes() != data:
            raise StateError(f"{source} is not in memvisor's canonical form: a byte of it was changed")
        return manifest
