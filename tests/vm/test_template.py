"""Templates and clones against real guests (docs/templates.md): clones of one warm template each see its warm
state, yet each is its own machine from its first command (a new VM generation ID the guest kernel reseeded on, its
own random stream, id, hostname and swap key); the template's RAM is a sealed memfd nobody can write; clones share
its pages. The daemon's side (API, CLI, restarts) is in test_template_service.py."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memvisor import policy
from memvisor.host import stats
from memvisor.host.sandbox import Instance
from memvisor.host.vmm.qmp import QMP
from memvisor.image.build import Image
from memvisor.snapshot import statedir, template
from memvisor.snapshot.manifest import Manifest

MIB = 1 << 20
# A long-running process of the template: it imported a module the template paid for, and keeps saying so.
WARM = """
import decimal, os, sys, time
os.makedirs("/tmp/warm", exist_ok=True)
while True:
    with open("/tmp/warm/alive.new", "w") as f:
        f.write(" ".join(str(x) for x in (os.getpid(), "decimal" in sys.modules, time.monotonic())))
    os.rename("/tmp/warm/alive.new", "/tmp/warm/alive")
    time.sleep(0.2)
"""
SETUP = ("mkdir -p /tmp/warm && echo warm > /tmp/warm/file && "
         f"(python3 -c '{WARM}' </dev/null >/dev/null 2>&1 &) && sleep 1 && "
         "python3 -c 'import os; print(os.getrandom(32).hex())'")
HOG = "import sys; b = bytearray(int(sys.argv[1]) << 20); b[::4096] = b'x' * len(b[::4096]); print('held')"


def sh(vm: Instance, script: str) -> str:
    result = vm.exec(["sh", "-c", script], uid=0)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout.decode()


class Frozen:
    def __init__(self, state: statedir.State, meta: Manifest, fd: int, pol: policy.Policy,
                 random_before: str) -> None:
        self.state, self.meta, self.fd, self.policy, self.random_before = state, meta, fd, pol, random_before


@pytest.fixture
def frozen(image: Image, tmp_path: Path) -> Iterator[Frozen]:
    """A 192 MiB template with 64 MiB of authenticated swap (set up in its clones only), warmed by SETUP. Not the
    default confidential swap: its tag store is written in each clone as it wakes, which makes each clone's own
    pages (and the wake) larger, measured in docs/templates.md; what these tests prove (sharing, sealing, each clone
    its own machine) does not depend on the swap mode."""
    pol = policy.merge(("test", {"memory_mib": 192, "swap_size_mib": 64, "swap_mode": "authenticated",
                                 "templatable": True}))
    handover = tmp_path / "template-key"
    handover.write_bytes(bytes(4096))
    vm = Instance(pol, image, key_handover=handover)
    state = statedir.open(create_key=True)
    try:
        vm.start()
        ready = vm.wait_ready()
        assert ready is not None and ready["swap"] == {}, "a templatable sandbox must run without swap"
        random_before = sh(vm, SETUP).strip()
        meta, fd, _ = template.freeze(state, vm, "warm", {"policy": policy.to_json(pol)})
    except BaseException:
        vm.close()
        state.close()
        raise
    try:
        yield Frozen(state, meta, fd, pol, random_before)
    finally:
        os.close(fd)
        template.remove(state, "warm", meta)
        state.close()


def guest_ram(vm: Instance) -> tuple[int, int]:
    """(Rss, Pss) in bytes of the VMM's mapping of the template's memfd (its guest RAM)."""
    assert vm.process is not None
    return stats.memfd_ram(vm.process.pid)


def clone(frozen: Frozen, image: Image, handover: Path) -> tuple[Instance, dict[str, Any]]:
    handover.write_bytes(bytes(4096))
    vm = Instance(frozen.policy, image, key_handover=handover)
    answer, _ = template.clone(frozen.state, vm, frozen.meta, frozen.fd)
    return vm, answer


def test_three_clones_see_the_warm_state_and_each_is_its_own_machine(frozen: Frozen, image: Image,
                                                                     tmp_path: Path) -> None:
    clones: list[Instance] = []
    try:
        seen: dict[str, dict[str, Any]] = {}
        for i in range(3):
            vm, answer = clone(frozen, image, tmp_path / f"key-{i}")
            clones.append(vm)
            assert answer["reseeded"] is True and answer["vmgenid"] is True, answer
            assert answer["hostname"] == f"memvisor-{vm.id}"
            with QMP(vm.qmp_path) as qmp:
                guid = qmp.execute("query-vm-generation-id")["guid"]
            out = sh(vm, "cat /tmp/warm/file; cat /tmp/warm/alive; echo; hostname; cat /run/memvisor/forked; echo; "
                         "python3 -c 'import os; print(os.getrandom(32).hex())'; "
                         "dmesg | grep -c 'crng reseeded due to virtual machine fork'")
            lines = out.splitlines()
            pid, imported, _ = lines[1].split()
            seen[vm.id] = {"guid": guid, "warm": lines[0], "pid": pid, "imported": imported, "hostname": lines[2],
                           "forked": json.loads(lines[3]), "random": lines[4], "reseeds": int(lines[5])}
        for vm_id, s in seen.items():
            assert s["warm"] == "warm" and s["imported"] == "True", s  # the template's files and warm process
            assert s["hostname"] == f"memvisor-{vm_id}" and s["forked"]["id"] == vm_id
            assert s["reseeds"] >= 1, "the guest kernel did not reseed on the new VM generation ID"
        assert len({s["pid"] for s in seen.values()}) == 1  # the same process, woken in each clone
        for key in ("guid", "random", "hostname"):
            assert len({s[key] for s in seen.values()}) == 3, f"two clones share a {key}: {seen}"
        assert frozen.random_before not in {s["random"] for s in seen.values()}
        # Each clone set up its own swap, with its own key; swapped pages come back; a write stays its own.
        keys = set()
        for i, vm in enumerate(clones):
            marker = f"clone-{i}-" + vm.id
            out = sh(vm, f"echo {marker} > /tmp/mine; python3 -c \"{HOG}\" 120 2>&1; cat /proc/swaps; "
                         "ls /tmp/mine; cat /tmp/warm/file")
            assert "held" in out and "/dev/dm-" in out and out.rstrip().endswith("warm"), out
            swap_key = (tmp_path / f"key-{i}").read_bytes()[:64]
            assert swap_key != bytes(64), "the clone did not set up its swap"
            keys.add(swap_key)
            # A file description of its own: QEMU set O_DIRECT on the one it shares with memvisor
            swapped = Path(f"/proc/self/fd/{vm.disk_fds['swap.img']}").read_bytes()
            assert len(swapped) == 64 * MIB and marker.encode() not in swapped
        assert len(keys) == 3, "two clones share a swap key"
        mine = [sh(vm, "cat /tmp/mine").strip() for vm in clones]
        assert len(set(mine)) == 3
    finally:
        for vm in clones:
            vm.close()


def test_the_template_ram_is_sealed_and_clones_share_it(frozen: Frozen, image: Image, tmp_path: Path) -> None:
    seals = fcntl.fcntl(frozen.fd, fcntl.F_GET_SEALS)
    assert seals & template.SEALS == template.SEALS
    with pytest.raises(OSError) as refused:
        os.pwrite(frozen.fd, b"x", 0)
    assert refused.value.errno == errno.EPERM
    clones: list[Instance] = []
    try:
        for i in range(4):
            clones.append(clone(frozen, image, tmp_path / f"key-{i}")[0])
        # The clone VMM's own descriptor of the template RAM: opened for writing, it still cannot change it.
        vmm = clones[0].process
        assert vmm is not None
        fds = [f for f in Path(f"/proc/{vmm.pid}/fd").iterdir()
               if os.path.samestat(f.stat(), os.fstat(frozen.fd))]
        assert fds, "the clone VMM does not hold the template's memfd"
        fd = os.open(fds[0], os.O_RDWR)
        try:
            with pytest.raises(OSError) as through:
                os.pwrite(fd, b"x", 4096)
            assert through.value.errno == errno.EPERM
        finally:
            os.close(fd)
        # Each clone writes 8 MiB of its own; the template's pages stay shared among the four.
        for vm in clones:
            sh(vm, "head -c 8388608 /dev/urandom > /tmp/own")
        ram = template.ram_bytes(frozen.meta)
        mapped = [guest_ram(vm) for vm in clones]
        rss, pss = sum(m[0] for m in mapped), sum(m[1] for m in mapped)
        assert ram > 48 * MIB
        # Four clones map the template: each one's guest RAM is resident in full (RSS), but its pages are
        # counted once among them (PSS), plus what each wrote.
        assert pss < 0.6 * rss, f"the clones' guest RAM: PSS {pss >> 20} MiB of RSS {rss >> 20} MiB"
    finally:
        for vm in clones:
            vm.close()


def test_the_sdk_freezes_a_sandbox_and_clones_it(image: Image) -> None:
    from memvisor.sdk import Sandbox

    live = Sandbox(memory_mib=160, templatable=True).start()
    try:
        assert live.exec(["sh", "-c", "echo from-the-template > /tmp/t"]).exit_code == 0
        frozen = live.freeze("sdk")
    except BaseException:
        live.stop()
        raise
    with frozen:
        with frozen.clone() as one, frozen.clone() as two:
            assert one.id != two.id
            for box in (one, two):
                result = box.exec(["sh", "-c", "cat /tmp/t; hostname"])
                assert result.stdout.decode().split() == ["from-the-template", f"memvisor-{box.id}"]
