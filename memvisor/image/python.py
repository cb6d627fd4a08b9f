"""The slice of Debian's Python the guest needs, and the shared libraries its binaries load.

The stdlib subset is found by running the guest's own interpreter (unpacked from the Debian packages; it runs on
the Debian 12 host) on the guest entry modules and listing what ended up in sys.modules, so the guest code must
import what it needs at module level. The same interpreter compiles the .pyc files (unchecked-hash, so cpio
mtimes do not matter and nothing is recompiled at boot).
"""

from __future__ import annotations

import struct
from pathlib import Path

from memvisor import proc
from memvisor.errors import ImageError
from memvisor.image.kernel import elf_section

PY_VERSION = "3.11"
# swapstack: imported only with swap; diag: only when the host asks for a dump; memctld: only with memctl
# (memctl: PID 1's side, the workload's); userroot: only with a user's image; clone: only templatable;
# scratch: only with a confidential scratch disk
GUEST_ENTRY_MODULES = ("memvisor.guest.init", "memvisor.guest.swapstack", "memvisor.guest.diag",
                       "memvisor.guest.memctld", "memvisor.guest.memctl", "memvisor.guest.userroot",
                       "memvisor.guest.clone", "memvisor.guest.scratch")
# Imported lazily, on paths the guest can take: encoding lookups, error paths.
EXTRA_MODULES = ("encodings.latin_1", "encodings.ascii", "encodings.utf_8",
                 "json.decoder",  # _json raises json.decoder.JSONDecodeError, importing it on that path
                 "traceback")  # imported by init only when it fails

_LISTER = """
import sys
sys.path.insert(0, sys.argv[1])
for name in sys.argv[2:]:
    __import__(name)
for mod in list(sys.modules.values()):
    f = getattr(mod, "__file__", None)
    if f:
        print(f)
"""


def stdlib_files(root: Path, src: Path) -> list[Path]:
    """Files of root/usr/lib/python3.X that the guest modules import (absolute host paths, sorted)."""
    python = root / "usr/bin" / f"python{PY_VERSION}"
    out = proc.run([str(python), "-I", "-S", "-c", _LISTER, str(src), *GUEST_ENTRY_MODULES, *EXTRA_MODULES],
                   timeout=120).stdout.decode()
    stdlib = (root / "usr/lib" / f"python{PY_VERSION}").resolve()
    files = set()
    for line in out.split():
        path = Path(line).resolve()
        if path.is_relative_to(stdlib):
            files.add(path)
            # Packages need every __init__ up the tree.
            for parent in path.parents:
                if parent == stdlib:
                    break
                init = parent / "__init__.py"
                if init.exists():
                    files.add(init)
        elif not path.is_relative_to(src.resolve()):
            raise ImageError(f"guest module imported from outside the image: {path}")
    return sorted(files)


# Not shipped in the shared image: the test suite, the GUI toolkits (no display, no Tk), pip's bootstrap.
SKIPPED_STDLIB = frozenset({"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3/tests",
                            "distutils/tests", "unittest/test", "ctypes/test", "sqlite3/test", "__phello__"})


def whole_stdlib(root: Path) -> list[Path]:
    """Every file of root/usr/lib/python3.X (the whole standard library, for the shared
    image; initramfs images take stdlib_files' subset), without SKIPPED_STDLIB (absolute host paths, sorted)."""
    stdlib = (root / "usr/lib" / f"python{PY_VERSION}").resolve()
    files = []
    for path in stdlib.rglob("*"):
        rel = path.relative_to(stdlib).as_posix()
        if "__pycache__" in rel or any(rel == s or rel.startswith(f"{s}/") for s in SKIPPED_STDLIB):
            continue
        if path.is_file() and not path.is_symlink() and path.suffix != ".pyc":
            files.append(path)
    return sorted(files)


def compile_pyc(root: Path, files: list[Path]) -> None:
    """Byte-compile `files` in place (into __pycache__) with the guest interpreter, paths as the guest sees them."""
    python = root / "usr/bin" / f"python{PY_VERSION}"
    listing = root / "compile-list.txt"
    listing.write_text("".join(f"{f}\n" for f in files if f.suffix == ".py"))
    proc.run([str(python), "-I", "-S", "-m", "compileall", "-q", "-i", str(listing),
              "--invalidation-mode", "unchecked-hash", "-s", str(root), "-p", "/"], timeout=600)
    listing.unlink()


def needed_libraries(binary: bytes) -> list[str]:
    """The DT_NEEDED sonames of an ELF64 binary (struct elf64_dyn, include/uapi/linux/elf.h)."""
    dynamic = elf_section(binary, ".dynamic")
    dynstr = elf_section(binary, ".dynstr")
    if dynamic is None or dynstr is None:
        return []  # static
    names = []
    for off in range(0, len(dynamic) - 15, 16):
        tag, val = struct.unpack_from("<qQ", dynamic, off)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            names.append(dynstr[val:dynstr.index(b"\0", val)].decode())
    return names


def resolve_in(root: Path, path: Path, depth: int = 0) -> Path | None:
    """Follow symlinks inside `root` as the guest would (absolute targets are re-rooted); None if missing."""
    if depth > 16:
        raise ImageError(f"symlink loop at {path}")
    if path.is_symlink():
        target = Path(path.readlink().as_posix())
        nxt = root / target.relative_to("/") if target.is_absolute() else path.parent / target
        return resolve_in(root, nxt, depth + 1)
    return path if path.exists() else None


LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64")


def library_closure(root: Path, binaries: list[Path]) -> dict[str, Path]:
    """soname -> host file (symlinks followed) for every library the binaries need, transitively."""
    found: dict[str, Path] = {}
    todo = [b for b in binaries]
    while todo:
        for soname in needed_libraries(todo.pop().read_bytes()):
            if soname in found:
                continue
            for d in LIB_DIRS:
                candidate = resolve_in(root, root / d / soname)
                if candidate is not None:
                    found[soname] = candidate
                    todo.append(candidate)
                    break
            else:
                raise ImageError(f"shared library {soname} is not in the guest packages",
                                 hint="add its Debian package to IMAGE_PACKAGES in memvisor/image/debs.py")
    return found
