"""The one module that knows etcd's wire format (STYLE.md 13): everything the fleet asks of etcd is one of the
few things named here, and each is one store call: a read (one key, or a prefix), a transaction (every write,
conditional or not, so its revision comes back), and a lease's grant, refresh and revoke (lease.py keeps one
alive).

The client is etcd3gw (etcd's JSON gRPC gateway, pinned in pyproject.toml). What it leaves to us, and why:
- It talks to one endpoint; the fleet is given several (`etcd://HOST:PORT,HOST:PORT`), so failover is here: a
  call goes to the endpoint that answered last, and moves on when one is refused or silent.
- requests waits forever by default: every call here has a timeout.
- requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override the CA it was given (and HTTP(S)_PROXY redirect
  it): each session here is built with trust_env=False, so only --etcd-ca is trusted.
- etcd3gw encodes str as latin-1: keys are UTF-8 encoded here and always passed as bytes.
- The gateway's JSON drops default values (a failed transaction has no "succeeded") and sends int64 as strings:
  Record and TxnResult are plain ints, bytes and bools.
- A write that timed out may have been applied. The transaction still fails over, and says so (`uncertain`), so
  a caller that sees it fail re-reads before believing it lost (the fence does, by a nonce in its values).
- Its watches run in threads that hang forever when etcd dies: the fleet polls with prefix reads instead.
- One requests.Session per thread: requests does not promise that sessions are thread-safe, and a lease's
  keepalive thread runs beside the daemon's callers.

It must not know what the fleet stores (records.py) or decide anything (fence.py, membership.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import etcd3gw
import requests
from etcd3gw.exceptions import (
    ConnectionFailedError,
    ConnectionTimeoutError,
    Etcd3Exception,
    InternalServerError,
)
from etcd3gw.lease import Lease as _GwLease
from etcd3gw.utils import _decode, _encode

from memvisor.fleet.errors import EtcdError, EtcdUnavailable, FleetConfigError, LeaseLost

log = logging.getLogger("memvisor")

SCHEME: Final = "etcd://"
API_PATH: Final = "/v3/"  # etcd >= 3.4 serves its gateway here; giving it saves etcd3gw a GET /version per client
MIN_VERSION: Final = (3, 4)
DEFAULT_TIMEOUT: Final = 2.0  # seconds per request per endpoint: a healthy etcd answers in ~2 ms
HINT: Final = "is it running? (--fleet)"
TLS_HINT: Final = ("check --etcd-ca (the CA that signed etcd's certificate), --etcd-cert and --etcd-key (a client "
                   "certificate etcd trusts)")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
# gRPC codes (google.golang.org/grpc/codes) that the gateway puts in its JSON errors
_NOT_FOUND, _PERMISSION_DENIED, _UNAVAILABLE, _DEADLINE, _UNAUTHENTICATED = 5, 7, 14, 4, 16

T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    """One etcd member's client address."""

    host: str  # an IPv6 address keeps its brackets
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_url(url: str) -> tuple[Endpoint, ...]:
    """`etcd://HOST:PORT[,HOST:PORT...]` as endpoints; FleetConfigError naming the URL otherwise. (Whether to
    speak TLS is TLSFiles' business, not the URL's: one flag per thing.)"""
    hint = "write it as etcd://HOST:PORT, or etcd://HOST:PORT,HOST:PORT,... for a cluster (e.g. etcd://127.0.0.1:2379)"
    if not isinstance(url, str) or not url.startswith(SCHEME) or len(url) > 4096:
        raise FleetConfigError(f"etcd URL {url!r} does not start with {SCHEME}", hint=hint)
    endpoints = []
    for item in url[len(SCHEME):].split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not _HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise FleetConfigError(f"etcd URL {url!r}: {item!r} is not HOST:PORT", hint=hint)
        endpoints.append(Endpoint(host, int(port)))
    if len(set(endpoints)) != len(endpoints):
        raise FleetConfigError(f"etcd URL {url!r} names an endpoint twice", hint=hint)
    return tuple(endpoints)


@dataclass(frozen=True)
class TLSFiles:
    """TLS to etcd: the CA that signed etcd's server certificate, and this node's client certificate and key
    (both or neither) when etcd asks for one (--client-cert-auth)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def check(self) -> None:
        """FleetConfigError naming a file that cannot be read, or a certificate without its key."""
        if (self.cert is None) != (self.key is None):
            raise FleetConfigError("a client certificate for etcd needs its key, and a key its certificate",
                                   hint="give both --etcd-cert and --etcd-key, or neither")
        for what, path in (("CA", self.ca), ("client certificate", self.cert), ("client key", self.key)):
            if path is None:
                continue
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except OSError as exc:
                raise FleetConfigError(f"cannot read the etcd {what} file {path}: {exc.strerror}",
                                       hint="give a readable PEM file") from None


@dataclass(frozen=True)
class Record:
    """One key as etcd holds it. Revisions are the store's: `create_revision` 0 means absent, `lease` 0 none."""

    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


Target = Literal["mod", "create", "version", "value", "lease"]
Result = Literal["==", "!=", "<", ">"]
_TARGETS: Final = {"mod": ("MOD", "mod_revision"), "create": ("CREATE", "create_revision"),
                   "version": ("VERSION", "version"), "value": ("VALUE", "value"), "lease": ("LEASE", "lease")}
_RESULTS: Final = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction: `key`'s `target` `result` `expected` (bytes for "value", else an int).
    A key that does not exist compares as all zeros (so `create == 0` means absent, and `lease == L` fails) and
    never equal on its value."""

    key: str
    target: Target
    expected: int | bytes
    result: Result = "=="


def absent(key: str) -> Compare:
    """`key` does not exist."""
    return Compare(key, "create", 0)


def mod_is(key: str, revision: int) -> Compare:
    """`key` was last written at `revision` (0: it does not exist)."""
    return Compare(key, "mod", revision)


def version_is(key: str, version: int) -> Compare:
    """`key` has been written `version` times since it was created."""
    return Compare(key, "version", version)


def value_is(key: str, value: bytes) -> Compare:
    """`key` exists and holds `value`."""
    return Compare(key, "value", value)


def lease_is(key: str, lease: int) -> Compare:
    """`key` exists and is attached to lease `lease`: true only while that lease lives, since etcd deletes a
    lease's keys when it expires. The fence puts this on the node's own key in every write."""
    return Compare(key, "lease", lease)


@dataclass(frozen=True)
class Put:
    """Set `key` to `value`, attached to `lease` (0: none)."""

    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    """Delete `key` (every key under it if `prefix`)."""

    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    """Read `key` (every key under it if `prefix`) inside a transaction, at its revision."""

    key: str
    prefix: bool = False


Op = Put | Delete | Get


@dataclass(frozen=True)
class Response:
    """One op's answer: `records` for a Get, `deleted` (how many keys) for a Delete; a Put has neither."""

    records: tuple[Record, ...] = ()
    deleted: int = 0


@dataclass(frozen=True)
class TxnResult:
    """A transaction's outcome: whether the compares held (and so the success ops ran, else the failure ones),
    the store's revision after it, one Response per op run, and `uncertain`: an earlier try of this very
    transaction timed out, so it may have been applied then and compared against its own write now."""

    succeeded: bool
    revision: int
    responses: tuple[Response, ...]
    uncertain: bool = False


def _b64(data: str | bytes) -> str:
    return _encode(data.encode() if isinstance(data, str) else data)


def _range_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with `prefix` (etcd's prefix convention)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\0"  # every key
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def _compare_json(c: Compare) -> dict[str, Any]:
    target, field = _TARGETS[c.target]
    if (c.target == "value") != isinstance(c.expected, bytes):
        raise TypeError(f"compare on {c.target} of {c.key!r} needs {'bytes' if c.target == 'value' else 'an int'}")
    expected = _b64(c.expected) if isinstance(c.expected, bytes) else str(c.expected)
    return {"key": _b64(c.key), "result": _RESULTS[c.result], "target": target, field: expected}


def _op_json(op: Op) -> dict[str, Any]:
    if isinstance(op, Put):
        put: dict[str, Any] = {"key": _b64(op.key), "value": _b64(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    body = {"key": _b64(op.key)}
    if op.prefix:
        body["range_end"] = _b64(_range_end(op.key.encode()))
    return {"request_delete_range" if isinstance(op, Delete) else "request_range": body}


def _record(kv: dict[str, Any], value: bytes | None = None) -> Record:
    """A Record from the gateway's KeyValue JSON (int64 as strings, defaults left out); `value` when etcd3gw has
    already taken it out and decoded it, else decoded here."""
    key = kv["key"]
    key_bytes = key if isinstance(key, bytes) else _decode(key)
    if value is None:
        value = _decode(kv.get("value", ""))
    return Record(key_bytes.decode(errors="surrogateescape"), value, int(kv.get("mod_revision", 0)),
                  int(kv.get("create_revision", 0)), int(kv.get("version", 0)), int(kv.get("lease", 0)))


def _response(op: Op, answer: dict[str, Any]) -> Response:
    if isinstance(op, Get):
        return Response(records=tuple(_record(kv) for kv in answer.get("response_range", {}).get("kvs", [])))
    if isinstance(op, Delete):
        return Response(deleted=int(answer.get("response_delete_range", {}).get("deleted", 0)))
    return Response()


def _detail(exc: Etcd3Exception) -> tuple[str, int | None]:
    """What etcd said (its error text and gRPC code) or, for a transport failure, what requests said; short."""
    text = exc.detail_text or str(exc) or type(exc).__name__
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "error" in doc:
        code = doc.get("code")
        return str(doc["error"]), code if isinstance(code, int) else None
    lowered = text.lower()
    if "connection refused" in lowered:
        return "connection refused", None
    if "remotedisconnected" in lowered or "connection aborted" in lowered:
        return "it closed the connection without an answer (if it speaks TLS, give --etcd-ca)", None
    if "ssl" in lowered or "certificate" in lowered:
        found = re.search(r"\[SSL[^\]]*\][^(')\"]*", text)
        return f"TLS failed: {found.group(0).strip() if found else text[-200:]}", None
    if isinstance(exc, ConnectionTimeoutError):
        return "no answer in time (timed out)", None
    return text[-200:], None


def _unavailable(exc: Etcd3Exception) -> bool:
    """Whether `exc` says "this endpoint cannot answer now" (try another) rather than "etcd refuses this"."""
    if isinstance(exc, ConnectionFailedError | ConnectionTimeoutError):
        return True  # includes HTTP 503: no leader, or a member without quorum
    if isinstance(exc, InternalServerError):
        message, code = _detail(exc)
        return code in (_UNAVAILABLE, _DEADLINE) or "deadline exceeded" in message or "timed out" in message
    return False


def _not_sent(exc: Etcd3Exception) -> bool:
    """Whether the request surely never reached etcd (so a write cannot have landed)."""
    message, _ = _detail(exc)
    return message == "connection refused" or message.startswith("TLS failed")


class Etcd:
    """A connection to an etcd cluster: its endpoints, TLS, a timeout on every call, and failover.

    Safe to share between threads (each thread gets its own sessions). close() ends them all."""

    def __init__(self, url: str, tls: TLSFiles | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.endpoints = parse_url(url)
        self.url = SCHEME + ",".join(map(str, self.endpoints))
        if tls is not None:
            tls.check()
        self.tls = tls
        self.timeout = timeout
        self._preferred = 0  # the endpoint that answered last: calls start there
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Etcd({self.url!r}, tls={self.tls is not None})"

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every session of every thread (their connections)."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    # -- transport ------------------------------------------------------------------------------------------
    def _clients(self) -> list[etcd3gw.Etcd3Client]:
        clients: list[etcd3gw.Etcd3Client] | None = getattr(self._local, "clients", None)
        if clients is None:
            session = requests.Session()
            session.trust_env = False  # REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE and proxies must not apply
            if self.tls is not None:
                session.verify = str(self.tls.ca)
                if self.tls.cert is not None and self.tls.key is not None:
                    session.cert = (str(self.tls.cert), str(self.tls.key))
            with self._lock:
                self._sessions.append(session)
            protocol = "https" if self.tls is not None else "http"
            clients = [etcd3gw.client(host=e.host.strip("[]"), port=e.port, protocol=protocol, api_path=API_PATH,
                                      timeout=self.timeout, session=session) for e in self.endpoints]
            self._local.clients = clients
        return clients

    def _call(self, what: str, fn: Callable[[etcd3gw.Etcd3Client], T], timeout: float | None = None) -> tuple[T, bool]:
        """fn(client) on the endpoint that answered last, then on each other one while they cannot answer;
        (its result, whether an earlier try may have reached etcd). EtcdUnavailable when none answers,
        EtcdError (or LeaseLost) when etcd refuses."""
        clients = self._clients()
        start = self._preferred
        tried: list[str] = []
        maybe_sent = False
        for n in range(len(clients)):
            i = (start + n) % len(clients)
            client = clients[i]
            client.timeout = timeout if timeout is not None else self.timeout
            try:
                result = fn(client)
            except Etcd3Exception as exc:
                if not _unavailable(exc):
                    raise self._refused(what, exc) from None
                reason = _detail(exc)[0]
                if reason.startswith("no answer in time"):
                    reason = f"no answer within {client.timeout:g} s"
                tried.append(f"{self.endpoints[i]}: {reason}")
                maybe_sent = maybe_sent or not _not_sent(exc)
                continue
            except requests.RequestException as exc:  # one etcd3gw does not wrap (e.g. a body that is not JSON)
                tried.append(f"{self.endpoints[i]}: {type(exc).__name__}: {exc}"[:300])
                maybe_sent = True
                continue
            self._preferred = i
            return result, maybe_sent
        tls = all(": TLS failed" in t for t in tried)
        raise EtcdUnavailable(f"etcd at {self.url} does not answer ({what}): {'; '.join(tried)}",
                              hint=TLS_HINT if tls else HINT)

    def _refused(self, what: str, exc: Etcd3Exception) -> Exception:
        message, code = _detail(exc)
        if code == _NOT_FOUND and "lease not found" in message:
            return LeaseLost(f"etcd at {self.url} no longer knows the lease ({what}): it expired or was revoked",
                             hint="the node must rejoin the fleet with a new lease")
        if code in (_PERMISSION_DENIED, _UNAUTHENTICATED):
            return EtcdError(f"etcd at {self.url} refused {what}: {message}",
                             hint="memvisor does not log in to etcd: authenticate it by client certificate "
                                  "(--etcd-cert, --etcd-key) or turn etcd auth off for it")
        return EtcdError(f"etcd at {self.url} refused {what}: {message}")

    # -- the calls the fleet makes ----------------------------------------------------------------------------
    def check(self) -> str:
        """At start: at least one endpoint answers, runs etcd >= 3.4, and the cluster has a leader (a quorum
        read succeeds). Returns etcd's version; EtcdUnavailable (or EtcdError for an old etcd) naming the URL,
        so `serve --fleet` fails at once with one line. Endpoints that do not answer are logged."""
        versions: list[str] = []
        silent: list[str] = []
        for i, endpoint in enumerate(self.endpoints):
            client = self._clients()[i]
            client.timeout = self.timeout
            try:
                versions.append(str(client.status()["version"]))
            except Etcd3Exception as exc:
                silent.append(f"{endpoint} ({_detail(exc)[0]})")
            except requests.RequestException as exc:
                silent.append(f"{endpoint} ({exc})")
        if versions and silent:  # some answer: go on, and say which did not (when none does, the error says it)
            log.warning("etcd endpoints of %s that do not answer: %s", self.url, "; ".join(silent))
        if not versions:  # none answered: once more through _call, which raises EtcdUnavailable with each reason
            status, _ = self._call("a status request", lambda c: c.status())  # or answers: etcd just came up
            versions.append(str(status["version"]))
        for version in versions:
            found = re.match(r"(\d+)\.(\d+)", version)
            if not found or (int(found.group(1)), int(found.group(2))) < MIN_VERSION:
                raise EtcdError(f"etcd at {self.url} runs version {version}; memvisor needs 3.4 or later",
                                hint="upgrade etcd (Debian 12's etcd-server is 3.4)")
        self.get("\0")  # a linearizable read: needs a leader and a quorum
        return versions[0]

    def get(self, key: str) -> Record | None:
        """`key`'s record, or None if it does not exist (a linearizable read)."""
        rows, _ = self._call(f"a read of {key}", lambda c: c.get(key.encode(), metadata=True))
        return _record(dict(rows[0][1]), rows[0][0]) if rows else None

    def get_prefix(self, prefix: str) -> list[Record]:
        """Every key that starts with `prefix`, in key order (a linearizable read)."""
        end = _range_end(prefix.encode()).decode("latin-1")  # etcd3gw encodes str as latin-1: bytes survive
        rows, _ = self._call(f"a read of {prefix}*",
                             lambda c: c.get(prefix.encode(), metadata=True, range_end=end))
        return [_record(dict(meta), value) for value, meta in rows]

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Set `key` (attached to `lease` if given); the store's revision after the write."""
        return self.txn([], [Put(key, value, lease)]).revision

    def delete(self, key: str) -> bool:
        """Delete `key`; whether it existed."""
        return self.txn([], [Delete(key)]).responses[0].deleted > 0

    def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        """One transaction: if every compare holds, the success ops, else the failure ops, atomically."""
        body = {"compare": [_compare_json(c) for c in compares], "success": [_op_json(op) for op in success],
                "failure": [_op_json(op) for op in failure]}
        keys = ", ".join(sorted({c.key for c in compares} | {op.key for op in success})) or "nothing"
        answer: dict[str, Any]
        answer, maybe_sent = self._call(f"a transaction on {keys}", lambda c: dict(c.transaction(body)))
        succeeded = bool(answer.get("succeeded", False))  # absent when false
        ran = success if succeeded else failure
        responses: list[dict[str, Any]] = answer.get("responses", [])
        return TxnResult(succeeded, int(answer["header"]["revision"]),
                         tuple(_response(op, r) for op, r in zip(ran, responses, strict=True)), maybe_sent)

    def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its id."""
        lease, _ = self._call(f"a lease grant of {ttl} s", lambda c: c.lease(ttl))
        return lease.id

    def refresh(self, lease: int, timeout: float | None = None) -> int:
        """Keep `lease` alive once; its TTL from now in seconds, or -1 if it has expired."""
        ttl, _ = self._call(f"a keepalive of lease {lease:x}", lambda c: _GwLease(lease, c).refresh(), timeout)
        return ttl

    def revoke(self, lease: int) -> None:
        """Revoke `lease` (its keys are deleted at once); one that already expired is fine."""
        with contextlib.suppress(LeaseLost):
            self._call(f"a revoke of lease {lease:x}", lambda c: _GwLease(lease, c).revoke())
