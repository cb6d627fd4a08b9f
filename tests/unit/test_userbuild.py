"""The user image spec and store (issue 13): every bad input is one clear error, and the store never leaves a
half-built image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor import policy
from memvisor.errors import ImageError, PolicyError
from memvisor.image import store
from memvisor.image.userbuild import BuildSpec, copy_in, merge_usr


@pytest.fixture(autouse=True)
def private_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("MEMVISOR_IMAGE_STORE", str(tmp_path / "images"))
    monkeypatch.setenv("MEMVISOR_CONFIG", str(tmp_path / "no-config.toml"))
    yield tmp_path


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "Bad"}, r"image name 'Bad' is not valid"),
    ({"name": "../x"}, r"is not valid"),
    ({"name": "ok", "packages": ("jq; rm -rf /",)}, r"is not a Debian package name"),
    ({"name": "ok", "pip": ("--index-url=http://evil",)}, r"pip options are not taken"),
    ({"name": "ok", "pip": ("",)}, r"is not a requirement"),
    ({"name": "ok", "requirements": Path("/nonexistent/req.txt")}, r"does not exist"),
    ({"name": "ok", "copies": ((Path("/nonexistent"), "/x"),)}, r"source /nonexistent does not exist"),
    ({"name": "ok", "copies": ((Path("/etc/hostname"), "relative"),)}, r"must be an absolute path"),
    ({"name": "ok", "copies": ((Path("/etc/hostname"), "/a/../../etc"),)}, r"no `\.\.`"),
])
def test_a_bad_spec_is_one_clear_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ImageError, match=match):
        BuildSpec(**kwargs)  # type: ignore[arg-type]


def test_flags_add_to_the_config_files_image_table(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "req.txt").write_text("six\n")
    config = tmp_path / "c.toml"
    config.write_text('[image]\nname = "tools"\npackages = ["jq"]\npip = ["six"]\nrequirements = "req.txt"\n'
                      'copy = ["app:/opt/app"]\nrootfs = "blk"\n')
    spec = BuildSpec.from_sources(name=None, packages=["git"], pip=[], requirements=None, copies=[],
                                  config=config)
    assert spec.name == "tools" and spec.packages == ("jq", "git") and spec.pip == ("six",)
    assert spec.requirements == tmp_path / "req.txt" and spec.copies == ((tmp_path / "app", "/opt/app"),)
    # The same file is a policy: [image] name and rootfs are settings, the build keys are skipped there only.
    from memvisor import config as config_mod

    layer = config_mod.load(config, explicit=True)[1]
    assert layer == {"image": "tools", "rootfs": "blk"}
    with pytest.raises(Exception, match=r"unknown key image.packages"):
        policy.layer_from_mapping({"image": {"packages": ["jq"]}}, "request")
    with pytest.raises(ImageError, match=r"needs a name"):
        BuildSpec.from_sources(name=None, packages=[], pip=[], requirements=None, copies=[], config=None)


def test_a_bad_image_name_in_a_policy_is_refused() -> None:
    with pytest.raises(PolicyError, match=r"--image 'a/b' is not an image name"):
        policy.merge(("flags", {"image": "a/b"}))


def test_merged_usr_moves_and_merges(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (tree / "lib/x86_64-linux-gnu/libc.so.6").write_text("c")
    (tree / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (tree / "usr/lib/x86_64-linux-gnu/libz.so.1").write_text("z")
    (tree / "bin").mkdir()
    (tree / "bin/sh").write_text("sh")
    merge_usr(tree)
    assert (tree / "lib").is_symlink() and (tree / "lib/x86_64-linux-gnu/libc.so.6").read_text() == "c"
    assert (tree / "usr/lib/x86_64-linux-gnu/libz.so.1").exists() and (tree / "usr/bin/sh").exists()


def test_copy_never_goes_through_a_link_in_the_image(tmp_path: Path) -> None:
    tree, outside = tmp_path / "t", tmp_path / "outside"
    tree.mkdir()
    outside.mkdir()
    (tree / "opt").symlink_to(outside)
    src = tmp_path / "f"
    src.write_text("x")
    with pytest.raises(ImageError, match=r"goes through the image's symlink /opt"):
        copy_in(tree, src, "/opt/app/f")
    assert list(outside.iterdir()) == []
    copy_in(tree, src, "/srv/f")
    assert (tree / "srv/f").read_text() == "x"


def test_a_failed_build_leaves_no_object_and_names_are_kept_apart() -> None:
    key = "a" * 64
    with pytest.raises(RuntimeError), store.new_object(key) as (_scratch, out):
        (out / "rootfs.erofs").write_bytes(b"half")
        raise RuntimeError("build failed")
    assert store.find_object(key) is None
    assert [p.name for p in (store.root() / "objects").iterdir()] == []
    with store.new_object(key) as (_scratch, out):
        (out / "rootfs.erofs").write_bytes(b"x" * 4096)
        (out / "config.json").write_text("{}")
    store.name("one", key, {"kind": "test"})
    store.name("two", key, {"kind": "test"})
    store.rm("one")
    assert store.find_object(key) is not None  # "two" still names it
    store.rm("two")
    assert store.find_object(key) is None
    with pytest.raises(ImageError, match=r"there is no image named 'two'"):
        store.get("two")
