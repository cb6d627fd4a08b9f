"""A lease kept alive: what a node's membership hangs on (membership.py) and what the fence compares (fence.py).

etcd3gw refreshes a lease one request at a time and leaves the loop to us: a daemon thread here refreshes every
TTL/3 through Etcd (so with its timeouts and failover). The node acts on its own fail-safe view, `alive`, which
turns false once no refresh got through for a TTL, never later than etcd's own; etcd's view is the one that
fences (the node key disappears with the lease).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

from memvisor.fleet.errors import EtcdError, EtcdUnavailable, FleetConfigError, LeaseLost
from memvisor.fleet.etcd import Etcd

log = logging.getLogger("memvisor")

LeaseState = Literal["alive", "unreachable", "expired", "revoked"]


class Lease:
    """A lease kept alive by a background thread, refreshing every TTL/3.

    `alive` is the fail-safe view a node acts on: a refresh sent less than the TTL ago succeeded. etcd may still
    hold the lease a while longer, never less: the clock starts when the refresh is sent. States, reported
    distinctly: "alive"; "unreachable" (no refresh got through within the TTL: etcd may or may not have dropped
    it; it becomes "alive" again if a refresh succeeds); "expired" (etcd said the lease is gone: final, the node
    must rejoin); "revoked" (by us). `on_lost` is called (from the keepalive thread) when the lease expires.
    """

    def __init__(self, etcd: Etcd, ttl: int, on_lost: Callable[[LeaseLost], None] | None = None) -> None:
        if ttl < 1:
            raise FleetConfigError(f"a lease TTL of {ttl} s is too short", hint="use at least 1 s")
        self.etcd = etcd
        self.ttl = ttl
        self.on_lost = on_lost
        sent = time.monotonic()
        self.id = etcd.grant(ttl)
        self._valid_until = sent + ttl
        self._state: LeaseState = "alive"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keepalive, name=f"etcd-lease-{self.id:x}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"Lease({self.id:x}, ttl={self.ttl}, {self.state})"

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revoke()

    @property
    def state(self) -> LeaseState:
        """What is known of the lease now (see the class's docstring)."""
        if self._state == "alive" and time.monotonic() >= self._valid_until:
            return "unreachable"
        return self._state

    @property
    def alive(self) -> bool:
        """Whether this node may still act under the lease."""
        return self.state == "alive"

    def check(self) -> None:
        """LeaseLost unless the lease is alive, saying why."""
        state = self.state
        if state == "alive":
            return
        why = {"unreachable": f"etcd at {self.etcd.url} did not answer a keepalive for {self.ttl} s (its TTL)",
               "expired": f"etcd at {self.etcd.url} dropped it (it was not refreshed within {self.ttl} s)",
               "revoked": "it was revoked (the node left the fleet)"}[state]
        raise LeaseLost(f"the lease {self.id:x} is {state}: {why}",
                        hint="the node cannot commit or claim anything until it rejoins the fleet")

    def _keepalive(self) -> None:
        interval = self.ttl / 3
        while not self._stop.wait(interval):
            sent = time.monotonic()
            try:
                left = self.etcd.refresh(self.id, timeout=min(self.etcd.timeout, interval))
            except (EtcdUnavailable, EtcdError) as exc:
                if time.monotonic() >= self._valid_until:
                    log.warning("lease %x: %s", self.id, exc)
                continue
            except LeaseLost:
                left = -1
            if self._stop.is_set():
                return
            if left <= 0:
                self._state = "expired"
                log.warning("lease %x expired in etcd at %s", self.id, self.etcd.url)
                if self.on_lost is not None:
                    try:
                        self.check()
                    except LeaseLost as exc:
                        self.on_lost(exc)
                return
            self._valid_until = sent + min(left, self.ttl)

    def stop(self) -> None:
        """End the keepalive thread without revoking: the lease then expires on its own within its TTL (what a
        killed node's lease does)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def revoke(self) -> None:
        """Stop the keepalive and revoke the lease, so its keys go at once. If etcd does not answer, the lease
        is left to expire within its TTL (logged). Idempotent."""
        self.stop()
        if self._state in ("revoked", "expired"):
            return
        self._state = "revoked"
        try:
            self.etcd.revoke(self.id)
        except (EtcdUnavailable, EtcdError) as exc:
            log.warning("lease %x not revoked, it expires within %d s: %s", self.id, self.ttl, exc)
