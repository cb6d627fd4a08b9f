"""Build a user's image from a spec: Debian packages (apt's own resolver picks their dependencies), Python
packages (pip, for the guest's Python 3.11), and files to copy in (docs/image.md).

The image is a whole Debian userland: the packages of memvisor's default image (busybox, the full Python) plus
the user's, each unpacked with `dpkg-deb -x` (maintainer scripts do not run: what a package needs them for,
e.g. alternatives links, is not there), /bin, /sbin and /lib merged into /usr as on Debian 12, busybox applets
where no package provides the command. Nothing of memvisor's own is in it: the guest boots from memvisor's root
and runs commands chrooted into this one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memvisor import contract, paths, proc
from memvisor.errors import ImageError, MemvisorError
from memvisor.image import build, debs, python, rootfs, store

PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,99}(=[A-Za-z0-9.+~:-]{1,100})?$")
PIP_SITE = "usr/lib/python3/dist-packages"  # on Debian's sys.path (site.py) for /usr/bin/python3
# The guest's Python (Debian 12: 3.11, glibc 2.36): wheels pip may pick for it.
PIP_PLATFORMS = ("manylinux_2_36_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64")


@dataclass(frozen=True)
class BuildSpec:
    """What goes into a user's image. One model for the flags and the `[image]` table of a config file."""

    name: str
    packages: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    requirements: Path | None = None
    copies: tuple[tuple[Path, str], ...] = ()  # (host path, absolute path in the image)

    def __post_init__(self) -> None:
        store.check_name(self.name)
        for pkg in self.packages:
            if not isinstance(pkg, str) or not PACKAGE.match(pkg):
                raise ImageError(f"package {str(pkg)[:80]!r} is not a Debian package name",
                                 hint="give names like `jq` or `git=1:2.39.5-0+deb12u2`")
        for req in self.pip:
            if not isinstance(req, str) or not req.strip() or req.lstrip().startswith("-") or "\n" in req:
                raise ImageError(f"pip requirement {str(req)[:80]!r} is not a requirement",
                                 hint="give a requirement like `requests==2.32.3` (pip options are not taken)")
        if self.requirements is not None and not self.requirements.is_file():
            raise ImageError(f"requirements file {self.requirements} does not exist")
        for src, dest in self.copies:
            if not src.exists():
                raise ImageError(f"--copy source {src} does not exist")
            parts = dest.split("/")
            if not dest.startswith("/") or ".." in parts or dest.strip("/") == "":
                raise ImageError(f"--copy destination {dest[:80]!r} must be an absolute path inside the image "
                                 "(no `..`)", hint="e.g. --copy ./app:/opt/app")

    @classmethod
    def parse_copy(cls, text: str, base: Path = Path(".")) -> tuple[Path, str]:
        src, sep, dest = text.rpartition(":")
        if not sep or not src or not dest:
            raise ImageError(f"--copy {text[:80]!r} is not SRC:DEST", hint="e.g. --copy ./app:/opt/app")
        return (base / src).resolve(), dest

    @classmethod
    def from_table(cls, table: dict[str, Any], source: str, base: Path) -> dict[str, Any]:
        """The spec fields of a config file's `[image]` table (the policy's own keys there are left alone)."""
        out: dict[str, Any] = {}
        for key in ("packages", "pip", "copy"):
            value = table.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ImageError(f"{source}: image.{key} must be a list of strings")
            out[key] = value
        if "name" in table:
            if not isinstance(table["name"], str):
                raise ImageError(f"{source}: image.name must be a string")
            out["name"] = table["name"]
        if "requirements" in table:
            if not isinstance(table["requirements"], str):
                raise ImageError(f"{source}: image.requirements must be a path")
            out["requirements"] = (base / table["requirements"]).resolve()
        out["copy"] = [cls.parse_copy(c, base) for c in out["copy"]]
        return out

    @classmethod
    def from_sources(cls, *, name: str | None, packages: list[str], pip: list[str], requirements: Path | None,
                     copies: list[str], config: Path | None) -> BuildSpec:
        """Flags on top of the config file's `[image]` table (--config, else the default config file if there is
        one): lists add up, a name or file given as a flag wins."""
        table: dict[str, Any] = {"packages": [], "pip": [], "copy": []}
        if config is None and paths.default_config().is_file():
            config = paths.default_config()
        if config is not None:
            try:
                doc = tomllib.loads(config.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ImageError(f"cannot read {config}: {exc}") from None
            image_table = doc.get("image", {})
            if not isinstance(image_table, dict):
                raise ImageError(f"{config}: [image] must be a table")
            table = cls.from_table(image_table, str(config), config.parent)
        chosen = name or table.get("name")
        if not chosen:
            raise ImageError("the image needs a name", hint="give --name NAME (or name = \"...\" under [image])")
        return cls(name=chosen, packages=tuple(table["packages"]) + tuple(packages),
                   pip=tuple(table["pip"]) + tuple(pip), requirements=requirements or table.get("requirements"),
                   copies=tuple(table["copy"]) + tuple(cls.parse_copy(c) for c in copies))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "packages": list(self.packages), "pip": list(self.pip),
                "requirements": str(self.requirements) if self.requirements else None,
                "copy": [f"{src}:{dest}" for src, dest in self.copies]}


def _content_hash(path: Path) -> str:
    """Hash of a file or a directory tree (names, modes, contents, link targets)."""
    digest = hashlib.sha256()
    items = [path] if not path.is_dir() or path.is_symlink() else [path, *sorted(path.rglob("*"))]
    for item in items:
        rel = item.relative_to(path).as_posix() if item != path else "."
        st = item.lstat()
        digest.update(f"{rel}\0{st.st_mode:o}\0".encode())
        if item.is_symlink():
            digest.update(os.readlink(item).encode())
        elif item.is_file():
            with item.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def spec_key(spec: BuildSpec, resolved: list[debs.Deb]) -> str:
    doc = {
        "builder": build.source_key(("image/userbuild.py", "image/debs.py", "image/rootfs.py", "image/nvdimm.py",
                                     "image/python.py", "image/store.py", "contract.py")),
        "debs": [f"{d.name}={d.version}:{d.sha256}" for d in resolved],
        "pip": list(spec.pip),
        "requirements": spec.requirements.read_text() if spec.requirements else None,
        "copy": [[dest, _content_hash(src)] for src, dest in spec.copies],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


STEPS = ("resolve packages", "download packages", "unpack packages", "python packages", "copy files",
         "write the image")


def build_image(spec: BuildSpec, progress: build.ProgressFn | None = None, rebuild: bool = False
                ) -> store.UserImage:
    """Build `spec` (or find it built, unless `rebuild`) and name it. The key covers the spec's text, not what
    an unpinned pip requirement (or a file a requirements file includes) resolves to today: pin versions, or
    `rebuild`."""
    report = progress or (lambda step, i, n: None)
    report(STEPS[0], 0, len(STEPS))
    resolved = debs.resolve((*debs.IMAGE_PACKAGES, *spec.packages), kernel=())
    key = spec_key(spec, resolved)
    meta = {"kind": "build", "spec": spec.to_json()}
    if store.find_object(key) is not None and not rebuild:
        return store.name(spec.name, key, meta)
    report(STEPS[1], 1, len(STEPS))
    files = debs.fetch(resolved, paths.cache_dir() / "debs")
    with store.new_object(key) as (scratch, out):
        tree = scratch / "tree"
        report(STEPS[2], 2, len(STEPS))
        for deb in files:
            debs.unpack(deb, tree)
        merge_usr(tree)
        _userland(tree)
        report(STEPS[3], 3, len(STEPS))
        if spec.pip or spec.requirements:
            pip_install(tree, spec)
        report(STEPS[4], 4, len(STEPS))
        for src, dest in spec.copies:
            copy_in(tree, src, dest)
        report(STEPS[5], 5, len(STEPS))
        rootfs.make_erofs(tree, out / "rootfs.erofs")
        config = store.ImageConfig(working_dir=contract.WORKLOAD_HOME, cmd=("/bin/sh",))
        (out / "config.json").write_text(json.dumps(config.to_json(), indent=1) + "\n")
    return store.name(spec.name, key, meta)



def merge_usr(tree: Path) -> None:
    """Debian 12's merged /usr: /bin, /sbin, /lib, /lib64 are links into /usr (some packages still ship files
    there; they move, directories merged)."""
    for d in ("bin", "sbin", "lib", "lib64"):
        top, usr = tree / d, tree / "usr" / d
        usr.mkdir(parents=True, exist_ok=True)
        if top.is_dir() and not top.is_symlink():
            _merge_into(top, usr)
            shutil.rmtree(top)
        if not top.is_symlink():
            top.symlink_to(f"usr/{d}")


def _merge_into(src: Path, dest: Path) -> None:
    for entry in src.iterdir():
        target = dest / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir() and not target.is_symlink():
            _merge_into(entry, target)
        elif not target.exists() and not target.is_symlink():
            entry.rename(target)
        else:
            raise ImageError(f"/{entry.relative_to(src.parent)} and /usr/{entry.relative_to(src.parent)} both "
                             "exist in the packages", hint="two packages disagree on merged /usr: drop one")


def _userland(tree: Path) -> None:
    """What an unpacked set of packages lacks to be a root to run commands in: busybox applets for commands no
    package provides, the sandbox user, and the usual directories."""
    for applet in build.busybox_applets(tree / "usr/bin/busybox"):
        link = tree / applet
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/usr/bin/busybox")
    user, uid, home = contract.WORKLOAD_USER, contract.WORKLOAD_UID, contract.WORKLOAD_HOME
    etc = tree / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text(f"root:x:0:0:root:/root:/bin/sh\n{user}:x:{uid}:{uid}:{user}:{home}:/bin/sh\n")
    (etc / "group").write_text(f"root:x:0:\n{user}:x:{uid}:\n")
    for d, mode in (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755), ("tmp", 0o1777),
                    ("root", 0o700)):
        (tree / d).mkdir(exist_ok=True)
        (tree / d).chmod(mode)
    (tree / home.lstrip("/")).mkdir(parents=True, exist_ok=True)
    os.chown(tree / home.lstrip("/"), uid, uid)


def pip_install(tree: Path, spec: BuildSpec) -> None:
    """pip installs wheels for the guest's Python (3.11, glibc 2.36) into the image's dist-packages; scripts go to
    /usr/local/bin with the guest's interpreter; everything is byte-compiled by the guest's own Python."""
    target = tree / PIP_SITE
    target.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
            "--no-input", "--target", str(target), "--only-binary=:all:", "--python-version", python.PY_VERSION,
            "--implementation", "cp", *[f"--platform={p}" for p in PIP_PLATFORMS]]
    if spec.requirements is not None:
        argv += ["--requirement", str(spec.requirements)]
    argv += ["--", *spec.pip] if spec.pip else []
    try:
        proc.run(argv, timeout=1800, env={"PIP_CONFIG_FILE": os.devnull})
    except MemvisorError as exc:
        lines = [ln.strip() for ln in exc.message.splitlines() if "ERROR" in ln or "error" in ln.lower()]
        raise ImageError(f"pip could not install {' '.join(spec.pip) or spec.requirements}: "
                         f"{' '.join(lines)[:500] or exc.message[:500]}",
                         hint="memvisor installs wheels only (no builds from source) for CPython 3.11 on "
                              "x86_64 glibc 2.36; check the names and that the project publishes wheels") from None
    scripts = target / "bin"
    if scripts.is_dir():
        dest = tree / "usr/local/bin"
        dest.mkdir(parents=True, exist_ok=True)
        for script in scripts.iterdir():
            data = script.read_bytes()
            if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
                data = b"#!/usr/bin/python3" + data[data.index(b"\n"):] if b"\n" in data else data
            (dest / script.name).write_bytes(data)
            (dest / script.name).chmod(0o755)
        shutil.rmtree(scripts)
    python.compile_pyc(tree, sorted(target.rglob("*.py")))


def copy_in(tree: Path, src: Path, dest: str) -> None:
    """Copy a host file or directory to `dest` in the image, never through a link in the image."""
    parts = [p for p in dest.split("/") if p]
    parent = tree
    for part in parts[:-1]:
        parent = parent / part
        if parent.is_symlink():
            raise ImageError(f"--copy destination {dest} goes through the image's symlink /"
                             f"{parent.relative_to(tree)}", hint="copy to the real directory instead")
        parent.mkdir(exist_ok=True)
    target = parent / parts[-1]
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        target.unlink()
    if src.is_dir():
        shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
    else:
        shutil.copy2(src, target)
