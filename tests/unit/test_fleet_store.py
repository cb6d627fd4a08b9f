"""memvisor/fleet/store.py: the directory store's checks, bundles written so that no reader sees a partial one,
sparse files kept sparse (also across filesystems), a full store (a real 1 MiB tmpfs) leaving nothing behind,
and no symlink followed anywhere."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.fleet import store as store_mod
from memvisor.fleet.errors import BundleNotFound, FleetConfigError, StoreError, StoreFull
from memvisor.fleet.store import Bundle, DirectoryStore, manifest_digest

MiB = 1 << 20


def make_root(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DirectoryStore]:
    with DirectoryStore(make_root(tmp_path / "store")) as s:
        yield s


def sparse_file(path: Path, size: int = 64 * MiB) -> bytes:
    """A `size`-byte file with three small extents of data and holes elsewhere; its SHA-256."""
    with open(path, "wb") as f:
        for offset, data in ((0, b"head" * 1024), (32 * MiB, b"middle" * 2048), (size - 4096, b"t" * 4096)):
            f.seek(offset)
            f.write(data)
        f.truncate(size)
    return sha256(path)


def sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.digest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def files(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "vm.snap").write_bytes(b"sealed stream" * 100)
    (src / "empty").write_bytes(b"")
    return {"vm.snap": src / "vm.snap", "empty": src / "empty"}


def test_the_store_must_be_ours(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=f"the store {tmp_path}/nope does not exist") as info:
        DirectoryStore(tmp_path / "nope")
    assert "mkdir -m 700" in str(info.value.hint)
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(StoreError, match=r"has mode drwxr-xr-x, not drwx------") as info:
        DirectoryStore(loose)
    assert f"chmod 700 {loose}" in str(info.value.hint)
    theirs = make_root(tmp_path / "theirs")
    os.chown(theirs, 12345, 12345)
    with pytest.raises(StoreError, match=r"is not memvisor's own \(owner uid 12345"):
        DirectoryStore(theirs)
    (tmp_path / "link").symlink_to(make_root(tmp_path / "real"))
    with pytest.raises(StoreError, match="is a symlink or not a directory"):
        DirectoryStore(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="is a symlink or not a directory"):
        DirectoryStore(tmp_path / "file")
    old = os.umask(0o022)
    try:
        DirectoryStore(tmp_path / "made", create=True).close()
    finally:
        os.umask(old)
    assert (tmp_path / "made").stat().st_mode & 0o7777 == 0o700


def test_put_list_fetch_remove(store: DirectoryStore, tmp_path: Path) -> None:
    src = files(tmp_path)
    manifest = b'{"id": "sb1", "generation": 3}'
    bundle = store.put("sb1", 3, src, manifest)
    assert bundle == Bundle("sb1", 3, {"vm.snap": 1300, "empty": 0})
    assert store.list() == [Bundle("sb1", 3, {"empty": 0, "vm.snap": 1300})] and store.partial() == []
    assert store.manifest("sb1", 3) == manifest
    layout = store.root / "bundles" / "sb1" / "3"
    assert sorted(os.listdir(layout)) == ["empty", "manifest", "vm.snap"]
    assert all((p.stat().st_mode & 0o777) == (0o700 if p.is_dir() else 0o600) for p in store.root.rglob("*"))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "vm.snap").write_bytes(b"an older copy")
    assert store.fetch("sb1", 3, dest, digest=manifest_digest(manifest)) == manifest
    assert sorted(os.listdir(dest)) == ["empty", "vm.snap"]
    assert (dest / "vm.snap").read_bytes() == b"sealed stream" * 100
    # written once
    with pytest.raises(StoreError, match="already has a bundle sb1/3"):
        store.put("sb1", 3, src, manifest)
    store.put("sb1", 4, src, manifest)
    with pytest.raises(BundleNotFound, match="has no bundle sb1/5"):
        store.manifest("sb1", 5)
    with pytest.raises(BundleNotFound, match="has no bundle sb2/1"):
        store.fetch("sb2", 1, dest)
    assert store.remove("sb1", 3) is True and store.remove("sb1", 3) is False
    assert [b.generation for b in store.list()] == [4]
    assert store.remove("sb1", 4) is True
    assert os.listdir(store.root / "bundles") == []  # the id's directory goes with its last bundle


def test_an_edited_manifest_is_refused_before_anything_is_copied(store: DirectoryStore, tmp_path: Path) -> None:
    store.put("sb1", 1, files(tmp_path), b"manifest")
    (store.root / "bundles" / "sb1" / "1" / "manifest").write_bytes(b"manifest, edited")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(StoreError, match="is not the one the fence recorded") as info:
        store.fetch("sb1", 1, dest, digest=manifest_digest(b"manifest"))
    assert "refused" in str(info.value.hint) and os.listdir(dest) == []


def test_a_partial_bundle_is_invisible(store: DirectoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[list[Bundle], list[Bundle]]] = []
    real = store_mod.copy_sparse

    def copy_and_look(src: int, dst: int) -> int:
        seen.append((store.list(), store.partial()))  # a reader while the put is under way
        return real(src, dst)

    monkeypatch.setattr(store_mod, "copy_sparse", copy_and_look)
    store.put("sb1", 1, files(tmp_path), b"m")
    assert seen and all(complete == [] and [b.id for b in partial] == ["sb1"] for complete, partial in seen)
    assert [b.generation for b in store.list()] == [1]
    # a writer that died before its manifest: never listed or fetched, and removable
    dead = store.root / "bundles" / "sb1" / "2"
    dead.mkdir(mode=0o700)
    (dead / "vm.snap").write_bytes(b"half")
    (dead / ".vm.snap.0123456789abcdef.tmp").write_bytes(b"ha")
    assert [b.generation for b in store.list()] == [1]
    assert store.partial() == [Bundle("sb1", 2, {"vm.snap": 4}, complete=False)]
    assert [(b.generation, b.complete) for b in store.of("sb1")] == [(1, True), (2, False)]
    assert store.of("sb9") == []
    with pytest.raises(BundleNotFound, match="sb1/2 .* is partial \\(no manifest\\)"):
        store.manifest("sb1", 2)
    with pytest.raises(BundleNotFound, match="partial"):
        store.fetch("sb1", 2, tmp_path)
    assert store.remove("sb1", 2) and store.partial() == [] and len(store.list()) == 1


def test_sparse_files_stay_sparse(store: DirectoryStore, tmp_path: Path) -> None:
    src = tmp_path / "swap.img"
    digest = sparse_file(src)
    assert allocated(src) < MiB  # the filesystem under the tests keeps holes
    store.put("sb1", 1, {"swap.img": src}, b"m")
    stored = store.root / "bundles" / "sb1" / "1" / "swap.img"
    assert stored.stat().st_size == 64 * MiB and sha256(stored) == digest
    assert allocated(stored) < MiB, f"{allocated(stored)} bytes allocated for 28 KiB of data"
    dest = tmp_path / "dest"
    dest.mkdir()
    store.fetch("sb1", 1, dest)
    assert sha256(dest / "swap.img") == digest and allocated(dest / "swap.img") < MiB
    # all holes, and all data
    (tmp_path / "holes").write_bytes(b"")
    os.truncate(tmp_path / "holes", 8 * MiB)
    (tmp_path / "dense").write_bytes(os.urandom(MiB))
    store.put("sb1", 2, {"holes": tmp_path / "holes", "dense": tmp_path / "dense"}, b"m")
    kept = store.root / "bundles" / "sb1" / "2"
    assert (kept / "holes").stat().st_size == 8 * MiB and allocated(kept / "holes") == 0
    assert (kept / "dense").read_bytes() == (tmp_path / "dense").read_bytes()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (the suite runs as root, here and in CI), unmounted after the test."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], check=True,
                       capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.fail(f"cannot mount a small tmpfs to fill (the fleet's store tests run as root): {exc}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_store_leaves_nothing(small_fs: Path, tmp_path: Path) -> None:
    """ENOSPC on a real filesystem; the copy crosses filesystems (ext4 to tmpfs) like a store on NFS would."""
    big = tmp_path / "big"
    big.write_bytes(os.urandom(2 * MiB))
    with DirectoryStore(small_fs) as store:
        with pytest.raises(StoreFull, match=f"the store {small_fs} is full \\(No space left on device\\) while "
                                            "bundle sb1/1 was written; nothing of it was kept"):
            store.put("sb1", 1, {"a": big}, b"m")
        assert os.listdir(small_fs / "bundles") == [] and store.list() == [] and store.partial() == []
        sparse_file(tmp_path / "sparse", 16 * MiB)  # bigger than the store, but mostly holes
        store.put("sb1", 1, {"sparse": tmp_path / "sparse", **files(tmp_path)}, b"m")
        assert sha256(small_fs / "bundles" / "sb1" / "1" / "sparse") == sha256(tmp_path / "sparse")
        # once its files are in, the manifest does not fit: still nothing left of the new bundle
        (tmp_path / "most").write_bytes(os.urandom(1024 * 1024 - 160 * 1024))
        with pytest.raises(StoreFull):
            store.put("sb2", 1, {"most": tmp_path / "most"}, os.urandom(300 * 1024))
        assert [b.id for b in store.list()] == ["sb1"] and store.partial() == []
        assert sorted(os.listdir(small_fs / "bundles")) == ["sb1"]


def test_quota_exceeded_is_full_too(store: DirectoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def over_quota(src: int, dst: int) -> int:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(store_mod, "copy_sparse", over_quota)
    with pytest.raises(StoreFull, match="Disk quota exceeded"):
        store.put("sb1", 1, files(tmp_path), b"m")
    assert os.listdir(store.root / "bundles") == []


def test_no_symlink_is_followed(store: DirectoryStore, tmp_path: Path) -> None:
    src = files(tmp_path)
    (tmp_path / "link").symlink_to(src["vm.snap"])
    with pytest.raises(StoreError, match="it is a symlink"):
        store.put("sb1", 1, {"vm.snap": tmp_path / "link"}, b"m")
    elsewhere = make_root(tmp_path / "elsewhere")
    (store.root / "bundles").mkdir(mode=0o700, exist_ok=True)
    (store.root / "bundles" / "sb2").symlink_to(elsewhere)
    with pytest.raises(StoreError, match="bundles/sb2 in the store .* cannot be used"):
        store.put("sb2", 1, src, b"m")
    with pytest.raises(StoreError, match="cannot be used"):
        store.manifest("sb2", 1)
    assert os.listdir(elsewhere) == [] and store.list() == []  # listed around, not through
    store.put("sb3", 1, src, b"m")
    manifest = store.root / "bundles" / "sb3" / "1" / "manifest"
    manifest.unlink()
    manifest.symlink_to(tmp_path / "src" / "vm.snap")
    with pytest.raises(StoreError, match="manifest of sb3/1 .* it is a symlink"):
        store.manifest("sb3", 1)
    dest_link = tmp_path / "dest-link"
    dest_link.symlink_to(make_root(tmp_path / "dest"))
    store.put("sb4", 1, src, b"m")
    with pytest.raises(StoreError, match="cannot fetch into"):
        store.fetch("sb4", 1, dest_link)


def test_names_are_checked(store: DirectoryStore, tmp_path: Path) -> None:
    src = files(tmp_path)
    for name in ("manifest", ".hidden", "a/b", "", "x" * 65):
        with pytest.raises(StoreError, match="cannot name a file of a bundle"):
            store.put("sb1", 1, {name: src["vm.snap"]}, b"m")
    with pytest.raises(FleetConfigError, match="bundle id '../etc'"):
        store.put("../etc", 1, src, b"m")
    with pytest.raises(ValueError):
        store.put("sb1", 0, src, b"m")
    assert store.list() == [] and store.partial() == []
