"""Users' images on the host: named, content-addressed, each a read-only erofs root plus the defaults commands
run with (docs/image.md).

    <store>/objects/<key>/rootfs.erofs   the root, shared read-only by every guest that runs it
    <store>/objects/<key>/config.json    Env, WorkingDir, User, Entrypoint, Cmd (ImageConfig)
    <store>/names/<name>.json            {"name", "key", "source", "created"}

<store> is $MEMVISOR_IMAGE_STORE, else <cache>/user-images (memvisor/paths.py: cache_dir).

An object is written under a temporary name and renamed into place whole, then the name is written atomically:
a failed build or import leaves nothing. The key is a hash of everything that decides the object's bytes, so
the same spec or archive twice is built once. `rm` drops the name, then the object if no name refers to it (a
running guest keeps its open fd to the file, so removing an image never breaks a sandbox).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memvisor import paths, policy
from memvisor.errors import ImageError

NAME = policy.IMAGE_NAME
KEY = re.compile(r"^[0-9a-f]{64}$")


def check_name(name: str) -> str:
    """A valid image name, or ImageError naming the rule (names become file names)."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise ImageError(f"image name {str(name)[:80]!r} is not valid",
                         hint="use 1-63 characters: lower-case letters, digits, '.', '_' and '-', starting with a "
                              "letter or digit")
    return name


@dataclass(frozen=True)
class ImageConfig:
    """The defaults a command in the image runs with (from an OCI image config, or a build's own)."""

    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    working_dir: str = ""
    uid: int | None = None  # None: the policy's user (the unprivileged sandbox user unless --root)
    gid: int | None = None
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    def env_dict(self) -> dict[str, str]:
        out = {}
        for item in self.env:
            key, sep, value = item.partition("=")
            if sep and key:
                out[key] = value
        return out

    def default_argv(self) -> list[str]:
        return [*self.entrypoint, *self.cmd]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ImageConfig:
        return cls(env=tuple(doc.get("env", ())), working_dir=str(doc.get("working_dir", "")),
                   uid=doc.get("uid"), gid=doc.get("gid"), entrypoint=tuple(doc.get("entrypoint", ())),
                   cmd=tuple(doc.get("cmd", ())))


@dataclass(frozen=True)
class UserImage:
    """A named image ready to run."""

    name: str
    key: str
    path: Path  # its object directory
    source: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs.erofs"

    @functools.cached_property
    def config(self) -> ImageConfig:
        """Read once: every command of a sandbox of this image asks for it."""
        return ImageConfig.from_json(json.loads((self.path / "config.json").read_text()))

    @property
    def size(self) -> int:
        return self.rootfs.stat().st_size

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "size": self.size, "created": self.created,
                "source": self.source, "config": self.config.to_json(), "rootfs": str(self.rootfs)}


def root() -> Path:
    """$MEMVISOR_IMAGE_STORE, else <cache>/user-images."""
    override = os.environ.get("MEMVISOR_IMAGE_STORE")
    return Path(override) if override else paths.cache_dir() / "user-images"


def _names() -> Path:
    return root() / "names"


def _objects() -> Path:
    return root() / "objects"


def get(name: str) -> UserImage:
    """The image of that name, or ImageError saying how to see the ones there are."""
    check_name(name)
    entry = _names() / f"{name}.json"
    try:
        doc = json.loads(entry.read_text())
    except FileNotFoundError:
        raise ImageError(f"there is no image named {name!r}",
                         hint="see `memvisor image ls`; make one with `memvisor image build --name` or "
                              "`memvisor image import`") from None
    except (OSError, ValueError):
        doc = None
    if not isinstance(doc, dict):
        raise ImageError(f"image {name!r} is damaged (its entry {entry} is unreadable)",
                         hint=f"remove it with `memvisor image rm {name}` and build or import it again")
    key = str(doc.get("key", ""))
    obj = _objects() / key
    if not KEY.match(key) or not (obj / "rootfs.erofs").is_file():
        raise ImageError(f"image {name!r} is damaged (its object {key[:16]} is missing)",
                         hint=f"remove it with `memvisor image rm {name}` and build or import it again")
    return UserImage(name, key, obj, doc.get("source", {}), doc.get("created", ""))


def ls() -> list[UserImage]:
    out = []
    for entry in sorted(_names().glob("*.json")) if _names().is_dir() else []:
        with contextlib.suppress(ImageError):
            out.append(get(entry.stem))
    return out


def find_object(key: str) -> Path | None:
    obj = _objects() / key
    return obj if (obj / "rootfs.erofs").is_file() and (obj / "config.json").is_file() else None


@contextlib.contextmanager
def new_object(key: str) -> Iterator[tuple[Path, Path]]:
    """(scratch directory, object directory) for building object `key`: the caller writes rootfs.erofs and
    config.json into the second. On a clean exit it becomes the object, whole; on an exception both go."""
    if not KEY.match(key):
        raise ValueError(f"bad object key {key!r}")
    _objects().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=_objects(), prefix=".build-") as tmp:
        work = Path(tmp)
        out = work / "object"
        out.mkdir()
        scratch = work / "scratch"
        scratch.mkdir()
        yield scratch, out
        target = _objects() / key
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)


def name(image_name: str, key: str, source: dict[str, Any]) -> UserImage:
    """Point `image_name` at object `key` (replacing what it named before)."""
    check_name(image_name)
    if find_object(key) is None:
        raise ImageError(f"image object {key[:16]} does not exist")
    _names().mkdir(parents=True, exist_ok=True)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    entry = _names() / f"{image_name}.json"
    tmp = entry.with_name(f".{image_name}.json.tmp")
    tmp.write_text(json.dumps({"name": image_name, "key": key, "source": source, "created": created}, indent=1))
    old = None
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(entry.read_text()).get("key")
    tmp.replace(entry)
    if old and old != key:
        _collect(old)
    return get(image_name)


def rm(image_name: str) -> None:
    """Remove a name (a damaged one too), then its object if nothing else names it."""
    check_name(image_name)
    entry = _names() / f"{image_name}.json"
    key = None
    try:
        key = get(image_name).key
    except ImageError:
        if not entry.exists():
            raise
    entry.unlink()
    if key:
        _collect(key)


def _collect(key: str) -> None:
    """Remove object `key` if no name refers to it any more."""
    for entry in _names().glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(entry.read_text()).get("key") == key:
                return
    shutil.rmtree(_objects() / key, ignore_errors=True)
