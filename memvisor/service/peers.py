"""Requests between the daemons of a fleet (docs/fleet.md): a request for a sandbox that runs on another node is
forwarded to that node's API (its node record's `api`), and its answer is passed back as it came (an exec's
output streamed line by line).

Peers authenticate each request with a MAC under a key every daemon derives from the fleet key
(fleetd.PEER_TOKEN): nothing to configure, nothing stored, and nothing reusable on the wire. The MAC binds the
node the request is for, the time, a nonce, the method, the path and the body's SHA-256: a node record in etcd
that points elsewhere (its address is not authenticated) gets a request it can neither replay nor turn into
another, or send to another node; the receiving node checks that it is the target, that the time is within
PEER_SKEW_S, and that it has not seen the nonce. Over https the peer's certificate is checked against --peer-ca.
A forwarded request carries X-Memvisor-Forwarded, and a daemon never forwards such a request again: no loops, at
most one hop.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from memvisor.errors import MemvisorError
from memvisor.fleet.records import NodeRecord

FORWARDED = "x-memvisor-forwarded"  # the header a forwarded request carries (its value: the node it came from)
AUTH = "x-memvisor-peer-auth"  # v1 target=NODE ts=SECONDS nonce=HEX mac=HEX
PEER_SKEW_S = 60.0  # a forwarded request older (or newer) than this by the receiver's clock is refused
CONNECT_S = 5.0
CALL_S = 300.0  # a create boots a guest (TCG): as long as a client's own wait


class PeerUnreachable(MemvisorError):
    """The node that has the sandbox does not answer (HTTP 503)."""


def _unreachable(peer: NodeRecord, exc: httpx.HTTPError) -> PeerUnreachable:
    return PeerUnreachable(f"node {peer.name} ({peer.api}) does not answer: {exc}",
                           hint="it may be restarting; try again, or see `memvisor fleet ls`")


class Forwarded(Exception):
    """A peer's answer to a forwarded request, to be passed back as it is."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


def _mac(key: str, target: str, ts: int, nonce: str, method: str, path: str, body: bytes) -> str:
    text = "\n".join(("v1", target, str(ts), nonce, method.upper(), path, hashlib.sha256(body).hexdigest()))
    return hmac.new(bytes.fromhex(key), text.encode(), hashlib.sha256).hexdigest()


class PeerAuth:
    """Checks the MAC of requests forwarded by the fleet's other daemons (the receiving side)."""

    def __init__(self, node: str, keys: Sequence[str]) -> None:
        """`keys`: the peer keys accepted (the fleet key's, and during a rotation the previous key's)."""
        self.node = node
        self.keys = list(keys)
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, header: str, method: str, path: str, body: bytes) -> str | None:
        """Why the forwarded request with `header` is refused, or None if it is authentic, for this node, fresh
        and not seen before."""
        fields = dict(part.split("=", 1) for part in header.split()[1:] if "=" in part)
        if not header.startswith("v1 ") or set(fields) != {"target", "ts", "nonce", "mac"}:
            return "a malformed peer authentication"
        if fields["target"] != self.node:
            return f"a request for node {fields['target'][:64]!r}, not this one ({self.node})"
        try:
            ts = int(fields["ts"])
        except ValueError:
            return "a malformed peer authentication"
        now = time.time()
        if abs(now - ts) > PEER_SKEW_S:
            return f"a peer request {now - ts:.0f} s old (more than {PEER_SKEW_S:g} s: clocks apart, or a replay)"
        if not any(hmac.compare_digest(_mac(k, self.node, ts, fields["nonce"], method, path, body), fields["mac"])
                   for k in self.keys):
            return "a peer request whose MAC is wrong (another fleet key?)"
        with self._lock:
            self._seen = {n: t for n, t in self._seen.items() if t > now - 2 * PEER_SKEW_S}
            if fields["nonce"] in self._seen:
                return "a peer request seen before (a replay)"
            self._seen[fields["nonce"]] = now
        return None


class Peers:
    """This daemon's client for the others."""

    def __init__(self, node: str, key: str, ca: Path | None) -> None:
        """`key`: the peer key (hex) derived from the fleet key."""
        self.node = node
        self._key = key
        self._verify: str | bool = str(ca) if ca is not None else True

    def _client(self, peer: NodeRecord) -> httpx.Client:
        return httpx.Client(base_url=peer.api, headers={FORWARDED: self.node}, verify=self._verify,
                            trust_env=False, timeout=httpx.Timeout(CALL_S, connect=CONNECT_S))

    def _signed(self, peer: NodeRecord, method: str, path: str, body: Any) -> tuple[bytes, dict[str, str]]:
        data = json.dumps(body).encode() if body is not None else b""
        ts, nonce = int(time.time()), secrets.token_hex(12)
        mac = _mac(self._key, peer.name, ts, nonce, method, path, data)
        headers = {AUTH: f"v1 target={peer.name} ts={ts} nonce={nonce} mac={mac}"}
        if body is not None:
            headers["content-type"] = "application/json"
        return data, headers

    def call(self, peer: NodeRecord, method: str, path: str, body: Any = None) -> Forwarded:
        """Forward one request; its answer (status and JSON body), to be returned as is."""
        data, headers = self._signed(peer, method, path, body)
        try:
            with self._client(peer) as client:
                response = client.request(method, path, content=data, headers=headers)
        except httpx.HTTPError as exc:
            raise _unreachable(peer, exc) from None
        try:
            payload = response.json()
        except ValueError:
            payload = {"detail": response.text[:400]}
        return Forwarded(response.status_code, payload)

    def stream(self, peer: NodeRecord, path: str, body: Any) -> tuple[int, Iterator[bytes]]:
        """Forward an exec: its status, and its NDJSON lines as they come (the connection closes with them)."""
        client = self._client(peer)
        data, headers = self._signed(peer, "POST", path, body)
        try:
            request = client.build_request("POST", path, content=data, headers=headers)
            response = client.send(request, stream=True)
        except httpx.HTTPError as exc:
            client.close()
            raise _unreachable(peer, exc) from None

        def lines() -> Iterator[bytes]:
            try:
                if response.status_code != 200:
                    yield response.read()
                    return
                for line in response.iter_lines():
                    yield (line + "\n").encode()
            except httpx.HTTPError as exc:
                yield (json.dumps({"error": f"node {peer.name} went away during the command: {exc}"}) + "\n").encode()
            finally:
                response.close()
                client.close()

        return response.status_code, lines()
