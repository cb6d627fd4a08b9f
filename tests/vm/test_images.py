"""Users' images on real guests (issue 13, docs/image.md): built from a Debian package and a pip package, and
imported from an OCI archive that umoci (not memvisor) wrote, with whiteouts and an opaque directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from memvisor import paths
from memvisor.image.build import Image
from tests.vm.conftest import Runner, report


def test_an_image_with_a_debian_package_and_a_pip_package(memvisor: Runner, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "hello.py").write_text("import six\nprint('hello from', six.__name__)\n")
    built = memvisor("image", "build", "--name", "tools", "--package", "jq", "--pip", "six==1.16.0",
                     "--copy", f"{app}:/opt/app", "--json", timeout=900)
    assert built.returncode == 0, built.stderr
    image = json.loads(built.stdout)
    assert image["name"] == "tools" and image["source"]["spec"]["packages"] == ["jq"]
    again = memvisor("image", "build", "--name", "tools", "--package", "jq", "--pip", "six==1.16.0",
                     "--copy", f"{app}:/opt/app", "--json", timeout=900)
    assert json.loads(again.stdout)["key"] == image["key"]  # cached by content: nothing rebuilt
    run = memvisor("run", "--image", "tools", "--json", "--", "sh", "-c",
                   "echo '{\"a\": [1, 2]}' | jq -c .a; python3 /opt/app/hello.py; pwd; id -u")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[:4] == ["[1,2]", "hello from six", "/home/sandbox", "1000"]
    assert report(run.stdout)["exit_code"] == 0


def test_a_bad_spec_fails_clearly_and_leaves_no_image(memvisor: Runner) -> None:
    bad = memvisor("image", "build", "--name", "bad", "--package", "no-such-package-memvisor", timeout=300)
    assert bad.returncode != 0 and "no-such-package-memvisor" in bad.stderr, bad.stderr
    wheel = memvisor("image", "build", "--name", "bad", "--pip", "no-such-project-memvisor-xyz==1.0", timeout=300)
    assert wheel.returncode != 0 and "pip could not install" in wheel.stderr, wheel.stderr
    name = memvisor("image", "build", "--name", "Bad/Name", "--package", "jq")
    assert name.returncode != 0 and "is not valid" in name.stderr
    assert json.loads(memvisor("image", "ls", "--json").stdout) == []
    objects = Path(os.environ["MEMVISOR_IMAGE_STORE"]) / "objects"  # this test's own store (conftest)
    assert not objects.exists() or list(objects.iterdir()) == []
    missing = memvisor("run", "--image", "nothing-here", "--", "true")
    assert missing.returncode == 125 and "there is no image named 'nothing-here'" in missing.stderr


def umoci_archive(work: Path) -> Path:
    """Two layers built with GNU tar from trees assembled here, put into an OCI layout by umoci, with its config
    (Env, WorkingDir, Cmd); the second layer deletes a file and a directory (whiteouts) and makes one directory
    opaque. The archive is a tar of the layout, as `skopeo copy ... oci-archive:` writes."""
    debs = sorted((paths.cache_dir() / "debs").glob("busybox-static_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(work / "bb")], check=True)
    l1, l2 = work / "l1", work / "l2"
    for d in ("bin", "data/keep", "data/gone", "opq"):
        (l1 / d).mkdir(parents=True)
    shutil.copy(work / "bb/bin/busybox", l1 / "bin/busybox")
    (l1 / "bin/sh").symlink_to("busybox")
    for path, text in (("data/keep/a", "one"), ("data/gone/b", "two"), ("opq/old", "old"),
                       ("data/deleted.txt", "secret")):
        (l1 / path).write_text(text)
    for d in ("data", "opq", "work"):
        (l2 / d).mkdir(parents=True)
    for path in ("data/.wh.deleted.txt", "data/.wh.gone", "opq/.wh..wh..opq"):
        (l2 / path).touch()
    (l2 / "opq/new").write_text("new")
    (l2 / "work/hello").write_text("hi from the image\n")
    layout = work / "layout"

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    for layer, tree in (("layer1.tar", l1), ("layer2.tar", l2)):
        sh("tar", "--numeric-owner", "--owner=0", "--group=0", "-C", str(tree), "-cf", str(work / layer), ".")
    sh("umoci", "init", "--layout", str(layout))
    sh("umoci", "new", "--image", f"{layout}:t")
    for layer in ("layer1.tar", "layer2.tar"):
        sh("umoci", "raw", "add-layer", "--image", f"{layout}:t", str(work / layer))
    sh("umoci", "config", "--image", f"{layout}:t", "--config.env", "GREETING=hello from the config",
       "--config.workingdir", "/work", "--config.user", "1234:5678", "--config.cmd", "/bin/sh", "--config.cmd",
       "-c", "--config.cmd",
       'echo "$GREETING"; pwd; ls /data /opq; cat hello; ls /data/deleted.txt /data/gone 2>&1; id -u; id -g; '
       'ls /run/memvisor 2>/dev/null; true')
    archive = work / "image.tar"
    sh("tar", "-C", str(layout), "-cf", str(archive), ".")
    return archive


@pytest.mark.parametrize("rootfs", ["pmem", "blk"])
def test_an_oci_archive_runs_with_its_config(memvisor: Runner, image: Image, tmp_path: Path, rootfs: str) -> None:
    """On blk with memctl too: its socket reaches into the image's root."""
    archive = umoci_archive(tmp_path)
    imported = memvisor("image", "import", str(archive), "--name", "umoci-test", "--json", timeout=300)
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["source"]["layers"] == 2
    memctl = ["--memctl"] if rootfs == "blk" else []
    run = memvisor("run", "--rootfs", rootfs, *memctl, "--image", "umoci-test")  # no command: the image's Cmd
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[:2] == ["hello from the config", "/work"]
    assert lines[2:7] == ["/data:", "keep", "", "/opq:", "new"]  # whiteouts gone, the opaque dir has only `new`
    assert lines[7] == "hi from the image"
    assert all("No such file or directory" in line for line in lines[8:10]), lines
    assert lines[10:12] == ["1234", "5678"]  # the config's User, group included
    assert lines[12:] == (["memctl.sock"] if memctl else [])
    listed = json.loads(memvisor("image", "ls", "--json").stdout)
    assert [i["name"] for i in listed] == ["umoci-test"]
    assert memvisor("image", "rm", "umoci-test").returncode == 0
    assert json.loads(memvisor("image", "ls", "--json").stdout) == []
