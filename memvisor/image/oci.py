"""Import an OCI image (a layout directory, or a tar of one as `skopeo copy oci-archive:` writes, or a
`docker save` / `podman save` archive) as a memvisor image (docs/image.md).

Every blob is checked against its digest and size before it is used, and each layer's uncompressed bytes against
the config's diff_id. Layers are applied in order into an empty tree the way the OCI image spec's changeset
rules say (image-spec layer.md): `.wh.NAME` deletes NAME from the layers below, `.wh..wh..opq` empties its
directory of what the layers below put there. The archive is hostile input: an entry that climbs out of the root
(`..`), goes through a symlink, is a device node, or declares more bytes than the limit is refused with the
entry's name, and the whole import fails; nothing is ever written outside the scratch tree, which goes with
the failure.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from memvisor.errors import ImageError
from memvisor.image import build, rootfs, store

DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
MAX_JSON = 4 << 20  # manifests, indexes and configs are small
MAX_ENTRIES = 1_000_000
DEFAULT_MAX_BYTES = 8 << 30
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json"}
MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json"}
OPAQUE = ".wh..wh..opq"
WHITEOUT = ".wh."

ProgressFn = Callable[[str, int, int], None]


# -- where the blobs are ----------------------------------------------------------------------------------------
class Source:
    """An OCI layout or image archive, read-only: files by their path inside it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            return
        if not path.is_file():
            raise ImageError(f"{path} does not exist", hint="give an OCI layout directory or an image archive")
        try:
            self._tar = tarfile.open(path, "r:*")
            for member in self._tar:
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                if member.isreg() and ".." not in parts:
                    self._members["/".join(parts)] = member
        except (tarfile.TarError, EOFError, OSError) as exc:
            reason = str(exc).splitlines()[0].rstrip(":") if str(exc) else type(exc).__name__
            raise ImageError(f"{path} is not a readable image archive ({reason})",
                             hint="give an OCI layout directory, or a tar as written by `skopeo copy "
                                  "... oci-archive:FILE` or `docker save`") from None

    def exists(self, name: str) -> bool:
        if self._tar is not None:
            return name in self._members
        return (self.path / name).is_file() and not (self.path / name).is_symlink()

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        if self._tar is not None:
            member = self._members.get(name)
            handle = self._tar.extractfile(member) if member is not None else None
            if handle is None:
                raise ImageError(f"{self.path}: {name} is missing from the archive")
            with handle:
                yield handle
            return
        target = self.path / _clean(name)
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise ImageError(f"{self.path}: cannot read {name}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device would block or never end
            os.close(fd)
            raise ImageError(f"{self.path}: {name} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            yield f

    def read_json(self, name: str) -> Any:
        with self.open(name) as f:
            data = f.read(MAX_JSON + 1)
        return _json(data, f"{self.path}: {name}")

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def _clean(name: str) -> str:
    """A path inside the layout or archive; ImageError if it climbs out of it."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or name.startswith("/") or "\0" in name:
        raise ImageError(f"the archive names {name[:200]!r}, a path outside itself")
    return "/".join(parts)


def _json(data: bytes, what: str) -> Any:
    if len(data) > MAX_JSON:
        raise ImageError(f"{what} is over {MAX_JSON >> 20} MiB: not an image manifest or config")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{what} is not valid JSON ({exc})") from None


# -- what the image is -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    path: str  # inside the source
    digest: str | None  # of the blob as stored (None: docker-save legacy, checked through diff_id only)
    size: int | None
    media_type: str
    diff_id: str  # of the uncompressed tar


@dataclass(frozen=True)
class Resolved:
    key_digest: str  # the manifest's digest (or the config's, for a legacy docker archive)
    config: dict[str, Any]
    layers: tuple[Layer, ...]


def _blob_path(digest: str) -> str:
    match = DIGEST.match(digest) if isinstance(digest, str) else None
    if not match:
        raise ImageError(f"digest {str(digest)[:80]!r} is not a sha256 digest",
                         hint="memvisor imports images whose blobs are named by sha256")
    return f"blobs/sha256/{match.group(1)}"


def _descriptor(doc: Any, what: str) -> tuple[str, int, str]:
    if not isinstance(doc, dict):
        raise ImageError(f"{what} is not a descriptor")
    digest, size, media = doc.get("digest"), doc.get("size"), doc.get("mediaType", "")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{what}: size {size!r} is not a byte count")
    _blob_path(str(digest))
    return str(digest), size, str(media)


def read_blob(source: Source, digest: str, size: int, limit: int = MAX_JSON) -> bytes:
    """A small blob (manifest, config), checked against its digest and size."""
    if size > limit:
        raise ImageError(f"blob {digest[:19]} declares {size} bytes, over the {limit}-byte limit for its kind")
    with source.open(_blob_path(digest)) as f:
        data = f.read(limit + 1)
    _check(digest, size, hashlib.sha256(data).hexdigest(), len(data))
    return data


def verify_blob(source: Source, digest: str, size: int) -> None:
    """A large blob (a layer), hashed in chunks and checked against its digest and size."""
    h, n = hashlib.sha256(), 0
    with source.open(_blob_path(digest)) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
            if n > size:
                break
    _check(digest, size, h.hexdigest(), n)


def _check(digest: str, size: int, got: str, got_size: int) -> None:
    if got_size != size or f"sha256:{got}" != digest:
        raise ImageError(f"blob {digest[:19]}… does not match its digest (got sha256:{got[:12]}…, "
                         f"{got_size} bytes, expected {size})",
                         hint="the archive is corrupt or was changed after it was written: export it again")


def resolve(source: Source, platform: tuple[str, str] = ("linux", "amd64")) -> Resolved:
    """The one image in the source: its manifest (or docker manifest.json entry), config and layers."""
    if source.exists("index.json"):
        return _resolve_oci(source, source.read_json("index.json"), platform, depth=0)
    if source.exists("manifest.json"):
        return _resolve_docker(source)
    raise ImageError(f"{source.path} holds no OCI index.json and no docker manifest.json",
                     hint="export it with `skopeo copy ... oci:DIR` / `oci-archive:FILE`, or `docker save`")


def _resolve_oci(source: Source, index: Any, platform: tuple[str, str], depth: int) -> Resolved:
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise ImageError(f"{source.path}: the image index lists no manifests")
    candidates = [m for m in manifests if isinstance(m, dict)
                  and (not isinstance(m.get("platform"), dict)
                       or (m["platform"].get("os"), m["platform"].get("architecture")) == platform)]
    if len(candidates) != 1:
        names = [str((m.get("annotations") or {}).get("org.opencontainers.image.ref.name", m.get("digest")))[:40]
                 for m in candidates if isinstance(m, dict)]
        raise ImageError(f"{source.path}: {len(candidates)} images for {'/'.join(platform)} "
                         f"({', '.join(names) or 'none'}); memvisor imports one",
                         hint="export the one image you want (skopeo copy docker://IMAGE oci-archive:FILE)")
    digest, size, media = _descriptor(candidates[0], "the index's manifest")
    doc = _json(read_blob(source, digest, size), f"manifest {digest[:19]}")
    if media in INDEX_TYPES or (isinstance(doc, dict) and doc.get("mediaType") in INDEX_TYPES):
        if depth > 2:
            raise ImageError(f"{source.path}: image indexes nest too deep")
        return _resolve_oci(source, doc, platform, depth + 1)
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list):
        raise ImageError(f"manifest {digest[:19]} has no layers list")
    cdigest, csize, _ = _descriptor(doc.get("config"), "the manifest's config")
    config = _json(read_blob(source, cdigest, csize), f"config {cdigest[:19]}")
    diff_ids = _diff_ids(config, len(doc["layers"]))
    layers = []
    for i, entry in enumerate(doc["layers"]):
        ldigest, lsize, lmedia = _descriptor(entry, f"layer {i + 1}")
        layers.append(Layer(_blob_path(ldigest), ldigest, lsize, lmedia, diff_ids[i]))
    return Resolved(digest, config, tuple(layers))


def _resolve_docker(source: Source) -> Resolved:
    doc = source.read_json("manifest.json")
    if not isinstance(doc, list) or len(doc) != 1 or not isinstance(doc[0], dict):
        raise ImageError(f"{source.path}: manifest.json must describe exactly one image",
                         hint="save one image per archive (docker save IMAGE -o FILE)")
    entry = doc[0]
    config_path, layer_paths = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_path, str) or not isinstance(layer_paths, list):
        raise ImageError(f"{source.path}: manifest.json has no Config or Layers")
    # The config's file name is its digest (<hex>.json, or blobs/sha256/<hex>).
    match = re.search(r"([0-9a-f]{64})(?:\.json)?$", config_path)
    if not match:
        raise ImageError(f"{source.path}: config {config_path[:80]!r} is not named by its digest")
    with source.open(_clean(config_path)) as f:
        data = f.read(MAX_JSON + 1)
    digest = f"sha256:{match.group(1)}"
    _check(digest, len(data), hashlib.sha256(data).hexdigest(), len(data))
    config = _json(data, f"config {digest[:19]}")
    diff_ids = _diff_ids(config, len(layer_paths))
    layers = tuple(Layer(_clean(str(p)), None, None, "application/vnd.docker.image.rootfs.diff.tar", diff_ids[i])
                   for i, p in enumerate(layer_paths))
    return Resolved(digest, config, layers)


def _diff_ids(config: Any, count: int) -> list[str]:
    ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config, dict) else None
    if not isinstance(ids, list) or len(ids) != count or not all(isinstance(d, str) and DIGEST.match(d)
                                                                  for d in ids):
        raise ImageError(f"the image config's rootfs.diff_ids does not list one sha256 digest per layer "
                         f"({count} layers)")
    return ids


# -- applying layers ---------------------------------------------------------------------------------------------
class _Hashing(io.RawIOBase):
    """Reads through `inner`, hashing every byte."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.inner.read(len(buf))
        self.hash.update(data)
        buf[:len(data)] = data
        return len(data)


def _decompressed(raw: IO[bytes], media_type: str) -> IO[bytes]:
    head = raw.peek(4)[:4] if hasattr(raw, "peek") else b""
    if media_type.endswith("zstd") or head.startswith(b"\x28\xb5\x2f\xfd"):
        raise ImageError(f"layer compression zstd ({media_type}) is not supported",
                         hint="export the image with gzip layers (skopeo copy --dest-compress-format gzip)")
    if media_type.endswith("gzip") or head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    return raw


class Tree:
    """The image root being assembled: every change goes through checks that it stays inside."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.budget = max_bytes
        self.max_bytes = max_bytes
        self.entries = 0

    def _parts(self, name: str, what: str) -> list[str]:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ImageError(f"{what}: entry {name[:200]!r} climbs out of the image root (..)")
        return parts

    def _dir(self, parts: list[str], what: str, name: str) -> Path:
        """The real directory at `parts`, created if missing; never through a symlink."""
        path = self.root
        for part in parts:
            path = path / part
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise ImageError(f"{what}: entry {name[:200]!r} goes through the symlink "
                                 f"/{path.relative_to(self.root)}, which could point outside the image")
            if not stat.S_ISDIR(st.st_mode):
                raise ImageError(f"{what}: entry {name[:200]!r} needs /{path.relative_to(self.root)} to be a "
                                 "directory")
        return path

    def _remove(self, path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()

    def apply(self, stream: IO[bytes], what: str) -> None:
        """Apply one uncompressed layer tar."""
        added: set[str] = set()  # this layer's entries and their ancestors: an opaque marker keeps those
        try:
            archive = tarfile.open(fileobj=stream, mode="r|")
            for member in archive:
                self.entries += 1
                if self.entries > MAX_ENTRIES:
                    raise ImageError(f"{what}: over {MAX_ENTRIES} entries")
                try:
                    self._member(archive, member, what, added)
                except (OSError, ValueError, OverflowError) as exc:
                    raise ImageError(f"{what}: cannot apply entry {member.name[:200]!r}: {exc}") from None
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
            raise ImageError(f"{what} is not a valid tar layer: {exc}") from None

    def _member(self, archive: tarfile.TarFile, member: tarfile.TarInfo, what: str, added: set[str]) -> None:
        parts = self._parts(member.name, what)
        if not parts:
            return  # the root itself
        base = parts[-1]
        parent = self._dir(parts[:-1], what, member.name)
        rel = "/".join(parts)
        for i in range(1, len(parts)):
            added.add("/".join(parts[:i]))
        if base == OPAQUE:
            # Now, not at the end of the layer: a later entry may replace this directory with a symlink. What
            # the layers below put here goes; what this layer already added stays.
            prefix = "/".join(parts[:-1])
            for child in list(parent.iterdir()):
                if f"{prefix}/{child.name}".lstrip("/") not in added:
                    self._remove(child)
            return
        if base.startswith(WHITEOUT):
            name = base[len(WHITEOUT):]
            if name in ("", ".", ".."):
                raise ImageError(f"{what}: whiteout {member.name[:200]!r} names no file")
            self._remove(parent / name)
            return
        if member.ischr() or member.isblk():
            raise ImageError(f"{what}: entry {member.name[:200]!r} is a device node; images may not carry "
                             "devices (the guest's /dev is its own)")
        target = parent / base
        added.add(rel)
        try:
            existing = os.lstat(target)
        except FileNotFoundError:
            existing = None
        if member.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                target.unlink()
                existing = None
            if existing is None:
                os.mkdir(target, 0o700)
            os.chown(target, member.uid, member.gid)
            os.chmod(target, member.mode & 0o7777)
            return
        if existing is not None:
            self._remove(target)
        if member.isreg():
            if member.size > self.budget:
                raise ImageError(f"{what}: entry {member.name[:200]!r} declares {member.size} bytes; the image "
                                 f"may hold {self.max_bytes} in all",
                                 hint="raise the limit with --max-size if the image really is that large")
            self.budget -= member.size
            source = archive.extractfile(member)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                if source is not None:
                    shutil.copyfileobj(source, out, 1 << 20)
                os.fchown(out.fileno(), member.uid, member.gid)
                os.fchmod(out.fileno(), member.mode & 0o7777)
        elif member.issym():
            os.symlink(member.linkname, target)
            os.lchown(target, member.uid, member.gid)
        elif member.islnk():
            link_parts = self._parts(member.linkname, what)
            source_path = self._dir(link_parts[:-1], what, member.linkname) / link_parts[-1] if link_parts else None
            if source_path is None or not source_path.is_file() or source_path.is_symlink():
                raise ImageError(f"{what}: hard link {member.name[:200]!r} -> {member.linkname[:200]!r} does not "
                                 "name a regular file of the image")
            os.link(source_path, target)
        elif member.isfifo():
            os.mkfifo(target, member.mode & 0o777)
            os.chown(target, member.uid, member.gid)
        else:
            raise ImageError(f"{what}: entry {member.name[:200]!r} has an unsupported type {member.type!r}")


# -- the image's defaults ------------------------------------------------------------------------------------------
def image_config(config: dict[str, Any], tree: Path) -> store.ImageConfig:
    """Env, WorkingDir, User (resolved to numbers through the image's own /etc/passwd and /etc/group),
    Entrypoint and Cmd from an OCI image config."""
    body = config.get("config") or {}
    if not isinstance(body, dict):
        raise ImageError("the image config's `config` is not an object")

    def strings(key: str) -> tuple[str, ...]:
        value = body.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ImageError(f"the image config's {key} is not a list of strings")
        return tuple(value)

    workdir = body.get("WorkingDir") or ""
    if not isinstance(workdir, str) or (workdir and not workdir.startswith("/")):
        raise ImageError(f"the image config's WorkingDir {str(workdir)[:80]!r} is not an absolute path")
    uid, gid = _user(str(body.get("User") or ""), tree)
    return store.ImageConfig(env=strings("Env") or store.ImageConfig().env, working_dir=workdir, uid=uid, gid=gid,
                             entrypoint=strings("Entrypoint"), cmd=strings("Cmd"))


def _user(spec: str, tree: Path) -> tuple[int | None, int | None]:
    if not spec:
        return None, None
    user, _, group = spec.partition(":")

    def lookup(table: str, name: str) -> tuple[int, int] | None:
        path = tree / "etc" / table
        if name.isascii() and name.isdigit():
            return int(name), int(name)
        if path.is_symlink() or not path.is_file():
            return None
        for line in path.read_text(errors="replace").splitlines()[:100000]:
            fields = line.split(":")
            if len(fields) >= 4 and fields[0] == name and fields[2].isascii() and fields[2].isdigit():
                gid = int(fields[3]) if fields[3].isascii() and fields[3].isdigit() else int(fields[2])
                return int(fields[2]), gid
        return None

    found = lookup("passwd", user)
    if found is None:
        raise ImageError(f"the image's User {spec[:80]!r} is not in its /etc/passwd")
    uid, gid = found
    if group:
        got = lookup("group", group)
        if got is None:
            raise ImageError(f"the image's group {group[:80]!r} is not in its /etc/group")
        gid = got[0]
    if not (0 <= uid < 1 << 31 and 0 <= gid < 1 << 31):
        raise ImageError(f"the image's User {spec[:80]!r} is out of range")
    return uid, gid


# -- the whole import ----------------------------------------------------------------------------------------------
def import_image(path: Path, name: str, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 progress: ProgressFn | None = None) -> store.UserImage:
    """Import the image at `path` as `name` (replacing an image of that name). Cached: the same manifest is
    imported once."""
    store.check_name(name)
    report = progress or (lambda step, i, n: None)
    source = Source(path)
    try:
        resolved = resolve(source)
        # The key: the image's digest and the code that turns it into a tree.
        importer = build.source_key(("image/oci.py", "image/rootfs.py", "image/nvdimm.py"))
        key = hashlib.sha256(f"oci:{importer}:{resolved.key_digest}".encode()).hexdigest()
        meta = {"kind": "oci", "path": str(path), "digest": resolved.key_digest, "layers": len(resolved.layers)}
        if store.find_object(key) is None:
            steps = 2 * len(resolved.layers) + 1
            with store.new_object(key) as (scratch, out):
                tree = Tree(scratch / "tree", max_bytes)
                tree.root.mkdir()
                for i, layer in enumerate(resolved.layers):
                    what = f"layer {i + 1} of {len(resolved.layers)}"
                    report(f"verify {what}", 2 * i, steps)
                    if layer.digest is not None and layer.size is not None:
                        verify_blob(source, layer.digest, layer.size)
                    report(f"apply {what}", 2 * i + 1, steps)
                    with source.open(layer.path) as raw:
                        hashing = _Hashing(_decompressed(raw, layer.media_type))
                        tree.apply(io.BufferedReader(hashing, 1 << 20), what)
                        try:
                            while hashing.read(1 << 20):
                                pass
                        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                            raise ImageError(f"{what} is not a valid compressed layer: {exc}") from None
                    if f"sha256:{hashing.hash.hexdigest()}" != layer.diff_id:
                        raise ImageError(f"{what}: its content does not match the config's diff_id "
                                         f"{layer.diff_id[:19]}…", hint="the archive is corrupt: export it again")
                for d, mode in (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("tmp", 0o1777),
                                ("run", 0o755)):
                    tree._dir([d], "the image", d)
                    os.chmod(tree.root / d, mode)
                config = image_config(resolved.config, tree.root)
                report("write the image", steps - 1, steps)
                rootfs.make_erofs(tree.root, out / "rootfs.erofs")
                (out / "config.json").write_text(json.dumps(config.to_json(), indent=1) + "\n")
        return store.name(name, key, meta)
    finally:
        source.close()
