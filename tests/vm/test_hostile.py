"""The host against a hostile guest, on real guests (issue 12): a guest that floods bad frames is cut off in
time, a flood on the console leaves a bounded log, memvisor's own kernel words cannot be overridden, output a
caller collects is capped, and the VMM itself is confined (tests/unit/test_hostile.py covers the rest
without a guest)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from memvisor import policy
from memvisor.errors import GuestError
from memvisor.host.sandbox import Instance
from memvisor.image.build import Image
from memvisor.sdk import Sandbox
from tests.vm.conftest import Runner, alive, memvisor_argv, ps, wait_for

# In-guest root speaks for the agent: it takes PID 1's own channel fd (pidfd_getfd) and writes garbage.
FLOOD = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
port = next(int(n) for n in os.listdir("/proc/1/fd") if os.readlink(f"/proc/1/fd/{n}").startswith("/dev/vport"))
fd = libc.syscall(438, os.pidfd_open(1), port, 0)  # pidfd_getfd
assert fd >= 0, ctypes.get_errno()
bad = b"MVSR" + bytes([4, 99, 0, 0, 0, 0, 0, 3]) + b"abc"  # a frame of an unknown kind
for _ in range(10000):
    os.write(fd, bad)
"""


def test_a_guest_that_floods_bad_frames_is_cut_off_with_a_clear_error(image: Image) -> None:
    pol = policy.merge(("test", {"memory_mib": 128, "max_bad_frames": 16, "timeout": 120}))
    start = time.monotonic()
    with Instance(pol, image) as vm:
        with pytest.raises(GuestError, match=r"malformed frames \(the limit is 16.*cut it off"):
            vm.exec(["python3", "-S", "-c", FLOOD], uid=0)
        assert vm.process is not None and vm.process.wait(timeout=10) == -9  # its VMM was killed
    assert time.monotonic() - start < 120


def test_a_console_flood_leaves_a_bounded_log(memvisor: Runner, tmp_path: Path) -> None:
    r = memvisor("run", "--root", "--memory", "128", "--console-log", "256", "--json", "--", "sh", "-c",
                 "head -c 3000000 /dev/zero | tr '\\0' x > /dev/console; echo done")
    assert r.returncode == 0 and "done" in r.stdout, r.stderr
    kept = tmp_path / "consoles"  # MEMVISOR_KEEP_CONSOLE (tests/vm/conftest.py) copies the log at teardown
    logs = list(kept.glob("*.log"))
    assert logs and all(p.stat().st_size <= 256 * 1024 for p in logs), [p.stat().st_size for p in logs]
    assert "earlier console bytes dropped" in logs[0].read_text(errors="replace")


def test_memvisors_own_kernel_words_cannot_be_overridden(memvisor: Runner) -> None:
    r = memvisor("run", "--swap-mode", "authenticated", "--swap-size", "64", "--kernel-arg",
                 "memvisor.swap_mode=plain", "--json", "--", "true")
    assert r.returncode == 125
    assert "kernel argument 'memvisor.swap_mode=plain' is refused: memvisor owns the memvisor.* settings" in r.stderr


def test_yes_through_the_sdk_is_truncated_and_the_caller_stays_bounded(image: Image) -> None:
    me = psutil.Process()
    with Sandbox(memory_mib=128, output_limit_mib=1, config_file=False).start() as live:
        before = me.memory_info().rss
        result = live.exec(["sh", "-c", "yes | head -c 8000000; echo end >&2"], timeout=300)
        grown = me.memory_info().rss - before
    assert result.exit_code == 0 and result.truncated
    assert len(result.stdout) == 1 << 20 and result.stdout.startswith(b"y\ny\n")
    assert result.stderr == b"end\n"  # the command kept running past the cap
    assert grown < 64 << 20, grown


def test_the_vmm_is_confined_and_a_kill_leaves_nothing(image: Image) -> None:
    import subprocess

    proc = subprocess.Popen(memvisor_argv("run", "--memory", "128", "--swap-size", "64", "--", "sleep", "600"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        state = wait_for(lambda: next((s for s in ps() if s.get("vmm_pid")), None), 90, "the sandbox in ps")
        vmm = psutil.Process(state["vmm_pid"])
        argv = vmm.cmdline()
        from memvisor import paths

        uid = vmm.uids().real
        assert uid == vmm.uids().effective == vmm.uids().saved and paths.VMM_UID_BASE <= uid  # its own uid
        assert (uid, uid) == paths.vmm_user(state["id"])
        assert argv[argv.index("-sandbox") + 1].startswith("on,obsolete=deny,elevateprivileges=deny,spawn=deny")
        assert "dump-guest-core=off" in argv[argv.index("-machine") + 1]
        for ns in ("net", "ipc", "uts"):  # no network of its own to reach the host's with
            assert os.readlink(f"/proc/{vmm.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        assert not any(a.startswith(("/root", state["runtime_dir"])) for a in argv)  # every file is an fd
        assert not (Path(state["runtime_dir"]) / "swap.img").exists()
        assert Path(state["runtime_dir"]).parent.stat().st_mode & 0o777 == 0o700
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    wait_for(lambda: not alive(state["vmm_pid"]), 30, "the VMM to die with memvisor")
    assert not list(Path(state["runtime_dir"]).glob("swap*"))
    assert ps() == []
    assert os.environ["MEMVISOR_RUNTIME_DIR"]


READ_KEY = r"""
import re, sys
sys.path.insert(0, "/usr/lib/python3.11")
from memvisor.guest import dm
row = dm.DeviceMapper().table("memvisor-swap-crypt")[0][3]
print("TABLE", row)
print("HEX", bool(re.search(r"[0-9a-f]{32}", row)))
print("KEYS", sum("memvisor" in line for line in open("/proc/keys")))
"""


def test_in_guest_root_cannot_read_the_swap_key_back(memvisor: Runner) -> None:
    for mode in ("encrypted", "authenticated"):
        r = memvisor("run", "--root", "--memory", "160", "--swap-size", "64", "--swap-mode", mode, "--",
                     "python3", "-S", "-c", READ_KEY)
        assert r.returncode == 0, r.stderr
        lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
        assert ":logon:memvisor:swap-crypt" in lines["TABLE"]  # dm-crypt shows where the key was, not the key
        assert lines["HEX"] == "False" and lines["KEYS"] == "0"  # and the keyring entry is gone after loading
