"""What the fleet keeps in etcd: the key layout and the JSON of each value, in one place.

    <prefix>nodes/<node name>       NodeRecord, attached to the node's lease: gone when the node stops answering
    <prefix>sandboxes/<sandbox id>  SandboxRecord: no lease (a parked sandbox outlives every node)
    <prefix>generations/<id>        the fleet's Generations counter of a sandbox or template: {generation, nonce}
    <prefix>templates/<name>        TemplateRecord: which template bundle (id, generation, digest) the name is
    <prefix>key-check               a MAC of a fixed label under the fleet key: a daemon with another key is refused

<prefix> is /memvisor/fleet/ unless a fleet is given another (tests, or two fleets on one etcd).

Values are JSON objects. A reader checks every field it knows (type and range) and ignores fields it does not,
so a daemon of the next version can add one during a rolling upgrade. Malformed values raise RecordError
naming the key: they are never repaired, since a record is what fences a sandbox.

This module does no I/O: etcd.py talks to etcd, fence.py and membership.py decide.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any, Final

from memvisor.fleet.errors import FleetConfigError, RecordError
from memvisor.host.runtime import SAFE_ID, TEMPLATE_NAME

DEFAULT_PREFIX: Final = "/memvisor/fleet/"
NODE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")  # a DNS label and more: Kubernetes node names fit
DIGEST = re.compile(r"[0-9a-f]{64}")  # SHA-256, hex
VALUE_LIMIT: Final = 64 << 10  # a record memvisor writes is a few hundred bytes


def check_node_name(name: str) -> str:
    """`name` if it can name a node (and so an etcd key), else FleetConfigError naming it."""
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        raise FleetConfigError(f"node name {name!r} is not 1-63 of a-z, 0-9, '.', '_' and '-' (starting with a "
                               "letter or digit)", hint="pass --node NAME, e.g. the host's short name")
    return name


def check_id(key: str, what: str = "sandbox id") -> str:
    """`key` if it is a sandbox or template id memvisor hands out (host/runtime.py's SAFE_ID), else
    FleetConfigError; ids become etcd keys and store directories, so no '/', no '..'."""
    if not isinstance(key, str) or not SAFE_ID.fullmatch(key):
        raise FleetConfigError(f"{what} {key!r} is not 1-32 of a-z, 0-9, '_' and '-'")
    return key


@dataclass(frozen=True)
class Layout:
    """Where each kind of value lives under a fleet's prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or not self.prefix.endswith("/") or "//" in self.prefix:
            raise FleetConfigError(f"fleet prefix {self.prefix!r} must start and end with '/'",
                                   hint=f"e.g. {DEFAULT_PREFIX}")

    @property
    def nodes(self) -> str:
        return f"{self.prefix}nodes/"

    @property
    def sandboxes(self) -> str:
        return f"{self.prefix}sandboxes/"

    @property
    def generations(self) -> str:
        return f"{self.prefix}generations/"

    @property
    def templates(self) -> str:
        return f"{self.prefix}templates/"

    def template(self, name: str) -> str:
        if not TEMPLATE_NAME.fullmatch(name):
            raise RecordError(f"template name {name!r} is not one", hint="1-30 of a-z 0-9 _ -")
        return self.templates + name

    @property
    def key_check(self) -> str:
        """Where the fleet key's check value lives (written once, by the first node: fleetd.py)."""
        return f"{self.prefix}key-check"

    def node(self, name: str) -> str:
        return self.nodes + check_node_name(name)

    def sandbox(self, sandbox_id: str) -> str:
        return self.sandboxes + check_id(sandbox_id)

    def generation(self, key: str) -> str:
        return self.generations + check_id(key, "generation key")


class State(StrEnum):
    """Where a sandbox is, as the fleet sees it."""

    RUNNING = "running"  # on `node`
    PARKING = "parking"  # `node` is writing its bundle; the fence still names the previous generation
    PARKED = "parked"  # its bundle of `generation` is in the store; no node runs it; any node may claim it
    RESUMING = "resuming"  # `node` claimed it and is fetching and resuming the bundle of `generation`
    LOST = "lost"  # `node`'s lease lapsed while it ran it: never resumed elsewhere; the node re-adopts it


def _doc(data: bytes, key: str) -> dict[str, Any]:
    if len(data) > VALUE_LIMIT:
        raise RecordError(f"the value of {key} in etcd is {len(data)} bytes: not a record memvisor wrote")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise RecordError(f"the value of {key} in etcd is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RecordError(f"the value of {key} in etcd is not a JSON object")
    return doc


def _field(doc: dict[str, Any], key: str, name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    value = doc.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise RecordError(f"the record {key} in etcd has a bad or missing {name!r}: {value!r}",
                          hint="it was not written by memvisor; it is never repaired automatically")
    return value


def _count(doc: dict[str, Any], key: str, name: str) -> int:
    value: int = _field(doc, key, name, int)
    if value < 0:
        raise RecordError(f"the record {key} in etcd has a negative {name!r}: {value}")
    return value


def _dump(obj: object) -> bytes:
    return json.dumps(asdict(obj), sort_keys=True, separators=(",", ":")).encode()  # type: ignore[call-overload]


@dataclass(frozen=True)
class SandboxRecord:
    """A sandbox's record: the generation fence. `node` is its owner (None while parked); `last_node` the node
    that ran it last; `digest` the SHA-256 of the parked bundle's manifest; `lease` the owner's lease when it
    last wrote; `nonce` unique per write, so a writer whose reply was lost can tell its write landed."""

    id: str
    name: str
    node: str | None
    state: State
    generation: int
    digest: str | None = None
    last_node: str | None = None
    lease: int = 0
    updated: float = 0.0
    nonce: str = ""
    template: str | None = None  # the template it is a clone of (which the fleet must keep while it exists)

    def to_json(self) -> bytes:
        return _dump(self)

    @classmethod
    def from_json(cls, data: bytes, key: str) -> SandboxRecord:
        """The record stored at `key`; RecordError naming the key if anything is off (id, state, counts)."""
        doc = _doc(data, key)
        try:
            state = State(_field(doc, key, "state", str))
        except ValueError:
            raise RecordError(f"the record {key} in etcd has an unknown state {doc.get('state')!r}") from None
        record = cls(id=_field(doc, key, "id", str), name=_field(doc, key, "name", str),
                     node=_field(doc, key, "node", str, optional=True), state=state,
                     generation=_count(doc, key, "generation"), digest=_field(doc, key, "digest", str, optional=True),
                     last_node=_field(doc, key, "last_node", str, optional=True), lease=_count(doc, key, "lease"),
                     updated=float(_field(doc, key, "updated", (int, float))), nonce=_field(doc, key, "nonce", str),
                     template=_field(doc, key, "template", str, optional=True))
        if not SAFE_ID.fullmatch(record.id) or not key.endswith("/" + record.id):
            raise RecordError(f"the record {key} in etcd is for sandbox {record.id!r}, not its key's")
        if (record.node is None) != (record.state == State.PARKED):
            raise RecordError(f"the record {key} in etcd is {record.state} with owner {record.node!r}: a parked "
                              "sandbox has no owner and any other has one")
        if record.digest is not None and not DIGEST.fullmatch(record.digest):
            raise RecordError(f"the record {key} in etcd has a digest that is not SHA-256 hex: {record.digest!r}")
        return record


@dataclass(frozen=True)
class NodeRecord:
    """A node as the fleet sees it: where its API is, its room, and what a resume there must match.

    `budget` and `held` are bytes of guest memory (the supervisor's); `templates` the digests of the templates it
    holds; `qemu_version` as `qemu-system-x86_64 --version` prints it (membership.qemu_version()). `lease` is read
    from the key, not stored."""

    name: str
    api: str
    budget: int
    held: int
    running: int
    parked: int
    qemu_version: str
    machine: str
    cpu_model: str
    image: str
    templates: tuple[str, ...] = ()
    updated: float = 0.0
    lease: int = 0

    @property
    def room(self) -> int:
        """Bytes of budget it does not hold."""
        return max(0, self.budget - self.held)

    def to_json(self) -> bytes:
        doc = asdict(self)
        del doc["lease"]
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, key: str, lease: int = 0) -> NodeRecord:
        """The node record stored at `key` (attached to `lease`); RecordError naming the key if anything is off."""
        doc = _doc(data, key)
        strings = {f.name: _field(doc, key, f.name, str)
                   for f in fields(cls) if f.name in ("name", "api", "qemu_version", "machine", "cpu_model", "image")}
        templates = _field(doc, key, "templates", list)
        if not all(isinstance(t, str) for t in templates):
            raise RecordError(f"the node record {key} in etcd has templates that are not strings")
        record = cls(**strings, budget=_count(doc, key, "budget"), held=_count(doc, key, "held"),
                     running=_count(doc, key, "running"), parked=_count(doc, key, "parked"),
                     templates=tuple(templates), updated=float(_field(doc, key, "updated", (int, float))),
                     lease=lease)
        if not NODE_NAME.fullmatch(record.name) or not key.endswith("/" + record.name):
            raise RecordError(f"the node record {key} in etcd is for node {record.name!r}, not its key's")
        return record




@dataclass(frozen=True)
class TemplateRecord:
    """A template of the fleet: its name, the id and generation of its bundle in the store, the digest of that
    bundle's manifest (body), and the node that made it."""

    name: str
    id: str
    generation: int
    digest: str
    node: str
    updated: float = 0.0

    def to_json(self) -> bytes:
        return _dump(self)

    @classmethod
    def from_json(cls, data: bytes, key: str) -> TemplateRecord:
        doc = _doc(data, key)
        record = cls(name=_field(doc, key, "name", str), id=_field(doc, key, "id", str),
                     generation=_count(doc, key, "generation"), digest=_field(doc, key, "digest", str),
                     node=_field(doc, key, "node", str), updated=float(_field(doc, key, "updated", (int, float))))
        if not key.endswith("/" + record.name) or not DIGEST.fullmatch(record.digest) or record.generation < 1:
            raise RecordError(f"the template record {key} in etcd is malformed")
        return record
