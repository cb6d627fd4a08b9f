"""Debian packages for the guest image: resolve them and their dependencies with apt's own resolver (a simulated
install onto an empty system), fetch with `apt-get download`, verify their SHA256, unpack with `dpkg-deb -x`.
Nothing is installed on the host.

Downloads are cached under <cache>/debs by name and version, so a rebuild with unchanged package versions
touches the network not at all.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from memvisor import proc
from memvisor.errors import ImageError, MemvisorError

# The packages the image is made of, with their dependencies (apt resolves those). The kernel is taken alone:
# its metapackage (FOLLOW) is replaced by the package it names, without the kernel's own tool dependencies.
KERNEL_PACKAGES = ("linux-image-amd64",)
IMAGE_PACKAGES = (
    "busybox-static",
    "python3-minimal",
    "libpython3.11-stdlib",  # the whole standard library, and the libraries its extension modules load
)
FOLLOW = frozenset({"linux-image-amd64"})
# apt-get's simulated install prints one line per package it would unpack: `Inst NAME (VERSION REPO [ARCH])`.
_INST = re.compile(r"^Inst (\S+) (?:\[\S+\] )?\((\S+) ")


@dataclass(frozen=True)
class Deb:
    """One resolved package: what apt-cache says of the candidate version."""

    name: str
    version: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return f"{self.name}_{re.sub(r'[^A-Za-z0-9.+~-]', '_', self.version)}_amd64.deb"


def _records(text: str) -> list[dict[str, str]]:
    records = []
    for block in text.strip().split("\n\n"):
        record: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                record[key] = value.strip()
        if record:
            records.append(record)
    return records


def resolve(names: tuple[str, ...] = IMAGE_PACKAGES, kernel: tuple[str, ...] = KERNEL_PACKAGES) -> list[Deb]:
    """`kernel` as named (following metapackages) and `names` with every package they depend on, as apt's
    resolver picks them for an empty system; candidate versions from the local apt lists."""
    closure = dependency_closure(names) if names else []
    return [*_show(kernel), *_show(tuple(n for n, _ in closure), dict(closure))]


def dependency_closure(names: tuple[str, ...]) -> list[tuple[str, str]]:
    """(name, version) of `names` and all they depend on (no recommends), by `apt-get install --simulate` against
    an empty dpkg status: apt's own resolver, nothing installed. ImageError naming apt's complaint otherwise."""
    argv = ["apt-get", "install", "--simulate", "-q", "--no-install-recommends",
            "-o", "Dir::State::status=/dev/null", "-o", "APT::Get::Show-Versions=false", *names]
    try:
        out = proc.run(argv, timeout=300).stdout.decode()
    except MemvisorError as exc:
        lines = [ln for ln in exc.message.splitlines() if ln.startswith(("E:", " ")) or "has no installation" in ln]
        raise ImageError(f"apt cannot resolve {' '.join(names)}: {' '.join(lines)[:400] or exc.message[:400]}",
                         hint="check the package names (`apt-cache policy NAME`); run `apt-get update`") from None
    found = [(m.group(1), m.group(2)) for m in map(_INST.match, out.splitlines()) if m]
    if not found:
        raise ImageError(f"apt resolved nothing for {' '.join(names)}")
    return found


def _show(names: tuple[str, ...], versions: dict[str, str] | None = None) -> list[Deb]:
    """The record apt-cache has for each package (the candidate, or the version given), following FOLLOW."""
    if not names:
        return []
    wanted = [f"{n}={versions[n]}" if versions else n for n in names]
    try:
        out = proc.run(["apt-cache", "show", "--no-all-versions", *wanted]).stdout.decode()
    except MemvisorError as exc:
        raise ImageError(f"cannot look up the guest packages: {exc.message}",
                         hint="run `apt-get update` (memvisor builds its guest from Debian 12 packages)") from None
    by_name = {r["Package"]: r for r in _records(out) if "Package" in r}
    debs: list[Deb] = []
    for name in names:
        record = by_name.get(name)
        if record is None:
            raise ImageError(f"package {name} is not known to apt", hint="run `apt-get update` on a Debian 12 host")
        if name in FOLLOW:
            target = record.get("Depends", "").split(",")[0].split()[0]
            if not target:
                raise ImageError(f"metapackage {name} has no Depends")
            debs += _show((target,))
            continue
        debs.append(Deb(name, record["Version"], record["SHA256"], int(record["Size"])))
    return debs


def fetch(debs: list[Deb], cache: Path) -> list[Path]:
    """Download every package not already in `cache`, verifying its SHA256; return the .deb paths."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [d for d in debs if not _valid(cache / d.filename, d)]
    if missing:
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            # Root's apt drops privileges to _apt, which cannot write our cache directory; it would warn only.
            proc.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                      *[f"{d.name}={d.version}" for d in missing]], cwd=tmp, timeout=1800)
            got = list(Path(tmp).glob("*.deb"))
            for deb in missing:
                match = [p for p in got if p.name.startswith(f"{deb.name}_")]
                if len(match) != 1 or not _valid(match[0], deb):
                    raise ImageError(f"download of {deb.name} {deb.version} failed or has a wrong SHA256",
                                     hint="run `apt-get update` and retry `memvisor image build`")
                match[0].replace(cache / deb.filename)
    return [cache / d.filename for d in debs]


def _valid(path: Path, deb: Deb) -> bool:
    if not path.exists() or path.stat().st_size != deb.size:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == deb.sha256


def unpack(deb: Path, dest: Path) -> None:
    """Unpack a package's files (not its scripts) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    proc.run(["dpkg-deb", "-x", str(deb), str(dest)], timeout=600)
