"""Templates without a guest: the templatable policy (no balloon unless asked, then refused; what it cannot be
combined with), the CLONED message's checks, the VMM's RAM and vmgenid arguments, and template names."""

from __future__ import annotations

import os

import pytest

from memvisor import policy, proto
from memvisor.errors import MemvisorError, PolicyError, ProtocolError
from memvisor.host.vmm import qemu
from memvisor.snapshot import template
from tests.unit.test_qemu import options, spec


def test_templatable_means_no_balloon_and_refuses_what_a_shared_ram_cannot_take() -> None:
    made = policy.merge(("test", {"templatable": True}))
    assert made.templatable and not made.balloon and "templatable" in made.summary()
    assert dict(made.sources)["balloon"] == "templatable"
    for layer, flag in (({"balloon": True}, "--balloon"), ({"ksm": True}, "--ksm"), ({"memctl": True}, "--memctl"),
                        ({"scratch_mib": 256}, "--scratch"), ({"rootfs": "initramfs"}, "--rootfs initramfs")):
        with pytest.raises(PolicyError, match=f"--templatable cannot be used with {flag}"):
            policy.merge(("test", {"templatable": True, **layer}))
    assert "memvisor.templatable=1" in policy.to_cmdline(made)
    assert "memvisor.templatable=0" in policy.to_cmdline(policy.DEFAULT)


@pytest.mark.parametrize("body, words", [
    ({"sandbox_id": "../etc"}, "sandbox_id"),
    ({"sandbox_id": "a" * 33}, "sandbox_id"),
    ({"entropy": "00"}, "entropy"),
    ({"entropy": "ZZ" * proto.CLONE_ENTROPY}, "entropy"),
    ({"error": "x" * (proto.MAX_TEXT + 1)}, "at most"),
    ({"reseeded": 1}, "reseeded"),
    ({"swap": []}, "swap"),
])
def test_a_cloned_message_out_of_bounds_is_refused(body: dict[str, object], words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        proto.check(proto.Kind.CLONED, body)


def test_a_good_cloned_message_passes() -> None:
    proto.check(proto.Kind.CLONED, {"sandbox_id": "0a1b2c3d", "entropy": "ab" * proto.CLONE_ENTROPY,
                                    "realtime": 1.5})
    proto.check(proto.Kind.CLONED, {"uptime": 3.0, "reseeded": True, "vmgenid": True, "hostname": "memvisor-x",
                                    "swap": {}, "seconds": 0.2, "clock_step": 4.0})


def test_every_vmm_has_a_vm_generation_id_and_a_clone_maps_its_ram_privately(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "kvm_usable", lambda: False)

    def opts(**changes: object) -> dict[str, list[str]]:
        argv = qemu.QemuBackend().command(spec(**changes))
        return options([argv[0], *[a for a in argv[1:] if a not in ("-nodefaults", "-no-user-config", "-no-reboot")]])

    assert "vmgenid,id=vmgenid0,guid=auto" in opts()["-device"]
    assert "mem-path=/proc/self/fd/11,share=on," in opts(ram_fd=11)["-object"][0]
    assert "mem-path=/proc/self/fd/11,share=off," in opts(ram_fd=11, ram_shared=False)["-object"][0]


@pytest.mark.parametrize("name", ["", "Py", "a b", "../x", "x" * 31, "-x"])
def test_bad_template_names_are_refused(name: str) -> None:
    with pytest.raises(MemvisorError, match="is not allowed"):
        template.check_name(name)


def test_the_budget_counts_a_clone_by_its_own_pages_and_its_template_once() -> None:
    from types import SimpleNamespace

    from memvisor.service import supervisor as sup_mod

    me = SimpleNamespace(pid=os.getpid())
    plain = SimpleNamespace(process=me, is_clone=False)
    clone = SimpleNamespace(process=me, is_clone=True)
    status = {k: int(v.split()[0]) << 10 for k, v in (line.split(":", 1) for line in
                                                      open(f"/proc/{me.pid}/status") if ":" in line)
              if k in ("RssAnon", "RssShmem")}
    assert sup_mod._rss(clone) == status["RssAnon"]  # the template's pages it maps are not its own
    assert sup_mod._rss(plain) == status["RssAnon"] + status["RssShmem"]
    sup = sup_mod.Supervisor(1 << 40)
    try:
        sup.shared_bytes = lambda: 100 << 20
        sup.measure("a", clone)
        sup.measure("b", clone)
        with sup._lock:
            held = sup._held()
        assert held >= 2 * sup_mod._rss(clone) + (100 << 20) - (4 << 20)  # two clones, the template once
        sup.release("a")
        sup.release("b")
        with sup._lock:
            assert sup._held() >= 100 << 20 and not sup._measured
    finally:
        sup.close()


def test_memfd_ram_counts_only_memvisors_guest_ram_memfds() -> None:
    import mmap

    from memvisor.host import stats

    before = stats.memfd_ram(os.getpid())
    fd = os.memfd_create("memvisor-test-ram")
    other = os.memfd_create("someone-else")
    try:
        for f in (fd, other):
            os.ftruncate(f, 1 << 20)
        with mmap.mmap(fd, 1 << 20) as ram, mmap.mmap(other, 1 << 20) as not_ram:
            ram[:] = b"x" * (1 << 20)
            not_ram[:] = b"y" * (1 << 20)
            rss, pss = stats.memfd_ram(os.getpid())
            assert rss - before[0] == 1 << 20 and pss - before[1] == 1 << 20
    finally:
        os.close(fd)
        os.close(other)
