"""The host end of the control channel: a socketpair whose other end QEMU relays to the guest's virtio-serial port.

Frames from the guest are decoded and validated by memvisor.proto; a malformed or unexpected one is logged and
answered with an ERROR frame, never raised, so a misbehaving guest cannot crash or hang the host.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from typing import Any

from memvisor import proto
from memvisor.errors import ProtocolError

log = logging.getLogger("memvisor")
SEND_TIMEOUT_S = 10.0  # a guest that reads nothing for this long is treated as dead
REPLY_TIMEOUT_S = 0.5  # an ERROR reply waits this long for room, then is dropped (and counted)


class HostChannel:
    """Non-blocking host socket plus an incremental decoder."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.decoder = proto.Decoder()
        self.closed = False
        self.errors = 0  # protocol errors seen from the guest
        self.dropped_replies = 0  # ERROR replies not sent because the guest did not read
        self._send_lock = threading.Lock()

    @classmethod
    def pair(cls) -> tuple[HostChannel, socket.socket]:
        """A channel and the socket to hand to the VMM (close it in the parent once the VMM has it)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(ours), theirs

    def send(self, kind: proto.MessageKind, body: dict[str, Any] | bytes, stream: int = 0,
             timeout: float = SEND_TIMEOUT_S) -> None:
        """Send one frame (raw kinds: of exec `stream`); TimeoutError if the guest makes no room for `timeout`
        seconds. Safe from several threads."""
        self.sendraw(proto.encode(kind, body, stream), timeout)

    def sendraw(self, data: bytes, timeout: float = SEND_TIMEOUT_S) -> None:
        """Send bytes as they are (tests use this to send malformed frames), waiting for room at most `timeout`
        seconds; the socket stays non-blocking, so a reader on another thread is never blocked by it."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        with self._send_lock:
            while view:
                try:
                    view = view[self.sock.send(view):]
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"the guest read nothing for {timeout:g} s") from None
                    select.select([], [self.sock], [], min(left, 1.0))

    def receive(self) -> list[proto.Frame]:
        """Read what is available; return valid frames. Bad input is logged and answered, not raised."""
        frames: list[proto.Frame] = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return frames
            except OSError as exc:
                log.debug("control channel read failed: %s", exc)
                data = b""
            if not data:
                self.closed = True
                return frames
            for item in self.decoder.feed(data):
                if isinstance(item, ProtocolError):
                    self.reject(item.message)
                else:
                    frames.append(item)

    def reject(self, message: str) -> None:
        """Log a protocol error from the guest and tell the guest about it."""
        self.errors += 1
        log.warning("bad frame from guest: %s", message)
        try:
            self.send(proto.Kind.ERROR, {"message": f"bad frame: {message}"}, timeout=REPLY_TIMEOUT_S)
        except OSError:  # TimeoutError included: a guest that does not read gets no reply
            self.dropped_replies += 1

    def close(self) -> None:
        self.sock.close()
