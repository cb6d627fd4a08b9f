"""The guest agent, run on the host over a socketpair with real processes: many commands at once, stdin,
timeouts, kills, and hostile input that never crashes it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor import contract, proto
from memvisor.guest import agent, cgroups, quiesce

Kind = proto.Kind


class Harness:
    """An agent serving on one end of a socketpair (in a thread); the test plays the host on the other."""

    def __init__(self) -> None:
        guest, self.host = socket.socketpair()
        self.logged: list[str] = []
        self.channel = agent.Channel(guest.detach(), self.logged.append)
        self.frames: list[proto.Frame] = []
        self.decoder = proto.Decoder()
        self.thread = threading.Thread(target=agent.serve, args=(self.channel, 0, lambda: {"meminfo": {}}),
                                       daemon=True)
        self.thread.start()
        self.host.settimeout(0.2)

    def send(self, kind: proto.MessageKind, body: dict[str, object] | bytes, stream: int = 0) -> None:
        self.host.sendall(proto.encode(kind, body, stream))

    def until(self, done: Callable[[list[proto.Frame]], bool], timeout: float = 20) -> list[proto.Frame]:
        deadline = time.monotonic() + timeout
        while not done(self.frames):
            assert time.monotonic() < deadline, f"timed out; frames so far: {self.frames}"
            try:
                data = self.host.recv(1 << 16)
            except TimeoutError:
                continue
            for item in self.decoder.feed(data):
                assert isinstance(item, proto.Frame), item
                self.frames.append(item)
        return self.frames

    def exits(self) -> dict[int, dict[str, object]]:
        return {f.body["id"]: f.body for f in self.frames if f.kind is Kind.EXIT and f.body}

    def output(self, kind: proto.MessageKind, exec_id: int) -> bytes:
        return b"".join(f.data for f in self.frames if f.kind is kind and f.stream == exec_id)

    def stop(self) -> None:
        self.send(Kind.SHUTDOWN, {})
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "the agent did not stop on SHUTDOWN"
        self.host.close()


@pytest.fixture
def guest() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.stop()


def test_commands_run_at_once_with_their_own_streams(guest: Harness) -> None:
    guest.send(Kind.EXEC, {"id": 1, "argv": ["sh", "-c", "sleep 1; echo one; echo err1 >&2; exit 3"]})
    guest.send(Kind.EXEC, {"id": 2, "argv": ["sh", "-c", "echo two"], "env": {"X": "y"}, "cwd": "/"})
    guest.until(lambda _f: len(guest.exits()) == 2)
    exits = guest.exits()
    assert exits[1]["code"] == 3 and exits[2]["code"] == 0
    assert guest.output(Kind.STDOUT, 1) == b"one\n" and guest.output(Kind.STDERR, 1) == b"err1\n"
    assert guest.output(Kind.STDOUT, 2) == b"two\n"
    # Command 2 ended while command 1 still slept: they ran at once.
    order = [f.body["id"] for f in guest.frames if f.kind is Kind.EXIT and f.body]
    assert order == [2, 1]


def test_stdin_is_fed_and_closed(guest: Harness) -> None:
    guest.send(Kind.EXEC, {"id": 7, "argv": ["cat"], "stdin": True})
    guest.send(Kind.STDIN, b"hello ", 7)
    guest.send(Kind.STDIN, b"world", 7)
    guest.send(Kind.STDIN, b"", 7)
    guest.until(lambda _f: 7 in guest.exits())
    assert guest.output(Kind.STDOUT, 7) == b"hello world"
    assert guest.exits()[7]["code"] == 0


def test_timeout_kills_the_process_group_and_kill_signals_it(guest: Harness) -> None:
    guest.send(Kind.EXEC, {"id": 1, "argv": ["sh", "-c", "sleep 30 & sleep 30"], "timeout": 0.5})
    guest.send(Kind.EXEC, {"id": 2, "argv": ["sleep", "30"]})
    guest.until(lambda f: any(x.kind is Kind.STARTED and x.body and x.body["id"] == 2 for x in f))
    guest.send(Kind.KILL, {"id": 2, "signal": 15})
    guest.until(lambda _f: len(guest.exits()) == 2)
    exits = guest.exits()
    assert exits[1]["timed_out"] is True and exits[1]["signal"] == 9
    assert exits[2]["signal"] == 15 and exits[2]["timed_out"] is False


def test_a_missing_program_and_bad_requests_get_clear_answers(guest: Harness) -> None:
    guest.send(Kind.EXEC, {"id": 1, "argv": ["no-such-program"]})
    guest.send(Kind.STDIN, b"x", 9)  # no such command
    guest.send(Kind.KILL, {"id": 9, "signal": 9})
    guest.until(lambda f: 1 in guest.exits() and sum(x.kind is Kind.ERROR for x in f) == 2)
    assert guest.exits()[1]["code"] == 127
    assert b"no-such-program" in guest.output(Kind.STDERR, 1)
    errors = [f.body["message"] for f in guest.frames if f.kind is Kind.ERROR and f.body]
    assert any("STDIN for exec 9" in e for e in errors) and any("KILL for exec 9" in e for e in errors)


def test_an_exec_id_in_use_is_refused(guest: Harness) -> None:
    guest.send(Kind.EXEC, {"id": 4, "argv": ["sleep", "30"]})
    guest.send(Kind.EXEC, {"id": 4, "argv": ["true"]})
    guest.until(lambda f: any(x.kind is Kind.ERROR for x in f))
    assert "already running" in next(f.body["message"] for f in guest.frames if f.kind is Kind.ERROR and f.body)
    guest.send(Kind.KILL, {"id": 4, "signal": 9})
    guest.until(lambda _f: 4 in guest.exits())


EXEC_TRUE = proto.encode(Kind.EXEC, {"id": 5, "argv": ["true"]})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=100),
    st.builds(lambda k, s, body: proto.HEADER.pack(proto.MAGIC, proto.VERSION, k, s, len(body)) + body,
              st.integers(0, 255), st.integers(0, 3), st.binary(max_size=60)),
    st.sampled_from([proto.encode(Kind.EXIT, {"id": 1, "code": 1, "signal": None, "uptime": 0}),
                     proto.encode(Kind.STDOUT, b"x", 1), proto.encode(Kind.EXEC, {"id": 1, "argv": ["true"]})]),
), max_size=8))
def test_garbage_never_crashes_it(chunks: list[bytes]) -> None:
    h = Harness()
    try:
        # Enough valid EXECs that one survives any partial frame the garbage may leave open.
        h.host.sendall(b"".join(chunks) + EXEC_TRUE * 6)
        h.until(lambda _f: 5 in h.exits())
        assert h.thread.is_alive()
    finally:
        h.stop()


def started_pid(h: Harness, exec_id: int) -> int:
    h.until(lambda f: any(x.kind is Kind.STARTED and x.body and x.body["id"] == exec_id for x in f))
    return next(int(f.body["pid"]) for f in h.frames if f.kind is Kind.STARTED and f.body and f.body["id"] == exec_id)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("half", ["exec", "stdin", "header"])
def test_adopt_after_a_half_written_frame_ends_every_command_without_an_exit(guest: Harness, half: str) -> None:
    guest.send(Kind.EXEC, {"id": 3, "argv": ["sleep", "30"]})
    guest.send(Kind.EXEC, {"id": 4, "argv": ["cat"], "stdin": True})
    pids = [started_pid(guest, 3), started_pid(guest, 4)]
    # What a daemon killed mid-write leaves in the channel: part of a frame, whose header promises more bytes.
    frame = {"exec": proto.encode(Kind.EXEC, {"id": 9, "argv": ["sh", "-c", "echo never"]}),
             "stdin": proto.encode(Kind.STDIN, b"x" * 5000, 4),
             "header": proto.encode(Kind.STDIN, b"y" * 300, 4)}[half]
    guest.host.sendall(frame[:7 if half == "header" else len(frame) // 2])
    guest.host.sendall(bytes(proto.ADOPT_FILLER))  # what the new daemon sends first
    guest.send(Kind.ADOPT, {})
    frames = guest.until(lambda f: any(x.kind is Kind.ADOPTED for x in f))
    adopted = next(f.body for f in frames if f.kind is Kind.ADOPTED)
    assert adopted is not None
    assert sorted(adopted["ended"]) == [[3, "sleep"], [4, "cat"]] and adopted["parked"] is False
    assert not guest.exits() and not any(alive(pid) for pid in pids)
    assert not any(f.kind is Kind.STARTED and f.body and f.body["id"] == 9 for f in frames)
    # The agent goes on with the new daemon: the exec ids are free again.
    guest.send(Kind.EXEC, {"id": 3, "argv": ["sh", "-c", "echo again"]})
    guest.until(lambda _f: 3 in guest.exits())
    assert guest.output(Kind.STDOUT, 3) == b"again\n"


def test_between_parking_and_resumed_exec_is_refused_and_adopt_says_parked(guest: Harness) -> None:
    guest.send(Kind.PARK, {})
    parking = guest.until(lambda f: any(x.kind is Kind.PARKING for x in f))[-1].body
    assert parking is not None and parking["ok"] is True, parking
    guest.send(Kind.EXEC, {"id": 6, "argv": ["sh", "-c", "echo ran"]})
    guest.until(lambda f: any(x.kind is Kind.ERROR for x in f))
    error = next(f.body for f in guest.frames if f.kind is Kind.ERROR)
    assert error is not None and error["id"] == 6 and "parked" in error["message"]
    guest.send(Kind.PARK, {})  # a host that asks again gets the same answer
    guest.until(lambda f: sum(x.kind is Kind.PARKING for x in f) == 2)
    assert all(f.body and f.body["ok"] for f in guest.frames if f.kind is Kind.PARKING)
    guest.send(Kind.ADOPT, {})
    adopted = guest.until(lambda f: any(x.kind is Kind.ADOPTED for x in f))[-1].body
    assert adopted is not None and adopted == {"uptime": adopted["uptime"], "ended": [], "parked": True}
    guest.send(Kind.RESUMED, {})
    guest.until(lambda f: any(x.kind is Kind.RESUMED for x in f))
    assert not any(f.kind in (Kind.STARTED, Kind.EXIT) for f in guest.frames)  # nothing ran for exec 6
    guest.send(Kind.EXEC, {"id": 6, "argv": ["sh", "-c", "echo ran"]})
    guest.until(lambda _f: 6 in guest.exits())
    assert guest.output(Kind.STDOUT, 6) == b"ran\n"


def fake_cgroups(tmp_path: Path, frozen: str) -> Path:
    """A cgroup tree as the guest has it: PID 1's cgroup, the workloads' parent and one a root workload made."""
    for name in (contract.INIT_CGROUP, cgroups.WORKLOADS, "made-by-root"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cgroup.freeze").write_text("0\n")
        (tmp_path / name / "cgroup.events").write_text(f"populated 1\nfrozen {frozen}\n")
    (tmp_path / "cgroup.procs").write_text("1\n")
    return tmp_path


def test_park_freezes_every_cgroup_but_pid1s_and_thaws_them(tmp_path: Path) -> None:
    root = fake_cgroups(tmp_path, frozen="1")
    frozen = quiesce.freeze(str(root), (str(tmp_path / "no-such-mount"),))
    state = {p.name: (p / "cgroup.freeze").read_text() for p in root.iterdir() if p.is_dir()}
    assert state == {contract.INIT_CGROUP: "0\n", cgroups.WORKLOADS: "1", "made-by-root": "1"}
    assert quiesce.thaw(frozen) == []
    assert {(p / "cgroup.freeze").read_text() for p in root.iterdir() if p.is_dir()} <= {"0", "0\n"}


def test_a_park_whose_freeze_times_out_leaves_everything_thawed(tmp_path: Path) -> None:
    root = fake_cgroups(tmp_path, frozen="0")  # a task that never stops (stuck in D state)
    with pytest.raises(quiesce.FreezeError, match="did not freeze within 0.05 s"):
        quiesce.freeze(str(root), (), timeout=0.05)
    assert {(p / "cgroup.freeze").read_text() for p in root.iterdir() if p.is_dir()} <= {"0", "0\n"}
