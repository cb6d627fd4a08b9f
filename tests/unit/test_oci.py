"""OCI import against hostile archives (issue 13): each is refused with a clear error, leaves no image and no
half-built object, and touches nothing outside the image's scratch tree. The archives are written here by hand
(tarfile) because no well-behaved tool writes them; tests/vm/test_images.py imports one made by umoci."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from memvisor.errors import ImageError
from memvisor.image import oci, store

Entry = Callable[[tarfile.TarFile], None]


def layer(*entries: Entry) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for add in entries:
            add(tar)
    return buf.getvalue()


def file(name: str, data: bytes = b"x", mode: int = 0o644) -> Entry:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), mode
        tar.addfile(info, io.BytesIO(data))
    return add


def special(name: str, kind: bytes, linkname: str = "", **attrs: int) -> Entry:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        for key, value in attrs.items():
            setattr(info, key, value)
        tar.addfile(info)
    return add


def write_layout(root: Path, layers: list[bytes], config: dict[str, object] | None = None,
                 gzip_layers: bool = True, corrupt: Callable[[Path, list[str]], None] | None = None) -> Path:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    stored = [gzip.compress(raw, mtime=0) if gzip_layers else raw for raw in layers]
    cfg = {"architecture": "amd64", "os": "linux", "config": config or {},
           "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(r).hexdigest()}" for r in layers]}}
    layer_descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gzip_layers else ""),
                    **blob(s)} for s in stored]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(json.dumps(cfg).encode())},
                "layers": layer_descs}
    index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                **blob(json.dumps(manifest).encode())}]}
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps(index))
    if corrupt is not None:
        corrupt(blobs, [str(d["digest"]).split(":")[1] for d in layer_descs])
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("MEMVISOR_IMAGE_STORE", str(tmp_path / "images"))
    yield tmp_path


def nothing_left(tmp_path: Path) -> None:
    assert store.ls() == []
    objects = store.root() / "objects"
    assert not objects.exists() or list(objects.iterdir()) == []


def refused(tmp_path: Path, layers: list[bytes], match: str, **kw: object) -> None:
    layout = write_layout(Path(tempfile.mkdtemp(dir=tmp_path)) / "layout", layers, **kw)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match=match):
        oci.import_image(layout, "hostile")
    nothing_left(tmp_path)


def test_path_traversal_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, [layer(file("etc/ok"), file("../../escaped"))], r"climbs out of the image root")
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()


def test_writing_through_a_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    refused(tmp_path, [layer(special("evil", tarfile.SYMTYPE, str(outside))),
                       layer(file("evil/planted"))], r"goes through the symlink /evil")
    assert list(outside.iterdir()) == []


def test_a_relative_symlink_escape_and_a_hard_link_through_it_are_refused(tmp_path: Path) -> None:
    refused(tmp_path, [layer(special("up", tarfile.SYMTYPE, "../../../.."), file("up/etc/passwd"))],
            r"goes through the symlink /up")
    refused(tmp_path, [layer(special("up", tarfile.SYMTYPE, "/"), special("h", tarfile.LNKTYPE, "up/etc/passwd"))],
            r"goes through the symlink /up")


def test_device_nodes_are_refused(tmp_path: Path) -> None:
    refused(tmp_path, [layer(special("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0))], r"is a device node")
    refused(tmp_path, [layer(special("mem", tarfile.CHRTYPE, devmajor=1, devminor=1))], r"is a device node")


def test_a_huge_declared_size_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    info = tarfile.TarInfo("huge")
    info.size = 1 << 40  # 1 TiB declared, nothing behind it
    raw = info.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024)
    refused(tmp_path, [raw], r"declares 1099511627776 bytes")


def test_a_changed_layer_fails_its_digest(tmp_path: Path) -> None:
    def flip(blobs: Path, layers: list[str]) -> None:
        data = bytearray((blobs / layers[0]).read_bytes())
        data[-1] ^= 1
        (blobs / layers[0]).write_bytes(bytes(data))
    refused(tmp_path, [layer(file("a"))], r"does not match its digest", corrupt=flip)


def test_a_layer_whose_content_differs_from_its_diff_id_is_refused(tmp_path: Path) -> None:
    good, other = layer(file("a")), layer(file("b"))
    layout = write_layout(tmp_path / "layout", [good])
    # Swap in another (correctly digested) blob: the manifest still names it, but the config's diff_id does not.
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest_path = blobs / index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(manifest_path.read_text())
    data = gzip.compress(other, mtime=0)
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    manifest["layers"][0].update(digest=f"sha256:{digest}", size=len(data))
    body = json.dumps(manifest).encode()
    new = hashlib.sha256(body).hexdigest()
    (blobs / new).write_bytes(body)
    index["manifests"][0].update(digest=f"sha256:{new}", size=len(body))
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match=r"does not match the config's diff_id"):
        oci.import_image(layout, "hostile")
    nothing_left(tmp_path)


def test_a_corrupt_archive_and_a_bad_name_are_clear_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ImageError, match=r"is not a readable image archive"):
        oci.import_image(junk, "x")
    with pytest.raises(ImageError, match=r"image name '../x' is not valid"):
        oci.import_image(junk, "../x")
    with pytest.raises(ImageError, match=r"does not exist"):
        oci.import_image(tmp_path / "missing.tar", "x")
    nothing_left(tmp_path)


def tree_of(tmp_path: Path, layers: list[bytes]) -> Path:
    """Apply layers the way import does, to look at the tree (no mkfs.erofs needed)."""
    tree = oci.Tree(tmp_path / "tree", 1 << 30)
    tree.root.mkdir()
    for i, raw in enumerate(layers):
        tree.apply(io.BytesIO(raw), f"layer {i + 1}")
    return tree.root


def test_whiteouts_and_opaque_directories_follow_the_spec(tmp_path: Path) -> None:
    root = tree_of(tmp_path, [
        layer(file("a/keep"), file("a/gone"), file("b/old"), file("c/x"), special("c/link", tarfile.SYMTYPE, "x")),
        layer(file("a/.wh.gone"), file("b/.wh..wh..opq"), file("b/new"), file("c/.wh.link"),
              file("a/keep", b"replaced")),
    ])
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["a", "a/keep", "b", "b/new", "c",
                                                                                "c/x"]
    assert (root / "a/keep").read_bytes() == b"replaced"


def test_the_image_config_gives_the_defaults(tmp_path: Path) -> None:
    root = tree_of(tmp_path, [layer(file("etc/passwd", b"root:x:0:0::/root:/bin/sh\napp:x:1234:99::/app:/bin/sh\n"),
                                    file("etc/group", b"root:x:0:\nstaff:x:50:\n"))])
    cfg = oci.image_config({"config": {"Env": ["A=1", "PATH=/x"], "WorkingDir": "/app", "User": "app:staff",
                                       "Entrypoint": ["/bin/e"], "Cmd": ["c"]}}, root)
    assert cfg.env_dict() == {"A": "1", "PATH": "/x"} and cfg.working_dir == "/app"
    assert (cfg.uid, cfg.gid) == (1234, 50) and cfg.default_argv() == ["/bin/e", "c"]
    with pytest.raises(ImageError, match=r"User 'nobody' is not in its /etc/passwd"):
        oci.image_config({"config": {"User": "nobody"}}, root)
    with pytest.raises(ImageError, match=r"WorkingDir 'rel' is not an absolute path"):
        oci.image_config({"config": {"WorkingDir": "rel"}}, root)


# Found in review: each of these once deleted or read outside the tree, or ended in a traceback.
def test_an_opaque_marker_then_a_symlink_in_its_place_deletes_nothing_outside(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine")
    tree_of(tmp_path, [layer(file("a/old")),
                       layer(file("a/.wh..wh..opq"), special("a", tarfile.SYMTYPE, str(victim)))])
    assert (victim / "keep").read_text() == "mine"


def test_whiteouts_that_name_no_file_are_refused(tmp_path: Path) -> None:
    for name in ("etc/.wh.", ".wh...", "etc/.wh.."):
        with pytest.raises(ImageError, match=r"names no file"):
            tree_of(Path(tempfile.mkdtemp(dir=tmp_path)), [layer(file("etc/passwd")), layer(file(name))])


def test_an_opaque_directory_keeps_this_layers_nested_files(tmp_path: Path) -> None:
    root = tree_of(tmp_path, [layer(file("d/old")), layer(file("d/.wh..wh..opq"), file("d/sub/new"))])
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["d", "d/sub", "d/sub/new"]


def test_odd_entries_are_clear_errors_not_tracebacks(tmp_path: Path) -> None:
    long_name = "x" * 300
    big_uid = tarfile.TarInfo("f")
    big_uid.uid = 1 << 40
    huge = io.BytesIO()
    with tarfile.open(fileobj=huge, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(big_uid, io.BytesIO(b""))
    for raw in (layer(file(long_name)), huge.getvalue()):
        with pytest.raises(ImageError, match=r"cannot apply entry"):
            tree_of(Path(tempfile.mkdtemp(dir=tmp_path)), [raw])
    with pytest.raises(ImageError, match=r"is not in its /etc/passwd"):
        oci.image_config({"config": {"User": "²"}}, tmp_path)


def test_a_docker_archive_cannot_point_outside_itself(tmp_path: Path) -> None:
    layout = tmp_path / "docker"
    layout.mkdir()
    config = json.dumps({"rootfs": {"diff_ids": ["sha256:" + "0" * 64]}}).encode()
    digest = hashlib.sha256(config).hexdigest()
    (layout / f"{digest}.json").write_bytes(config)
    for layers in (["../../../../etc/hostname"], ["fifo"]):
        (layout / "manifest.json").write_text(json.dumps([{"Config": f"{digest}.json", "Layers": layers}]))
        if layers == ["fifo"] and not (layout / "fifo").exists():
            os.mkfifo(layout / "fifo")
        with pytest.raises(ImageError, match=r"a path outside itself|is not a regular file"):
            oci.import_image(layout, "escape")
    nothing_left(tmp_path)


def test_a_damaged_name_entry_is_a_clear_error_and_can_be_removed(tmp_path: Path) -> None:
    names = store.root() / "names"
    names.mkdir(parents=True)
    (names / "broken.json").write_text("{not json")
    with pytest.raises(ImageError, match=r"image 'broken' is damaged"):
        store.get("broken")
    assert store.ls() == []
    store.rm("broken")
    assert not (names / "broken.json").exists()
