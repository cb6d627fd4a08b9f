"""The live conversation with one guest: a reader thread that dispatches the guest's frames, and commands.

From the VMM's start to its end one thread reads the control channel (and watches the VMM's pidfd), so any
number of callers can run commands in the sandbox at once, each waiting on its own Command. What the guest sends
is checked by memvisor.proto first; a frame that names no running command, or arrives out of turn, is answered
with an ERROR and counted, never trusted. Writes to the guest take a lock and a deadline; they never wait
forever on a guest that does not read.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memvisor import proto
from memvisor.host import guestdata, memctl
from memvisor.host.channel import HostChannel

log = logging.getLogger("memvisor")
OutputFn = Callable[[bytes], None]
TICK_S = 1.0


@dataclass
class Command:
    """One command in the guest, as the host sees it."""

    id: int
    argv: list[str]
    on_stdout: OutputFn
    on_stderr: OutputFn
    started: dict[str, Any] | None = None
    exit: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)
    refused: str | None = None  # the guest would not start it: why
    started_at: float = 0.0
    ended_at: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


class Session:
    """The channel's reader thread and the commands in flight."""

    def __init__(self, channel: HostChannel, vmm_pid: int, on_stats: Callable[[dict[str, Any]], None],
                 on_memctl: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 console: tuple[socket.socket, Callable[[bytes], None]] | None = None,
                 max_bad_frames: int = 32, hello: dict[str, Any] | None = None) -> None:
        """`on_memctl`: answers a MEMCTL with its MEMCTL_ACK body (None: memctl is off, every MEMCTL refused).
        `console`: the guest console's socket and where its bytes go (read by the same thread, drained when
        the VMM ends so its last words are kept). `hello`: a resumed guest's HELLO, kept from its boot (it
        sends no other)."""
        self.channel = channel
        self.console = console
        self.max_bad_frames = max_bad_frames
        self.cutoff: str | None = None  # why the host cut the guest off (its VMM is then killed)
        self.vmm_pidfd = os.pidfd_open(vmm_pid)
        self.on_stats = on_stats
        self.on_memctl = on_memctl
        self.hello: dict[str, Any] | None = None
        self.hello_at = 0.0
        self.ready = threading.Event()  # HELLO arrived
        # PARKING, RESUMED, CLONED, ADOPTED: the guest's one answer to a PARK, RESUMED, CLONED or ADOPT
        # (snapshot/park.py, snapshot/template.py, Instance.take_over)
        self._answers: dict[proto.MessageKind, dict[str, Any]] = {}
        self._answered = threading.Condition(threading.Lock())
        self.gone = threading.Event()  # the VMM exited or the channel closed
        self.dumped: dict[str, Any] | None = None
        self.dump_done = threading.Event()
        self.fatal: str | None = None
        self.commands: dict[int, Command] = {}
        self._ids = itertools.cycle(range(1, proto.MAX_EXEC_ID + 1))
        self._lock = threading.Lock()  # commands and ids
        self._stop = threading.Event()
        if hello is not None:
            self.hello, self.hello_at = hello, time.monotonic()
            self.ready.set()
        self._thread = threading.Thread(target=self._read_loop, name="memvisor-channel", daemon=True)
        self._thread.start()

    # -- sending ---------------------------------------------------------------------------------------------
    def send(self, kind: proto.MessageKind, body: dict[str, Any] | bytes, stream: int = 0) -> None:
        """Send one frame; TimeoutError if the guest takes nothing for channel.SEND_TIMEOUT_S."""
        self.channel.send(kind, body, stream)

    def begin(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
              uid: int | None = None, gid: int | None = None, stdin: bool = False, timeout: float | None = None,
              on_stdout: OutputFn, on_stderr: OutputFn) -> Command:
        """Start a command (EXEC); returns at once. Raises RuntimeError if the guest already runs
        proto.MAX_EXECS of them."""
        with self._lock:
            if len(self.commands) >= proto.MAX_EXECS:
                raise RuntimeError(f"{proto.MAX_EXECS} commands already run in this sandbox")
            exec_id = next(i for i in self._ids if i not in self.commands)
            command = Command(exec_id, argv, on_stdout, on_stderr, started_at=time.monotonic())
            self.commands[exec_id] = command
            if self.gone.is_set():  # the reader has ended and will not end this command: it ends now, unrun
                command.done.set()
                return command
        body: dict[str, Any] = {"id": exec_id, "argv": argv, "env": env or {}}
        if cwd is not None:
            body["cwd"] = cwd
        if uid is not None:
            body["uid"] = uid
        if gid is not None:
            body["gid"] = gid
        if stdin:
            body["stdin"] = True
        if timeout:
            body["timeout"] = float(timeout)
        try:
            self.send(proto.Kind.EXEC, body)
        except BaseException:  # the guest never heard of it: free its slot
            self.finish(command)
            raise
        return command

    def ask(self, kind: proto.MessageKind, body: dict[str, Any], answer: proto.MessageKind,
            timeout: float) -> dict[str, Any]:
        """Send `kind` and wait for the guest's `answer` (PARK -> PARKING, RESUMED -> RESUMED); TimeoutError if
        it does not come within `timeout` seconds, ConnectionError if the guest goes away first."""
        with self._answered:
            self._answers.pop(answer, None)
        self.send(kind, body)
        deadline = time.monotonic() + timeout
        with self._answered:
            while answer not in self._answers:
                left = deadline - time.monotonic()
                if self.gone.is_set():
                    raise ConnectionError(f"the guest went away before its {answer.name}")
                if left <= 0:
                    raise TimeoutError(f"the guest did not answer {kind.name} with {answer.name} within {timeout:g} s")
                self._answered.wait(min(left, TICK_S))
            return self._answers.pop(answer)

    def write_stdin(self, command: Command, data: bytes) -> None:
        """Feed the command's stdin (in CHUNK-sized frames); empty `data` ends it."""
        if not data:
            self.send(proto.Kind.STDIN, b"", command.id)
        for start in range(0, len(data), proto.CHUNK):
            self.send(proto.Kind.STDIN, data[start:start + proto.CHUNK], command.id)

    def kill(self, command: Command, signo: int = 9) -> None:
        """Signal the command's process group."""
        self.send(proto.Kind.KILL, {"id": command.id, "signal": signo})

    def finish(self, command: Command) -> None:
        """Forget a command that ended (or was given up on)."""
        with self._lock:
            self.commands.pop(command.id, None)

    def close(self) -> None:
        """Stop the reader thread (the channel itself is closed by its owner)."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
            if self._thread.is_alive():  # stuck in a callback: closing its fds could hit a reused fd number
                log.warning("the control channel's reader did not stop; leaving its pidfd open")
                return
        with contextlib.suppress(OSError):
            os.close(self.vmm_pidfd)

    # -- receiving -------------------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        # Process-directed signals (SIGTERM, SIGINT, SIGHUP) must reach the main thread: CPython runs handlers
        # there only, and a main thread asleep in a lock wait learns of a signal the kernel gave this thread
        # only when the wait ends.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        sock = self.channel.sock
        # poll, not select: a daemon with many sandboxes has fds past select's 1024
        poller = select.poll()
        poller.register(self.vmm_pidfd, select.POLLIN)
        if self.console is not None:
            poller.register(self.console[0].fileno(), select.POLLIN)
        try:
            while not self._stop.is_set() and not self.gone.is_set():
                poller.register(sock.fileno(), select.POLLIN | (select.POLLOUT if self.channel.queued else 0))
                events = dict(poller.poll(TICK_S * 1000))
                readable = [fd for fd, ev in events.items() if ev & (select.POLLIN | select.POLLHUP | select.POLLERR)]
                if events.get(sock.fileno(), 0) & select.POLLOUT:
                    self.channel.flush()
                if self.console is not None and self.console[0].fileno() in readable:
                    console_fd = self.console[0].fileno()
                    self._read_console()
                    if self.console is None:  # the VMM closed it
                        poller.unregister(console_fd)
                for frame in self.channel.receive():
                    self._dispatch(frame)
                if self.channel.malformed > self.max_bad_frames:
                    self._cut_off()
                if self.vmm_pidfd in readable or self.channel.closed:
                    self.gone.set()
            if self.console is not None:
                self._read_console(drain=True)
        except Exception:  # a bug here must not leave callers waiting forever
            log.exception("the control channel's reader failed")
            self.gone.set()
        finally:
            with self._lock:  # under the lock: begin() adds a command, then looks at `gone`
                ended = list(self.commands.values())
            for command in ended:
                command.done.set()
            self.ready.set()
            self.dump_done.set()

    def _cut_off(self) -> None:
        """The guest sent more malformed frames than the policy allows: stop listening and kill its VMM."""
        self.cutoff = (f"the guest sent {self.channel.malformed} malformed frames (the limit is {self.max_bad_frames}, "
                       "policy setting max_bad_frames): memvisor cut it off and stopped the sandbox")
        log.warning("%s", self.cutoff)
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.vmm_pidfd, signal.SIGKILL)
        self.gone.set()

    def _read_console(self, drain: bool = False) -> None:
        """Move what the console has to its sink (all of it when draining: the VMM is gone)."""
        assert self.console is not None
        sock, sink = self.console
        while True:
            try:
                data = sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # the VMM closed its end
                self.console = None
                return
            try:
                sink(data)
            except OSError as exc:  # a full disk loses console output, not the sandbox
                log.warning("console output lost: %s", exc)
            if not drain:
                return

    def _dispatch(self, frame: proto.Frame) -> None:
        kind = frame.kind
        # Checked by proto (fields, types); bounded and made printable here before anyone else sees it.
        body = guestdata.clean(frame.body) if frame.body is not None and kind is not proto.Kind.MEMCTL \
            else frame.body
        if kind is proto.Kind.HELLO and body is not None and self.hello is None:
            self.hello, self.hello_at = body, time.monotonic()
            self.ready.set()
        elif kind is proto.Kind.STATS and body is not None:
            self.on_stats(body)
        elif kind in (proto.Kind.STDOUT, proto.Kind.STDERR):
            command = self.commands.get(frame.stream)
            if command is None:
                self.channel.reject(f"{kind.name} for exec {frame.stream}, which is not running")
            elif kind is proto.Kind.STDOUT:
                command.on_stdout(frame.data)
            else:
                command.on_stderr(frame.data)
        elif kind in (proto.Kind.STARTED, proto.Kind.EXIT) and body is not None:
            command = self.commands.get(body["id"])
            if command is None or (kind is proto.Kind.STARTED and command.started is not None):
                self.channel.reject(f"{kind.name} for exec {body['id']}, which is not running")
            elif kind is proto.Kind.STARTED:
                command.started = body
            else:
                command.exit, command.ended_at = body, time.monotonic()
                command.done.set()
        elif kind in (proto.Kind.PARKING, proto.Kind.RESUMED, proto.Kind.CLONED, proto.Kind.ADOPTED) \
                and body is not None:
            with self._answered:
                self._answers[kind] = body
                self._answered.notify_all()
        elif kind is proto.Kind.DUMPED and body is not None:
            self.dumped = body
            self.dump_done.set()
        elif kind is proto.Kind.ERROR and body is not None:
            self._guest_error(body)
        elif kind is proto.Kind.MEMCTL and body is not None:
            ack = self.on_memctl(body) if self.on_memctl is not None else memctl.refuse(body)
            if not self.channel.reply(proto.Kind.MEMCTL_ACK, ack):
                log.warning("could not answer the guest's MEMCTL %d: it does not read", body["seq"])
        else:
            self.channel.reject(f"unexpected {kind.name} from the guest")

    def _guest_error(self, body: dict[str, Any]) -> None:
        message = body["message"]
        command = self.commands.get(body.get("id", 0))
        if command is not None:
            command.errors.append(message)
            if command.started is None and command.exit is None:  # refused before it started (e.g. parking)
                command.refused = message
                command.done.set()
        log.warning("guest reports: %s", message.replace("\n", " | "))
        if body.get("fatal"):
            self.fatal = message
            self.ready.set()
