"""memctl in PID 1: the unix socket a workload asks on, and the translation of its ranges to guest-physical ones.

A request names a range of the caller's own address space. PID 1 learns who the caller is from the socket
(SO_PEERCRED), never from the request, and before it reads the caller's page tables it freezes the caller's
whole command (the cgroup v2 freezer; every command runs in its own cgroup, which only root can thaw): while
frozen no process that can reach those pages runs. The range must lie in private anonymous mappings that the
caller has mlock()ed (VmFlags `lo`, so reclaim and, with vm.compact_unevictable_allowed=0, compaction leave the
pages where they are; transparent huge pages are off, the guest has one NUMA node and no KSM), and every page
must be present and mapped by the caller alone (/proc/PID/pagemap: present, not swapped, exclusive). Only then
are the frames sent to the host, and the command is thawed when the host's answer arrives: a frame the host
touches is one the caller owns, and keeps, throughout (docs/memctl.md).

Guest only, stdlib only; imported by init only when the policy enables memctl.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

from memvisor import contract, proto
from memvisor.errors import ProtocolError
from memvisor.guest import cgroups

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

SOCKET_DIR = "/run/memvisor"
SOCKET = contract.MEMCTL_SOCKET
PAGE = proto.PAGE
MAX_LENGTH = 64 << 20  # bytes one request may name (the library splits larger ones)
MAX_REQUEST = 4096  # bytes of one request packet
MAX_CLIENTS = 64
FREEZE_TIMEOUT_S = 2.0
PENDING_TIMEOUT_S = 30.0  # a request the host has not answered by then is answered ETIMEDOUT and thawed
PM_PRESENT, PM_SWAPPED, PM_EXCLUSIVE = 1 << 63, 1 << 62, 1 << 56
PM_PFN = (1 << 55) - 1
ANON_NAMES = ("", "[heap]", "[stack]")
REQUEST_FIELDS = {"op", "code", "address", "length", "name"}


class Refused(Exception):
    """A request PID 1 will not pass on: (errno, reason) for the caller."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = err
        self.reason = reason


def setup() -> socket.socket:
    """Make the guest's memory stable enough for memctl, and listen: no compaction of mlocked pages, no
    transparent huge pages; the socket, mode 0666 (any process may ask, about its own memory only). Each
    command's own cgroup (guest/cgroups.py, mounted by init) is what the freezer acts on."""
    for path, value in (("/proc/sys/vm/compact_unevictable_allowed", "0"),
                        ("/sys/kernel/mm/transparent_hugepage/enabled", "never")):
        if os.path.exists(path):
            with open(path, "w") as f:
                f.write(value)
    os.makedirs(SOCKET_DIR, mode=0o755, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    sock.bind(SOCKET)
    os.chmod(SOCKET, 0o666)
    sock.listen(16)
    return sock


class Pending:
    __slots__ = ("conn", "cgroup", "started", "ranges")

    def __init__(self, conn: socket.socket, cgroup: str | None, ranges: int) -> None:
        self.conn = conn
        self.cgroup = cgroup
        self.started = time.monotonic()
        self.ranges = ranges


class Memctld:
    """Requests from workloads in, MEMCTL frames to the host out, MEMCTL_ACKs back to the callers."""

    def __init__(self, listener: socket.socket, send: Callable[[dict[str, Any]], None],
                 log: Callable[[str], None]) -> None:
        self.listener = listener
        self.send = send
        self.log = log
        self.clients: dict[int, socket.socket] = {}
        self.pending: dict[int, Pending] = {}
        self.peers: dict[int, tuple[int, int | None]] = {}  # client fd -> (pid, start time) at connect
        self.seq = 0

    def accept(self) -> socket.socket | None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return None
        if len(self.clients) >= MAX_CLIENTS:
            conn.close()
            return None
        conn.setblocking(False)
        pid = _peer_pid(conn)
        self.peers[conn.fileno()] = (pid, _start_time(pid))  # who connected, by pid and start time
        self.clients[conn.fileno()] = conn
        return conn

    def close_client(self, fd: int) -> None:
        conn = self.clients.pop(fd, None)
        self.peers.pop(fd, None)
        if conn is not None:
            conn.close()  # a pending request still completes (and thaws); its answer is dropped

    def readable(self, fd: int) -> bool:
        """Serve one request from client `fd`; False if the client is gone (the caller forgets it)."""
        conn = self.clients.get(fd)
        if conn is None:
            return False
        try:
            data = conn.recv(MAX_REQUEST + 1)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            return False
        try:
            self._request(conn, data)
        except Refused as exc:
            self._answer(conn, {"ok": False, "errno": exc.errno, "reason": exc.reason, "bytes": 0})
        except Exception as exc:  # noqa: BLE001 - a workload's request must never take PID 1 down
            self.log(f"memctl: a request failed: {type(exc).__name__}")
            self._answer(conn, {"ok": False, "errno": errno.EINVAL, "reason": "the request could not be served",
                                "bytes": 0})
        return True

    def ack(self, body: dict[str, Any]) -> None:
        """The host's answer to MEMCTL `seq`: thaw the caller, pass the answer on."""
        pending = self.pending.pop(body["seq"], None)
        if pending is None:
            self.log(f"memctl: an answer for seq {body['seq']}, which was not asked")
            return
        self._thaw(pending)
        answer: dict[str, Any] = {k: body[k] for k in ("ok", "errno", "reason", "bytes", "info") if k in body}
        answer["ranges"] = pending.ranges
        answer["seconds"] = round(time.monotonic() - pending.started, 6)
        if pending.conn.fileno() in self.clients:
            self._answer(pending.conn, answer)

    def abandon(self, reason: str | None = None) -> None:
        """The host is gone: thaw everyone still waiting; with `reason` (a new host took over, and the guest goes
        on), each caller is told its request was lost."""
        pending = list(self.pending.values())
        self.pending.clear()
        for p in pending:
            self._thaw(p)
            if reason is not None and p.conn.fileno() in self.clients:
                self._answer(p.conn, {"ok": False, "errno": errno.ECONNABORTED, "bytes": 0,
                                      "reason": f"{reason}: the request may or may not have been applied"})

    def expire(self, now: float) -> None:
        """Answer and thaw requests the host has not answered within PENDING_TIMEOUT_S. The host applies a
        request before it answers and never blocks on a guest, so an answer this late was lost (a guest that
        did not read), not delayed."""
        for seq, p in list(self.pending.items()):
            if now - p.started > PENDING_TIMEOUT_S:
                del self.pending[seq]
                self._thaw(p)
                if p.conn.fileno() in self.clients:
                    self._answer(p.conn, {"ok": False, "errno": errno.ETIMEDOUT, "bytes": 0,
                                          "reason": "the host's answer was lost"})

    def _thaw(self, pending: Pending) -> None:
        if pending.cgroup is None:
            return
        try:
            _freeze(pending.cgroup, False)
        except OSError:
            pass  # the command ended and its cgroup is gone

    # -- one request -----------------------------------------------------------------------------------------
    def _request(self, conn: socket.socket, data: bytes) -> None:
        if len(data) > MAX_REQUEST:
            raise Refused(errno.EMSGSIZE, f"a request is at most {MAX_REQUEST} bytes")
        try:
            req = proto.json_loads(data.decode())
        except (UnicodeDecodeError, ValueError):
            raise Refused(errno.EINVAL, "a request is one JSON object") from None
        if not isinstance(req, dict) or set(req) - REQUEST_FIELDS or req.get("op") not in ("info", "advise"):
            raise Refused(errno.EINVAL, f"a request is {{\"op\": \"info\"|\"advise\", ...}} with fields "
                          f"{', '.join(sorted(REQUEST_FIELDS))}")
        if req["op"] == "info":
            self._forward(conn, "INFO", [], None, None)
            return
        code, address, length, name = req.get("code"), req.get("address", -1), req.get("length", 0), req.get("name")
        if code not in proto.MEMCTL_CODES or code == "INFO":
            raise Refused(errno.EINVAL, f"unknown code {str(code)[:40]!r}")
        if not (_is_int(address) and _is_int(length)):
            raise Refused(errno.EINVAL, "address and length must be integers")
        assert isinstance(address, int) and isinstance(length, int)
        if address < 0 or length <= 0 or address % PAGE or length % PAGE or length > MAX_LENGTH:
            raise Refused(errno.EINVAL, f"address and length must be page-aligned, with 0 < length <= "
                          f"{MAX_LENGTH >> 20} MiB")
        if name is not None and (not proto.is_text(name) or len(name) > proto.MAX_ANON_NAME):
            raise Refused(errno.EINVAL, f"name must be text of at most {proto.MAX_ANON_NAME} characters")
        pid, started = self.peers.get(conn.fileno(), (0, None))
        if started is None or _start_time(pid) != started:
            raise Refused(errno.ESRCH, "the process that connected is gone: connect again")
        cgroup = _cgroup_of(pid)
        if any(p.cgroup == cgroup for p in self.pending.values()):  # its thaw would end this one's freeze
            raise Refused(errno.EBUSY, "a memctl request of this command is still in flight: one at a time")
        _freeze(cgroup, True)
        try:
            ranges = translate(pid, address, length)
            self._forward(conn, code, ranges, cgroup, name)
        except BaseException:
            _freeze(cgroup, False)
            raise

    def _forward(self, conn: socket.socket, code: str, ranges: list[list[int]], cgroup: str | None,
                 name: str | None) -> None:
        self.seq = self.seq % proto.MAX_MEMCTL_SEQ + 1
        body: dict[str, Any] = {"seq": self.seq, "code": code, "ranges": ranges}
        if name is not None:
            body["name"] = name
        self.pending[self.seq] = Pending(conn, cgroup, len(ranges))
        try:
            self.send(body)
        except (OSError, ProtocolError) as exc:
            del self.pending[self.seq]
            raise Refused(errno.EIO, f"the host could not be asked: {exc}") from None

    def _answer(self, conn: socket.socket, body: dict[str, Any]) -> None:
        try:
            conn.send(proto.json_dumps(body).encode())
        except OSError:
            pass  # the caller left, or does not read: its loss


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _peer_pid(conn: socket.socket) -> int:
    pid: int = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    return pid


def _start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot), to tell it from a later one with the same pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _cgroup_of(pid: int) -> str:
    """The command cgroup `pid` runs in; Refused if it is not one (only commands the agent started may ask)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            line = f.read().strip()
    except OSError:
        raise Refused(errno.ESRCH, "the caller is gone") from None
    path = line.rpartition("::")[2]
    if not cgroups.is_exec(path):
        raise Refused(errno.EPERM, "only commands the sandbox agent started may use memctl")
    return cgroups.ROOT + path


def _freeze(cgroup: str, frozen: bool) -> None:
    """Freeze (and wait until every task is frozen) or thaw a command's cgroup."""
    with open(f"{cgroup}/cgroup.freeze", "w") as f:
        f.write("1" if frozen else "0")
    if not frozen:
        return
    deadline = time.monotonic() + FREEZE_TIMEOUT_S
    while True:
        with open(f"{cgroup}/cgroup.events") as f:
            if "frozen 1" in f.read():
                return
        if time.monotonic() > deadline:
            _freeze(cgroup, False)
            raise Refused(errno.EAGAIN, "the caller's command did not freeze in time")
        time.sleep(0.0005)


def translate(pid: int, address: int, length: int) -> list[list[int]]:
    """The guest-physical [start, length] ranges backing [address, address+length) of a frozen `pid`.
    Refused unless every page is in a private anonymous, mlocked mapping, present and mapped by `pid` alone."""
    end = address + length
    covered = address
    for start, stop, perms, name, flags in _mappings(pid, address, end):
        if start > covered:
            break
        if perms[3] != "p" or not (name in ANON_NAMES or name.startswith("[anon:")):
            raise Refused(errno.EINVAL, f"[{start:#x}, {stop:#x}) is not private anonymous memory "
                          f"({name or 'anonymous'}, {perms})")
        if "lo" not in flags:
            raise Refused(errno.EPERM, f"[{start:#x}, {stop:#x}) is not mlock()ed: lock it first (the memctl "
                          "library does)")
        covered = max(covered, stop)
    if covered < end:
        raise Refused(errno.EFAULT, f"[{covered:#x}, {end:#x}) is not mapped in the caller")
    pages = length // PAGE
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = os.pread(fd, pages * 8, (address // PAGE) * 8)
    finally:
        os.close(fd)
    if len(raw) != pages * 8:
        raise Refused(errno.EFAULT, "the caller's page table could not be read")
    ranges: list[list[int]] = []
    for i, entry in enumerate(struct.unpack(f"{pages}Q", raw)):
        pfn = entry & PM_PFN
        if not entry & PM_PRESENT or entry & PM_SWAPPED or not entry & PM_EXCLUSIVE or not pfn:
            raise Refused(errno.EFAULT, f"page {address + i * PAGE:#x} is not present, or shared with another "
                          "process (copy-on-write after fork)")
        if ranges and ranges[-1][0] + ranges[-1][1] == pfn * PAGE:
            ranges[-1][1] += PAGE
        else:
            ranges.append([pfn * PAGE, PAGE])
    if len(ranges) > proto.MAX_MEMCTL_RANGES:
        raise Refused(errno.E2BIG, f"the range is {len(ranges)} physical pieces, over {proto.MAX_MEMCTL_RANGES}: "
                      "ask for less at once")
    return ranges


def _mappings(pid: int, lo: int, hi: int) -> list[tuple[int, int, str, str, list[str]]]:
    """(start, end, perms, name, VmFlags) of `pid`'s mappings that overlap [lo, hi), in address order."""
    out: list[tuple[int, int, str, str, list[str]]] = []
    keep = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 5)
                if line[0] in "0123456789abcdef" and "-" in head[0]:
                    start_text, _, stop_text = head[0].partition("-")
                    start, stop = int(start_text, 16), int(stop_text, 16)
                    keep = start < hi and stop > lo
                    if keep:
                        out.append((start, stop, head[1], head[5].strip() if len(head) > 5 else "", []))
                elif keep and line.startswith("VmFlags:"):
                    out[-1][4].extend(line[8:].split())
    except OSError:
        raise Refused(errno.ESRCH, "the caller is gone") from None
    return out
