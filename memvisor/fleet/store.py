"""The bundle store: where a parked sandbox (or a template) lives while no host runs it, reachable from every host.

A bundle is a set of files (sealed streams, kept disks) plus a manifest (bytes the caller writes: what the bundle
is, policy included; its SHA-256 is what the fence records), for one (id, generation). BundleStore is the small
interface the daemon uses: put, manifest, fetch, list, partial, remove. DirectoryStore fills it with a directory
(local for one host; NFS or CephFS for a fleet). An object-store backend would fill the same interface with boto3
against S3 or Ceph's radosgw (a bundle = objects under <id>/<generation>/, the manifest object put last).

DirectoryStore layout, everything of this user's, directories mode 0700:

    STORE/bundles/<id>/<generation>/<file>...    the bundle's files
    STORE/bundles/<id>/<generation>/manifest     written last: the commit point

Why a reader never sees a partial bundle: each file is written under a temporary name (".<name>.<hex>.tmp"),
fsynced and renamed; the manifest goes last the same way, then the directory is fsynced. A generation directory
without a manifest is partial (a writer is at work, or died): never listed, never fetched, removable. A full disk
(ENOSPC, EDQUOT) raises StoreFull after removing everything the put wrote. Files are copied in the kernel
(copy_file_range, else sendfile) one data extent at a time (SEEK_DATA/SEEK_HOLE): kept disks are sparse and stay
so. Nothing here follows a symlink: every path is opened relative to a directory fd with O_NOFOLLOW, and every
directory and file is checked to be this user's.

Which host may write or remove a bundle is the fence's business (fence.py), not the store's; the store does not
verify or decrypt anything (the snapshot layer does).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from memvisor.fleet.errors import BundleNotFound, StoreError, StoreFull
from memvisor.fleet.records import check_id
from memvisor.host.runtime import SAFE_ID

log = logging.getLogger("memvisor")

MANIFEST: Final = "manifest"
BUNDLES: Final = "bundles"
MANIFEST_LIMIT: Final = 16 << 20
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # no '/', no leading '.' (temporary names have one)
_FULL = (errno.ENOSPC, errno.EDQUOT)
_NO_COPY_FILE_RANGE = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 30  # bytes per copy_file_range/sendfile call


def manifest_digest(manifest: bytes) -> str:
    """The SHA-256 (hex) of a manifest, as the fence records it."""
    return hashlib.sha256(manifest).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A bundle in the store: (id, generation), its files' sizes in bytes, and whether its manifest is there."""

    id: str
    generation: int
    files: dict[str, int] = field(default_factory=dict)
    complete: bool = True


class BundleStore(ABC):
    """Where bundles live between hosts. Bundles are written once per (id, generation) and never changed."""

    @abstractmethod
    def put(self, bundle_id: str, generation: int, files: Mapping[str, Path], manifest: bytes) -> Bundle:
        """Store `files` (name in the bundle -> local file) and `manifest` as (id, generation), so that a reader
        sees all of it or nothing; StoreFull (leaving nothing) when the store has no room."""

    @abstractmethod
    def manifest(self, bundle_id: str, generation: int) -> bytes:
        """The manifest of a complete bundle; BundleNotFound if absent or partial."""

    @abstractmethod
    def fetch(self, bundle_id: str, generation: int, dest: Path, digest: str | None = None) -> bytes:
        """Copy the bundle's files into the local directory `dest` and return its manifest; with `digest`, a
        manifest of another SHA-256 is refused before anything is copied."""

    @abstractmethod
    def rewrite_manifest(self, bundle_id: str, generation: int, manifest: bytes) -> None:
        """Replace the manifest of a complete bundle, atomically (a key rotation rewraps it: the rest of the
        bundle never changes); BundleNotFound if it is absent or partial."""

    @abstractmethod
    def list(self) -> list[Bundle]:
        """Every complete bundle."""

    @abstractmethod
    def partial(self) -> builtins.list[Bundle]:
        """Every partial bundle (no manifest): a put in progress, or one that died."""

    @abstractmethod
    def of(self, bundle_id: str) -> builtins.list[Bundle]:
        """Every bundle, complete or partial, of one sandbox or template (what its removal removes)."""

    @abstractmethod
    def remove(self, bundle_id: str, generation: int) -> bool:
        """Remove a bundle, complete or partial (its manifest first); whether there was one."""


def _check(fd: int, what: str, kind: int, hint: str) -> os.stat_result:
    st = os.fstat(fd)
    if stat.S_IFMT(st.st_mode) != kind or st.st_uid != os.geteuid():
        raise StoreError(f"{what} is not memvisor's own (owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)})",
                         hint=hint)
    return st


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy bytes [offset, offset+count) of src to the same offsets of dst, in the kernel."""
    end = offset + count
    while offset < end:
        try:
            n = os.copy_file_range(src, dst, min(_CHUNK, end - offset), offset, offset)
        except OSError as exc:
            if exc.errno not in _NO_COPY_FILE_RANGE:
                raise
            os.lseek(dst, offset, os.SEEK_SET)  # another filesystem that cannot: sendfile writes at dst's offset
            n = os.sendfile(dst, src, offset, min(_CHUNK, end - offset))
        if n == 0:
            raise StoreError(f"a file shrank while it was copied (at byte {offset} of {end})")
        offset += n


def copy_sparse(src: int, dst: int) -> int:
    """Copy regular file `src` into empty `dst` extent by extent, leaving holes as holes; its size."""
    size = os.fstat(src).st_size
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole is left
            raise
        hole = min(os.lseek(src, data, os.SEEK_HOLE), size)
        _copy_range(src, dst, data, hole - data)
        offset = hole
    os.ftruncate(dst, size)
    return size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class DirectoryStore(BundleStore):
    """BundleStore in a directory (see the module's docstring). `root` must be a directory of this user's with
    mode 0700 (created so if `create` and it is missing): the store holds sealed snapshots, but also the kept
    disks' ciphertext and what their sizes tell, so no one else may read or plant anything there."""

    def __init__(self, root: Path, create: bool = False) -> None:
        self.root = Path(root)
        hint = (f"it must be a directory owned by uid {os.geteuid()} with mode 0700: chmod 700 {self.root}, or "
                "give --store another")
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.root, 0o700)
        try:
            fd = os.open(self.root, _O_DIR)
        except FileNotFoundError:
            raise StoreError(f"the store {self.root} does not exist",
                             hint=f"mkdir -m 700 {self.root}, or give --store another directory") from None
        except OSError as exc:
            why = "it is a symlink or not a directory" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc.strerror
            raise StoreError(f"the store {self.root} cannot be used: {why}", hint=hint) from None
        try:
            st = _check(fd, f"the store {self.root}", stat.S_IFDIR, hint)
            if stat.S_IMODE(st.st_mode) != 0o700:
                raise StoreError(f"the store {self.root} has mode {stat.filemode(st.st_mode)}, not drwx------",
                                 hint=hint)
        except BaseException:
            os.close(fd)
            raise
        self._root_fd = fd

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.root)!r})"

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> DirectoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- directories ------------------------------------------------------------------------------------------
    def _subdir(self, parent: int, name: str, what: str, create: bool = False) -> tuple[int, bool]:
        """(fd, created) of directory `name` under fd `parent`; never a symlink, always this user's."""
        created = False
        if create:
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
                created = True
            except FileExistsError:
                pass
        try:
            fd = os.open(name, _O_DIR, dir_fd=parent)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise
            raise StoreError(f"{what} in the store {self.root} cannot be used: {exc.strerror}",
                             hint="it is not a directory memvisor made: remove it") from None
        try:
            if created:
                os.fchmod(fd, 0o700)  # whatever the umask
                os.fsync(parent)
            _check(fd, f"{what} in the store {self.root}", stat.S_IFDIR, hint="it was not made by memvisor: remove it")
        except BaseException:
            os.close(fd)
            raise
        return fd, created

    def _bundle_dir(self, bundle_id: str, generation: int) -> int:
        """The fd of bundles/<id>/<generation>; FileNotFoundError if any part is missing."""
        check_id(bundle_id, "bundle id")
        with _fd(self._subdir(self._root_fd, BUNDLES, f"{BUNDLES}/")[0]) as bundles, \
                _fd(self._subdir(bundles, bundle_id, f"{BUNDLES}/{bundle_id}")[0]) as folder:
            return self._subdir(folder, str(generation), f"bundle {bundle_id}/{generation}")[0]

    # -- writing ----------------------------------------------------------------------------------------------
    def _write_file(self, folder: int, name: str, fill: Callable[[int], None]) -> None:
        """Create .<name>.<hex>.tmp in `folder`, fill(fd), fsync, rename to `name`."""
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=folder)
        try:
            os.fchmod(fd, 0o600)
            fill(fd)
            os.fsync(fd)
            os.rename(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=folder)
            raise
        finally:
            os.close(fd)

    def put(self, bundle_id: str, generation: int, files: Mapping[str, Path], manifest: bytes) -> Bundle:
        check_id(bundle_id, "bundle id")
        if type(generation) is not int or generation < 1:
            raise ValueError(f"a bundle's generation is an int >= 1, not {generation!r}")
        for name in files:
            if not FILE_NAME.fullmatch(name) or name == MANIFEST:
                raise StoreError(f"{name!r} cannot name a file of a bundle: use 1-64 of A-Z, a-z, 0-9, '.', '_' "
                                 f"and '-', not starting with '.', and not {MANIFEST!r}")
        sources: dict[str, int] = {}
        try:
            for name, path in files.items():
                sources[name] = self._open_source(path)
            return self._put(bundle_id, generation, sources, manifest)
        except OSError as exc:
            if exc.errno in _FULL:  # _put has removed what it wrote
                raise StoreFull(f"the store {self.root} is full ({exc.strerror}) while bundle {bundle_id}/"
                                f"{generation} was written; nothing of it was kept",
                                hint="free space in the store, or give it a larger quota") from None
            raise
        finally:
            for fd in sources.values():
                os.close(fd)

    @staticmethod
    def _open_source(path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
            raise StoreError(f"cannot read {path} to store it: {why}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreError(f"cannot store {path}: it is not a regular file")
        return fd

    def _put(self, bundle_id: str, generation: int, sources: dict[str, int], manifest: bytes) -> Bundle:
        gen = str(generation)
        with _fd(self._subdir(self._root_fd, BUNDLES, f"{BUNDLES}/", create=True)[0]) as bundles:
            folder, made_id = self._subdir(bundles, bundle_id, f"{BUNDLES}/{bundle_id}", create=True)
            with _fd(folder):
                try:
                    os.mkdir(gen, 0o700, dir_fd=folder)
                except FileExistsError:
                    raise StoreError(f"the store {self.root} already has a bundle {bundle_id}/{gen} (complete or "
                                     "partial): a generation is written once",
                                     hint="remove it if it is partial; a complete one is never overwritten") from None
                except BaseException:
                    self._undo(bundles, folder, bundle_id, None, made_id)
                    raise
                try:
                    with _fd(self._subdir(folder, gen, f"bundle {bundle_id}/{gen}")[0]) as target:
                        os.fchmod(target, 0o700)
                        os.fsync(folder)
                        sizes = {name: 0 for name in sources}
                        for name, src in sources.items():
                            def fill(fd: int, src: int = src, name: str = name) -> None:
                                sizes[name] = copy_sparse(src, fd)
                            self._write_file(target, name, fill)
                        os.fsync(target)  # every file's rename is durable before the manifest's
                        self._write_file(target, MANIFEST, lambda fd: _write_all(fd, manifest))
                        os.fsync(target)
                except BaseException:
                    self._undo(bundles, folder, bundle_id, gen, made_id)
                    raise
        return Bundle(bundle_id, generation, sizes)

    def _undo(self, bundles: int, folder: int, bundle_id: str, gen: str | None, made_id: bool) -> None:
        """Remove what a failed put wrote: its generation directory, and the id's if the put made it."""
        if gen is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(gen, dir_fd=folder)
            with contextlib.suppress(OSError):
                os.fsync(folder)
        if made_id:
            with contextlib.suppress(OSError):
                os.rmdir(bundle_id, dir_fd=bundles)
                os.fsync(bundles)

    # -- reading ----------------------------------------------------------------------------------------------
    def _read_manifest(self, folder: int, bundle_id: str, gen: str) -> bytes:
        try:
            fd = os.open(MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=folder)
        except FileNotFoundError:
            raise BundleNotFound(f"the bundle {bundle_id}/{gen} in the store {self.root} is partial (no manifest)",
                                 hint="a park was cut short or is in progress; it is never resumed") from None
        except OSError as exc:
            raise StoreError(f"cannot read the manifest of {bundle_id}/{gen} in the store {self.root}: "
                             f"{'it is a symlink' if exc.errno == errno.ELOOP else exc.strerror}") from None
        with open(fd, "rb") as f:
            _check(fd, f"the manifest of {bundle_id}/{gen} in the store {self.root}", stat.S_IFREG,
                   hint="remove the bundle")
            data = f.read(MANIFEST_LIMIT + 1)
        if len(data) > MANIFEST_LIMIT:
            raise StoreError(f"the manifest of {bundle_id}/{gen} in the store {self.root} is over {MANIFEST_LIMIT} "
                             "bytes: not one memvisor wrote")
        return data

    def _open_bundle(self, bundle_id: str, generation: int) -> int:
        try:
            return self._bundle_dir(bundle_id, generation)
        except FileNotFoundError:
            raise BundleNotFound(f"the store {self.root} has no bundle {bundle_id}/{generation}") from None

    def manifest(self, bundle_id: str, generation: int) -> bytes:
        with _fd(self._open_bundle(bundle_id, generation)) as folder:
            return self._read_manifest(folder, bundle_id, str(generation))

    def fetch(self, bundle_id: str, generation: int, dest: Path, digest: str | None = None) -> bytes:
        gen = str(generation)
        with _fd(self._open_bundle(bundle_id, generation)) as folder:
            manifest = self._read_manifest(folder, bundle_id, gen)
            if digest is not None and manifest_digest(manifest) != digest:
                raise StoreError(f"the manifest of {bundle_id}/{gen} in the store {self.root} is not the one the "
                                 f"fence recorded (SHA-256 {manifest_digest(manifest)}, not {digest})",
                                 hint="the bundle was edited or replaced in the store: it is refused")
            try:
                out = os.open(dest, _O_DIR)
            except OSError as exc:
                raise StoreError(f"cannot fetch into {dest}: {exc.strerror}") from None
            with _fd(out):
                _check(out, f"the directory {dest}", stat.S_IFDIR, hint="fetch into a directory of this user's")
                written: list[str] = []
                try:
                    for name in self._names(folder):
                        with _fd(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)) as src:
                            _check(src, f"the file {bundle_id}/{gen}/{name} in the store {self.root}", stat.S_IFREG,
                                   hint="remove the bundle")
                            def fill(fd: int, src: int = src) -> None:
                                copy_sparse(src, fd)
                            self._write_file(out, name, fill)
                            written.append(name)
                    os.fsync(out)
                except BaseException:
                    for name in written:
                        with contextlib.suppress(OSError):
                            os.unlink(name, dir_fd=out)
                    raise
        return manifest

    @staticmethod
    def _names(folder: int) -> list[str]:
        """The bundle's file names (not the manifest, not temporary files)."""
        return sorted(n for n in os.listdir(folder) if FILE_NAME.fullmatch(n) and n != MANIFEST)

    def _scan(self) -> Iterator[Bundle]:
        try:
            bundles = self._subdir(self._root_fd, BUNDLES, f"{BUNDLES}/")[0]
        except FileNotFoundError:
            return
        with _fd(bundles):
            for bundle_id in sorted(os.listdir(bundles)):
                if not SAFE_ID.fullmatch(bundle_id):
                    continue
                try:
                    folder = self._subdir(bundles, bundle_id, f"{BUNDLES}/{bundle_id}")[0]
                except (StoreError, FileNotFoundError) as exc:  # one planted entry must not hide the others
                    log.warning("skipping %s/%s in the store %s: %s", BUNDLES, bundle_id, self.root, exc)
                    continue
                with _fd(folder):
                    yield from self._scan_id(folder, bundle_id)

    def _scan_id(self, folder: int, bundle_id: str) -> Iterator[Bundle]:
        for gen in sorted((g for g in os.listdir(folder) if g.isdigit() and int(g) > 0), key=int):
            try:
                target = self._subdir(folder, gen, f"bundle {bundle_id}/{gen}")[0]
            except (StoreError, FileNotFoundError) as exc:
                log.warning("skipping bundle %s/%s in the store %s: %s", bundle_id, gen, self.root, exc)
                continue
            with _fd(target):
                names = os.listdir(target)
                sizes = {n: os.stat(n, dir_fd=target, follow_symlinks=False).st_size
                         for n in sorted(names) if FILE_NAME.fullmatch(n) and n != MANIFEST}
                yield Bundle(bundle_id, int(gen), sizes, MANIFEST in names)

    def rewrite_manifest(self, bundle_id: str, generation: int, manifest: bytes) -> None:
        with _fd(self._open_bundle(bundle_id, generation)) as folder:
            self._read_manifest(folder, bundle_id, str(generation))  # complete, and ours
            self._write_file(folder, MANIFEST, lambda fd: _write_all(fd, manifest))
            os.fsync(folder)

    def list(self) -> list[Bundle]:
        return [b for b in self._scan() if b.complete]

    def partial(self) -> builtins.list[Bundle]:
        return [b for b in self._scan() if not b.complete]

    def of(self, bundle_id: str) -> builtins.list[Bundle]:
        check_id(bundle_id, "bundle id")
        try:
            with _fd(self._subdir(self._root_fd, BUNDLES, f"{BUNDLES}/")[0]) as bundles, \
                    _fd(self._subdir(bundles, bundle_id, f"{BUNDLES}/{bundle_id}")[0]) as folder:
                return list(self._scan_id(folder, bundle_id))
        except FileNotFoundError:
            return []

    def remove(self, bundle_id: str, generation: int) -> bool:
        gen = str(generation)
        check_id(bundle_id, "bundle id")
        try:
            bundles = self._subdir(self._root_fd, BUNDLES, f"{BUNDLES}/")[0]
        except FileNotFoundError:
            return False
        with _fd(bundles):
            try:
                folder = self._subdir(bundles, bundle_id, f"{BUNDLES}/{bundle_id}")[0]
            except FileNotFoundError:
                return False
            with _fd(folder):
                try:
                    target = self._subdir(folder, gen, f"bundle {bundle_id}/{gen}")[0]
                except FileNotFoundError:
                    return False
                with _fd(target):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(MANIFEST, dir_fd=target)  # first: cut short, it leaves a partial bundle
                    os.fsync(target)
                shutil.rmtree(gen, dir_fd=folder)
                with contextlib.suppress(OSError):
                    os.rmdir(bundle_id, dir_fd=bundles)  # only if no other generation is left
                os.fsync(folder)
            os.fsync(bundles)
        return True
