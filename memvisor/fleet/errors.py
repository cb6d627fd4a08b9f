"""The fleet's errors: each names the value at fault (a URL, a node, a sandbox, a directory) and, as its hint,
the fix. The daemon maps them to answers: FenceLost and Stale to 409, NoSuchSandbox to 404, EtcdUnavailable and
PlacementRefused to 503, StoreFull to 507."""

from __future__ import annotations

from memvisor.errors import MemvisorError


class FleetError(MemvisorError):
    """Anything the fleet layer refuses."""


class FleetConfigError(FleetError):
    """A fleet setting is malformed (an etcd URL, TLS files, a node name): found at start, before anything runs."""


class EtcdUnavailable(FleetError):
    """No etcd endpoint answered in time (refused, timed out, no leader): nothing was decided. A write that timed
    out may still have landed; the fence re-reads before it reports a lost race."""


class EtcdError(FleetError):
    """etcd answered and refused the request (malformed, not permitted): retrying will not help."""


class LeaseLost(FleetError):
    """This node's lease expired, was revoked, or could not be refreshed within its TTL: the node may no longer
    commit anything under it (etcd refuses its fenced writes) and must rejoin."""


class NodeNameTaken(FleetError):
    """Another live node holds the node name asked for."""


class FenceError(FleetError):
    """A sandbox's record does not allow the move asked for."""


class NoSuchSandbox(FenceError):
    """The fleet has no record of that sandbox."""


class FenceLost(FenceError):
    """The sandbox's record is not in the state the move needs (another node claimed it first, its generation
    moved, it runs elsewhere): the caller's view is old. Never retried blindly: the daemon answers 409."""


class Stale(FenceLost):
    """Generations.advance() found another generation than the caller expected (same meaning as the local
    ledger's Stale)."""


class RecordError(FleetError):
    """A value in etcd under the fleet's prefix is not what memvisor writes."""


class StoreError(FleetError):
    """The bundle store is unusable (not a directory of ours, wrong mode) or a bundle in it is malformed."""


class StoreFull(StoreError):
    """The store ran out of space (ENOSPC or EDQUOT) while a bundle was written; nothing of it was left behind."""


class BundleNotFound(StoreError):
    """No complete bundle for that (sandbox, generation): absent, or partial (no manifest)."""


class PlacementRefused(FleetError):
    """No node of the fleet both has room for the sandbox and matches what it needs."""
