"""Freshness: which generation of each parked sandbox and template may be resumed (the only thing that refuses an
older snapshot, since seal.py proves a stream's generation but not that it is the latest).

`Generations` is the interface: a current generation per id, advanced by compare-and-swap, forgotten when the
sandbox is gone. One host implements it here (`LocalLedger`); the fleet will implement it in etcd, where a
generation moves only by transaction.

The local ledger is <state>/ledger.json, authenticated: a monotonic `counter` (one more on every write), the
state directory's random `state_id`, every generation, and an HMAC-SHA256 under a subkey of the host key
(keys.LEDGER) over the canonical bytes of the rest. A second copy of its head, `{counter, digest}` of the ledger
with its own MAC and bound to the state_id, is kept beside the key file (keys.head_path), out of the state
directory's reach. A read checks both: the MAC, then that the head agrees (the same counter and digest; or the
ledger exactly one ahead, which only a crash between the two writes leaves, and which is repaired). Anything else
means the state directory was rolled back (restored from an older copy), or the ledger or head damaged or made
under another key: a StateError that names both files, never a reset (a reset ledger would make old snapshots
resumable again). What an attacker who restores both the state directory and the key's directory can still do is
in docs/security.md.

One head file may carry the heads of several state directories (each bound to its state_id): test runs and
benchmarks with a state directory of their own may share the default key file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any, Final, Protocol

from memvisor.host.runtime import SAFE_ID
from memvisor.snapshot import files, keys
from memvisor.snapshot.files import StateError

LEDGER: Final = "ledger.json"
LOCK: Final = ".lock"
FORMAT: Final = 2  # 1 was an unauthenticated {"generations": ...} (migrated once, with the old host.key)
JSON_LIMIT: Final = 16 << 20
_STATE_ID = 16  # bytes of randomness in a state directory's id


class Generations(Protocol):
    """The generation of each parked sandbox or template that may be resumed; what refuses an older snapshot."""

    def current(self, key: str) -> int | None:
        """The generation of `key` that may be resumed, or None if it has none."""

    def advance(self, key: str, expected: int | None) -> int:
        """Move `key` from generation `expected` (None: it has none) to the next one and return it; Stale if its
        generation is not `expected` (another writer moved it: the caller's view is old)."""

    def forget(self, key: str) -> None:
        """Drop `key`: none of its snapshots is resumable after this."""

    def all(self) -> dict[str, int]:
        """Every id and its current generation."""


class Stale(StateError):
    """advance() found another generation than expected."""


def _check_id(key: str) -> None:
    if not isinstance(key, str) or not SAFE_ID.fullmatch(key):
        raise StateError(f"sandbox id {key!r} is not 1-32 of a-z, 0-9, '_' and '-'")


def _mac(mac_key: bytearray, label: bytes, doc: object) -> str:
    return hmac.new(mac_key, label + b"\0" + files.canonical(doc), hashlib.sha256).hexdigest()


class LocalLedger:
    """The authenticated ledger of one state directory, with its head beside the key file (see the module's
    docstring). Every call re-reads both under the state directory's lock: several processes (a daemon, an SDK
    program) may share it. close() zeroes its MAC key."""

    def __init__(self, root: Path, key: keys.HostKey, head: Path) -> None:
        self.path = root / LEDGER
        self.head = head
        self._lock = root / LOCK
        self._head_lock = head.with_name(head.name + ".lock")
        self.key_path = key.path
        self._mac: bytearray = key.derive(keys.LEDGER)

    def close(self) -> None:
        files.zero(self._mac)

    def __repr__(self) -> str:
        return f"LocalLedger({str(self.path)!r}, head={str(self.head)!r})"

    # -- Generations --------------------------------------------------------------------------------------
    def current(self, key: str) -> int | None:
        _check_id(key)
        with files.locked(self._lock):
            gens = self._read((self._mac,))[0]["generations"]
        value: int | None = gens.get(key)
        return value

    def advance(self, key: str, expected: int | None) -> int:
        _check_id(key)
        with files.locked(self._lock):
            doc, used = self._read((self._mac,))
            now = doc["generations"].get(key)
            if now != expected:
                raise Stale(f"the generation of {key} is {now}, not {expected}: it moved meanwhile")
            doc["generations"][key] = (now or 0) + 1
            self._write(doc, self._mac)
            value: int = doc["generations"][key]
            return value

    def forget(self, key: str) -> None:
        _check_id(key)
        with files.locked(self._lock):
            doc, _ = self._read((self._mac,))
            if doc["generations"].pop(key, None) is not None:
                self._write(doc, self._mac)

    def all(self) -> dict[str, int]:
        with files.locked(self._lock):
            gens: dict[str, int] = self._read((self._mac,))[0]["generations"]
        return gens

    # -- the files ----------------------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether ledger.json exists (any format)."""
        return self.path.exists() or self.path.is_symlink()

    def initialize(self, generations: dict[str, int] | None = None) -> None:
        """Write the first ledger of a state directory (a new random state_id) and its head. Only for a state
        directory with no ledger (statedir.py decides)."""
        with files.locked(self._lock):
            if self.exists():
                raise StateError(f"the ledger {self.path} appeared while memvisor was creating it")
            doc = {"format": FORMAT, "state_id": secrets.token_hex(_STATE_ID), "counter": 0,
                   "generations": dict(generations or {})}
            self._write(doc, self._mac)

    def legacy(self) -> dict[str, int] | None:
        """The generations of an older memvisor's unauthenticated ledger (format 1), or None if the ledger is not
        one. Trusted only once, by statedir.py, while it moves that memvisor's host key out of the directory."""
        try:
            data, _ = files.read_own(self.path, JSON_LIMIT, f"the ledger {self.path}")
        except FileNotFoundError:
            return None
        doc = files.parse_json(data, self.path)
        if not isinstance(doc, dict) or set(doc) != {"generations"}:
            return None
        gens = doc["generations"]
        if not isinstance(gens, dict) or not all(isinstance(k, str) and SAFE_ID.fullmatch(k) and type(v) is int
                                                 and v >= 1 for k, v in gens.items()):
            raise StateError(f"the old ledger {self.path} is malformed")
        return dict(gens)

    def rekey(self, new: keys.HostKey) -> None:
        """Rotation: re-MAC the ledger and its head under `new` (either may be under the old key or already the
        new one, after an interrupted rotation); from then on this object uses `new`."""
        mac = new.derive(keys.LEDGER)
        try:
            with files.locked(self._lock):
                doc, _ = self._read((self._mac, mac))
                self._write(doc, mac)
        except BaseException:
            files.zero(mac)
            raise
        files.zero(self._mac)
        self._mac = mac
        self.key_path = new.path

    def _hint(self) -> str:
        return (f"nothing is reset (a reset ledger would make old snapshots resumable): if the key file "
                f"{self.key_path} is not the one this state directory was used with, put the right one back; if the "
                f"state directory was restored from an older copy, its parked sandboxes of that time cannot be "
                f"resumed (remove {self.path.parent} to start over, with {self.head})")

    def _read(self, accept: tuple[bytearray, ...]) -> tuple[dict[str, Any], bytearray]:
        """The checked ledger, and which MAC key of `accept` it verified under. Holds the lock (caller)."""
        try:
            data, _ = files.read_own(self.path, JSON_LIMIT, f"the ledger {self.path}", modes=(0o600,))
        except FileNotFoundError:
            raise StateError(f"the ledger {self.path} is missing", hint=self._hint()) from None
        doc = files.parse_json(data, self.path)
        if not isinstance(doc, dict) or set(doc) != {"format", "state_id", "counter", "generations", "mac"} \
                or doc["format"] != FORMAT or not isinstance(doc["state_id"], str) \
                or len(doc["state_id"]) != 2 * _STATE_ID or type(doc["counter"]) is not int or doc["counter"] < 1 \
                or not isinstance(doc["generations"], dict) or not isinstance(doc["mac"], str) \
                or not all(isinstance(k, str) and SAFE_ID.fullmatch(k) and type(v) is int and v >= 1
                           for k, v in doc["generations"].items()):
            raise StateError(f"the ledger {self.path} is malformed", hint=self._hint())
        mac = doc.pop("mac")
        if files.canonical({**doc, "mac": mac}) != data:
            raise StateError(f"the ledger {self.path} is not in memvisor's canonical form: it was edited",
                             hint=self._hint())
        used = next((k for k in accept if hmac.compare_digest(_mac(k, b"memvisor ledger", doc), mac)), None)
        if used is None:
            raise StateError(f"the ledger {self.path} fails its MAC under the key file {self.key_path}: the key "
                             "file was replaced, or the ledger changed", hint=self._hint())
        self._check_head(doc, data, accept, used)
        return doc, used

    def _check_head(self, doc: dict[str, Any], data: bytes, accept: tuple[bytearray, ...],
                    used: bytearray) -> None:
        digest = hashlib.sha256(data).hexdigest()
        entry = self._heads().get(doc["state_id"])
        where = f"the ledger {self.path} (counter {doc['counter']}) and its head in {self.head}"
        if not isinstance(entry, dict) or set(entry) != {"counter", "digest", "mac"}:
            raise StateError(f"{where}: the head has no entry for this state directory (id {doc['state_id']}): "
                             "the head was removed, or the state directory comes from elsewhere", hint=self._hint())
        body = {"state_id": doc["state_id"], "counter": entry["counter"], "digest": entry["digest"]}
        if not isinstance(entry["mac"], str) or not any(
                hmac.compare_digest(_mac(k, b"memvisor ledger head", body), entry["mac"]) for k in accept):
            raise StateError(f"{where}: the head fails its MAC", hint=self._hint())
        if entry["counter"] == doc["counter"] and hmac.compare_digest(str(entry["digest"]), digest):
            return
        if entry["counter"] == doc["counter"] - 1:
            self._put_head(doc["state_id"], doc["counter"], digest, used)  # a crash between the two writes
            return
        raise StateError(f"{where} disagree: the head says counter {entry['counter']}, so the state directory "
                         "was rolled back (restored from an older copy) or its ledger replaced", hint=self._hint())

    def _heads(self) -> dict[str, Any]:
        try:
            os.close(keys.open_dir(self.head.parent, f"the ledger head {self.head}"))
            data, _ = files.read_own(self.head, JSON_LIMIT, f"the ledger head {self.head}", modes=(0o600,))
        except FileNotFoundError:
            return {}
        doc = files.parse_json(data, self.head)
        if not isinstance(doc, dict) or set(doc) != {"format", "heads"} or not isinstance(doc["heads"], dict):
            raise StateError(f"the ledger head {self.head} is malformed", hint=self._hint())
        heads: dict[str, Any] = doc["heads"]
        return heads

    def _put_head(self, state_id: str, counter: int, digest: str, mac_key: bytearray) -> None:
        try:
            if not self.head.parent.is_dir():
                self.head.parent.parent.mkdir(parents=True, exist_ok=True)
                files.make_dir(self.head.parent)
            with files.locked(self._head_lock):  # other state directories may share the head file
                heads = self._heads()
                body = {"state_id": state_id, "counter": counter, "digest": digest}
                heads[state_id] = {"counter": counter, "digest": digest,
                                   "mac": _mac(mac_key, b"memvisor ledger head", body)}
                files.write_atomic(self.head, files.canonical({"format": 1, "heads": heads}))
        except OSError as exc:
            raise StateError(f"cannot write the ledger head {self.head}: {exc.strerror}",
                             hint="it must be writable (a read-only key directory, such as systemd-creds': set "
                                  "MEMVISOR_LEDGER_HEAD to a writable path; docs/configuration.md)") from None

    def _write(self, doc: dict[str, Any], mac_key: bytearray) -> None:
        """Write the next ledger (counter + 1) and then its head. A crash in between leaves the ledger one ahead,
        which the next read repairs. Holds the lock (caller)."""
        doc = {k: v for k, v in doc.items() if k != "mac"}
        doc["counter"] += 1
        doc["generations"] = dict(sorted(doc["generations"].items()))
        data = files.canonical({**doc, "mac": _mac(mac_key, b"memvisor ledger", doc)})
        files.write_atomic(self.path, data)
        self._put_head(doc["state_id"], doc["counter"], hashlib.sha256(data).hexdigest(), mac_key)
