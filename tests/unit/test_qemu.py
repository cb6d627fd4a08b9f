"""The QEMU command line and the KVM/TCG decision."""

from __future__ import annotations

from pathlib import Path

import pytest

from memvisor import proc
from memvisor.errors import MemvisorError, MissingDependencyError
from memvisor.host.vmm import qemu
from memvisor.host.vmm.base import Disk, Nvdimm, VMSpec


def spec(**changes: object) -> VMSpec:
    base: dict[str, object] = dict(name="memvisor-t", memory_mib=192, cpus=2, kernel=Path("/k/vmlinux"),
                                   initrd=Path("/k/initramfs.cpio"), cmdline=("memvisor.root=0",),
                                   console_fd=5, qmp_fd=7, channel_fd=9)
    base.update(changes)
    return VMSpec(**base)  # type: ignore[arg-type]


def options(argv: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for opt, value in zip(argv[1::2], argv[2::2], strict=False):
        out.setdefault(opt, []).append(value)
    return out


def test_command_line_tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "kvm_usable", lambda: False)
    argv = qemu.QemuBackend().command(spec())
    assert argv[0].endswith("qemu-system-x86_64")
    flags = [a for a in argv if a.startswith("-")]
    assert {"-nodefaults", "-no-user-config", "-no-reboot"} <= set(flags)
    value_argv = [a for a in argv[1:] if a not in ("-nodefaults", "-no-user-config", "-no-reboot")]
    opts = options([argv[0], *value_argv])
    assert opts["-accel"] == [f"tcg,tb-size={qemu.TCG_TB_MIB}"] and opts["-cpu"] == ["max"]
    assert opts["-m"] == ["192M"] and opts["-smp"] == ["2"]
    assert opts["-machine"] == ["q35,mem-merge=off,dump-guest-core=off"]
    assert opts["-sandbox"] == ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert opts["-append"][0].endswith("memvisor.root=0") and "console=ttyS0" in opts["-append"][0]
    assert "socket,id=qmp,fd=7,server=on,wait=off" in opts["-chardev"]
    assert "socket,id=ctl,fd=9" in opts["-chardev"]
    assert any("name=org.memvisor.ctl" in d for d in opts["-device"])
    assert qemu.QemuBackend().notice() is not None


def test_command_line_kvm_and_ksm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "kvm_usable", lambda: True)
    argv = qemu.QemuBackend().command(spec(ksm=True))
    assert argv[argv.index("-accel") + 1] == "kvm" and argv[argv.index("-cpu") + 1] == "host"
    assert argv[argv.index("-machine") + 1] == "q35,mem-merge=on,dump-guest-core=off"
    assert qemu.QemuBackend().notice() is None


def test_kernel_command_line_length_is_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MemvisorError, match="over the 2048-byte limit"):
        qemu.QemuBackend().command(spec(cmdline=("memvisor.x=" + "y" * 2100,)))


def test_missing_qemu_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingDependencyError, match="qemu-system-x86_64 is not installed") as info:
        qemu.QemuBackend().command(spec())
    assert info.value.hint == "apt-get install qemu-system-x86"
    with pytest.raises(MissingDependencyError, match="apt-get install dpkg"):
        proc.which("dpkg-deb")


def test_kvm_needs_vmx_or_svm() -> None:
    # On this host /dev/kvm exists but the CPU has neither flag (FACTS.md); elsewhere the answer must agree
    # with /proc/cpuinfo.
    qemu.kvm_usable.cache_clear()
    flags = Path("/proc/cpuinfo").read_text()
    has_virt = " vmx" in flags or " svm" in flags
    assert qemu.kvm_usable() == (has_virt and Path("/dev/kvm").exists())


def test_shared_root_is_a_read_only_nvdimm_and_a_blk_root_skips_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """The root and the user's image go on emulated NVDIMMs (which QEMU 7.2 migrates, unlike virtio-pmem), in the
    slots the guest looks for, mapped read-only; as a disk, the erofs starts after the 2 MiB NVDIMM header."""
    monkeypatch.setattr(qemu, "kvm_usable", lambda: False)
    two = (Nvdimm(fd=11, size=64 << 20, slot=0), Nvdimm(fd=12, size=(6 << 20), slot=1))
    argv = qemu.QemuBackend().command(spec(nvdimms=two))
    text = " ".join(argv)
    assert "virtio-pmem" not in text
    opts = options([a for a in argv if a not in ("-nodefaults", "-no-user-config", "-no-reboot")])
    assert opts["-machine"] == ["q35,mem-merge=off,dump-guest-core=off,nvdimm=on"]
    assert opts["-m"] == ["192M,slots=2,maxmem=262M"]
    assert opts["-object"] == [
        "memory-backend-file,id=nv0,size=67108864,mem-path=/proc/self/fd/11,share=on,readonly=on",
        "memory-backend-file,id=nv1,size=6291456,mem-path=/proc/self/fd/12,share=on,readonly=on"]
    assert [d for d in opts["-device"] if d.startswith("nvdimm,")] == [
        "nvdimm,id=nvdimm0,memdev=nv0,unarmed=on,slot=0", "nvdimm,id=nvdimm1,memdev=nv1,unarmed=on,slot=1"]
    assert "swiotlb=noforce" in opts["-append"][0]

    disk = Disk(Path("/img/rootfs.erofs"), "memvisor-rootfs", direct_io=False, fds=(13,), readonly=True,
                offset=2 << 20)
    argv = qemu.QemuBackend().command(spec(disks=(disk,)))
    drive = argv[argv.index("-drive") + 1]
    assert "readonly=on," in drive and ",offset=2097152," in f",{drive},"
    # a disk from fds is the VMM's own: no image locks (a `cont` after a failed park could not take them back)
    assert drive.startswith("file=/dev/fdset/1,") and ",file.locking=off," in drive
    assert "nvdimm" not in " ".join(argv) and "swiotlb" not in " ".join(argv)
