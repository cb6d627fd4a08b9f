"""The QEMU backend: the command line, one option and its value per line, and the KVM/TCG choice.

KVM is used only when /dev/kvm is usable *and* the CPU has vmx/svm: a PVM-only /dev/kvm (FACTS.md) exists but
cannot run a normal guest. Otherwise TCG with `-cpu max` (which gives the guest AES-NI/PCLMUL, used by the swap
crypto). The guest boots the ELF vmlinux through QEMU's PVH entry.
"""

from __future__ import annotations

import functools
import os
from typing import ClassVar

from memvisor import cmdline, proc, proto
from memvisor.errors import MemvisorError
from memvisor.host.vmm.base import VMMBackend, VMSpec

QEMU = "qemu-system-x86_64"
# no_timer_check: the kernel times the 8254 timer through the IO-APIC at boot and panics ("IO-APIC + timer
# doesn't work!") when a starved TCG vCPU is too slow for its check; a VM's timer needs no such check.
KERNEL_ARGS = ("console=ttyS0", "quiet", "panic=-1", "no_timer_check")
# TCG's translation cache, MiB. QEMU >= 5.0 defaults to 1 GiB on x86-64 hosts and keeps what it translates,
# which no balloon can take back; past the cap QEMU flushes it and translates again. Measured on a 192 MiB guest
# (docs/density.md): VMM RssAnon 255 MiB at the default, 209 at 32, 190 at 16; 16 made a mixed workload ~20%
# slower, 32 no measurable amount.
TCG_TB_MIB = 32
# With an NVDIMM the guest sees a memory region above 4 GiB, and its kernel then reserves a 64 MiB
# swiotlb bounce buffer out of guest RAM (measured: MemTotal 144 MiB instead of 210 in a 256 MiB guest). Guest RAM
# is all below 4 GiB and every device is virtio, which never bounces: no buffer.
PMEM_KERNEL_ARGS = ("swiotlb=noforce",)


@functools.cache
def kvm_usable() -> bool:
    """True when /dev/kvm can run a normal guest: readable/writable and a vmx or svm CPU flag."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "vmx" in flags or "svm" in flags


class QemuBackend(VMMBackend):
    """qemu-system-x86_64, q35 machine, no default devices."""

    name: ClassVar[str] = "qemu"

    def accel(self) -> str:
        return "kvm" if kvm_usable() else "tcg"

    def notice(self) -> str | None:
        if self.accel() == "tcg":
            return "KVM cannot run a normal guest here (no vmx/svm CPU flag): using QEMU TCG, which is slow"
        return None

    def command(self, spec: VMSpec) -> list[str]:
        kernel_cmdline = " ".join((*KERNEL_ARGS, *(PMEM_KERNEL_ARGS if spec.nvdimms else ()), *spec.cmdline))
        if len(kernel_cmdline) >= cmdline.COMMAND_LINE_MAX:
            raise MemvisorError(f"the kernel command line is {len(kernel_cmdline)} bytes, over the "
                                f"{cmdline.COMMAND_LINE_MAX}-byte limit")
        accel = self.accel()
        disks: list[str] = []
        for i, disk in enumerate(spec.disks):
            # QEMU dups an inherited fd of the access mode it wants from an fd set: it never opens the path
            # (it wants O_RDWR for the disk and O_RDONLY for its lock probe).
            for fd in disk.fds:
                disks += ["-add-fd", f"fd={fd},set={i + 1},opaque={disk.serial}"]
            disks += [
                "-drive", f"file={f'/dev/fdset/{i + 1}' if disk.fds else disk.path},if=none,id=disk{i},"
                          # A disk from fds is this VMM's alone: no image locks, which a `cont` after a saved
                          # (completed) migration could not take back across the two descriptors.
                          f"format=raw,{'file.locking=off,' if disk.fds else ''}"
                          f"{'readonly=on,' if disk.readonly else ''}"
                          f"{f'offset={disk.offset},' if disk.offset else ''}"
                          f"cache={'none' if disk.direct_io else 'writeback'},"
                          f"discard={'unmap' if disk.discard else 'ignore'}",
                "-device", f"virtio-blk-pci,drive=disk{i},serial={disk.serial}",
            ]
        memory = f"{spec.memory_mib}M"
        nvdimms: list[str] = []
        if spec.nvdimms:
            # Mapped read-only from an O_RDONLY fd: guest writes to it are dropped, the file cannot change
            # (`unarmed=on`: QEMU insists on it for a read-only backend). Memory devices need slots and room above
            # RAM (maxmem). No label area: the guest sees one label-less namespace per NVDIMM.
            memory += (f",slots={len(spec.nvdimms)},"
                       f"maxmem={spec.memory_mib + sum(-(-d.size // (1 << 20)) for d in spec.nvdimms)}M")
            for i, dev in enumerate(spec.nvdimms):
                nvdimms += ["-object", f"memory-backend-file,id=nv{i},size={dev.size},"
                                       f"mem-path=/proc/self/fd/{dev.fd},share=on,readonly=on",
                            "-device", f"nvdimm,id=nvdimm{i},memdev=nv{i},unarmed=on,slot={dev.slot}"]
        return [
            proc.which(QEMU),
            "-name", f"guest={spec.name},process={spec.name},debug-threads=on",
            # Guest RAM never goes into a core dump of the VMM (a crash would hand it to the host's core handler).
            "-machine", f"q35,mem-merge={'on' if spec.ksm else 'off'},dump-guest-core=off"
                        + (",nvdimm=on" if spec.nvdimms else "")
                        + (",memory-backend=ram0" if spec.ram_fd is not None else ""),
            *(["-object", f"memory-backend-file,id=ram0,size={spec.memory_mib}M,"
                          f"mem-path=/proc/self/fd/{spec.ram_fd},share={'on' if spec.ram_shared else 'off'},"
                          "dump=off"]
              if spec.ram_fd is not None else []),
            # seccomp: no obsolete syscalls, no setuid/setgid/exec/fork, no scheduler or priority changes.
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-accel", accel if accel == "kvm" else f"tcg,tb-size={TCG_TB_MIB}",
            "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(spec.cpus),
            "-m", memory,
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-no-reboot",
            "-kernel", str(spec.kernel),
            "-initrd", str(spec.initrd),
            "-append", kernel_cmdline,
            "-chardev", f"socket,id=console,fd={spec.console_fd}",
            "-serial", "chardev:console",
            "-chardev", f"socket,id=qmp,fd={spec.qmp_fd},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=ctl,fd={spec.channel_fd}",
            "-device", f"virtserialport,bus=vser0.0,chardev=ctl,name={proto.PORT_NAME}",
            *disks,
            *nvdimms,
            # A VM generation ID the guest kernel watches: a VMM that takes a migration stream in writes a new
            # one, and the guest reseeds its RNG (a resumed or cloned guest must never repeat a random stream).
            "-device", "vmgenid,id=vmgenid0,guid=auto",
            *(["-incoming", "defer"] if spec.incoming else []),
            *(["-device", f"virtio-balloon-pci,id=balloon0,free-page-reporting=on,"
                          f"deflate-on-oom={'on' if spec.deflate_on_oom else 'off'}"] if spec.balloon else []),
        ]
