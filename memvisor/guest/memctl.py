"""memctl for a workload inside a memvisor sandbox: tell the host how to back your own memory.

    import memctl                      # in the sandbox image (memvisor's policy setting memctl must be on)
    memctl.info()                      # {"FREE": "supported", "PAGEOUT": "unsupported: why", ...}
    buf = bytearray(64 << 20)
    memctl.advise(buf, code="FREE")    # the host frees those pages now; the buffer reads zeros afterwards
    memctl.advise(secret, code="MLOCK")    # never swapped by the host (and locked here too)
    memctl.advise(secret, code="MUNLOCK")

`advise(obj_or_address, length=None, code=...)` takes a writable buffer (bytearray, mmap, memoryview, ctypes
array) or an address with a length. Only whole pages inside the range are named: the start is rounded up and
the end down to 4 KiB, so a neighbour's data on a shared page is never touched. Each page must be private
anonymous memory of this process (a buffer, the heap): the library mlock()s the range for the duration of the
call (and keeps it locked after a successful MLOCK), PID 1 checks and translates it (memvisor/guest/memctld.py),
the host acts. Large ranges go in pieces of at most CHUNK bytes, within the default RLIMIT_MEMLOCK.

Returns {"ok": True, "bytes": ..., "ranges": ..., "reason": ...}; raises MemctlError (an OSError: errno
EOPNOTSUPP for a code the host cannot honour, EINVAL, EPERM, EFAULT, EAGAIN ...) with the host's or PID 1's
reason. Command line: `memctl info [--json]`. Stdlib only (ctypes for the addresses and mlock).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys

from memvisor import contract, proto

SOCKET = contract.MEMCTL_SOCKET
PAGE = proto.PAGE
CHUNK = 4 << 20  # bytes per request: under the default 8 MiB RLIMIT_MEMLOCK of an unprivileged process
CODES = tuple(c for c in proto.MEMCTL_CODES if c != "INFO")
TIMEOUT_S = 30.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mlock.argtypes = _libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


class MemctlError(OSError):
    """memctl refused or failed: `errno` and the reason from PID 1 or the host."""


def info() -> dict[str, str]:
    """What the host does with each code: "supported ..." or "unsupported: why"."""
    table = _ask({"op": "info"}).get("info")
    return {str(k): str(v) for k, v in table.items()} if isinstance(table, dict) else {}


def advise(obj_or_address: object, length: int | None = None, code: str = "FREE",
           name: str | None = None) -> dict[str, object]:
    """Apply `code` to the whole pages of a buffer (or of [address, address+length)); see the module doc."""
    if code not in CODES:
        raise MemctlError(errno.EINVAL, f"unknown memctl code {code!r}: one of {', '.join(CODES)}")
    address, size = _span(obj_or_address, length)
    start = -(-address // PAGE) * PAGE
    end = (address + size) // PAGE * PAGE
    total = {"ok": True, "bytes": 0, "ranges": 0, "reason": "nothing to do: no whole page in the range"}
    for piece in range(start, end, CHUNK):
        n = min(CHUNK, end - piece)
        if _libc.mlock(piece, n) != 0:
            err = ctypes.get_errno()
            raise MemctlError(err, f"mlock of {n} bytes failed ({os.strerror(err)}): memctl needs the pages "
                              "locked while it works (RLIMIT_MEMLOCK)")
        keep = False
        try:
            body: dict[str, object] = {"op": "advise", "code": code, "address": piece, "length": n}
            if name is not None:
                body["name"] = name
            answer = _ask(body)
            keep = code == "MLOCK"
        finally:
            if not keep:
                _libc.munlock(piece, n)
        total["bytes"] = int(total["bytes"]) + int(answer.get("bytes", 0))  # type: ignore[call-overload]
        total["ranges"] = int(total["ranges"]) + int(answer.get("ranges", 0))  # type: ignore[call-overload]
        total["reason"] = answer.get("reason", "")
    return total


def _span(obj: object, length: int | None) -> tuple[int, int]:
    if isinstance(obj, int) and not isinstance(obj, bool):
        if length is None or length < 0:
            raise MemctlError(errno.EINVAL, "an address needs a length")
        return obj, length
    try:
        view = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise MemctlError(errno.EINVAL, f"{type(obj).__name__} is not a buffer or an address") from None
    if view.readonly or not view.c_contiguous:
        raise MemctlError(errno.EINVAL, "the buffer must be writable and contiguous")
    size = view.nbytes if length is None else min(length, view.nbytes)
    holder = (ctypes.c_char * view.nbytes).from_buffer(view)
    return ctypes.addressof(holder), size


def _ask(body: dict[str, object]) -> dict[str, object]:
    """One request to PID 1 and its answer; MemctlError unless the answer says ok."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(TIMEOUT_S)
    try:
        try:
            sock.connect(SOCKET)
        except FileNotFoundError:
            raise MemctlError(errno.ENOSYS, "memctl is off in this sandbox: start it with the policy setting "
                              "memctl (memvisor run --memctl)") from None
        sock.send(proto.json_dumps(body).encode())
        data = sock.recv(1 << 16)
    finally:
        sock.close()
    try:
        answer = proto.json_loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        answer = None
    if not isinstance(answer, dict):  # nothing (PID 1 closed: too many clients at once), or garbage
        raise MemctlError(errno.EAGAIN, "PID 1 gave no answer (too many memctl clients at once?): try again")
    if not answer.get("ok"):
        raise MemctlError(int(answer.get("errno") or errno.EIO), str(answer.get("reason", "refused")))
    return answer


def main(argv: list[str] | None = None) -> int:
    """`memctl info [--json]`: what this sandbox's host does with each code."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["info"] or set(args[1:]) - {"--json"}:
        print("usage: memctl info [--json]   (from Python: import memctl; memctl.advise(buf, code=...))",
              file=sys.stderr)
        return 2
    try:
        table = info()
    except OSError as exc:
        print(f"memctl: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if "--json" in args:
        print(proto.json_dumps(table))
    else:
        for code, what in table.items():
            print(f"{code:<18} {what}")
    return 0
