"""Debian packages for the guest image: resolve versions with apt-cache, fetch with `apt-get download`, verify
their SHA256, unpack with `dpkg-deb -x`. Nothing is installed on the host.

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

# The packages the image is made of. Metapackages (FOLLOW) are replaced by the package they depend on.
IMAGE_PACKAGES = (
    "linux-image-amd64",
    "busybox-static",
    "python3-minimal",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "zlib1g",
    "libexpat1",
    "libffi8",
)
FOLLOW = frozenset({"linux-image-amd64"})


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


def resolve(names: tuple[str, ...] = IMAGE_PACKAGES) -> list[Deb]:
    """The candidate version of each package (following metapackages), from the local apt lists."""
    try:
        out = proc.run(["apt-cache", "show", "--no-all-versions", *names]).stdout.decode()
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
            debs += resolve((target,))
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
