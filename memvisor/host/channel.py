"""The host end of the control channel: a socketpair whose other end QEMU relays to the guest's virtio-serial port.

Frames from the guest are decoded and validated by memvisor.proto; a malformed or unexpected one is logged and
answered with an ERROR frame, never raised, so a misbehaving guest cannot crash or hang the host.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from memvisor import proto
from memvisor.errors import ProtocolError

log = logging.getLogger("memvisor")


class HostChannel:
    """Non-blocking host socket plus an incremental decoder."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.decoder = proto.Decoder()
        self.closed = False
        self.errors = 0  # protocol errors seen from the guest

    @classmethod
    def pair(cls) -> tuple[HostChannel, socket.socket]:
        """A channel and the socket to hand to the VMM (close it in the parent once the VMM has it)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(ours), theirs

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, kind: proto.MessageKind, body: dict[str, Any] | bytes) -> None:
        """Send one frame (blocking briefly if the VMM's buffer is full)."""
        self.sendraw(proto.encode(kind, body))

    def sendraw(self, data: bytes) -> None:
        """Send bytes as they are (tests use this to send malformed frames)."""
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

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
            self.send(proto.Kind.ERROR, {"message": f"bad frame: {message}"})
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
