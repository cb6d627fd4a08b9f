"""Host<->guest messages: framed, versioned, size-limited, validated on receipt.

A frame is a 12-byte header followed by a payload:

    struct frame_header {        /* all fields big-endian */
        char     magic[4];       /* "MVSR" */
        uint8_t  version;        /* VERSION */
        uint8_t  kind;           /* Kind */
        uint16_t stream;         /* raw kinds: the exec id the bytes belong to; JSON kinds: 0 */
        uint32_t length;         /* payload bytes, <= MAX_PAYLOAD */
    };

STDOUT/STDERR/STDIN payloads are raw bytes of one command (its exec id in `stream`); every other kind carries a
UTF-8 JSON object whose fields are checked against SCHEMAS (commands are named by an `id` field there). A
stream that loses sync (bad magic, bad version, oversize length) is resynchronised at the next magic; the bytes
skipped are reported as a ProtocolError value, never raised, so neither side can be crashed or
hung by its peer.

Stdlib only: the guest imports this module at boot, so it also avoids `json` (whose decoder compiles regexes
at import), `enum`, `dataclasses` and `typing`, each of which costs ~0.4-0.9 s of TCG code translation in a
fresh guest (bench/boot.py; measured with `python3 -X importtime` as the guest's first process).
JSON goes through `_json`, the C scanner/encoder that `json.loads`/`json.dumps` themselves use. It owns the wire
format and nothing else (no sockets, no files).
"""

from __future__ import annotations

import _json
import struct

from memvisor import contract
from memvisor.errors import ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

MAGIC = b"MVSR"
VERSION = 5  # 2: DUMP/DUMPED; 3: many commands per boot (EXEC, STDIN, KILL, SHUTDOWN; exec ids); 4: MEMCTL;
# 5: ADOPT/ADOPTED (a new daemon takes over a running guest)
MAX_EXEC_ID = 0xFFFF  # exec ids are 1..MAX_EXEC_ID (they travel in the header's 16-bit stream field)
MAX_EXECS = 64  # commands running at once in one guest
HEADER = struct.Struct(">4sBBHI")
MAX_PAYLOAD = 256 * 1024
CHUNK = 64 * 1024  # output is sent in chunks no larger than this
PORT_NAME = contract.PORT_NAME  # the virtio-serial port's name


class MessageKind(int):
    """A message kind: its number on the wire, with a name. One instance per kind, so `is` compares."""

    name: str
    _by_value: dict[int, MessageKind] = {}

    def __new__(cls, value: int, name: str) -> MessageKind:
        self = super().__new__(cls, value)
        self.name = name
        cls._by_value[value] = self
        return self

    def __repr__(self) -> str:
        return f"Kind.{self.name}"


class Kind:
    """Message kinds (what an IntEnum would be, without importing enum at boot); the direction is in the comment."""

    HELLO = MessageKind(1, "HELLO")  # guest -> host: init is ready; boot facts and step timings
    EXEC = MessageKind(2, "EXEC")  # host -> guest: start a command, named by its exec id
    STARTED = MessageKind(3, "STARTED")  # guest -> host: the command was spawned
    STDOUT = MessageKind(4, "STDOUT")  # guest -> host: raw bytes of command `stream`
    STDERR = MessageKind(5, "STDERR")  # guest -> host: raw bytes of command `stream`
    EXIT = MessageKind(6, "EXIT")  # guest -> host: how a command ended, plus guest memory facts
    ERROR = MessageKind(7, "ERROR")  # either way: the peer sent something wrong, or the guest failed
    STATS = MessageKind(8, "STATS")  # guest -> host, every few seconds: memory figures
    DUMP = MessageKind(9, "DUMP")  # host -> guest: write a diagnostic dump (blocked tasks, memory, I/O) to the console
    DUMPED = MessageKind(10, "DUMPED")  # guest -> host: the dump is on the console; a summary of blocked tasks
    STDIN = MessageKind(11, "STDIN")  # host -> guest: raw bytes for command `stream`'s stdin; empty = end of input
    KILL = MessageKind(12, "KILL")  # host -> guest: send a signal to a command's process group
    SHUTDOWN = MessageKind(13, "SHUTDOWN")  # host -> guest: kill every command and power off
    MEMCTL = MessageKind(14, "MEMCTL")  # guest -> host: apply a memctl function code to guest-physical ranges
    MEMCTL_ACK = MessageKind(15, "MEMCTL_ACK")  # host -> guest: what was done with MEMCTL `seq`
    PARK = MessageKind(16, "PARK")  # host -> guest: about to be parked: drop caches, sync, go quiet
    PARKING = MessageKind(17, "PARKING")  # guest -> host: ready to be paused; sends nothing until RESUMED
    RESUMED = MessageKind(18, "RESUMED")  # host -> guest: running again, here is the wall clock; guest -> host: done
    CLONED = MessageKind(19, "CLONED")  # host -> guest: you are a template's clone, be your own; guest -> host: done
    ADOPT = MessageKind(20, "ADOPT")  # host -> guest: a new daemon took over: end every command, forget its streams
    ADOPTED = MessageKind(21, "ADOPTED")  # guest -> host: done; which commands were ended, and whether it is parked

    @staticmethod
    def from_wire(value: int) -> MessageKind:
        """The kind numbered `value`; ValueError if there is none."""
        try:
            return MessageKind._by_value[value]
        except KeyError:
            raise ValueError(f"unknown message kind {value}") from None


RAW_KINDS = frozenset({Kind.STDOUT, Kind.STDERR, Kind.STDIN})

# field -> (allowed types, required). Unknown fields are rejected so typos cannot hide.
_Schema = dict[str, tuple[tuple[type, ...], bool]]
SCHEMAS: dict[MessageKind, _Schema] = {
    Kind.HELLO: {
        "version": ((int,), True),
        "uptime": ((float, int), True),
        "memtotal_kib": ((int,), True),
        "steps": ((list,), True),
        "kernel": ((str,), False),
        "swap": ((dict,), False),
    },
    Kind.EXEC: {
        "id": ((int,), True),
        "argv": ((list,), True),
        "env": ((dict,), False),
        "cwd": ((str,), False),
        "uid": ((int,), False),  # default: the sandbox's workload user (root with the `root` policy)
        "gid": ((int,), False),  # default: the uid (a user's image may name its own group)
        "stdin": ((bool,), False),  # true: STDIN frames follow (else stdin is /dev/null)
        "timeout": ((float, int), False),  # seconds; the guest kills the command's process group after it
    },
    Kind.STARTED: {"id": ((int,), True), "pid": ((int,), True), "uptime": ((float, int), True)},
    Kind.EXIT: {
        "id": ((int,), True),
        "timed_out": ((bool,), False),
        "code": ((int, type(None)), True),
        "signal": ((int, type(None)), True),
        "uptime": ((float, int), True),
        "oom_kills": ((int,), False),  # processes of the command the guest's OOM killer ended (absent: none)
        "meminfo": ((dict,), False),
        "vmstat": ((dict,), False),
        "swaps": ((list,), False),
        "zram": ((dict,), False),
        "psi": ((dict,), False),
        "reclaim": ((dict,), False),
    },
    Kind.ERROR: {"message": ((str,), True), "fatal": ((bool,), False), "id": ((int,), False)},
    Kind.STATS: {
        "uptime": ((float, int), True),
        "meminfo": ((dict,), True),
        "vmstat": ((dict,), False),
        "swaps": ((list,), False),
        "zram": ((dict,), False),
        "psi": ((dict,), False),
        "reclaim": ((dict,), False),  # what the guest cannot give back (guest/memstats.py reclaim)
    },
    Kind.DUMP: {"reason": ((str,), True)},
    Kind.KILL: {"id": ((int,), True), "signal": ((int,), True)},
    Kind.SHUTDOWN: {},
    Kind.MEMCTL: {
        "seq": ((int,), True),  # 1..MAX_MEMCTL_SEQ, echoed in the MEMCTL_ACK
        "code": ((str,), True),  # one of MEMCTL_CODES
        "ranges": ((list,), True),  # [[gpa, length], ...]: page-aligned, non-empty, at most MAX_MEMCTL_RANGES
        "name": ((str,), False),  # SET_VMA_ANON_NAME's name
    },
    Kind.MEMCTL_ACK: {
        "seq": ((int,), True),
        "ok": ((bool,), True),
        "errno": ((int,), True),  # 0, or why not (EOPNOTSUPP, EINVAL, EAGAIN, ...)
        "reason": ((str,), True),  # what was done, or why not
        "bytes": ((int,), True),  # how much memory the code was applied to
        "info": ((dict,), False),  # INFO: code -> "supported" or "unsupported: why"
    },
    Kind.PARK: {},
    Kind.PARKING: {
        "uptime": ((float, int), True),
        "ok": ((bool,), True),  # false: the guest will not park (`reason`), and stays as it was
        "reason": ((str,), False),
        "seconds": ((float, int), False),  # how long dropping caches and syncing took
    },
    Kind.RESUMED: {
        "realtime": ((float, int), False),  # host -> guest: the host's CLOCK_REALTIME, seconds
        "uptime": ((float, int), False),  # guest -> host: its uptime (it continued: not a reboot)
        "clock_step": ((float, int), False),  # guest -> host: how far the guest's wall clock was moved, seconds
        "error": ((str,), False),  # guest -> host: the clock could not be set (why)
    },
    Kind.CLONED: {
        # host -> guest
        "sandbox_id": ((str,), False),  # the clone's sandbox id (its hostname is memvisor-<id>)
        "entropy": ((str,), False),  # hex of CLONE_ENTROPY random bytes, mixed into the guest's RNG
        "realtime": ((float, int), False),  # the host's CLOCK_REALTIME, seconds
        # guest -> host
        "uptime": ((float, int), False),
        "clock_step": ((float, int), False),
        "reseeded": ((bool,), False),  # the RNG was reseeded with the host's entropy (RNDRESEEDCRNG)
        "vmgenid": ((bool,), False),  # the kernel logged its reseed on the new VM generation ID
        "hostname": ((str,), False),
        "swap": ((dict,), False),  # the swap set up after the wake (as HELLO's)
        "seconds": ((float, int), False),
        "error": ((str,), False),  # what failed: the host stops the clone
    },
    Kind.ADOPT: {},
    Kind.ADOPTED: {
        "uptime": ((float, int), True),
        "ended": ((list,), True),  # [[exec id, argv[0]], ...] of the commands it killed, at most MAX_EXECS
        "parked": ((bool,), True),  # between PARKING and RESUMED (the new daemon must resume or park it)
    },
    Kind.DUMPED: {
        "uptime": ((float, int), True),
        "blocked": ((list,), True),  # [[pid, comm, state, wchan], ...], at most MAX_BLOCKED
        "bytes": ((int,), True),  # how much the dump wrote to the console
    },
}
MAX_BLOCKED = 32
# What a new daemon sends before its ADOPT: a dead daemon may have left a frame half written into the channel,
# whose header makes the guest's decoder wait for up to MAX_PAYLOAD more bytes. This many zero bytes complete any
# such frame (it is then refused, or its stdin goes to a command ADOPT ends) and resynchronise the decoder, which
# skips zero bytes up to the next magic.
ADOPT_FILLER = HEADER.size + MAX_PAYLOAD
CLONE_ENTROPY = 32  # bytes of host randomness a clone mixes into its RNG
MAX_SANDBOX_ID = 32
MAX_TEXT = 4096  # characters of a CLONED's hostname or error
# memctl function codes (docs/memctl.md): the Cloud Hypervisor RFC's, named on the wire.
MEMCTL_CODES = ("INFO", "FREE", "REMOVE", "DONTNEED", "PAGEOUT", "MERGEABLE", "UNMERGEABLE", "DONTDUMP", "MLOCK",
                "MUNLOCK", "MPROTECT_NONE", "MPROTECT_R", "MPROTECT_W", "MPROTECT_RW", "SET_VMA_ANON_NAME")
MAX_MEMCTL_RANGES = 4096  # [guest-physical address, length] pairs in one MEMCTL
MAX_GPA = 1 << 52  # x86-64's physical address width at most
PAGE = 4096
MAX_MEMCTL_SEQ = (1 << 31) - 1
MAX_ANON_NAME = 80  # the kernel's limit for PR_SET_VMA_ANON_NAME


class Frame:
    """One decoded frame: `body` is the validated JSON object, or None for raw kinds (see `data`, and `stream`:
    the exec id the bytes belong to)."""

    __slots__ = ("kind", "data", "body", "stream")

    def __init__(self, kind: MessageKind, data: bytes, body: dict[str, Any] | None = None, stream: int = 0) -> None:
        self.kind = kind
        self.data = data
        self.body = body
        self.stream = stream

    def __repr__(self) -> str:
        return f"Frame({self.kind.name}, {self.body if self.body is not None else (self.stream, self.data)!r})"


class _ScanContext:
    """The attributes `_json.make_scanner` reads (what json.JSONDecoder passes it), strict JSON only."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict[str, str] = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        raise ValueError(f"{name} is not allowed")


# typeshed types the context as a JSONDecoder; the C scanner only reads these attributes.
_scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]
_WHITESPACE = " \t\n\r"


def json_loads(text: str) -> object:
    """Strict JSON to Python (like json.loads without NaN/Infinity); ValueError on anything else."""
    stripped = text.strip(_WHITESPACE)
    try:
        value, end = _scan(stripped, 0)
    except StopIteration:
        raise ValueError("not a JSON value") from None
    if end != len(stripped):
        raise ValueError(f"extra data at character {end}")
    return value


def _no_default(obj: object) -> object:
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# markers, default, encoder, indent, key_separator, item_separator, sort_keys, skipkeys, allow_nan
_encode = _json.make_encoder({}, _no_default, _json.encode_basestring_ascii, None, ":", ",", False, False, False)


def json_dumps(value: object) -> str:
    """Compact ASCII JSON (like json.dumps(..., separators=(",", ":"), allow_nan=False))."""
    return "".join(_encode(value, 0))


def encode(kind: MessageKind, body: dict[str, Any] | bytes, stream: int = 0) -> bytes:
    """Serialise one message (raw kinds: of exec `stream`); raises ProtocolError if it would exceed MAX_PAYLOAD
    or break its schema."""
    if kind in RAW_KINDS:
        if not isinstance(body, bytes | bytearray):
            raise ProtocolError(f"{kind.name} carries raw bytes, not {type(body).__name__}")
        if not 1 <= stream <= MAX_EXEC_ID:
            raise ProtocolError(f"{kind.name}: exec id {stream} is not in 1..{MAX_EXEC_ID}")
        payload = bytes(body)
    else:
        stream = 0
        if not isinstance(body, dict):
            raise ProtocolError(f"{kind.name} carries a JSON object, not {type(body).__name__}")
        check(kind, body)
        payload = json_dumps(body).encode()
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"{kind.name} payload is {len(payload)} bytes, over the {MAX_PAYLOAD}-byte limit")
    return HEADER.pack(MAGIC, VERSION, kind, stream, len(payload)) + payload


def encode_output(kind: MessageKind, data: bytes, stream: int) -> Iterator[bytes]:
    """STDOUT/STDERR/STDIN data of exec `stream` split into frames of at most CHUNK bytes."""
    for start in range(0, len(data), CHUNK):
        yield encode(kind, data[start:start + CHUNK], stream)


def check(kind: MessageKind, body: dict[str, Any]) -> None:
    """Validate a JSON body against its kind's schema; raises ProtocolError naming the field."""
    schema = SCHEMAS[kind]
    for name, (types, required) in schema.items():
        if name not in body:
            if required:
                raise ProtocolError(f"{kind.name}: missing field {name!r}")
            continue
        value = body[name]
        # bool is an int subclass; a bool where a number belongs is a bug in the peer.
        if isinstance(value, bool) and bool not in types:
            raise ProtocolError(f"{kind.name}: field {name!r} is a bool, expected {_names(types)}")
        if not isinstance(value, types):
            raise ProtocolError(f"{kind.name}: field {name!r} is {type(value).__name__}, expected {_names(types)}")
    unknown = set(body) - set(schema)
    if unknown:
        raise ProtocolError(f"{kind.name}: unknown field(s) {', '.join(sorted(unknown))}")
    if "id" in schema and "id" in body and not 1 <= body["id"] <= MAX_EXEC_ID:
        raise ProtocolError(f"{kind.name}: exec id {body['id']} is not in 1..{MAX_EXEC_ID}")
    if kind is Kind.CLONED:
        sandbox_id = body.get("sandbox_id", "x")
        if not (sandbox_id.isascii() and sandbox_id.isalnum() and len(sandbox_id) <= MAX_SANDBOX_ID):
            raise ProtocolError(f"CLONED: sandbox_id must be 1..{MAX_SANDBOX_ID} ASCII letters and digits")
        entropy = body.get("entropy", "00" * CLONE_ENTROPY)
        if len(entropy) != 2 * CLONE_ENTROPY or not all(c in "0123456789abcdef" for c in entropy):
            raise ProtocolError(f"CLONED: entropy must be {CLONE_ENTROPY} bytes in lowercase hex")
        if any(len(body.get(name, "")) > MAX_TEXT for name in ("hostname", "error")):
            raise ProtocolError(f"CLONED: hostname and error are at most {MAX_TEXT} characters")
    if kind is Kind.EXEC:
        argv = body["argv"]
        if not argv or not all(is_text(a) for a in argv):
            raise ProtocolError("EXEC: argv must be a non-empty list of UTF-8 strings without NUL")
        env = body.get("env", {})
        if not all(is_text(k) and is_text(v) and k and "=" not in k for k, v in env.items()):
            raise ProtocolError("EXEC: env must map NAME to value strings (UTF-8, no '=' in NAME, no NUL)")
        if not is_text(body.get("cwd", "/")):
            raise ProtocolError("EXEC: cwd must be a UTF-8 string without NUL")
        if not 0 <= body.get("uid", 0) < 1 << 31 or not 0 <= body.get("gid", 0) < 1 << 31:
            raise ProtocolError("EXEC: uid and gid must be in 0..2^31-1")
        if not 0 < body.get("timeout", 1) < 1e9:
            raise ProtocolError("EXEC: timeout must be a positive number of seconds")
    elif kind is Kind.KILL and not 1 <= body["signal"] <= 64:
        raise ProtocolError("KILL: signal must be in 1..64")
    elif kind is Kind.MEMCTL:
        check_memctl(body)
    elif kind is Kind.MEMCTL_ACK and not 1 <= body["seq"] <= MAX_MEMCTL_SEQ:
        raise ProtocolError(f"MEMCTL_ACK: seq {body['seq']} is not in 1..{MAX_MEMCTL_SEQ}")
    elif kind is Kind.ADOPTED:
        ended = body["ended"]
        if len(ended) > MAX_EXECS or not all(_is_ended(row) for row in ended):
            raise ProtocolError(f"ADOPTED: ended must be at most {MAX_EXECS} [exec id, argv0] rows of an id in "
                                f"1..{MAX_EXEC_ID} and a string of at most 64 characters")
    elif kind is Kind.DUMPED:
        blocked = body["blocked"]
        if len(blocked) > MAX_BLOCKED or not all(_is_task(t) for t in blocked):
            raise ProtocolError(f"DUMPED: blocked must be at most {MAX_BLOCKED} [pid, comm, state, wchan] rows "
                                "of an int and three strings of at most 64 characters")


def check_memctl(body: dict[str, Any]) -> None:
    """A MEMCTL's fields beyond their types: a known code, a sequence number in range, and ranges that are
    [address, length] pairs of non-negative, page-aligned integers, each non-empty and under MAX_GPA. Whether
    they lie in the guest's RAM is the host's check (memvisor.host.memctl), which knows the RAM layout."""
    if body["code"] not in MEMCTL_CODES:
        raise ProtocolError(f"MEMCTL: unknown code {body['code'][:40]!r}")
    if not 1 <= body["seq"] <= MAX_MEMCTL_SEQ:
        raise ProtocolError(f"MEMCTL: seq {body['seq']} is not in 1..{MAX_MEMCTL_SEQ}")
    ranges = body["ranges"]
    if len(ranges) > MAX_MEMCTL_RANGES:
        raise ProtocolError(f"MEMCTL: {len(ranges)} ranges, over the limit of {MAX_MEMCTL_RANGES}")
    for pair in ranges:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise ProtocolError("MEMCTL: each range must be an [address, length] pair of integers")
        start, length = pair
        if start < 0 or length <= 0 or start % PAGE or length % PAGE or start + length > MAX_GPA:
            raise ProtocolError(f"MEMCTL: range [{start:#x}, {length:#x}] is not page-aligned, non-empty and "
                                "under 2^52")
    name = body.get("name")
    if name is not None and (not is_text(name) or len(name) > MAX_ANON_NAME):
        raise ProtocolError(f"MEMCTL: name must be text of at most {MAX_ANON_NAME} characters")


def _is_ended(row: object) -> bool:
    """One ADOPTED row: [exec id, argv0]."""
    return (isinstance(row, list) and len(row) == 2 and isinstance(row[0], int) and not isinstance(row[0], bool)
            and 1 <= row[0] <= MAX_EXEC_ID and isinstance(row[1], str) and len(row[1]) <= 64)


def _is_task(row: object) -> bool:
    """One DUMPED row: [pid, comm, state, wchan]."""
    return (isinstance(row, list) and len(row) == 4 and isinstance(row[0], int) and not isinstance(row[0], bool)
            and all(isinstance(x, str) and len(x) <= 64 for x in row[1:]))


def is_text(value: object) -> bool:
    """A string that can become a C string: valid UTF-8 (no lone surrogates) and no NUL."""
    if not isinstance(value, str) or "\0" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _names(types: tuple[type, ...]) -> str:
    return "/".join("null" if t is type(None) else t.__name__ for t in types)


class Decoder:
    """Incremental frame decoder: `feed()` bytes, get back frames and ProtocolErrors (as values)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes buffered but not yet a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame | ProtocolError]:
        """Add bytes; return every complete frame (or error) they finish, in order."""
        self._buf += data
        out: list[Frame | ProtocolError] = []
        while True:
            item = self._next()
            if item is None:
                return out
            out.append(item)

    def _next(self) -> Frame | ProtocolError | None:
        buf = self._buf
        # Zero bytes between frames are a new daemon's ADOPT_FILLER (or its remainder once the frame it completed
        # has been taken): skipped without an error, as no frame can start with them.
        if buf[:1] == b"\0":
            del buf[:len(buf) - len(buf.lstrip(b"\0"))]
        if len(buf) < HEADER.size:
            # A partial header must still start like the magic, else resync now rather than wait.
            if buf and not MAGIC.startswith(bytes(buf[:len(MAGIC)])):
                return self._resync("bad magic")
            return None
        magic, version, kind, stream, length = HEADER.unpack_from(buf)
        if magic != MAGIC:
            return self._resync("bad magic")
        if version != VERSION:
            return self._resync(f"unsupported version {version} (this side speaks {VERSION})")
        if length > MAX_PAYLOAD:
            return self._resync(f"frame length {length} over the {MAX_PAYLOAD}-byte limit")
        if len(buf) < HEADER.size + length:
            return None
        payload = bytes(buf[HEADER.size:HEADER.size + length])
        del buf[:HEADER.size + length]
        try:
            kind_ = Kind.from_wire(kind)
        except ValueError:
            return ProtocolError(f"unknown message kind {kind}")
        if kind_ in RAW_KINDS:
            if stream == 0:
                return ProtocolError(f"{kind_.name} without an exec id")
            return Frame(kind_, payload, stream=stream)
        if stream != 0:
            return ProtocolError(f"{kind_.name} carries stream {stream}; JSON frames carry 0")
        try:
            body = json_loads(payload.decode())
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return ProtocolError(f"{kind_.name}: payload is not JSON ({exc})")
        if not isinstance(body, dict):
            return ProtocolError(f"{kind_.name}: payload is {type(body).__name__}, not an object")
        try:
            check(kind_, body)
        except ProtocolError as exc:
            return exc
        return Frame(kind_, payload, body)

    def _resync(self, why: str) -> ProtocolError:
        """Drop bytes up to the next possible magic and report how many were dropped."""
        nxt = self._buf.find(MAGIC, 1)
        if nxt < 0:
            # Keep a tail that could be the start of a magic split across reads.
            keep = next((k for k in range(len(MAGIC) - 1, 0, -1) if self._buf.endswith(MAGIC[:k])), 0)
            nxt = len(self._buf) - keep
        del self._buf[:nxt]
        return ProtocolError(f"{why}; skipped {nxt} bytes to resynchronise")
