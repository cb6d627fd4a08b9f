"""Build, cache and find the guest image, in one directory:
    vmlinux          the kernel
    rootfs.erofs     the whole guest tree, whole Python standard library included: the shared read-only root
    stage0.cpio      the initramfs that mounts it (image/rootfs.py)
    initramfs.cpio   the older way, for comparison (policy rootfs = "initramfs"): the tree in RAM, with only
                     the stdlib modules memvisor's init imports
    manifest.json

The directory name is <source key>-<package key>: the first half hashes the guest code and this builder, the
second the exact Debian package versions. `memvisor run` takes the newest image for the current source key
without asking apt; `memvisor image build` re-resolves package versions and builds only if the key changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import memvisor
from memvisor import contract, paths, proc
from memvisor.errors import ImageError
from memvisor.image import debs, kernel, python, rootfs
from memvisor.image.cpio import CpioWriter
from memvisor.image.tree import DirWriter, TreeWriter

PKG_DIR = Path(memvisor.__file__).parent
# The guest's share of the memvisor package (stdlib-only modules), shipped into the image's stdlib directory.
GUEST_SOURCES = ("__init__.py", "errors.py", "cmdline.py", "contract.py", "proto.py", "guest/__init__.py",
                 "guest/init.py", "guest/agent.py", "guest/linux.py", "guest/spawn.py", "guest/dm.py",
                 "guest/blockio.py", "guest/integrity.py", "guest/swap.py", "guest/swapstack.py", "guest/tagstore.py",
                 "guest/segments.py", "guest/zram.py", "guest/memstats.py", "guest/diag.py", "guest/memctld.py",
                 "guest/memctl.py", "guest/userroot.py", "guest/cgroups.py", "guest/clone.py", "guest/quiesce.py",
                 "guest/scratch.py")
BUILDER_SOURCES = ("image/__init__.py", "image/build.py", "image/cpio.py", "image/debs.py", "image/kernel.py",
                   "image/nvdimm.py", "image/python.py", "image/rootfs.py", "image/tree.py")
UNPRIVILEGED = contract.WORKLOAD_UID
STEPS = ("resolve packages", "download packages", "unpack packages", "kernel", "kernel modules",
         "python", "write initramfs", "write the shared root")

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Image:
    """A built image on disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def vmlinux(self) -> Path:
        return self.path / "vmlinux"

    @property
    def initramfs(self) -> Path:
        return self.path / "initramfs.cpio"

    @property
    def stage0(self) -> Path:
        return self.path / "stage0.cpio"

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs.erofs"


def images_dir() -> Path:
    return paths.cache_dir() / "images"


def source_key(files: tuple[str, ...] = (*GUEST_SOURCES, *BUILDER_SOURCES)) -> str:
    """Hash of every file that decides the image's contents besides the packages (or of `files`)."""
    digest = hashlib.sha256()
    for rel in files:
        digest.update(rel.encode() + b"\0" + (PKG_DIR / rel).read_bytes())
    return digest.hexdigest()[:16]


def package_key(resolved: list[debs.Deb]) -> str:
    text = "\n".join(f"{d.name}={d.version}:{d.sha256}" for d in resolved)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def find() -> Image | None:
    """The newest built image for the current guest code, or None."""
    candidates = [p for p in images_dir().glob(f"{source_key()}-*") if (p / "manifest.json").exists()]
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: (p / "manifest.json").stat().st_mtime)
    return Image(newest, json.loads((newest / "manifest.json").read_text()))


def ensure(progress: ProgressFn | None = None) -> Image:
    """The current image, building it if there is none."""
    return find() or build(progress=progress)


def build(*, rebuild: bool = False, progress: ProgressFn | None = None) -> Image:
    """Resolve the packages and build the image unless one with the same key exists (or `rebuild`)."""
    report = progress or (lambda step, i, n: None)
    started = time.monotonic()
    report(STEPS[0], 0, len(STEPS))
    resolved = debs.resolve()
    key = f"{source_key()}-{package_key(resolved)}"
    target = images_dir() / key
    if (target / "manifest.json").exists() and not rebuild:
        return Image(target, json.loads((target / "manifest.json").read_text()))
    report(STEPS[1], 1, len(STEPS))
    files = debs.fetch(resolved, paths.cache_dir() / "debs")
    images_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=images_dir(), prefix=".build-") as tmp:
        work = Path(tmp)
        root, out = work / "root", work / "out"
        out.mkdir()
        report(STEPS[2], 2, len(STEPS))
        for deb in files:
            debs.unpack(deb, root)
        report(STEPS[3], 3, len(STEPS))
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise ImageError(f"expected one kernel in the package, found {[p.name for p in vmlinuz]}")
        (out / "vmlinux").write_bytes(kernel.extract_vmlinux(vmlinuz[0].read_bytes()))
        report(STEPS[4], 4, len(STEPS))
        modules = kernel.resolve_modules(root / "lib/modules" / vmlinuz[0].name.removeprefix("vmlinuz-"))
        report(STEPS[5], 5, len(STEPS))
        pyfiles, whole = _prepare_python(root)
        report(STEPS[6], 6, len(STEPS))
        with (out / "initramfs.cpio").open("wb") as f, CpioWriter(f) as cpio:
            count = _write_tree(cpio, root, modules, pyfiles)
        report(STEPS[7], 7, len(STEPS))
        moddir = root / "lib/modules" / modules.kernel_version
        with (out / "stage0.cpio").open("wb") as f, CpioWriter(f) as cpio:
            rootfs.write_stage0(cpio, root / "bin/busybox", moddir, modules)
        rootfs_files = _write_tree(DirWriter(work / "tree"), root, modules, whole)
        rootfs.make_erofs(work / "tree", out / "rootfs.erofs")
        manifest = {
            "key": key,
            "memvisor": memvisor.__version__,
            "kernel_version": modules.kernel_version,
            "packages": {d.name: d.version for d in resolved},
            "module_groups": {g: [kernel.module_name(p) for p in v] for g, v in modules.groups.items()},
            "initramfs_files": count,
            "rootfs_files": rootfs_files,
            "sizes": {name: (out / name).stat().st_size
                      for name in ("vmlinux", "initramfs.cpio", "stage0.cpio", "rootfs.erofs")},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - started, 2),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    return Image(target, manifest)


def _prepare_python(root: Path) -> tuple[list[Path], list[Path]]:
    """Copy the guest package into the unpacked stdlib and byte-compile it all; return the files memvisor's
    init imports (the initramfs's subset) and the whole standard library with memvisor (the shared root's)."""
    dest = root / "usr/lib" / f"python{python.PY_VERSION}" / "memvisor"
    for rel in GUEST_SOURCES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PKG_DIR / rel, dest / rel)
    subset = python.stdlib_files(root, dest.parent)
    whole = python.whole_stdlib(root)
    python.compile_pyc(root, sorted(set(subset) | set(whole)))
    return subset, whole


def busybox_applets(busybox: Path) -> list[str]:
    """Where busybox's applets go in a merged-/usr tree (`usr/bin/ls`, `usr/sbin/insmod`, ...)."""
    out = []
    for applet in proc.run([str(busybox), "--list-full"]).stdout.decode().split():
        name = applet.removeprefix("usr/")
        if name not in ("linuxrc", "bin/busybox") and "/" in name:
            out.append(f"usr/{name}")
    return out


def _write_tree(cpio: TreeWriter, root: Path, modules: kernel.ModuleSet, pyfiles: list[Path]) -> int:
    """Lay out the guest's filesystem. Debian's merged-/usr layout: /bin, /sbin, /lib, /lib64 link into /usr."""
    dirs: set[str] = set()
    count = 0

    def mkdir(path: str, perm: int = 0o755, uid: int = 0) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in dirs:
                dirs.add(sub)
                cpio.add_dir(sub, perm if i == len(parts) else 0o755, uid=uid, gid=uid)

    def add(path: str, data: bytes, perm: int = 0o644) -> None:
        nonlocal count
        mkdir(os.path.dirname(path))
        cpio.add_file(path, data, perm)
        count += 1

    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "run", "mnt", "etc"):
        mkdir(d)
    mkdir("tmp", 0o1777)
    mkdir("root", 0o700)
    mkdir(contract.WORKLOAD_HOME.lstrip("/"), 0o755, uid=UNPRIVILEGED)
    for link in ("bin", "sbin", "lib", "lib64"):
        cpio.add_symlink(link, f"usr/{link}")
    cpio.add_device("dev/console", char=True, major=5, minor=1)
    cpio.add_device("dev/null", char=True, major=1, minor=3, perm=0o666)

    # busybox and its applets
    busybox = root / "bin/busybox"
    add("usr/bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox):
        if applet not in (f"usr/bin/python{python.PY_VERSION}", "usr/bin/python3"):
            cpio.add_symlink(applet, "/usr/bin/busybox")

    # python, its libraries, the stdlib subset with its .pyc
    interp = root / "usr/bin" / f"python{python.PY_VERSION}"
    add(f"usr/bin/python{python.PY_VERSION}", interp.read_bytes(), 0o755)
    cpio.add_symlink("usr/bin/python3", f"python{python.PY_VERSION}")
    so_files = [p for p in pyfiles if p.suffix == ".so"]
    for soname, lib in sorted(python.library_closure(root, [interp, *so_files]).items()):
        add(f"usr/lib/x86_64-linux-gnu/{soname}", lib.read_bytes(), 0o755)
    cpio.add_symlink("usr/lib64/ld-linux-x86-64.so.2", "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    real_root = root.resolve()
    for path in pyfiles:
        rel = path.relative_to(real_root).as_posix()
        add(rel, path.read_bytes(), 0o755 if path.suffix == ".so" else 0o644)
        if path.suffix == ".py":
            pyc = path.parent / "__pycache__" / f"{path.stem}.cpython-{python.PY_VERSION.replace('.', '')}.pyc"
            add(pyc.relative_to(real_root).as_posix(), pyc.read_bytes())

    # kernel modules and the load order per group
    moddir = f"usr/lib/modules/{modules.kernel_version}"
    for rel in modules.files:
        add(f"{moddir}/{rel}", (root / "lib/modules" / modules.kernel_version / rel).read_bytes())
    add("etc/memvisor/modules.json", json.dumps({"kernel": modules.kernel_version, "groups": modules.groups},
                                                indent=1).encode())

    user, uid, home = contract.WORKLOAD_USER, contract.WORKLOAD_UID, contract.WORKLOAD_HOME
    add("etc/passwd", f"root:x:0:0:root:/root:/bin/sh\n{user}:x:{uid}:{uid}:{user}:{home}:/bin/sh\n".encode())
    add("etc/group", f"root:x:0:\n{user}:x:{uid}:\n".encode())
    add("etc/hostname", b"memvisor\n")
    add("init", b"#!/usr/bin/python3 -SI\nfrom memvisor.guest.init import main\nmain()\n", 0o755)
    # memctl for workloads (docs/memctl.md): `import memctl`, and the `memctl` command
    add(f"usr/lib/python{python.PY_VERSION}/memctl.py", b"from memvisor.guest.memctl import *  # noqa\n"
        b"from memvisor.guest.memctl import MemctlError, advise, info, main  # noqa\n")
    add("usr/bin/memctl", b"#!/usr/bin/python3 -S\nimport sys\nfrom memvisor.guest.memctl import main\n"
        b"sys.exit(main())\n", 0o755)
    return count
