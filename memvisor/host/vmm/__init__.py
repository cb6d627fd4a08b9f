"""VMM backends: a registry of subclasses of VMMBackend, chosen by name."""

from __future__ import annotations

from memvisor.errors import MemvisorError
from memvisor.host.vmm.base import Disk, Nvdimm, VMMBackend, VMSpec
from memvisor.host.vmm.qemu import QemuBackend

BACKENDS: dict[str, type[VMMBackend]] = {QemuBackend.name: QemuBackend}


def backend(name: str = "qemu") -> VMMBackend:
    """An instance of the named backend."""
    if name not in BACKENDS:
        raise MemvisorError(f"unknown VMM backend {name!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]()


__all__ = ["BACKENDS", "Disk", "Nvdimm", "VMMBackend", "VMSpec", "backend"]
