"""The host key file: where it is, the checks on its descriptor, when it may be made (never while anything is
wrapped under a key), an older memvisor's key moved out of the state directory, and `memvisor key rotate`."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest

from memvisor import paths
from memvisor.snapshot import keys, rotate, statedir
from memvisor.snapshot.files import StateError
from tests.unit.test_statedir import park


@pytest.fixture
def key_path() -> Path:
    return Path(os.environ["MEMVISOR_KEY_FILE"])


def test_where_the_key_file_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert keys.locate(tmp_path / "given") == tmp_path / "given"
    assert keys.locate() == Path(os.environ["MEMVISOR_KEY_FILE"])
    monkeypatch.delenv("MEMVISOR_KEY_FILE")
    assert keys.locate() == paths.key_file()
    assert paths.key_file() == (Path("/etc/memvisor/host.key") if os.geteuid() == 0 else
                                Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
                                / "memvisor" / "host.key")
    monkeypatch.setenv("MEMVISOR_LEDGER_HEAD", str(tmp_path / "elsewhere.head"))
    assert keys.head_path(tmp_path / "k") == tmp_path / "elsewhere.head"
    monkeypatch.delenv("MEMVISOR_LEDGER_HEAD")
    assert keys.head_path(tmp_path / "k") == tmp_path / "k.head"


def test_the_key_is_made_at_the_first_open_outside_the_state_directory(key_path: Path) -> None:
    assert not key_path.exists()
    with statedir.open(create_key=True) as state:
        assert state.key.path == key_path
    assert key_path.stat().st_size == 32 and key_path.stat().st_mode & 0o777 == 0o600
    assert key_path.parent.stat().st_mode & 0o777 == 0o700
    before = key_path.read_bytes()
    with statedir.open(create_key=True):
        pass
    assert key_path.read_bytes() == before  # never remade
    with pytest.raises(keys.KeyMissing):
        key_path.unlink()
        statedir.open(create_key=False)


def test_a_removed_key_is_never_recreated_while_something_is_wrapped(key_path: Path) -> None:
    with statedir.open(create_key=True) as state:
        park(state, "abc")
    key_path.unlink()
    for _ in range(2):
        with pytest.raises(StateError, match=f"the key file {key_path} does not exist, but the state directory .* "
                                             "holds 2 thing.*the snapshot of sandbox abc.*nothing was "
                                             "recreated") as info:
            statedir.open(create_key=True)
        assert "restore it" in (info.value.hint or "")
        assert not key_path.exists()


def test_a_replaced_key_is_refused_naming_the_key_file(key_path: Path) -> None:
    with statedir.open(create_key=True) as state:
        park(state, "abc")
    os.chmod(key_path, 0o600)
    key_path.write_bytes(os.urandom(32))
    with pytest.raises(StateError, match=f"fails its MAC under the key file {key_path}: the key file was "
                                         "replaced"):
        statedir.open(create_key=True)


@pytest.mark.parametrize("damage, match", [
    ("short", "is 31 bytes, not the 32 recorded"),
    ("long", "is 33 bytes, not the 32 recorded"),
    ("mode", "has mode 0644, not 0600 or 0400"),
    ("symlink", "it is a symlink"),
    ("dir", "can be written by others"),
])
def test_a_bad_key_file_is_refused(key_path: Path, tmp_path: Path, damage: str, match: str) -> None:
    with statedir.open(create_key=True):
        pass
    if damage == "symlink":
        (tmp_path / "elsewhere").write_bytes(os.urandom(32))
        key_path.unlink()
        key_path.symlink_to(tmp_path / "elsewhere")
    elif damage == "dir":
        os.chmod(key_path.parent, 0o777)
    else:
        key_path.write_bytes(os.urandom({"short": 31, "long": 33}.get(damage, 32)))
        os.chmod(key_path, 0o644 if damage == "mode" else 0o600)
    before = os.lstat(key_path)
    with pytest.raises(StateError, match=match) as info:
        statedir.open(create_key=True)
    assert info.value.hint
    assert os.lstat(key_path) == before  # never overwritten


def test_a_read_only_key_is_fine(key_path: Path) -> None:
    with statedir.open(create_key=True) as state:
        park(state, "abc")
    os.chmod(key_path, 0o400)  # systemd-creds and mounted secrets are read-only
    with statedir.open() as state:
        assert state.load("abc") is not None


def test_an_older_memvisors_key_and_ledger_are_moved_out_and_authenticated(key_path: Path) -> None:
    root = statedir.root()
    secret = os.urandom(32)
    fd = os.open(root / "host.key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, secret)
    os.close(fd)
    fd = os.open(root / "ledger.json", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps({"generations": {"abc": 4}}).encode())
    os.close(fd)
    with statedir.open(create_key=True) as state:
        assert state.generations.all() == {"abc": 4}
    assert key_path.read_bytes() == secret and not (root / "host.key").exists()
    assert json.loads((root / "ledger.json").read_text())["mac"]


def test_an_unauthenticated_ledger_without_the_old_key_is_refused(key_path: Path) -> None:
    with statedir.open(create_key=True):
        pass
    root = statedir.root()
    (root / "ledger.json").write_text(json.dumps({"generations": {}}))
    with pytest.raises(StateError, match="an older memvisor's, unauthenticated, and no old host key came with it"):
        statedir.open(create_key=True)


def test_rotate_rewraps_everything_and_the_old_key_opens_nothing(key_path: Path) -> None:
    with statedir.open(create_key=True) as state:
        parked = park(state, "abc")
        park(state, "t-0123456789abcdef", kind="template")
    old = key_path.read_bytes()
    done = rotate.rotate()
    assert (done.sandboxes, done.templates, done.finished_earlier_run) == (2, 0, False)
    assert key_path.read_bytes() != old and not key_path.with_name("host.key.new").exists()
    with statedir.open() as state:
        loaded = state.load("abc")
        assert loaded is not None and loaded.body() == parked.body() and loaded.wrapped_key != parked.wrapped_key
    os.chmod(key_path, 0o600)
    key_path.write_bytes(old)
    with pytest.raises(StateError, match="fails its MAC"):
        statedir.open()


def test_rotate_is_refused_while_the_state_directory_is_in_use(key_path: Path) -> None:
    with statedir.open(create_key=True):
        with pytest.raises(StateError, match="is in use .* cannot be rotated"):
            rotate.rotate()
    with statedir.open(hold=False):  # a reader (ps, metrics) does not hold it
        rotate.rotate()


def test_an_interrupted_rotation_is_refused_at_open_and_finished_by_the_next(key_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with statedir.open(create_key=True) as state:
        park(state, "aaa")
        park(state, "bbb")
    calls: list[object] = []
    real = rotate._rewrap

    def cut(*args: object) -> None:
        if calls:
            raise KeyboardInterrupt  # the power goes after the first manifest
        calls.append(args)
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(rotate, "_rewrap", cut)
    with pytest.raises(KeyboardInterrupt):
        rotate.rotate()
    monkeypatch.setattr(rotate, "_rewrap", real)
    assert key_path.with_name("host.key.new").exists()
    with pytest.raises(StateError, match="a key rotation of .* was interrupted"):
        statedir.open(create_key=True)
    done = rotate.rotate()
    assert done.finished_earlier_run and done.sandboxes == 2
    with statedir.open() as state:
        assert state.load("aaa") is not None and state.load("bbb") is not None


def test_a_rotation_cut_between_the_ledger_and_its_head_finishes(key_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with statedir.open(create_key=True) as state:
        park(state, "abc")
    real = os.replace

    def cut(src: object, dst: object) -> None:
        real(src, dst)  # type: ignore[arg-type]
        if str(dst).endswith("ledger.json"):
            raise KeyboardInterrupt  # the ledger is under the new key, its head not yet

    monkeypatch.setattr(os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        rotate.rotate()
    monkeypatch.setattr(os, "replace", real)
    rotate.rotate()
    with statedir.open() as state:
        assert state.load("abc") is not None


def test_a_lock_held_by_another_process_blocks_rotation(key_path: Path) -> None:
    with statedir.open(create_key=True):
        pass
    fd = os.open(statedir.root() / ".inuse", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        with pytest.raises(StateError, match="in use"):
            rotate.rotate()
    finally:
        os.close(fd)
    shutil.rmtree(statedir.root())
    with pytest.raises(StateError, match="no state directory"):
        rotate.rotate()


def test_reading_the_state_directory_needs_no_key_while_nothing_is_wrapped(key_path: Path) -> None:
    assert statedir.open_to_read() is None  # no state directory
    statedir.root()
    assert statedir.open_to_read() is None  # no key, nothing wrapped: nothing to list
    assert not key_path.exists()  # and no key made by a reader
    with statedir.open(create_key=True) as state:
        park(state, "abc")
    opened = statedir.open_to_read()
    assert opened is not None
    with opened:
        assert [m.id for m in opened.committed()[0]] == ["abc"]
    key_path.unlink()
    with pytest.raises(keys.KeyMissing):
        statedir.open_to_read()


def test_a_damaged_manifest_stops_a_rotation_before_anything_is_written(key_path: Path) -> None:
    with statedir.open(create_key=True) as state:
        park(state, "aaa")
        park(state, "bbb")
    meta = statedir.root() / "bbb" / "meta.json"
    good = meta.read_bytes()
    meta.write_bytes(good.replace(b"512", b"513"))
    before = key_path.read_bytes(), (statedir.root() / "aaa" / "meta.json").read_bytes()
    with pytest.raises(StateError, match="the manifest of sandbox bbb is not authentic .*nothing was changed"):
        rotate.rotate()
    assert not key_path.with_name("host.key.new").exists()
    assert (key_path.read_bytes(), (statedir.root() / "aaa" / "meta.json").read_bytes()) == before
    meta.write_bytes(good)
    assert rotate.rotate().sandboxes == 2
