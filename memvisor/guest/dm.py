"""The device-mapper ioctl ABI on /dev/mapper/control, for the guest (no dmsetup, no libdevmapper).

Mirrors include/uapi/linux/dm-ioctl.h (interface version 4). Every call uses one 16 KiB buffer: fcntl.ioctl
passes buffers of 1024 bytes or more to the kernel in place, so a table holding a key is never copied onto the C
stack, and the buffer is zeroed after each call. Tables holding keys are sent with DM_SECURE_DATA_FLAG so the
kernel wipes its copies too. Guest only, stdlib only.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

CONTROL = "/dev/mapper/control"

# struct dm_ioctl {                       (312 bytes, no implicit padding)
#     __u32 version[3]; __u32 data_size; __u32 data_start; __u32 target_count; __s32 open_count;
#     __u32 flags; __u32 event_nr; __u32 padding; __u64 dev;
#     char name[DM_NAME_LEN /* 128 */]; char uuid[DM_UUID_LEN /* 129 */]; char data[7];
# };
DM_IOCTL = struct.Struct("<3IIIIiIIIQ128s129s7s")
# struct dm_target_spec { __u64 sector_start; __u64 length; __s32 status; __u32 next;
#                         char target_type[DM_MAX_TYPE_NAME /* 16 */]; };  followed by the parameter string
DM_TARGET_SPEC = struct.Struct("<QQiI16s")
# struct dm_target_versions { __u32 next; __u32 version[3]; char name[]; };
DM_TARGET_VERSIONS = struct.Struct("<I3I")
assert DM_IOCTL.size == 312 and DM_TARGET_SPEC.size == 40

DM_VERSION_MAJOR, DM_VERSION_MINOR, DM_VERSION_PATCHLEVEL = 4, 0, 0
BUFFER_SIZE = 16384


def _IOWR(type_: int, nr: int, size: int) -> int:  # noqa: N802 - the kernel's name
    """include/uapi/asm-generic/ioctl.h: _IOC(_IOC_READ|_IOC_WRITE, type, nr, size)."""
    return (3 << 30) | (size << 16) | (type_ << 8) | nr


DM_IOCTL_TYPE = 0xFD
DM_VERSION = _IOWR(DM_IOCTL_TYPE, 0, DM_IOCTL.size)
DM_DEV_CREATE = _IOWR(DM_IOCTL_TYPE, 3, DM_IOCTL.size)
DM_DEV_REMOVE = _IOWR(DM_IOCTL_TYPE, 4, DM_IOCTL.size)
DM_DEV_SUSPEND = _IOWR(DM_IOCTL_TYPE, 6, DM_IOCTL.size)
DM_TABLE_LOAD = _IOWR(DM_IOCTL_TYPE, 9, DM_IOCTL.size)
DM_TABLE_STATUS = _IOWR(DM_IOCTL_TYPE, 12, DM_IOCTL.size)
DM_LIST_VERSIONS = _IOWR(DM_IOCTL_TYPE, 13, DM_IOCTL.size)

# dm_ioctl.flags
DM_STATUS_TABLE_FLAG = 1 << 4
DM_BUFFER_FULL_FLAG = 1 << 8
DM_SECURE_DATA_FLAG = 1 << 15  # the kernel wipes its copy of the ioctl buffer: tables with keys

# libdevmapper.h: udev flags travel in the upper 16 bits of event_nr (the "cookie") and reach udev rules as
# DM_UDEV_* variables. The guest runs no udev, but a host that does must not probe, scan or read our devices:
# a probe read of a never-written sector of an integrity device floods dmesg with errors.
DM_UDEV_FLAGS_SHIFT = 16
DM_UDEV_DISABLE_DM_RULES_FLAG = 0x0001
DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG = 0x0002
DM_UDEV_DISABLE_DISK_RULES_FLAG = 0x0004
DM_UDEV_DISABLE_OTHER_RULES_FLAG = 0x0008
DM_UDEV_DISABLE_LIBRARY_FALLBACK = 0x0020
UDEV_COOKIE = (DM_UDEV_DISABLE_DM_RULES_FLAG | DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG
               | DM_UDEV_DISABLE_DISK_RULES_FLAG | DM_UDEV_DISABLE_OTHER_RULES_FLAG
               | DM_UDEV_DISABLE_LIBRARY_FALLBACK) << DM_UDEV_FLAGS_SHIFT


class Target:
    """One line of a table: `start length type params`. `params` is a bytearray so a key can be wiped."""

    __slots__ = ("start", "length", "type", "params")

    def __init__(self, start: int, length: int, type_: str, params: bytearray) -> None:
        self.start = start
        self.length = length
        self.type = type_
        self.params = params

    def wipe(self) -> None:
        self.params[:] = bytes(len(self.params))


def decode_dev(dev: int) -> tuple[int, int]:
    """The kernel's huge_encode_dev() layout of dm_ioctl.dev -> (major, minor)."""
    return (dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


class DeviceMapper:
    """An open /dev/mapper/control."""

    def __init__(self, path: str = CONTROL) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.buf = bytearray(BUFFER_SIZE)

    def close(self) -> None:
        os.close(self.fd)

    def _call(self, request: int, name: str = "", *, flags: int = 0, event_nr: int = 0, target_count: int = 0,
              data: bytes | bytearray = b"") -> tuple[int, int, int]:
        """One ioctl; returns (flags, dev, data_size) from the reply. The reply data stays in self.buf until
        the next call; callers copy out what they need."""
        buf = self.buf
        buf[:] = bytes(BUFFER_SIZE)
        start = DM_IOCTL.size + 1  # data_start: after the struct (8-byte aligned below)
        start += -start % 8
        if start + len(data) > BUFFER_SIZE:
            raise OSError(errno.EINVAL, f"device-mapper request of {len(data)} bytes is too large", self.path)
        DM_IOCTL.pack_into(buf, 0, DM_VERSION_MAJOR, DM_VERSION_MINOR, DM_VERSION_PATCHLEVEL, BUFFER_SIZE, start,
                           target_count, 0, flags, event_nr, 0, 0, name.encode(), b"", b"")
        buf[start:start + len(data)] = data
        try:
            fcntl.ioctl(self.fd, request, buf, True)
        except OSError as exc:
            buf[:] = bytes(BUFFER_SIZE)
            raise OSError(exc.errno, f"device-mapper {_NAMES.get(request, hex(request))} {name}: {exc.strerror}",
                          self.path) from None
        fields = DM_IOCTL.unpack_from(buf, 0)
        out_flags, dev = fields[7], fields[10]
        if out_flags & DM_BUFFER_FULL_FLAG:
            raise OSError(errno.ENOBUFS, f"device-mapper reply for {name} does not fit {BUFFER_SIZE} bytes", self.path)
        return out_flags, dev, fields[3]

    def version(self) -> tuple[int, int, int]:
        """The kernel's device-mapper interface version."""
        self._call(DM_VERSION)
        major, minor, patch = DM_IOCTL.unpack_from(self.buf, 0)[:3]
        return major, minor, patch

    def target_versions(self) -> dict[str, tuple[int, int, int]]:
        """Loaded target types (crypt, integrity, ...) and their versions."""
        self._call(DM_LIST_VERSIONS)
        data_start = DM_IOCTL.unpack_from(self.buf, 0)[4]
        out: dict[str, tuple[int, int, int]] = {}
        pos = data_start
        while True:
            nxt, v0, v1, v2 = DM_TARGET_VERSIONS.unpack_from(self.buf, pos)
            name_start = pos + DM_TARGET_VERSIONS.size
            name = bytes(self.buf[name_start:self.buf.index(b"\0", name_start)]).decode()
            out[name] = (v0, v1, v2)
            if nxt == 0:
                return out
            pos += nxt

    def create(self, name: str, uuid: str = "") -> tuple[int, int]:
        """DM_DEV_CREATE: a new device with no table; returns its (major, minor)."""
        _, dev, _ = self._call(DM_DEV_CREATE, name, event_nr=UDEV_COOKIE)
        return decode_dev(dev)

    def load(self, name: str, targets: list[Target], *, secret: bool = False) -> None:
        """DM_TABLE_LOAD into the inactive slot. `secret`: the table holds a key (DM_SECURE_DATA_FLAG)."""
        data = bytearray()
        try:
            for i, t in enumerate(targets):
                body = t.params + b"\0"
                size = DM_TARGET_SPEC.size + len(body)
                size += -size % 8
                nxt = size if i < len(targets) - 1 else 0
                spec = bytearray(size)
                DM_TARGET_SPEC.pack_into(spec, 0, t.start, t.length, 0, nxt, t.type.encode())
                spec[DM_TARGET_SPEC.size:DM_TARGET_SPEC.size + len(body)] = body
                data += spec
                body[:] = bytes(len(body))
                spec[:] = bytes(len(spec))
            self._call(DM_TABLE_LOAD, name, target_count=len(targets), data=data,
                       flags=DM_SECURE_DATA_FLAG if secret else 0)
        finally:
            data[:] = bytes(len(data))
            self.buf[:] = bytes(BUFFER_SIZE)

    def resume(self, name: str) -> None:
        """DM_DEV_SUSPEND without DM_SUSPEND_FLAG: make the loaded table live."""
        self._call(DM_DEV_SUSPEND, name, event_nr=UDEV_COOKIE)

    def remove(self, name: str) -> None:
        """DM_DEV_REMOVE."""
        self._call(DM_DEV_REMOVE, name, event_nr=UDEV_COOKIE)

    def table(self, name: str, *, status: bool = False) -> list[tuple[int, int, str, str]]:
        """DM_TABLE_STATUS: the live table (or, with `status`, each target's status line).

        The kernel prints dm-crypt keys in tables; they are overwritten with '-' in the buffer before any
        Python string is made, and the buffer is wiped.
        """
        try:
            self._call(DM_TABLE_STATUS, name, flags=(0 if status else DM_STATUS_TABLE_FLAG) | DM_SECURE_DATA_FLAG)
            header = DM_IOCTL.unpack_from(self.buf, 0)
            data_start, count = header[4], header[5]
            rows = []
            pos = data_start
            for _ in range(count):
                start, length, _status, nxt, ttype = DM_TARGET_SPEC.unpack_from(self.buf, pos)
                p0 = pos + DM_TARGET_SPEC.size
                p1 = self.buf.index(b"\0", p0)
                type_ = ttype.rstrip(b"\0").decode()
                if type_ == "crypt" and not status:
                    _mask_second_word(self.buf, p0, p1)
                rows.append((start, length, type_, bytes(self.buf[p0:p1]).decode()))
                pos = data_start + nxt
            return rows
        finally:
            self.buf[:] = bytes(BUFFER_SIZE)

    def node(self, major_minor: tuple[int, int], timeout: float = 5.0) -> str:
        """The /dev/dm-N node devtmpfs makes for a device (no /dev/mapper symlinks: the guest has no udev)."""
        path = f"/dev/dm-{major_minor[1]}"
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise OSError(errno.ENOENT, "device node did not appear", path)
            time.sleep(0.005)
        return path


def _mask_second_word(buf: bytearray, start: int, end: int) -> None:
    """Overwrite the second space-separated word of buf[start:end] (a crypt key) with '-', unless it names a key
    in the kernel keyring (what memvisor's own tables do)."""
    first = buf.find(b" ", start, end)
    if first < 0:
        return
    second = buf.find(b" ", first + 1, end)
    second = end if second < 0 else second
    if buf[first + 1:first + 2] == b":":  # `:<size>:<type>:<description>`: a keyring reference, not a key
        return
    buf[first + 1:second] = b"-" * (second - first - 1)


_NAMES = {DM_VERSION: "DM_VERSION", DM_DEV_CREATE: "DM_DEV_CREATE", DM_DEV_REMOVE: "DM_DEV_REMOVE",
          DM_DEV_SUSPEND: "DM_DEV_SUSPEND", DM_TABLE_LOAD: "DM_TABLE_LOAD",
          DM_TABLE_STATUS: "DM_TABLE_STATUS", DM_LIST_VERSIONS: "DM_LIST_VERSIONS"}
