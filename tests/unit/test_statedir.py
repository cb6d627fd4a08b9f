"""The state directory: its checks, the host key, the ledger, commit/load, and the scan that removes partial and
stale snapshots."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from memvisor.snapshot import seal, statedir
from memvisor.snapshot.statedir import Meta, StateError


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEMVISOR_STATE_DIR", str(tmp_path / "deep" / "state"))
    return tmp_path / "deep" / "state"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def park(sandbox_id: str, data: bytes = b"guest state" * 1000, swap: bytes = b"\0" * 4096) -> Meta:
    """What a park does: a new generation, a fresh key, the sealed stream and a kept file, meta.json last."""
    gen = statedir.next_generation(sandbox_id)
    key = seal.new_key()
    ident = seal.Ident(sandbox_id, gen)
    folder = statedir.sandbox_dir(sandbox_id, create=True)
    with seal.SealWriter(statedir.stream_path(sandbox_id, "vm"), key, ident, "vm") as w:
        w.write(data)
    (folder / "swap.img").write_bytes(swap)
    meta = Meta(sandbox_id=sandbox_id, generation=gen,
                wrapped_key=base64.b64encode(seal.wrap_key(statedir.host_key(), key, ident)).decode(),
                parked_at=time.time(),
                streams={"vm": {"plaintext_bytes": w.plaintext_bytes, "file_bytes": w.file_bytes}},
                files={"swap.img": len(swap)}, sandbox={"policy": {"memory_mib": 512}})
    statedir.commit(meta)
    return meta


def test_root_is_created_0700(state: Path) -> None:
    assert statedir.root() == state
    assert mode(state) == 0o700
    old = os.umask(0o077)
    try:
        assert statedir.root() == state  # an existing one is accepted
    finally:
        os.umask(old)


def test_root_without_create_does_not_make_it(state: Path) -> None:
    assert statedir.root(create=False) == state
    assert not state.exists()
    assert statedir.generation("abc") is None
    assert statedir.load("abc") is None


def test_root_0755_is_refused(state: Path) -> None:
    state.mkdir(parents=True, mode=0o755)
    os.chmod(state, 0o755)
    with pytest.raises(StateError, match="is not memvisor's own") as info:
        statedir.root()
    assert f"chmod 700 {state}" in str(info.value) and "MEMVISOR_STATE_DIR" in str(info.value)


def test_root_of_another_user_is_refused(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    statedir.root()
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 4242)
    with pytest.raises(StateError, match=r"owner uid \d+, mode drwx------"):
        statedir.root()
    with pytest.raises(StateError):
        statedir.host_key()


def test_root_symlink_is_refused(state: Path, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    state.parent.mkdir(parents=True)
    state.symlink_to(real)
    with pytest.raises(StateError, match="is not memvisor's own"):
        statedir.root()


def test_host_key_is_stable_and_0600(state: Path) -> None:
    key = statedir.host_key()
    assert len(key) == 32
    assert statedir.host_key() == key
    assert (state / "host.key").read_bytes() == key
    assert mode(state / "host.key") == 0o600
    assert sorted(os.listdir(state)) == ["host.key"]


def test_host_key_race_keeps_the_first(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process links its key in between our read and our link: its key wins, ours is dropped."""
    theirs = os.urandom(32)
    real_link = os.link

    def racing_link(src: str, dst: str) -> None:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, theirs)
        os.close(fd)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    assert statedir.host_key() == theirs
    assert sorted(os.listdir(state)) == ["host.key"]


@pytest.mark.parametrize("damage, match", [
    ("short", "is 31 bytes, not 32"),
    ("long", "is over 32 bytes"),
    ("mode", "has mode -rw-r--r--, not 0600"),
    ("symlink", "it is a symlink"),
])
def test_bad_host_key_is_refused(state: Path, tmp_path: Path, damage: str, match: str) -> None:
    path = statedir.root() / "host.key"
    if damage == "symlink":
        (tmp_path / "elsewhere").write_bytes(os.urandom(32))
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.write_bytes(os.urandom({"short": 31, "long": 33}.get(damage, 32)))
        os.chmod(path, 0o644 if damage == "mode" else 0o600)
    before = os.lstat(path)
    with pytest.raises(StateError, match=match) as info:
        statedir.host_key()
    assert info.value.hint
    assert os.lstat(path) == before  # never overwritten


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_host_key_of_another_user_is_refused(state: Path) -> None:
    statedir.host_key()
    os.chown(state / "host.key", 4242, 4242)
    with pytest.raises(StateError, match=r"owner uid 4242"):
        statedir.host_key()


def test_next_generation_increments_and_survives(state: Path) -> None:
    assert statedir.generation("abc") is None
    assert [statedir.next_generation("abc") for _ in range(3)] == [1, 2, 3]
    assert statedir.next_generation("xyz") == 1
    assert statedir.generation("abc") == 3
    assert json.loads((state / "ledger.json").read_text()) == {"generations": {"abc": 3, "xyz": 1}}
    assert mode(state / "ledger.json") == 0o600
    statedir.forget("abc")
    assert statedir.generation("abc") is None
    assert statedir.generation("xyz") == 1
    assert sorted(os.listdir(state)) == [".lock", "ledger.json"]


def _bump(n: int) -> None:
    for _ in range(n):
        statedir.next_generation("abc")


def test_concurrent_increments_are_not_lost(state: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_bump, args=(15,)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert statedir.generation("abc") == 60


@pytest.mark.parametrize("doc", ['{"generations": {"abc": 0}}', '{"generations": {"abc": true}}',
                                 '{"generations": {"../x": 1}}', '{"gens": {}}', "[]", "{"])
def test_malformed_ledger_is_an_error_not_a_reset(state: Path, doc: str) -> None:
    (statedir.root() / "ledger.json").write_text(doc)
    with pytest.raises(StateError, match="ledger|JSON"):
        statedir.next_generation("abc")
    assert (state / "ledger.json").read_text() == doc


@pytest.mark.parametrize("bad", ["", "ABC", "../etc", "a/b", "x" * 33, ".lock"])
def test_bad_sandbox_ids(bad: str) -> None:
    for call in (statedir.next_generation, statedir.generation, statedir.forget, statedir.sandbox_dir,
                 statedir.load, statedir.remove):
        with pytest.raises(StateError, match="is not 1-32 of"):
            call(bad)


def test_sandbox_dir(state: Path) -> None:
    folder = statedir.sandbox_dir("abc", create=True)
    assert folder == state / "abc" and mode(folder) == 0o700
    assert statedir.stream_path("abc", "ram") == folder / "ram.snap"
    with pytest.raises(ValueError):
        statedir.stream_path("abc", "disk")


def test_park_load_resume(state: Path) -> None:
    data = os.urandom(3 * seal.CHUNK_BYTES // 2)
    meta = park("abc", data)
    loaded = statedir.load("abc")
    assert loaded == meta
    key = loaded.key(statedir.host_key())
    assert b"".join(seal.read_chunks(statedir.stream_path("abc", "vm"), key, loaded.ident, "vm")) == data
    assert statedir.scan() == ([meta], [])


def test_meta_json_round_trip() -> None:
    meta = Meta(sandbox_id="abc", generation=2, wrapped_key=base64.b64encode(bytes(60)).decode(), parked_at=1.5,
                streams={"vm": {"plaintext_bytes": 1, "file_bytes": 2}}, files={"swap.img": 3}, sandbox={"x": [1]})
    assert Meta.from_json(json.loads(json.dumps(meta.to_json()))) == meta


@pytest.mark.parametrize("change", [
    {"generation": 0}, {"generation": "2"}, {"sandbox_id": "../x"}, {"wrapped_key": "not base64!"},
    {"wrapped_key": "AAAA"}, {"parked_at": "now"}, {"streams": {"disk": {"plaintext_bytes": 1, "file_bytes": 2}}},
    {"streams": {"vm": {"plaintext_bytes": -1, "file_bytes": 2}}}, {"files": {"../host.key": 32}},
    {"files": {"meta.json": 1}}, {"files": {"vm.snap": 1}}, {"sandbox": []}, {"extra": 1},
])
def test_malformed_meta_is_refused(change: dict[str, object]) -> None:
    doc: dict[str, object] = {"sandbox_id": "abc", "generation": 2, "wrapped_key": base64.b64encode(bytes(60)).decode(),
                              "parked_at": 1.5, "streams": {}, "files": {}, "sandbox": {}}
    Meta.from_json(doc)
    with pytest.raises(StateError, match="meta.json is malformed"):
        Meta.from_json(doc | change)


def test_commit_refuses_a_wrong_generation_or_missing_file(state: Path) -> None:
    meta = park("abc")
    statedir.remove("abc")
    with pytest.raises(StateError, match="the ledger is at 1"):
        statedir.commit(Meta(**{**meta.to_json(), "generation": 2}))
    statedir.next_generation("abc")
    statedir.sandbox_dir("abc", create=True)
    with pytest.raises(StateError, match=r"cannot commit the snapshot of sandbox abc: \S+ is missing"):
        statedir.commit(Meta(**{**meta.to_json(), "generation": 2}))
    assert not (state / "abc" / "meta.json").exists()


def test_scan_keeps_complete_and_removes_partial_and_stale(state: Path) -> None:
    keep = park("keep")
    # A park killed before its commit: no meta.json.
    statedir.next_generation("partial")
    (statedir.sandbox_dir("partial", create=True) / "vm.snap").write_bytes(b"half")
    # A snapshot whose sandbox was parked again since (or resumed and re-parked): the ledger is newer.
    park("stale")
    statedir.next_generation("stale")
    # Stream files damaged after the commit.
    park("short")
    os.truncate(statedir.stream_path("short", "vm"), 100)
    park("gone")
    statedir.stream_path("gone", "vm").unlink()
    park("noswap")
    (state / "noswap" / "swap.img").unlink()
    # A leftover temp file of write_atomic in a complete snapshot.
    (state / "keep" / ".meta.json.0123456789abcdef.tmp").write_text("{}")

    metas, notes = statedir.scan()
    assert metas == [keep]
    assert sorted(notes) == [
        "removed a leftover temporary file keep/.meta.json.0123456789abcdef.tmp",
        "removed a partial snapshot of sandbox gone (vm.snap is missing)",
        "removed a partial snapshot of sandbox noswap (swap.img is missing)",
        "removed a partial snapshot of sandbox partial (no meta.json)",
        "removed a partial snapshot of sandbox short (vm.snap is 100 bytes, meta.json says 11028)",
        "removed a stale snapshot of sandbox stale (generation 1; the ledger is at 2), which is never resumed",
    ]
    assert sorted(os.listdir(state)) == [".lock", "host.key", "keep", "ledger.json"]
    assert sorted(os.listdir(state / "keep")) == ["meta.json", "swap.img", "vm.snap"]
    assert statedir.scan() == ([keep], [])


def test_scan_never_follows_symlinks(state: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    statedir.root()
    (state / "evil").symlink_to(outside)
    (state / "README").write_text("not ours to remove")
    assert statedir.scan() == ([], [])
    assert (outside / "precious").read_text() == "keep me"
    assert (state / "README").exists() and (state / "evil").is_symlink()
    with pytest.raises(StateError, match="is not memvisor's own"):
        statedir.remove("evil")
    assert (outside / "precious").exists()


def test_remove_keeps_the_ledger_so_an_old_copy_stays_refused(state: Path, tmp_path: Path) -> None:
    park("abc")
    backup = tmp_path / "backup"
    shutil.copytree(state / "abc", backup)
    park_again = statedir.next_generation("abc")
    assert park_again == 2
    statedir.remove("abc")
    assert not (state / "abc").exists()
    statedir.remove("abc")  # nothing to remove
    assert statedir.generation("abc") == 2
    # An attacker (or a restore from backup) puts generation 1 back: it is stale, never resumed.
    os.rename(backup, state / "abc")
    with pytest.raises(StateError, match="is generation 1 but the ledger is at 2"):
        statedir.load("abc")
    metas, notes = statedir.scan()
    assert metas == [] and notes == [
        "removed a stale snapshot of sandbox abc (generation 1; the ledger is at 2), which is never resumed"]


def test_write_atomic_leaves_no_temp_files(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = statedir.root()
    target = folder / "doc.json"
    statedir.write_json_atomic(target, {"a": 1})
    statedir.write_atomic(target, b"two", mode=0o640)
    assert target.read_bytes() == b"two" and mode(target) == 0o640
    assert os.listdir(folder) == ["doc.json"]

    def fail(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        statedir.write_atomic(target, b"three")
    assert os.listdir(folder) == ["doc.json"] and target.read_bytes() == b"two"


def test_scan_removes_only_old_temp_files_in_the_root(state: Path) -> None:
    folder = statedir.root()
    young, old = folder / ".ledger.json.0000000000000001.tmp", folder / ".ledger.json.0000000000000002.tmp"
    young.write_text("{}")
    old.write_text("{}")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert statedir.scan() == ([], [f"removed a leftover temporary file {old.name}"])
    assert young.exists() and not old.exists()


def test_uncommit_consumes_the_snapshot_but_keeps_the_disks(state: Path, tmp_path: Path) -> None:
    park("abc")
    backup = tmp_path / "backup"
    shutil.copytree(state / "abc", backup)
    statedir.uncommit("abc")
    assert sorted(os.listdir(state / "abc")) == ["swap.img"]
    assert statedir.load("abc") is None
    assert statedir.generation("abc") == 2  # generation 1 is retired: a copy of it is stale
    statedir.uncommit("abc")  # twice is harmless
    assert statedir.generation("abc") == 2
    statedir.remove("abc")
    os.rename(backup, state / "abc")
    with pytest.raises(StateError, match="is generation 1 but the ledger is at 2"):
        statedir.load("abc")
    statedir.remove("abc")
    assert park("abc").generation == 3
