"""The guest agent, run on the host over a socketpair with real processes: many commands at once, stdin,
timeouts, kills, and hostile input that never crashes it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor import proto
from memvisor.guest import agent

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
