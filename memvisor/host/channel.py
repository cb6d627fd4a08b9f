"""The host end of the control channel: a socketpair whose other end QEMU relays to the guest's virtio-serial port.

Frames from the guest are decoded and validated by memvisor.proto; a malformed or unexpected one is logged and
answered with an ERROR frame, never raised, so a misbehaving guest cannot crash or hang the host.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from memvisor import proto
from memvisor.errors import ProtocolError

log = logging.getLogger("memvisor")
SEND_TIMEOUT_S = 10.0  # a guest that reads nothing for this long is treated as dead
REPLY_TIMEOUT_S = 0.0  # an ERROR reply that finds the queue full is dropped (and counted), never waited for
MAX_QUEUED = 4 << 20  # bytes queued for a guest that does not read
READS_PER_CALL = 16  # receive() reads at most this many 64 KiB chunks before it returns to the loop


class HostChannel:
    """Non-blocking host socket plus an incremental decoder."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.decoder = proto.Decoder()
        self.closed = False
        self.errors = 0  # protocol errors seen from the guest (malformed, or out of turn)
        self.malformed = 0  # of which frames that did not decode or broke their schema
        self.dropped_replies = 0  # replies (ERROR, MEMCTL_ACK) not sent because the guest did not read
        self._room = threading.Condition()  # guards _out; notified when it shrinks
        self._out = bytearray()  # frames the guest has not taken yet

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
        """Queue bytes as they are (tests use this to send malformed frames) and write what the socket takes
        now; the sandbox's reader thread writes the rest when the socket is writable (`flush`). The queue holds
        at most MAX_QUEUED bytes: a caller waits at most `timeout` seconds for room (TimeoutError after), and
        the socket itself never blocks anyone."""
        deadline = time.monotonic() + timeout
        with self._room:
            while self._out and len(self._out) + len(data) > MAX_QUEUED:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the guest read nothing for {timeout:g} s") from None
                self._room.wait(min(left, 1.0))
            self._out += data
            self._write()

    def flush(self) -> None:
        """Write what the socket takes now of the queued bytes (the reader thread calls this when writable)."""
        with self._room:
            self._write()

    @property
    def queued(self) -> int:
        """Bytes waiting for the guest to make room."""
        return len(self._out)

    def _write(self) -> None:
        try:
            while self._out:
                del self._out[:self.sock.send(self._out)]
        except BlockingIOError:
            pass
        except OSError as exc:  # the VMM is gone: nothing will ever be read
            log.debug("control channel write failed: %s", exc)
            self._out.clear()
        self._room.notify_all()

    def receive(self) -> list[proto.Frame]:
        """Read what is available; return valid frames. Bad input is logged and answered, not raised."""
        frames: list[proto.Frame] = []
        for _ in range(READS_PER_CALL):  # a flooding guest cannot keep the reader here for ever
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
                    self.malformed += 1
                    self.reject(item.message)
                else:
                    frames.append(item)
        return frames

    def reject(self, message: str) -> None:
        """Log a protocol error from the guest and tell the guest about it."""
        self.errors += 1
        log.warning("bad frame from guest: %s", message)
        self.reply(proto.Kind.ERROR, {"message": f"bad frame: {message}"})

    def reply(self, kind: proto.MessageKind, body: dict[str, Any]) -> bool:
        """Answer the guest without ever waiting (the reader thread, which answers, is the one that drains the
        queue): a reply that finds the queue full is dropped and counted. True if it was queued."""
        try:
            self.send(kind, body, timeout=REPLY_TIMEOUT_S)
            return True
        except OSError:  # TimeoutError included: a guest that does not read gets no reply
            self.dropped_replies += 1
            return False

    def close(self) -> None:
        self.sock.close()
