"""The state directory: its checks, commit/load of authenticated manifests, the kept files checked on their
descriptors, uncommit, and the scan that removes partial and stale snapshots and keeps (and lists) the rest."""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.snapshot import files, seal, statedir
from memvisor.snapshot.manifest import KeptFile, Manifest
from memvisor.snapshot.statedir import SnapshotProblem, State, StateError


@pytest.fixture
def root() -> Path:
    return Path(os.environ["MEMVISOR_STATE_DIR"])


@pytest.fixture
def state() -> Iterator[State]:
    opened = statedir.open(create_key=True)
    yield opened
    opened.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def kept_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, data)
    os.fchmod(fd, 0o600)
    os.close(fd)


def park(state: State, sandbox_id: str, data: bytes = b"guest state" * 1000, swap: bytes = b"\0" * 4096,
         kind: str = "sandbox") -> Manifest:
    """What a park does: a new generation, a fresh key, the sealed stream and a kept file, the manifest last."""
    gen = state.generations.advance(sandbox_id, state.generations.current(sandbox_id))
    key = seal.new_key()
    ident = seal.Ident(sandbox_id, gen)
    folder = state.sandbox_dir(sandbox_id, create=True)
    state.stream_path(sandbox_id, "vm").unlink(missing_ok=True)  # an uncommitted older one, as park.py does
    with seal.SealWriter(state.stream_path(sandbox_id, "vm"), key, ident, "vm") as w:
        w.write(data)
    kept_file(folder / "swap.img", swap)
    st = os.stat(folder / "swap.img")
    manifest = state.wrap(Manifest(
        kind=kind, id=sandbox_id, generation=gen, parked_at=time.time(),
        streams={"vm": {"plaintext_bytes": w.plaintext_bytes, "file_bytes": w.file_bytes,
                        "allocated_bytes": files.allocated(os.stat(w.path))}},
        files={"swap.img": KeptFile(len(swap), files.allocated(st), "confidential")},
        sandbox={"policy": {"vm": {"memory_mib": 512}}, "name": f"name-{sandbox_id}"}), key)
    state.commit(manifest)
    return manifest


def test_root_is_created_0700(root: Path) -> None:
    assert statedir.root() == root
    assert mode(root) == 0o700
    old = os.umask(0o077)
    try:
        assert statedir.root() == root  # an existing one is accepted
    finally:
        os.umask(old)


def test_root_0755_is_refused(root: Path) -> None:
    root.mkdir(parents=True, mode=0o755)
    os.chmod(root, 0o755)
    with pytest.raises(StateError, match="is not memvisor's own") as info:
        statedir.open(create_key=True)
    assert f"chmod 700 {root}" in str(info.value) and "MEMVISOR_STATE_DIR" in str(info.value)


def test_root_of_another_user_is_refused(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    statedir.root()
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 4242)
    with pytest.raises(StateError, match=r"owner uid \d+, mode drwx------"):
        statedir.root()


def test_root_symlink_is_refused(root: Path, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    root.parent.mkdir(parents=True)
    root.symlink_to(real)
    with pytest.raises(StateError, match="is not memvisor's own"):
        statedir.root()


def test_open_keeps_no_key_in_the_state_directory(state: State, root: Path) -> None:
    assert sorted(os.listdir(root)) == [".inuse", ".lock", "ledger.json"]
    assert state.key.path == Path(os.environ["MEMVISOR_KEY_FILE"])
    assert not state.key.path.is_relative_to(root)
    assert mode(state.key.path) == 0o600 and mode(state.key.path.parent) == 0o700


def test_park_load_scan(state: State) -> None:
    data = os.urandom(3 * seal.CHUNK_BYTES // 2)
    manifest = park(state, "abc", data)
    loaded = state.load("abc")
    assert loaded == manifest
    key = state.unwrap(loaded)
    assert b"".join(seal.read_chunks(state.stream_path("abc", "vm"), key, loaded.ident, "vm")) == data
    assert state.scan() == ([manifest], [])
    assert state.committed() == ([manifest], [])
    assert manifest.disk_bytes() == sum(files.allocated(os.stat(p)) for p in state.sandbox_dir("abc").iterdir()
                                        if p.name != "meta.json")


def test_one_changed_byte_of_the_manifest_is_refused_and_kept(state: State) -> None:
    park(state, "abc")
    meta = state.sandbox_dir("abc") / "meta.json"
    good = meta.read_bytes()
    for i in range(0, len(good), 7):
        changed = bytearray(good)
        changed[i] ^= 0x01 if chr(good[i]).isalnum() else 0x00
        if changed == good:
            continue
        files.write_atomic(meta, bytes(changed))
        with pytest.raises(SnapshotProblem, match="the manifest of sandbox abc is not authentic .*; it stays "
                                                  "parked") as info:
            state.load("abc")
        assert info.value.kind == "damaged"
    files.write_atomic(meta, good[:-1] + b" \n")  # not canonical, though the same JSON
    manifests, problems = state.scan()
    assert manifests == [] and [(p.id, p.kind, p.removed) for p in problems] == [("abc", "damaged", False)]
    assert meta.exists()  # a scan never removes what it cannot authenticate
    files.write_atomic(meta, good)
    assert state.load("abc") is not None


def test_a_templates_manifest_in_a_sandboxs_place_is_refused(state: State) -> None:
    park(state, "t-0123456789abcdef", kind="template")
    shutil.move(state.root / "t-0123456789abcdef", state.root / "abc")
    with pytest.raises(SnapshotProblem, match="is the manifest of t-0123456789abcdef, not abc|not a sandbox's"):
        state.load("abc")


@pytest.mark.parametrize("attack, words", [
    ("symlink", "it is a symlink"),
    ("hardlink", "has 2 hard links, not 1"),
    ("mode", "has mode 0644, not 0600"),
    ("size", "is 8192 bytes, not the 4096 recorded"),
    ("missing", "is missing"),
    ("fifo", "is not a regular file"),
])
def test_a_kept_disk_is_checked_on_its_descriptor(state: State, tmp_path: Path, attack: str, words: str) -> None:
    park(state, "abc")
    swap = state.sandbox_dir("abc") / "swap.img"
    elsewhere = tmp_path / "host-file"
    kept_file(elsewhere, b"\0" * 4096)
    if attack == "symlink":
        swap.unlink()
        swap.symlink_to(elsewhere)
    elif attack == "hardlink":
        os.link(swap, tmp_path / "another-name")
    elif attack == "mode":
        os.chmod(swap, 0o644)
    elif attack == "size":
        os.truncate(swap, 8192)
    elif attack == "missing":
        swap.unlink()
    else:
        swap.unlink()
        os.mkfifo(swap, 0o600)
    with pytest.raises(SnapshotProblem, match=f"the kept disk swap.img of sandbox abc:? {words}") as info:
        state.load("abc")
    assert info.value.kind == "files" and "stays parked" in info.value.message
    manifests, problems = state.scan()
    assert manifests == [] and [(p.kind, p.removed) for p in problems] == [("files", False)]
    assert problems[0].manifest is not None  # the manifest itself is authentic: the daemon can list its name
    assert (state.sandbox_dir("abc") / "meta.json").exists()


def test_open_kept_gives_checked_descriptors_of_the_files_themselves(state: State) -> None:
    manifest = park(state, "abc", swap=b"S" * 4096)
    fds = state.open_kept(state.sandbox_dir("abc"), manifest, "sandbox abc")
    try:
        assert list(fds) == ["swap.img"]
        assert os.pread(fds["swap.img"], 4, 0) == b"SSSS"
        assert os.path.samestat(os.fstat(fds["swap.img"]), os.stat(state.sandbox_dir("abc") / "swap.img"))
        assert os.get_blocking(fds["swap.img"])  # blocking, as QEMU expects
    finally:
        for fd in fds.values():
            os.close(fd)


def test_commit_refuses_a_wrong_generation_or_a_missing_file(state: State) -> None:
    manifest = park(state, "abc")
    state.generations.advance("abc", 1)
    with pytest.raises(StateError, match="the ledger is at 2"):
        state.commit(manifest)
    later = park(state, "abc")
    (state.sandbox_dir("abc") / "meta.json").unlink()
    (state.sandbox_dir("abc") / "swap.img").unlink()
    with pytest.raises(StateError, match=r"cannot commit the snapshot of abc: .*swap.img.* is missing"):
        state.commit(later)
    assert not (state.sandbox_dir("abc") / "meta.json").exists()


def test_scan_removes_partial_and_stale_and_keeps_the_rest(state: State, root: Path) -> None:
    keep = park(state, "keep")
    state.generations.advance("partial", None)  # a park killed before its commit: no manifest
    (state.sandbox_dir("partial", create=True) / "vm.snap").write_bytes(b"half")
    park(state, "stale")
    state.generations.advance("stale", 1)  # parked again (or resumed) since
    park(state, "short")
    os.truncate(state.stream_path("short", "vm"), 100)  # damaged after the commit: kept, listed
    park(state, "gone")
    state.generations.forget("gone")  # an id the ledger does not know: kept, listed
    (root / "keep" / ".meta.json.0123456789abcdef.tmp").write_text("{}")

    manifests, problems = state.scan()
    assert manifests == [keep]
    found = {(p.id, p.kind, p.removed) for p in problems}
    assert found == {("keep", "partial", True), ("partial", "partial", True), ("stale", "stale", True),
                     ("short", "files", False), ("gone", "unknown", False)}
    notes = sorted(p.note() for p in problems)
    assert "removed a stale snapshot of sandbox stale (generation 1; the ledger is at 2), which is never resumed" \
        in notes
    assert "removed a partial snapshot of sandbox partial (no meta.json)" in notes
    assert sorted(os.listdir(root)) == [".inuse", ".lock", "gone", "keep", "ledger.json", "short"]
    assert sorted(os.listdir(root / "keep")) == ["meta.json", "swap.img", "vm.snap"]
    assert state.scan() == ([keep], [p for p in problems if not p.removed])


def test_scan_leaves_a_running_sandboxs_kept_disks(state: State) -> None:
    park(state, "run")
    assert state.uncommit("run", 1)
    park(state, "stale")
    state.generations.advance("stale", 1)
    assert state.scan(running={"run", "stale"}) == ([], [statedir.Problem(
        "stale", "stale", "a stale snapshot of sandbox stale (generation 1; the ledger is at 2), which is never "
        "resumed (its kept disks stay: it runs)", True)])
    assert sorted(os.listdir(state.sandbox_dir("run"))) == ["swap.img"]
    assert sorted(os.listdir(state.sandbox_dir("stale"))) == ["swap.img"]


def test_scan_never_follows_symlinks(state: State, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    (root / "evil").symlink_to(outside)
    (root / "README").write_text("not ours to remove")
    assert state.scan() == ([], [])
    assert (outside / "precious").read_text() == "keep me"
    assert (root / "README").exists() and (root / "evil").is_symlink()
    with pytest.raises(StateError, match="is not memvisor's own"):
        state.remove("evil")
    assert (outside / "precious").exists()


def test_uncommit_is_idempotent_checks_the_generation_and_keeps_the_disks(state: State, tmp_path: Path) -> None:
    park(state, "abc")
    backup = tmp_path / "backup"
    shutil.copytree(state.sandbox_dir("abc"), backup)
    assert not state.uncommit("abc", 2)  # another generation's snapshot is committed: nothing changes
    assert state.load("abc") is not None
    assert state.uncommit("abc", 1)
    assert sorted(os.listdir(state.sandbox_dir("abc"))) == ["swap.img"]
    assert state.load("abc") is None and state.generations.current("abc") == 2  # generation 1 retired
    assert state.uncommit("abc", 1)  # twice is harmless (crash recovery may repeat it)
    assert state.generations.current("abc") == 2
    state.remove("abc")
    os.rename(backup, state.sandbox_dir("abc"))
    with pytest.raises(SnapshotProblem, match="is generation 1 but the ledger is at 2"):
        state.load("abc")
    state.remove("abc")
    assert park(state, "abc").generation == 3


def test_uncommit_finishes_one_cut_before_the_ledger_moved(state: State) -> None:
    park(state, "abc")
    (state.sandbox_dir("abc") / "meta.json").unlink()  # the crash came after this
    assert state.uncommit("abc", 1)
    assert state.generations.current("abc") == 2 and not state.stream_path("abc", "vm").exists()


def test_remove_keeps_the_ledger_so_an_old_copy_stays_refused(state: State, tmp_path: Path) -> None:
    park(state, "abc")
    backup = tmp_path / "backup"
    shutil.copytree(state.sandbox_dir("abc"), backup)
    state.generations.advance("abc", 1)
    state.remove("abc")
    assert not state.sandbox_dir("abc").exists()
    state.remove("abc")  # nothing to remove
    os.rename(backup, state.sandbox_dir("abc"))
    with pytest.raises(SnapshotProblem, match="is generation 1 but the ledger is at 2"):
        state.load("abc")
    state.forget("abc")
    with pytest.raises(SnapshotProblem, match="is not in the ledger") as info:
        state.load("abc")
    assert info.value.kind == "unknown"


@pytest.mark.parametrize("bad", ["", "ABC", "../etc", "a/b", "x" * 33, ".lock", "templates", "lost"])
def test_bad_sandbox_ids(state: State, bad: str) -> None:
    for call in (state.sandbox_dir, state.load, state.remove, state.forget):
        with pytest.raises(StateError, match="is not 1-32 of"):
            call(bad)


def test_write_atomic_leaves_no_temp_files(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = statedir.root()
    target = folder / "doc.json"
    files.write_json_atomic(target, {"a": 1})
    files.write_atomic(target, b"two", mode=0o640)
    assert target.read_bytes() == b"two" and mode(target) == 0o640
    assert os.listdir(folder) == ["doc.json"]

    def fail(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        files.write_atomic(target, b"three")
    assert os.listdir(folder) == ["doc.json"] and target.read_bytes() == b"two"


def test_scan_removes_only_old_temp_files_in_the_root(state: State, root: Path) -> None:
    young, old = root / ".ledger.json.0000000000000001.tmp", root / ".ledger.json.0000000000000002.tmp"
    young.write_text("{}")
    old.write_text("{}")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert [p.note() for p in state.scan()[1]] == [f"removed a leftover temporary file {old.name}"]
    assert young.exists() and not old.exists()


def test_committed_reads_without_removing(state: State) -> None:
    keep = park(state, "keep")
    state.generations.advance("partial", None)
    state.sandbox_dir("partial", create=True)
    park(state, "stale")
    state.generations.advance("stale", 1)
    manifests, problems = state.committed()
    assert manifests == [keep] and [(p.id, p.kind) for p in problems] == [("stale", "stale")]
    assert state.sandbox_dir("partial").exists() and state.sandbox_dir("stale").exists()
