"""What every VMM backend is given (VMSpec) and must provide (VMMBackend)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class Disk:
    """A raw disk image for the guest, found there by its virtio serial."""

    path: Path
    serial: str
    direct_io: bool = True  # bypass the host page cache (O_DIRECT)
    discard: bool = False  # the guest's discards punch holes in the file (else they are ignored)
    fds: tuple[int, ...] = ()  # open fds the VMM inherits, O_RDWR and O_RDONLY (then `path` is only a record)
    readonly: bool = False  # the guest cannot write it (then `fds` is one O_RDONLY fd)
    offset: int = 0  # the disk starts this many bytes into the file (a root image's NVDIMM header)


@dataclass(frozen=True)
class Nvdimm:
    """A host file mapped into the guest as an emulated ACPI NVDIMM, read-only: the guest reads the host's page cache
    (with DAX, no copy in the guest), and the host file can never change (opened O_RDONLY, mapped read-only). Not
    virtio-pmem, which QEMU 7.2 cannot migrate (a parked guest's first flush would block forever)."""

    fd: int  # O_RDONLY, inherited by the VMM
    size: int  # bytes, a multiple of 2 MiB, starting with the PFN info block (memvisor/image/nvdimm.py)
    slot: int  # the NVDIMM slot the guest finds it by (memvisor/contract.py)


@dataclass(frozen=True)
class VMSpec:
    """One VM to start: everything the backend needs, already decided by the sandbox."""

    name: str
    memory_mib: int
    cpus: int
    kernel: Path
    initrd: Path
    cmdline: tuple[str, ...]
    console_fd: int  # one end of a connected socketpair: the guest's serial console (memvisor reads the other)
    qmp_fd: int  # a bound, listening unix socket the VMM serves its monitor on
    channel_fd: int  # one end of a connected socketpair: the guest control channel
    ksm: bool = False
    disks: tuple[Disk, ...] = ()
    balloon: bool = False
    deflate_on_oom: bool = False
    nvdimms: tuple[Nvdimm, ...] = ()
    incoming: bool = False  # start paused, waiting for a migration stream (a parked sandbox's resume)
    # Guest RAM in a memfd memvisor owns (memctl, a templatable sandbox: mapped shared; a template's clone: the
    # template's sealed memfd, mapped private, so the clone's writes are its own copies), passed at this number.
    ram_fd: int | None = None
    ram_shared: bool = True


class VMMBackend(abc.ABC):
    """A VMM: turns a VMSpec into a command line, and says how it accelerates."""

    name: ClassVar[str]

    @abc.abstractmethod
    def command(self, spec: VMSpec) -> list[str]:
        """The exact argv that starts the VM (printed as is by --dry-run)."""

    @abc.abstractmethod
    def accel(self) -> str:
        """The accelerator this backend will use on this host ("kvm" or "tcg")."""

    def notice(self) -> str | None:
        """A one-line notice for the user about how the VM will run (e.g. no KVM), or None."""
        return None
