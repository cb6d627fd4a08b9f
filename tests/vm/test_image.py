"""The built guest image: cached by content, readable by standard tools, holding what the guest needs."""

from __future__ import annotations

import json
import subprocess

from memvisor.image import build
from memvisor.image.build import Image
from tests.vm.conftest import Runner


def test_unchanged_build_is_a_cache_hit(image: Image) -> None:
    built_at = image.manifest["built_at"]
    again = build.build()
    assert again.path == image.path
    assert again.manifest["built_at"] == built_at  # the same build, not a new one (bench/ times builds)


def test_initramfs_contents(image: Image) -> None:
    listing = subprocess.run(["bsdtar", "-tvf", str(image.initramfs)], capture_output=True, text=True,
                             check=True).stdout
    entries = {line.split()[-1] if " -> " not in line else line.split(" -> ")[0].split()[-1]: line
               for line in listing.splitlines()}
    for path in ("init", "usr/bin/python3.11", "usr/bin/busybox", "etc/memvisor/modules.json",
                 "usr/lib/python3.11/memvisor/guest/init.py", "usr/lib/x86_64-linux-gnu/libc.so.6"):
        assert path in entries, path
    assert entries["dev/console"].startswith("c")
    assert entries["home/sandbox"].split()[2:4] == ["1000", "1000"]
    assert entries["tmp"].startswith("drwxrwxrwt")
    # Only the slice of the stdlib the guest imports: no test suite, no tkinter, no json package source of
    # its own beyond what init imports.
    assert not any(p.startswith("usr/lib/python3.11/test/") for p in entries)
    assert image.manifest["sizes"]["initramfs.cpio"] < 40 * 2**20


def test_image_info_json(memvisor: Runner, image: Image) -> None:
    r = memvisor("image", "info", "--json")
    assert r.returncode == 0
    info = json.loads(r.stdout)
    assert info["key"] == image.manifest["key"]
    assert info["kernel_version"].endswith("-amd64")
    assert set(info["module_groups"]) >= {"base", "block", "dm", "crypt", "integrity", "zram", "balloon"}
