"""Requests between the daemons of a fleet (docs/fleet.md): a request for a sandbox that runs on another node is
forwarded to that node's API (its node record's `api`), and its answer is passed back as it came (an exec's
output streamed line by line).

Peers authenticate with one bearer token every daemon derives from the fleet key (fleetd.PEER_TOKEN): nothing to
configure, nothing stored. Over https the peer's certificate is checked against --peer-ca. A forwarded request
carries X-Memvisor-Forwarded, and a daemon never forwards such a request again: no loops, at most one hop.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from memvisor.errors import MemvisorError
from memvisor.fleet.records import NodeRecord

FORWARDED = "x-memvisor-forwarded"  # the header a forwarded request carries (its value: the node it came from)
CONNECT_S = 5.0
CALL_S = 300.0  # a create boots a guest (TCG): as long as a client's own wait


class PeerUnreachable(MemvisorError):
    """The node that has the sandbox does not answer (HTTP 503)."""


class Forwarded(Exception):
    """A peer's answer to a forwarded request, to be passed back as it is."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class Peers:
    """This daemon's client for the others."""

    def __init__(self, node: str, token: str, ca: Path | None) -> None:
        self.node = node
        self.token = token
        self._headers = {"Authorization": f"Bearer {token}", FORWARDED: node}
        self._verify: str | bool = str(ca) if ca is not None else True

    def _client(self, peer: NodeRecord) -> httpx.Client:
        return httpx.Client(base_url=peer.api, headers=self._headers, verify=self._verify, trust_env=False,
                            timeout=httpx.Timeout(CALL_S, connect=CONNECT_S))

    def call(self, peer: NodeRecord, method: str, path: str, body: Any = None) -> Forwarded:
        """Forward one request; its answer (status and JSON body), to be returned as is."""
        try:
            with self._client(peer) as client:
                response = client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise PeerUnreachable(f"node {peer.name} ({peer.api}) does not answer: {exc}",
                                  hint="it may be restarting; try again, or see `memvisor fleet ls`") from None
        try:
            payload = response.json()
        except ValueError:
            payload = {"detail": response.text[:400]}
        return Forwarded(response.status_code, payload)

    def stream(self, peer: NodeRecord, path: str, body: Any) -> tuple[int, Iterator[bytes]]:
        """Forward an exec: its status, and its NDJSON lines as they come (the connection closes with them)."""
        client = self._client(peer)
        try:
            request = client.build_request("POST", path, json=body)
            response = client.send(request, stream=True)
        except httpx.HTTPError as exc:
            client.close()
            raise PeerUnreachable(f"node {peer.name} ({peer.api}) does not answer: {exc}",
                                  hint="it may be restarting; try again, or see `memvisor fleet ls`") from None

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
