"""The host end of the control channel against a hostile guest: it logs, answers ERROR, never raises."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor import proto
from memvisor.host.channel import HostChannel


def receive_all(chan: HostChannel) -> list[proto.Frame]:
    frames = []
    for _ in range(100):
        frames += chan.receive()
    return frames


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_from_guest(garbage: bytes) -> None:
    host, guest = HostChannel.pair()
    try:
        guest.sendall(garbage + proto.encode(proto.Kind.STDOUT, b"still-works", 1))
        frames = receive_all(host)
        assert any(f.kind is proto.Kind.STDOUT and f.data == b"still-works" for f in frames)
        if host.errors:
            guest.setblocking(False)
            replies = proto.Decoder().feed(guest.recv(1 << 20))
            assert all(isinstance(r, proto.Frame) and r.kind is proto.Kind.ERROR for r in replies)
            assert len(replies) == host.errors
    finally:
        host.close()
        guest.close()


def test_peer_hangup_is_seen() -> None:
    host, guest = HostChannel.pair()
    guest.sendall(proto.encode(proto.Kind.STDERR, b"bye", 1))
    guest.shutdown(socket.SHUT_RDWR)
    guest.close()
    frames = receive_all(host)
    assert [f.data for f in frames] == [b"bye"]
    assert host.closed
    host.reject("after close")  # must not raise either
    host.close()
