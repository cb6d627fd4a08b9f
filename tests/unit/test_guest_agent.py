"""The guest's end of the channel, run on the host over a socketpair: hostile input never crashes it."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor import proto
from memvisor.guest import agent

RUN = proto.encode(proto.Kind.RUN, {"argv": ["true"]})


def pair() -> tuple[agent.Channel, socket.socket, list[str]]:
    guest, host = socket.socketpair()
    logged: list[str] = []
    return agent.Channel(guest.detach(), logged.append), host, logged


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=100),
    st.builds(lambda k, body: proto.HEADER.pack(proto.MAGIC, 1, k, 0, len(body)) + body,
              st.integers(0, 255), st.binary(max_size=60)),
    st.sampled_from([proto.encode(proto.Kind.EXIT, {"code": 1, "signal": None, "uptime": 0}),
                     proto.encode(proto.Kind.STDOUT, b"x")]),
), max_size=8))
def test_wait_for_run_survives_garbage(chunks: list[bytes]) -> None:
    chan, host, logged = pair()
    try:
        # Enough valid RUN frames that one survives any pending partial frame the garbage may leave open.
        host.sendall(b"".join(chunks) + RUN * 6)
        assert agent.wait_for_run(chan) == {"argv": ["true"]}
        host.setblocking(False)
        try:
            replies = proto.Decoder().feed(host.recv(1 << 20))
        except BlockingIOError:
            replies = []
        assert all(isinstance(r, proto.Frame) and r.kind is proto.Kind.ERROR for r in replies)
        assert len(replies) == len(logged)
    finally:
        host.close()
