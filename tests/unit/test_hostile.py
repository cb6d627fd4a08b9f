"""The host enforces its own policy whatever the guest says (issue 12), without a guest: a guest that reports a
weaker swap mode than the policy asks is refused unless the policy allows it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor import policy
from memvisor.errors import GuestError
from memvisor.host import runtime
from memvisor.host.sandbox import Instance


def instance(tmp_path: Path, **settings: Any) -> Instance:
    vm = Instance(policy.merge(("test", settings)), image=None)  # type: ignore[arg-type]
    vm.dir = tmp_path
    vm.state = runtime.SandboxState(id=vm.id, owner_pid=1, owner_started=0.0, created=0.0,
                                    runtime_dir=str(tmp_path), policy={}, summary="", vmm_name=vm.name)
    return vm


@pytest.mark.parametrize("effective", ["plain", "encrypted", "off"])
def test_a_weaker_swap_mode_from_the_guest_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      effective: str) -> None:
    monkeypatch.setenv("MEMVISOR_RUNTIME_DIR", str(tmp_path))
    vm = instance(tmp_path, swap_size_mib=64, swap_mode="authenticated")
    with pytest.raises(GuestError, match=f"the guest set up swap mode {effective}, weaker than authenticated"):
        vm.swap_ready({"asked": "plain", "effective": effective})  # what the guest says it was asked: ignored
    allowed = instance(tmp_path, swap_size_mib=64, swap_mode="authenticated", allow_weaker_swap=True)
    allowed.swap_ready({"asked": "authenticated", "effective": effective})


@pytest.mark.parametrize("effective", ["authenticated", "encrypted"])
def test_a_step_down_from_confidential_is_refused_unless_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 effective: str) -> None:
    monkeypatch.setenv("MEMVISOR_RUNTIME_DIR", str(tmp_path))
    vm = instance(tmp_path, swap_size_mib=64, swap_mode="confidential")
    with pytest.raises(GuestError, match=f"swap mode {effective}, weaker than confidential"):
        vm.swap_ready({"effective": effective})
    instance(tmp_path, swap_size_mib=64, swap_mode="confidential", allow_weaker_swap=True).swap_ready(
        {"effective": effective})
    instance(tmp_path, swap_size_mib=64, swap_mode="authenticated").swap_ready(
        {"effective": "confidential"})  # stronger than asked: fine


def test_a_swap_mode_that_is_not_one_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMVISOR_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(GuestError, match="which is not a mode"):
        instance(tmp_path, swap_size_mib=64).swap_ready({"effective": "\x1b[31mquantum"})
    instance(tmp_path, swap_size_mib=64).swap_ready({"effective": "confidential"})  # the default mode


def test_the_console_log_keeps_a_bounded_tail(tmp_path: Path) -> None:
    from memvisor.host.console import ConsoleLog

    log = ConsoleLog(tmp_path / "console.log", limit=1000)
    for i in range(10_000):
        log.write(f"line {i}\n".encode())
    log.close()
    text = (tmp_path / "console.log").read_text()
    assert 400 <= len(text) <= 1000
    assert text.endswith("line 9999\n") and text.startswith("[memvisor: ") and "console bytes dropped]" in text
    assert log.dropped > 70_000
    big = ConsoleLog(tmp_path / "big.log", limit=1000)
    big.write(b"x" * 5000 + b"end\n")  # one chunk larger than the whole log
    big.close()
    assert (tmp_path / "big.log").stat().st_size <= 1000 and (tmp_path / "big.log").read_bytes().endswith(b"end\n")


def test_a_guest_that_floods_bad_frames_and_never_reads_is_cut_off() -> None:
    import os
    import time

    from memvisor import proto
    from memvisor.host.channel import HostChannel
    from memvisor.host.session import Session

    host, guest = HostChannel.pair()
    vmm = os.fork()
    if vmm == 0:  # stands in for the VMM: the session kills it when it cuts the guest off
        time.sleep(60)
        os._exit(0)
    session = Session(host, vmm, on_stats=lambda _b: None, max_bad_frames=5)
    try:
        guest.setblocking(False)
        start = time.monotonic()
        bad = proto.HEADER.pack(proto.MAGIC, proto.VERSION, 99, 0, 3) + b"abc"  # an unknown kind
        for _ in range(1000):  # and it never reads the ERROR replies
            try:
                guest.send(bad)
            except BlockingIOError:
                break
        assert session.gone.wait(10), "the host did not cut the guest off"
        assert session.cutoff and "malformed frames (the limit is 5" in session.cutoff
        _, status = os.waitpid(vmm, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9  # its VMM was killed
        # Writing to a guest that reads nothing never blocks past the caller's deadline.
        with pytest.raises(TimeoutError):
            for _ in range(10_000):
                host.send(proto.Kind.STDIN, b"x" * proto.CHUNK, 1, timeout=0.2)
        assert time.monotonic() - start < 20
        assert host.queued <= 4 << 20
    finally:
        session.close()
        guest.close()
        host.close()
        try:
            os.kill(vmm, 9)
            os.waitpid(vmm, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


KEYS = st.sampled_from(["meminfo", "vmstat", "zram", "psi", "swaps", "devices", "device", "steps", "uptime",
                        "warnings", "effective", "MemTotal", "used_kib", "size_kib", "pswpin", "\x1b[2J", "x" * 70])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=6),
                           max_leaves=30)


def strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    if isinstance(value, dict):
        return [*value.keys(), *(s for v in value.values() for s in strings(v))]
    return []


@settings(max_examples=300, deadline=None)
@given(hello=json_values, exit_body=json_values)
def test_garbage_guest_figures_never_reach_a_report_or_a_terminal(hello: object, exit_body: object) -> None:
    from memvisor.host import guestdata, report

    cleaned_hello, cleaned_exit = guestdata.clean({"swap": hello, "steps": hello}), guestdata.clean(exit_body)
    for s in strings(cleaned_hello) + strings(cleaned_exit):
        assert not any(ord(c) < 32 and c not in "\n\t" or 0x7F <= ord(c) <= 0x9F for c in s), s
        assert len(s) <= guestdata.MAX_TEXT + 3
    json.dumps(cleaned_hello, allow_nan=False)
    exit_dict = cleaned_exit if isinstance(cleaned_exit, dict) else {}
    pol = policy.merge(("test", {"swap_size_mib": 64}))
    guest = report.guest_section({**cleaned_hello, "uptime": 1, "memtotal_kib": 1}, None, exit_dict)
    swap = report.swap_section(pol, {"swap": cleaned_hello.get("swap")}, exit_dict)
    assert swap["asked"] == "confidential"  # the host's own value (the default mode), whatever the guest sent
    assert all(isinstance(v, int) for v in (exit_dict.get("meminfo") or {}).values())
    json.dumps([guest, swap], allow_nan=False)


SECTIONS = st.sampled_from(["vm", "run", "swap", "zram", "ksm", "balloon", "memctl", "nope"])
FIELDS = st.sampled_from(["memory_mib", "floor_mib", "cpus", "timeout", "root", "size_mib", "mode", "percent",
                          "algorithm", "enable", "allow_weaker", "discard", "output_limit_mib", "x"])
SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)


@settings(max_examples=400, deadline=None)
@given(doc=st.dictionaries(SECTIONS, st.dictionaries(FIELDS, SCALARS, max_size=4) | SCALARS, max_size=4))
def test_policy_documents_fail_only_with_a_clear_error(doc: dict[str, object]) -> None:
    from memvisor.errors import MemvisorError

    try:
        policy.merge(("json", policy.layer_from_mapping(doc, "json")))
    except MemvisorError as exc:
        assert exc.message and "\n" not in exc.message


@settings(max_examples=400, deadline=None)
@given(text=st.text(max_size=200))
def test_toml_files_fail_only_with_a_clear_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    from memvisor import config
    from memvisor.errors import MemvisorError

    path = tmp_path_factory.mktemp("toml") / "config.toml"
    path.write_text(text)
    try:
        _, layer = config.load(path, explicit=True)
        policy.merge(("config", layer))
    except MemvisorError as exc:
        assert exc.message


@settings(max_examples=400, deadline=None)
@given(words=st.lists(st.text(max_size=30), max_size=8))
def test_kernel_command_lines_and_arguments_never_crash(words: list[str]) -> None:
    from memvisor import cmdline
    from memvisor.errors import MemvisorError
    from memvisor.host.sandbox import reserved_kernel_arg

    line = " ".join(["memvisor.swap_mode=plain", *words])
    parsed = cmdline.parse(line)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items())
    try:
        policy.parse_cmdline(line)
    except MemvisorError as exc:
        assert exc.message
    for word in words:
        reason = reserved_kernel_arg(word)
        assert reason is None or word.partition("=")[0] in reason or "memvisor" in reason


def test_a_command_begun_after_the_vmm_died_ends_at_once() -> None:
    """Found by bench/image.py: an exec sent once the VMM was gone waited forever (nothing ended it)."""
    import os

    from memvisor.host.channel import HostChannel
    from memvisor.host.session import Session

    host, guest = HostChannel.pair()
    vmm = os.fork()
    if vmm == 0:  # a VMM that exits at once
        os._exit(0)
    session = Session(host, vmm, on_stats=lambda _b: None)
    try:
        assert session.gone.wait(10)
        command = session.begin(["true"], on_stdout=lambda _d: None, on_stderr=lambda _d: None)
        assert command.done.is_set() and command.exit is None
    finally:
        session.close()
        guest.close()
        host.close()
        os.waitpid(vmm, 0)
