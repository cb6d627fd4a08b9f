"""Failure is loud and clean: timeouts, panics, killed processes, signals, hostile frames, ps."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from memvisor import policy, proto
from memvisor.host.sandbox import Instance
from memvisor.image.build import Image
from tests.vm.conftest import Runner, alive, memvisor_argv, ps, report, wait_for


def start_background(*args: str) -> subprocess.Popen[str]:
    """Start memvisor as from an interactive shell, with SIGINT at its default whatever the suite inherited: a
    script's `make test &` runs with SIGINT ignored, which memvisor (rightly) keeps, and an ignored disposition
    survives exec while a handler does not."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(memvisor_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
    finally:
        signal.signal(signal.SIGINT, saved)


def running_sandbox(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Wait until `ps` lists the sandbox with its VMM pid, and return its state."""
    def listed() -> dict[str, Any] | None:
        assert proc.poll() is None, proc.communicate()
        states = ps()
        return states[0] if states and states[0].get("vmm_pid") else None
    state: dict[str, Any] = wait_for(listed, 60, "the sandbox to appear in `memvisor ps`")
    return state


def test_timeout_kills_the_vm(memvisor: Runner) -> None:
    r = memvisor("run", "--json", "--timeout", "10", "--", "sleep", "600")  # the runner's own guard is 180 s
    assert r.returncode == 124
    assert "--timeout of 10 s" in r.stderr
    rep = report(r.stdout)
    assert rep["timed_out"] is True and rep["code"] is None


def test_kernel_panic_is_reported_with_console_tail(memvisor: Runner) -> None:
    r = memvisor("run", "--root", "--", "sh", "-c", "echo c > /proc/sysrq-trigger; sleep 60")
    assert r.returncode == 125
    assert "panicked" in r.stderr
    assert "last guest console lines" in r.stderr and "sysrq" in r.stderr.lower()


def test_ps_lists_a_running_sandbox(memvisor: Runner) -> None:
    proc = start_background("run", "--memory", "128", "--", "sleep", "600")
    try:
        state = running_sandbox(proc)
        assert alive(state["vmm_pid"])
        assert state["owner_pid"] == proc.pid
        assert "128MiB" in state["summary"]
        assert all(Path(p).exists() for k, p in state["files"].items() if k != "vmm_log") and state["files"]
        text = subprocess.run(memvisor_argv("ps"), capture_output=True, text=True, check=True).stdout
        assert state["id"] in text and str(state["vmm_pid"]) in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert ps() == []


def test_sigkill_of_the_vmm(memvisor: Runner) -> None:
    proc = start_background("run", "--", "sleep", "600")
    state = running_sandbox(proc)
    os.kill(state["vmm_pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 125
    assert "killed by SIGKILL" in err
    assert not Path(state["runtime_dir"]).exists()


def test_sigkill_of_memvisor_then_sweep(memvisor: Runner) -> None:
    proc = start_background("run", "--", "sleep", "600")
    state = running_sandbox(proc)
    proc.kill()
    proc.communicate(timeout=30)
    # PR_SET_PDEATHSIG takes the VMM down with memvisor...
    wait_for(lambda: not alive(state["vmm_pid"]), 30, "the VMM to die with memvisor")
    assert Path(state["runtime_dir"]).exists()
    # ... and the next memvisor command sweeps the runtime directory.
    assert ps() == []
    assert not Path(state["runtime_dir"]).exists()


def test_sigterm_and_sigint_clean_up(memvisor: Runner) -> None:
    for signo, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        proc = start_background("run", "--", "sleep", "600")
        state = running_sandbox(proc)
        proc.send_signal(signo)
        proc.communicate(timeout=60)
        assert proc.returncode == code
        assert not alive(state["vmm_pid"])
        assert not Path(state["runtime_dir"]).exists()


HOSTILE = [
    b"\x00" * 40,  # no magic
    b"MVS",  # a torn magic
    proto.HEADER.pack(proto.MAGIC, 9, 2, 0, 0),  # unknown version
    proto.HEADER.pack(proto.MAGIC, proto.VERSION, 99, 0, 3) + b"abc",  # unknown kind
    proto.HEADER.pack(proto.MAGIC, proto.VERSION, 2, 0, 8) + b"not json",  # EXEC that is not JSON
    proto.HEADER.pack(proto.MAGIC, proto.VERSION, 2, 0, 11) + b'{"argv": 5}',  # EXEC with a bad argv
    proto.HEADER.pack(proto.MAGIC, proto.VERSION, 2, 0, proto.MAX_PAYLOAD + 1),  # oversize
    proto.encode(proto.Kind.EXIT, {"id": 1, "code": 0, "signal": None, "uptime": 1}),  # host->guest nonsense
    b"\xff" * 1000,
]


def test_malformed_frames_to_the_guest(image: Image, isolated: Path) -> None:
    with Instance(policy.merge(), image) as vm:
        assert vm.channel is not None
        vm.channel.sendraw(b"".join(HOSTILE))  # read by the agent before the EXEC
        result = vm.run(["echo", "still-alive"])
        console = vm.console_log.read_text()
    assert result.exit_code == 0 and result.stdout == b"still-alive\n"
    assert "bad frame from host" in console
    assert "unexpected EXIT from host" in console
