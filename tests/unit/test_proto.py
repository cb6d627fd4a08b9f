"""The wire format: round trips, validation, resynchronisation, and hostile input that must never raise."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor import proto
from memvisor.errors import ProtocolError
from memvisor.proto import Kind

VALID: list[tuple[proto.MessageKind, dict[str, Any] | bytes]] = [
    (Kind.HELLO, {"version": 1, "uptime": 1.5, "memtotal_kib": 1000, "steps": [["a", 0.1]]}),
    (Kind.EXEC, {"id": 1, "argv": ["echo", "hé"], "env": {"A": "1"}, "cwd": "/tmp", "uid": 0, "stdin": True,
                 "timeout": 2.5}),
    (Kind.STARTED, {"id": 1, "pid": 5, "uptime": 2}),
    (Kind.EXIT, {"id": 1, "code": None, "signal": 9, "uptime": 3.0, "timed_out": True, "meminfo": {"MemTotal": 1}}),
    (Kind.ERROR, {"message": "x", "fatal": True}),
    (Kind.ERROR, {"message": "x", "id": 65535}),
    (Kind.KILL, {"id": 3, "signal": 15}),
    (Kind.SHUTDOWN, {}),
    (Kind.STDOUT, b"\x00\xffbinary"),
    (Kind.STDERR, b""),
    (Kind.STDIN, b"input"),
]


def enc(kind: proto.MessageKind, body: dict[str, Any] | bytes) -> bytes:
    """Encode; raw kinds as exec 1's."""
    return proto.encode(kind, body, 1 if kind in proto.RAW_KINDS else 0)


def decode_all(data: bytes) -> list[proto.Frame | ProtocolError]:
    return proto.Decoder().feed(data)


@pytest.mark.parametrize(("kind", "body"), VALID, ids=lambda v: str(v)[:20])
def test_round_trip(kind: proto.MessageKind, body: dict[str, Any] | bytes) -> None:
    [frame] = decode_all(enc(kind, body))
    assert isinstance(frame, proto.Frame)
    assert frame.kind is kind
    assert (frame.data if kind in proto.RAW_KINDS else frame.body) == body


def test_byte_by_byte_delivery() -> None:
    stream = b"".join(enc(k, b) for k, b in VALID)
    dec = proto.Decoder()
    got = [item for byte in stream for item in dec.feed(bytes([byte]))]
    assert [f.kind for f in got if isinstance(f, proto.Frame)] == [k for k, _ in VALID]
    assert dec.pending == 0


@pytest.mark.parametrize(("kind", "body", "match"), [
    (Kind.EXEC, {"id": 1, "argv": []}, "non-empty"),
    (Kind.EXEC, {"id": 1, "argv": ["a\0b"]}, "without NUL"),
    (Kind.EXEC, {"id": 1, "argv": ["\ud800"]}, "UTF-8"),
    (Kind.EXEC, {"id": 1, "argv": ["x"], "env": {"A=B": "1"}}, "no '=' in NAME"),
    (Kind.EXEC, {"id": 1, "argv": ["x"], "extra": 1}, "unknown field"),
    (Kind.EXEC, {"id": 0, "argv": ["x"]}, "not in 1..65535"),
    (Kind.EXEC, {"id": 65536, "argv": ["x"]}, "not in 1..65535"),
    (Kind.EXEC, {"id": 1, "argv": ["x"], "timeout": -1}, "positive"),
    (Kind.EXEC, {"id": 1, "argv": ["x"], "uid": -5}, "uid"),
    (Kind.KILL, {"id": 1, "signal": 0}, "signal"),
    (Kind.EXIT, {"id": 1, "code": 0, "signal": None, "uptime": 1, "timed_out": 1}, "is int"),
    (Kind.HELLO, {"version": "1", "uptime": 1, "memtotal_kib": 1, "steps": []}, "'version' is str"),
    (Kind.STARTED, {"id": 1, "pid": True, "uptime": 1}, "is a bool"),
    (Kind.EXIT, {"id": 1, "code": 0, "uptime": 1}, "missing field 'signal'"),
])
def test_invalid_bodies_are_rejected(kind: proto.MessageKind, body: dict[str, object], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        proto.encode(kind, body)
    # ... and the same body arriving from a peer is reported, not raised.
    payload = json.dumps(body).encode()
    [item] = decode_all(proto.HEADER.pack(proto.MAGIC, proto.VERSION, kind, 0, len(payload)) + payload)
    assert isinstance(item, ProtocolError)


def test_oversize_is_refused_both_ways() -> None:
    with pytest.raises(ProtocolError, match="over the"):
        proto.encode(Kind.STDOUT, b"x" * (proto.MAX_PAYLOAD + 1), 1)
    header = proto.HEADER.pack(proto.MAGIC, proto.VERSION, Kind.STDOUT, 1, proto.MAX_PAYLOAD + 1)
    items = decode_all(header + proto.encode(Kind.STDERR, b"after", 1))
    assert isinstance(items[0], ProtocolError) and "over the" in items[0].message
    assert isinstance(items[-1], proto.Frame) and items[-1].data == b"after"


def test_resync_after_garbage_and_bad_version() -> None:
    bad_version = struct.pack(">4sBBHI", proto.MAGIC, 99, 1, 0, 0)
    stream = b"garbage!" + bad_version + proto.encode(Kind.STDOUT, b"ok", 1) + b"\x00MV"
    items = decode_all(stream)
    frames = [i for i in items if isinstance(i, proto.Frame)]
    errors = [i for i in items if isinstance(i, ProtocolError)]
    assert [f.data for f in frames] == [b"ok"]
    assert any("bad magic" in e.message for e in errors)
    assert any("unsupported version 99" in e.message for e in errors)


@pytest.mark.parametrize("payload", [b"not json", b"[1,2]", b'{"message": NaN}', b"\xff\xfe", b"[" * 100000])
def test_bad_json_payload(payload: bytes) -> None:
    [item] = decode_all(proto.HEADER.pack(proto.MAGIC, proto.VERSION, Kind.ERROR, 0, len(payload)) + payload)
    assert isinstance(item, ProtocolError)


def test_unknown_kind_and_stream_field() -> None:
    v = proto.VERSION
    items = decode_all(proto.HEADER.pack(proto.MAGIC, v, 200, 0, 0) + proto.HEADER.pack(proto.MAGIC, v, 4, 0, 0)
                       + proto.HEADER.pack(proto.MAGIC, v, Kind.SHUTDOWN, 7, 2) + b"{}")
    assert [str(i) for i in items] == ["unknown message kind 200", "STDOUT without an exec id",
                                       "SHUTDOWN carries stream 7; JSON frames carry 0"]
    with pytest.raises(ProtocolError, match="exec id 0"):
        proto.encode(Kind.STDIN, b"x")


def test_old_versions_are_refused_with_a_clear_error() -> None:
    [item] = decode_all(proto.HEADER.pack(proto.MAGIC, 2, Kind.STDOUT, 1, 1) + b"x")
    assert isinstance(item, ProtocolError)
    assert f"unsupported version 2 (this side speaks {proto.VERSION})" in str(item)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=64),
    st.sampled_from([enc(k, b) for k, b in VALID]),
    st.builds(lambda k, n, body: proto.HEADER.pack(proto.MAGIC, proto.VERSION, k, 0, n) + body,
              st.integers(0, 255), st.integers(0, 80), st.binary(max_size=80)),
), max_size=12))
def test_hostile_streams_never_raise_and_never_stall(chunks: list[bytes]) -> None:
    dec = proto.Decoder()
    stream = b"".join(chunks)
    items = dec.feed(stream)
    for item in items:
        assert isinstance(item, proto.Frame | ProtocolError)
    # Whatever is left must be a possible prefix of one frame: bounded, so a stream can never stall forever.
    assert dec.pending <= proto.HEADER.size + proto.MAX_PAYLOAD
    # A valid frame after any garbage is still delivered: a pending frame (at most 80 bytes of payload here) may
    # swallow the first sentinels, but not all eight.
    tail = dec.feed(proto.encode(Kind.STDOUT, b"sentinel", 1) * 8 + b"\0" * (proto.MAX_PAYLOAD + 16))
    assert any(isinstance(i, proto.Frame) and i.data == b"sentinel" for i in tail)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_json_codec_matches_stdlib(value: object) -> None:
    text = proto.json_dumps(value)
    assert text == json.dumps(value, separators=(",", ":"), allow_nan=False)
    assert proto.json_loads(text) == json.loads(text)
    assert proto.json_loads(" \n" + json.dumps(value, indent=2) + "\t") == value


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_json_loads_agrees_with_stdlib_on_garbage(text: str) -> None:
    try:
        expected: object = json.loads(text)
    except ValueError:
        expected = ValueError
    try:
        got: object = proto.json_loads(text)
    except ValueError:
        got = ValueError
    if expected is not ValueError and got is ValueError:
        assert "NaN" in text or "Infinity" in text  # the only documented difference: no NaN/Infinity
    else:
        assert got == expected


def test_zero_filler_between_frames_is_skipped_silently() -> None:
    """A new daemon's ADOPT_FILLER: zeros before a frame decode to nothing, after a half frame they complete it
    (then refused) and the rest is skipped without an error."""
    frame = proto.encode(Kind.SHUTDOWN, {})
    decoder = proto.Decoder()
    [item] = decoder.feed(bytes(proto.ADOPT_FILLER) + frame)
    assert isinstance(item, proto.Frame) and item.kind is Kind.SHUTDOWN
    half = proto.encode(Kind.EXEC, {"id": 1, "argv": ["true"]})[:20]
    items = decoder.feed(half + bytes(proto.ADOPT_FILLER) + frame)
    assert len(items) == 2 and isinstance(items[0], ProtocolError), items
    assert isinstance(items[1], proto.Frame) and items[1].kind is Kind.SHUTDOWN
