"""`memvisor run` against a real guest: output, exit status, users, limits, the report, the policy's way in."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from memvisor import policy
from memvisor.image.build import Image
from memvisor.sdk import Sandbox
from tests.vm.conftest import Runner, report


def test_echo_with_json_report(memvisor: Runner, image: Image) -> None:
    r = memvisor("run", "--json", "--", "echo", "hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "hello"
    rep = report(r.stdout)
    assert rep["exit_code"] == 0 and rep["code"] == 0 and rep["signal"] is None and not rep["timed_out"]
    assert 0 < rep["boot_seconds"] <= rep["time_to_command_seconds"] <= rep["total_seconds"]
    assert list(rep["guest"]["init_steps"]) == ["mount_filesystems", "read_settings", "load_base_modules",
                                                "open_channel", "setup_scratch", "setup_swap", "setup_user_image"]
    assert rep["guest"]["kernel"] == image.manifest["kernel_version"]
    assert 150_000 < rep["guest"]["memtotal_kib"] < 256 * 1024
    assert rep["image"] == image.manifest["key"]
    assert rep["vmm"]["accel"] in ("kvm", "tcg")


@pytest.mark.parametrize("code", [0, 1, 3])
def test_exit_codes(memvisor: Runner, code: int) -> None:
    r = memvisor("run", "--json", "--", "sh", "-c", f"exit {code}")
    assert r.returncode == code
    assert report(r.stdout)["code"] == code


def test_signal_death_maps_to_128_plus_signo(memvisor: Runner) -> None:
    r = memvisor("run", "--json", "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + 15
    rep = report(r.stdout)
    assert (rep["code"], rep["signal"]) == (None, 15)


def test_stdout_and_stderr_kept_apart(memvisor: Runner) -> None:
    r = memvisor("run", "--", "sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2")
    assert r.returncode == 0
    assert r.stdout == "out1\nout2\n"
    assert r.stderr == "err1\nerr2\n"


def test_large_binary_output_intact(memvisor: Runner) -> None:
    script = "head -c 3000000 /dev/urandom > /tmp/blob; sha256sum /tmp/blob >&2; cat /tmp/blob"
    import subprocess

    from tests.vm.conftest import memvisor_argv
    r = subprocess.run(memvisor_argv("run", "--", "sh", "-c", script), capture_output=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 3_000_000
    assert r.stderr.split()[0].decode() == hashlib.sha256(r.stdout).hexdigest()


def test_missing_command_is_127(memvisor: Runner) -> None:
    r = memvisor("run", "--", "no-such-program")
    assert r.returncode == 127
    assert "no-such-program" in r.stderr


def test_hostname_is_the_sandbox_id(memvisor: Runner) -> None:
    r = memvisor("run", "--json", "--", "hostname")
    assert r.stdout.splitlines()[0] == f"memvisor-{report(r.stdout)['id']}"


def test_unprivileged_by_default_and_root_on_request(memvisor: Runner) -> None:
    r = memvisor("run", "--", "sh", "-c", "id -u; id -G; echo $HOME")
    assert r.stdout.split() == ["1000", "1000", "/home/sandbox"]
    r = memvisor("run", "--root", "--", "id", "-u")
    assert r.stdout.strip() == "0"


def test_workload_cannot_reach_the_control_channel(memvisor: Runner) -> None:
    script = ("ls /dev/vport*; for p in /dev/vport*; do cat $p </dev/null && echo READ-OK; "
              "echo hello > $p && echo WRITE-OK; done; mknod /tmp/port c 241 1 && echo MKNOD-OK; echo done")
    r = memvisor("run", "--json", "--", "sh", "-c", script)
    assert r.returncode == 0
    assert "/dev/vport" in r.stdout  # the port is there (else the loop below proves nothing)
    assert "READ-OK" not in r.stdout and "WRITE-OK" not in r.stdout and "MKNOD-OK" not in r.stdout
    assert "done" in r.stdout
    assert "Permission denied" in r.stderr or "Operation not permitted" in r.stderr
    assert report(r.stdout)["protocol_errors"] == 0  # nothing the workload did reached the host


def test_memory_and_cpus_flags(memvisor: Runner) -> None:
    r = memvisor("run", "--json", "--memory", "128", "--cpus", "2", "--", "sh", "-c",
                 "grep MemTotal /proc/meminfo; nproc")
    lines = r.stdout.splitlines()
    memtotal = int(lines[0].split()[1])
    assert 80_000 < memtotal < 128 * 1024
    assert lines[1] == "2"
    assert report(r.stdout)["guest"]["memtotal_kib"] == memtotal


def test_guest_sees_the_policy_on_its_kernel_command_line(memvisor: Runner) -> None:
    r = memvisor("run", "--root", "--", "cat", "/proc/cmdline")
    seen = policy.parse_cmdline(r.stdout)
    expected = policy.merge(("flags", {"root": True}))
    # Every guest-side setting is sent explicitly (memvisor/contract.py), the swap mode as it is in effect.
    assert seen == {s.field: expected.effective_swap_mode if s.field == "swap_mode" else getattr(expected, s.field)
                    for s in policy.SETTINGS if s.cmdline}


def test_config_file_then_flags(memvisor: Runner, tmp_path: Path) -> None:
    conf = tmp_path / "memvisor.toml"
    conf.write_text("[vm]\nmemory_mib = 160\n[run]\nroot = true\n")
    r = memvisor("--config", str(conf), "run", "--json", "--no-root", "--", "id", "-u")
    assert r.stdout.splitlines()[0] == "1000"  # flag beats file
    rep = report(r.stdout)
    assert rep["policy"]["vm"]["memory_mib"] == 160 and rep["policy"]["run"]["root"] is False
    assert 100_000 < rep["guest"]["memtotal_kib"] < 160 * 1024


def test_sdk_run(image: Image) -> None:
    seen: list[bytes] = []
    result = Sandbox(memory_mib=128, config_file=False).run(["sh", "-c", "echo hi; echo oops >&2; exit 2"],
                                                            stderr=seen.append, env={"GREETING": "x"})
    assert (result.exit_code, result.code, result.signal, result.timed_out) == (2, 2, None, False)
    assert result.stdout == b"hi\n"
    assert b"".join(seen) == b"oops\n"
    assert result.report["policy"]["vm"]["memory_mib"] == 128
    env = Sandbox(config_file=False).run(["sh", "-c", "echo $GREETING"], env={"GREETING": "hello"})
    assert env.stdout == b"hello\n"


def test_dry_run_prints_the_command_and_starts_nothing(memvisor: Runner, isolated: Path) -> None:
    r = memvisor("run", "--dry-run", "--memory", "128", "--", "true")
    assert r.returncode == 0
    assert r.stdout.startswith("/") and "qemu-system-x86_64" in r.stdout
    assert "-m 128M" in r.stdout and "mem-merge=off" in r.stdout and "memvisor.root=0" in r.stdout
