"""The guest agent: waits for the host's RUN, runs the workload, streams its output, reports how it ended.

Every frame from the host is validated; a bad one gets an ERROR reply and a console line, never a crash. Guest
only, stdlib only, and cheap to import (see proto.py on why no selectors/subprocess/pathlib).
"""

from __future__ import annotations

import os
import select
import time

from memvisor import proto
from memvisor.errors import ProtocolError
from memvisor.guest import spawn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

PORTS = "/sys/class/virtio-ports"
DRAIN_GRACE = 1.0  # seconds to keep reading output held open by the workload's orphans after it exits
STATS_INTERVAL = 2.0  # seconds between STATS frames while the command runs
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}


def uptime() -> float:
    """Seconds since the guest kernel started."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Channel:
    """The guest end of the control channel: one read-write fd on the virtio-serial port."""

    def __init__(self, fd: int, log: Callable[[str], None]) -> None:
        self.fd = fd
        self.log = log
        self.decoder = proto.Decoder()
        self.eof = False  # nobody on the host end (virtio-serial reads return 0)

    @classmethod
    def open(cls, name: str, deadline: float, log: Callable[[str], None]) -> Channel:
        """Wait for the port named `name` to appear, then open it once, read-write (FACTS.md)."""
        while True:
            for port in sorted(os.listdir(PORTS)) if os.path.isdir(PORTS) else []:
                try:
                    with open(f"{PORTS}/{port}/name") as f:
                        if f.read().strip() == name:
                            return cls(os.open(f"/dev/{port}", os.O_RDWR | os.O_CLOEXEC), log)
                except OSError:
                    pass  # the node may not exist yet
            if time.monotonic() > deadline:
                raise OSError(f"virtio-serial port {name!r} did not appear")
            time.sleep(0.01)

    def send(self, kind: proto.MessageKind, body: dict[str, Any] | bytes) -> None:
        """Send one frame (blocking until the host has room)."""
        self._write(proto.encode(kind, body))

    def send_output(self, kind: proto.MessageKind, data: bytes) -> None:
        for frame in proto.encode_output(kind, data):
            self._write(frame)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def read_frames(self) -> list[proto.Frame]:
        """Read what is available; answer malformed input with an ERROR frame and drop it."""
        data = os.read(self.fd, 65536)
        self.eof = not data
        frames = []
        for item in self.decoder.feed(data):
            if isinstance(item, ProtocolError):
                self.log(f"bad frame from host: {item.message}")
                self.send(proto.Kind.ERROR, {"message": f"bad frame: {item.message}"})
            else:
                frames.append(item)
        return frames


def wait_for_run(channel: Channel) -> dict[str, Any]:
    """Block until a valid RUN arrives; anything else gets an ERROR reply."""
    while True:
        frames = channel.read_frames()
        if channel.eof:
            time.sleep(0.05)  # nobody on the host end yet: poll gently
        for frame in frames:
            if frame.kind is proto.Kind.RUN and frame.body is not None:
                return frame.body
            if not answer(channel, frame):
                channel.log(f"unexpected {frame.kind.name} from host while waiting for RUN")
                channel.send(proto.Kind.ERROR, {"message": f"unexpected {frame.kind.name}; expected RUN"})


def answer(channel: Channel, frame: proto.Frame) -> bool:
    """Answer the requests the host may make at any time (DUMP); False if `frame` is not one of them."""
    if frame.kind is not proto.Kind.DUMP or frame.body is None:
        return False
    from memvisor.guest import diag  # only when asked: never at boot

    channel.log(f"diagnostic dump asked for: {frame.body['reason'][:200]}")
    channel.send(proto.Kind.DUMPED, diag.dump(frame.body["reason"], uptime()))
    return True


def serve(channel: Channel, uid: int, report: Callable[[], dict[str, Any]]) -> None:
    """Run one command for the host and report its end."""
    run = wait_for_run(channel)
    home, user = ("/root", "root") if uid == 0 else ("/home/sandbox", "sandbox")
    env = {**BASE_ENV, "HOME": home, "USER": user, "LOGNAME": user, "SHELL": "/bin/sh", **run.get("env", {})}
    channel.log(f"running a {len(run['argv'])}-word command as uid {uid}")
    try:
        child = spawn.spawn(run["argv"], env, run.get("cwd", home), uid)
    except OSError as exc:
        # The shell's conventions: 127 not found, 126 found but not runnable.
        code = 127 if exc.errno == 2 else 126
        channel.send(proto.Kind.STDERR, f"memvisor: {run['argv'][0]}: {exc.strerror}\n".encode())
        channel.send(proto.Kind.EXIT, {"code": code, "signal": None, "uptime": uptime(), **report()})
        return
    channel.send(proto.Kind.STARTED, {"pid": child.pid, "uptime": uptime()})
    status = pump(channel, child, lambda: {"uptime": uptime(), **report()})
    sig = -status if status < 0 else None
    channel.send(proto.Kind.EXIT, {"code": None if sig else status, "signal": sig, "uptime": uptime(), **report()})
    channel.log(f"command ended: {f'signal {sig}' if sig else f'exit {status}'}")


def pump(channel: Channel, child: spawn.Child, stats: Callable[[], dict[str, Any]]) -> int:
    """Forward the child's stdout/stderr until they close (or DRAIN_GRACE after it exits), sending STATS every
    STATS_INTERVAL; return the child's status."""
    kinds = {child.stdout: proto.Kind.STDOUT, child.stderr: proto.Kind.STDERR}
    poller = select.poll()
    for fd in (*kinds, child.pidfd, channel.fd):
        poller.register(fd, select.POLLIN)
    exited_at: float | None = None
    next_stats = time.monotonic()
    try:
        while kinds and (exited_at is None or time.monotonic() - exited_at < DRAIN_GRACE):
            if time.monotonic() >= next_stats:
                channel.send(proto.Kind.STATS, stats())
                next_stats = time.monotonic() + STATS_INTERVAL
            for fd, _ in poller.poll(200):
                if fd == child.pidfd:
                    poller.unregister(fd)
                    exited_at = time.monotonic()
                elif fd == channel.fd:
                    for frame in channel.read_frames():
                        if not answer(channel, frame):
                            channel.send(proto.Kind.ERROR,
                                         {"message": f"unexpected {frame.kind.name} while running"})
                    if channel.eof:
                        poller.unregister(fd)
                elif fd in kinds:
                    data = os.read(fd, proto.CHUNK)
                    if data:
                        channel.send_output(kinds[fd], data)
                    else:
                        poller.unregister(fd)
                        os.close(fd)
                        del kinds[fd]
    finally:
        for fd in kinds:
            os.close(fd)
    return child.wait()
