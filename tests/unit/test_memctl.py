"""memctl without a guest: the wire codec and the host's range validator (fuzzed), the host's actions on a real
memfd, a hostile PID 1's frames through a real Session, and PID 1's translation on this host's own pages."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor import proto
from memvisor.errors import ProtocolError
from memvisor.guest import memctld
from memvisor.host import memctl
from memvisor.host.channel import HostChannel
from memvisor.host.session import Session

MIB = 1 << 20
PAGE = 4096


@pytest.fixture
def backing() -> Any:
    b = memctl.Backing(16)
    yield b
    b.close()


def rss_shmem_kib() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssShmem:"))
    return int(line.split()[1])


def test_q35_layout_splits_at_the_pci_hole() -> None:
    assert memctl.q35_layout(256 * MIB) == [(0, 256 * MIB, 0)]
    assert memctl.q35_layout(0xB0000000 - PAGE) == [(0, 0xB0000000 - PAGE, 0)]
    assert memctl.q35_layout(4 << 30) == [(0, 2 << 30, 0), (4 << 30, 2 << 30, 2 << 30)]


def test_free_punches_the_memfd_and_reads_zero(backing: memctl.Backing) -> None:
    view = (ctypes.c_char * backing.size).from_address(backing.addr)
    ctypes.memset(backing.addr, 0x5A, backing.size)
    before = rss_shmem_kib()
    ack = backing.handle({"seq": 1, "code": "FREE", "ranges": [[0, 8 * MIB]]})
    assert ack["ok"] and ack["bytes"] == 8 * MIB
    assert before - rss_shmem_kib() >= 8 * 1024
    assert view[0] == b"\0" and view[8 * MIB - 1] == b"\0" and view[8 * MIB] == b"Z"
    assert backing.counters.bytes["FREE"] == 8 * MIB and backing.counters.ranges["FREE"] == 1


def test_mlock_is_bounded_counted_and_undone(backing: memctl.Backing) -> None:
    ack = backing.handle({"seq": 1, "code": "MLOCK", "ranges": [[0, MIB], [2 * MIB, MIB]]})
    assert ack["ok"] and backing.counters.locked_bytes == 2 * MIB
    again = backing.handle({"seq": 2, "code": "MLOCK", "ranges": [[0, MIB]]})  # already locked: no double count
    assert again["ok"] and backing.counters.locked_bytes == 2 * MIB
    over = backing.handle({"seq": 3, "code": "MLOCK", "ranges": [[4 * MIB, 4 * MIB]]})  # 25% of 16 MiB is 4
    assert not over["ok"] and over["errno"] == errno.ENOMEM and "4 MiB" in over["reason"]
    assert backing.handle({"seq": 4, "code": "FREE", "ranges": [[0, MIB]]})["ok"]  # freed pages are unlocked
    assert backing.counters.locked_bytes == MIB
    assert backing.handle({"seq": 5, "code": "MUNLOCK", "ranges": [[2 * MIB, MIB]]})["ok"]
    assert backing.counters.locked_bytes == 0


@pytest.mark.parametrize("code", sorted(memctl.UNSUPPORTED))
def test_what_the_backend_cannot_do_is_eopnotsupp_with_a_reason(backing: memctl.Backing, code: str) -> None:
    ack = backing.handle({"seq": 9, "code": code, "ranges": [[0, PAGE]]})
    assert not ack["ok"] and ack["errno"] == errno.EOPNOTSUPP and len(ack["reason"]) > 20
    assert backing.info()[code].startswith("unsupported: ")


def test_info_lists_every_code(backing: memctl.Backing) -> None:
    ack = backing.handle({"seq": 1, "code": "INFO", "ranges": []})
    assert set(ack["info"]) == set(proto.MEMCTL_CODES)
    proto.check(proto.Kind.MEMCTL_ACK, ack)


def test_the_rate_limit_refuses_a_flood(backing: memctl.Backing) -> None:
    answers = [backing.handle({"seq": i, "code": "INFO", "ranges": []})["ok"] for i in range(1, 1000)]
    assert answers.count(False) > 0 and backing.counters.rejects["rate"] == answers.count(False)


ranges_st = st.lists(st.lists(st.integers(-2**64, 2**64), min_size=0, max_size=3), max_size=6)


@settings(max_examples=400, deadline=None)
@given(seq=st.integers(-5, 2**32), code=st.sampled_from([*proto.MEMCTL_CODES, "", "nuke"]), ranges=ranges_st)
def test_the_codec_accepts_only_well_formed_requests(seq: int, code: str, ranges: list[list[int]]) -> None:
    body = {"seq": seq, "code": code, "ranges": ranges}
    try:
        proto.check(proto.Kind.MEMCTL, body)
    except ProtocolError:
        return
    assert code in proto.MEMCTL_CODES and 1 <= seq <= proto.MAX_MEMCTL_SEQ
    for start, length in ranges:
        assert start >= 0 and length > 0 and start % PAGE == 0 and length % PAGE == 0
    # what the codec lets through round-trips
    frames = proto.Decoder().feed(proto.encode(proto.Kind.MEMCTL, body))
    assert len(frames) == 1 and isinstance(frames[0], proto.Frame) and frames[0].body == body


@settings(max_examples=400, deadline=None)
@given(ranges=st.lists(st.tuples(st.integers(0, 2**40).map(lambda x: x * PAGE),
                                 st.integers(1, 2**20).map(lambda x: x * PAGE)), max_size=8))
def test_the_validator_never_lets_a_range_out_of_guest_ram(ranges: list[tuple[int, int]]) -> None:
    b = memctl.Backing(16)
    try:
        ack = b.handle({"seq": 1, "code": "DONTDUMP", "ranges": [list(r) for r in ranges]})
        inside = all(start + length <= 16 * MIB for start, length in ranges)
        assert ack["ok"] == inside, (ranges, ack)
    finally:
        b.close()


def test_a_hostile_pid1_cannot_hurt_the_host_through_a_session(backing: memctl.Backing) -> None:
    host, guest = HostChannel.pair()
    child = os.fork()
    if child == 0:  # something to watch as "the VMM"
        time.sleep(30)
        os._exit(0)
    session = Session(host, child, on_stats=lambda _b: None, on_memctl=backing.handle)
    try:
        def frame(body: dict[str, Any]) -> bytes:
            payload = proto.json_dumps(body).encode()
            return proto.HEADER.pack(proto.MAGIC, proto.VERSION, proto.Kind.MEMCTL, 0, len(payload)) + payload
        guest.sendall(b"".join([
            frame({"seq": 1, "code": "FREE", "ranges": [[16 * MIB, PAGE]]}),  # past the end of RAM
            frame({"seq": 2, "code": "FREE", "ranges": [[0, PAGE]] * (proto.MAX_MEMCTL_RANGES + 1)}),
            frame({"seq": 3, "code": "FREE", "ranges": [[1, PAGE]]}),
            frame({"seq": 4, "code": "FREE", "ranges": [[0, PAGE]], "evil": True}),
            frame({"seq": 5, "code": "FREE", "ranges": [[0, PAGE]]}),  # a good one
        ]))
        guest.settimeout(10)
        decoder, acks = proto.Decoder(), list[proto.Frame]()
        while len([a for a in acks if a.kind is proto.Kind.MEMCTL_ACK]) < 2:
            acks += [f for f in decoder.feed(guest.recv(65536)) if isinstance(f, proto.Frame)]
        answers = {f.body["seq"]: f.body for f in acks if f.kind is proto.Kind.MEMCTL_ACK and f.body}
        assert not answers[1]["ok"] and answers[1]["errno"] == errno.EINVAL
        assert answers[5]["ok"] and answers[5]["bytes"] == PAGE
        assert host.errors == 3  # the malformed ones were refused by the codec, and counted
        assert backing.counters.rejects == {"invalid": 1}
    finally:
        session.close()
        os.kill(child, 9)
        os.waitpid(child, 0)
        guest.close()
        host.sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="pagemap shows frame numbers to root only")
def test_pid1s_translation_on_this_hosts_own_pages() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = mmap.mmap(-1, 16 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    with pytest.raises(memctld.Refused, match="not mlock"):
        memctld.translate(os.getpid(), addr, 16 * PAGE)
    assert libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(16 * PAGE)) == 0
    try:
        ranges = memctld.translate(os.getpid(), addr, 16 * PAGE)
        assert sum(length for _, length in ranges) == 16 * PAGE and all(s % PAGE == 0 for s, _ in ranges)
        shared = mmap.mmap(-1, PAGE)  # MAP_SHARED: not private anonymous
        saddr = ctypes.addressof(ctypes.c_char.from_buffer(shared))
        with pytest.raises(memctld.Refused, match="not private anonymous"):
            memctld.translate(os.getpid(), saddr, PAGE)
        with pytest.raises(memctld.Refused, match="not mapped"):
            memctld.translate(os.getpid(), 0x10000, PAGE)
    finally:
        libc.munlock(ctypes.c_void_p(addr), ctypes.c_size_t(16 * PAGE))


def vmlck_kib() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmLck:"))
    return int(line.split()[1])


def test_locked_extents_are_bounded_and_free_unlocks(backing: memctl.Backing) -> None:
    scattered = [[2 * i * PAGE, PAGE] for i in range(memctl.MAX_LOCKED_EXTENTS + 1)]  # every other page
    ack = backing.handle({"seq": 1, "code": "MLOCK", "ranges": scattered})
    assert not ack["ok"] and ack["errno"] == errno.ENOMEM and "separate locked ranges" in ack["reason"]
    before = vmlck_kib()
    assert backing.handle({"seq": 2, "code": "MLOCK", "ranges": [[0, MIB]]})["ok"]
    assert vmlck_kib() - before == 1024
    assert backing.handle({"seq": 3, "code": "FREE", "ranges": [[0, MIB]]})["ok"]
    assert vmlck_kib() == before and backing.counters.locked_bytes == 0  # the kernel's figure and ours agree
