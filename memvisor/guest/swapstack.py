"""Build the guest's swap stack from its settings: disk swap in one of four modes, zram in front.

    plain:          /dev/vdX                                    swap header, swapon prio 10
    encrypted:      /dev/vdX -> crypt aes-xts-plain64 (512-bit)  swap header, swapon prio 10
    authenticated:  /dev/vdX -> integrity (D, no journal) -> crypt capi:aegis128-random (AEAD, 32-byte tags;
                    capi:gcm(aes)-random if aegis128 is missing)  swap header, swapon prio 10
    confidential:   as authenticated, with integrity's tags, superblock and journal on a RAM disk in guest memory
                    (meta_device: /dev/ram0, guest/tagstore.py): the host file holds only ciphertext. With discards
                    (which dm-integrity passes only when it hashes itself): /dev/vdX -> integrity (internal_hash
                    sha256, tags on /dev/ram0, allow_discards) -> crypt aes-xts-plain64 allow_discards
    zram:           /dev/zram0, N% of guest RAM                 swapon prio 100 (used first)

Both crypt tables carry `no_read_workqueue no_write_workqueue`: with the default workqueues, authenticated swap
livelocked under memory pressure (kcryptd spinning in direct reclaim while kswapd waits on it; FACTS.md); doing
the crypto in the submitting context removed the hang.

Keys: getrandom(2) straight into a private page, handed to the kernel keyring as a `logon` key (user space can
never read it back) and zeroed; the crypt table names the key (`:<size>:logon:memvisor:swap-crypt`), so no key
text ever exists, and once dm-crypt has loaded it the keyring entry is invalidated. A key is never logged, never
in a str, never sent to the host, and not in DM_TABLE_STATUS. (The discard variant's SHA-256 is unkeyed: its
tags never leave guest RAM, and the host cannot find other data with the same hash.)

If the kernel lacks what the asked mode needs, setup fails with a SetupError naming the missing feature, unless
allow_weaker_swap: then it steps down confidential -> authenticated -> encrypted -> plain and records a warning.
Guest only, stdlib only.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time

from memvisor import cmdline, contract
from memvisor.errors import SetupError
from memvisor.guest import blockio, dm, integrity, segments, swap, tagstore, zram

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

MODES = ("confidential", "authenticated", "encrypted", "plain")  # strongest first: the step-down order
DISK_SERIAL = contract.SWAP_DISK_SERIAL
DISK_PRIORITY = 10
ZRAM_PRIORITY = 100
SECTOR_ALIGN = 8  # 4 KiB sectors
CRYPT_FLAGS = ("no_read_workqueue", "no_write_workqueue")
# (dm-crypt cipher, /proc/crypto name, key bytes, integrity tag bytes = stored random IV + auth tag)
AEADS = (("capi:aegis128-random", "aegis128", 16, 32), ("capi:gcm(aes)-random", "gcm(aes)", 32, 28))
XTS = ("aes-xts-plain64", 64)
# Where freed swap may be discarded down to the host file (memvisor.policy.DISCARD_MODES, not imported: boot cost).
DISCARD_MODES = ("plain", "encrypted", "confidential")
# confidential with discards: dm-integrity's own hash over the ciphertext, its 32-byte digest the tag. Unkeyed is
# enough: the tags stay in guest RAM, and passing the check with other data means a second preimage of SHA-256.
INTERNAL_HASH = ("sha256", 32)
AEAD_MODES = ("authenticated", "confidential")
INTEGRITY_NAME = "memvisor-swap-integrity"
CRYPT_NAME = "memvisor-swap-crypt"

# Which module groups (memvisor/image/kernel.py) each part needs.
NEEDS = {"plain": ("block",), "encrypted": ("block", "dm", "crypt"),
         "authenticated": ("block", "dm", "crypt", "integrity"),
         "confidential": ("block", "dm", "crypt", "integrity", "ramdisk")}

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


class Missing(Exception):
    """A kernel feature a mode needs is absent (internal: drives the step-down)."""


# include/uapi/linux/keyctl.h, arch/x86/entry/syscalls/syscall_64.tbl
SYS_ADD_KEY, SYS_KEYCTL = 248, 250
KEY_SPEC_PROCESS_KEYRING = -2
KEYCTL_INVALIDATE = 21
KEY_DESCRIPTION = "memvisor:swap-crypt"  # a logon key's description needs a "service:" prefix
PAGE = 4096


def random_key(size: int) -> mmap.mmap:
    """`size` bytes from getrandom(2), written straight into a private page of their own we can wipe (a page, so
    the test-only hand-over can write it with O_DIRECT without a copy; logon_key)."""
    key = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = (ctypes.c_char * size).from_buffer(key)
    got = _libc.getrandom(view, ctypes.c_size_t(size), 0)
    del view
    if got != size:
        wipe(key)
        raise OSError(ctypes.get_errno(), "getrandom failed")
    return key


def wipe(key: mmap.mmap) -> None:
    key[:] = bytes(len(key))
    key.close()


def logon_key(size: int, handover: str | None = None, description: str = KEY_DESCRIPTION) -> int:
    """A fresh random key of `size` bytes in PID 1's process keyring as a `logon` key, which user space can
    never read back (not even root: there is no read operation for the type); the page Python held it in is
    zeroed at once. Returns the key's serial, for KEYCTL_INVALIDATE once dm-crypt has its own copy.
    `handover` (tests only, memvisor.key_handover: tests/vm/test_keydump.py): a disk the key is also written to,
    with O_DIRECT straight from that page, so the test can look for copies of it in a dump of guest RAM and the
    hand-over itself leaves none. `description`: the keyring name the crypt table refers to (the scratch disk has
    its own, guest/scratch.py)."""
    key = random_key(size)
    view = (ctypes.c_char * size).from_buffer(key)
    try:
        if handover is not None:
            fd = os.open(handover, os.O_WRONLY | os.O_DIRECT)
            try:
                os.pwrite(fd, key, 0)
            finally:
                os.close(fd)
        serial = _libc.syscall(SYS_ADD_KEY, b"logon", description.encode(), view, ctypes.c_size_t(size),
                               KEY_SPEC_PROCESS_KEYRING)
    finally:
        del view
        wipe(key)
    if serial < 0:
        err = ctypes.get_errno()
        raise Missing(f"the kernel keyring refused the key {description} ({os.strerror(err)})")
    return int(serial)


def invalidate_key(serial: int) -> None:
    _libc.syscall(SYS_KEYCTL, KEYCTL_INVALIDATE, serial)


def crypt_params(cipher: str, key_size: int, device: str, options: tuple[str, ...],
                 description: str = KEY_DESCRIPTION) -> bytearray:
    """`<cipher> :<size>:logon:<description> 0 <device> 0 <#opts> <opts...>`: dm-crypt takes the key from the
    keyring, so no key text ever exists in Python."""
    return bytearray(f"{cipher} :{key_size}:logon:{description} 0 {device} 0 {len(options)} "
                     f"{' '.join(options)}".encode())


def crypto_available(name: str) -> bool:
    """Whether /proc/crypto lists an algorithm of that name (after its modules are loaded)."""
    with open("/proc/crypto") as f:
        return any(line.split(":", 1)[1].strip() == name for line in f if line.startswith("name"))


class SwapStack:
    """Builds the stack; `report` describes it for the host (no keys in it)."""

    def __init__(self, settings: dict[str, str], load_group: Callable[[str, dict[str, str] | None], list[str]],
                 log: Callable[[str], None]) -> None:
        """`load_group(group, params)` loads a module group of the image (memvisor/image/kernel.py), each module
        with its params if named there, and returns the modules that failed."""
        # Every value as the host decided it (memvisor/contract.py): no default of the guest's own.
        self.size_mib = int(contract.require(settings, "swap_size_mib"))
        self.asked = contract.require(settings, "swap_mode")
        self.allow_weaker = cmdline.parse_bool(contract.require(settings, "allow_weaker_swap"))
        self.discard = cmdline.parse_bool(contract.require(settings, "swap_discard"))
        self.zram_percent = int(contract.require(settings, "zram_percent"))
        self.zram_algorithm = contract.require(settings, "zram_algorithm")
        # Test-only, and the one setting that may be absent: only a test's sandbox sends it (host/sandbox.py).
        self.key_handover = settings.get(contract.KEY_HANDOVER_SETTING) == "1"
        self.load_group = load_group
        self.log = log
        self.report: dict[str, Any] = {"asked": self.asked, "effective": "off", "warnings": [], "devices": []}
        self.aead = AEADS[0]
        self.crypt_dev = (0, 0)
        self.segments: segments.Segments | None = None  # confidential: its swap areas, grown by PID 1 (watch())
        self.timings: dict[str, float] = {}
        self.report["timings"] = self.timings
        self._mark = time.monotonic()

    def _lap(self, name: str) -> None:
        """Record the seconds since the previous lap under `name` (setup time per sub-step, for the report)."""
        now = time.monotonic()
        self.timings[name] = round(self.timings.get(name, 0.0) + now - self._mark, 4)
        self._mark = now

    def build(self, memtotal_kib: int) -> dict[str, Any]:
        """Set everything up; returns the report."""
        start = self._mark = time.monotonic()
        if self.zram_percent:
            self._zram(memtotal_kib)
        if self.asked != "off":
            self._disk()
        self.report["setup_seconds"] = round(time.monotonic() - start, 4)
        return self.report

    def _zram(self, memtotal_kib: int) -> None:
        failed = self.load_group("zram", None)
        if "zram" in failed:
            raise SetupError("zram needs the kernel module zram, which could not be loaded; remove --zram-pct")
        try:
            device = zram.setup(self.zram_algorithm, memtotal_kib * 1024 * self.zram_percent // 100)
            swap.write_header(device, memtotal_kib * 1024 * self.zram_percent // 100, os.urandom(16))
            swap.swapon(device, ZRAM_PRIORITY)
            self._lap("zram")
        except OSError as exc:
            raise SetupError(f"zram setup failed: {exc.strerror or exc}; choose another --zram-algorithm") from None
        self.report["devices"].append({"device": device, "kind": "zram", "priority": ZRAM_PRIORITY,
                                       "algorithm": self.zram_algorithm})

    def _disk(self) -> None:
        candidates = list(MODES[MODES.index(self.asked):]) if self.allow_weaker else [self.asked]
        for mode in candidates:
            try:
                self._require(mode)
                self._lap("modules")
            except Missing as exc:
                if mode == candidates[-1]:
                    hint = "" if self.allow_weaker or mode == "plain" else \
                        "; pass --allow-weaker-swap to step down to a weaker mode"
                    raise SetupError(f"swap mode {mode} is not available: {exc}{hint}") from None
                weaker = candidates[candidates.index(mode) + 1]
                warning = f"swap mode {mode} is not available ({exc}); stepping down to {weaker}"
                self.report["warnings"].append(warning)
                self.log(warning)
                continue
            self._build(mode, blockio.find_disk(DISK_SERIAL))
            self.report["effective"] = mode
            return

    def _require(self, mode: str) -> None:
        """Raise Missing naming the first kernel feature `mode` lacks (loading what it needs)."""
        for group in NEEDS[mode]:
            params = None
            if group == "ramdisk":  # sized from the swap disk (virtio_blk is loaded by then: "block" comes first)
                params = tagstore.module_params(self._tag_store_kib(blockio.find_disk(DISK_SERIAL)[2]))
            failed = self.load_group(group, params)
            if failed:
                raise Missing(f"kernel module {failed[0]} could not be loaded")
        if mode == "plain":
            return
        ctl = dm.DeviceMapper()
        try:
            major = ctl.version()[0]
            if major != dm.DM_VERSION_MAJOR:
                raise Missing(f"device-mapper speaks ioctl interface {major}, memvisor needs {dm.DM_VERSION_MAJOR}")
            targets = ctl.target_versions()
        finally:
            ctl.close()
        for target in ("crypt", "integrity") if mode in AEAD_MODES else ("crypt",):
            if target not in targets:
                raise Missing(f"device-mapper target {target} is not registered")
        if mode == "confidential" and self.discard:
            self.load_group("sha256", None)  # the SIMD versions; the generic sha256 is built in
            if not crypto_available(INTERNAL_HASH[0]):
                raise Missing(f"no {INTERNAL_HASH[0]} hash for dm-integrity")
        elif mode in AEAD_MODES:
            self._choose_aead()

    def _choose_aead(self) -> None:
        """The strongest AEAD the kernel has (docs/swap.md, "Which AEAD"): aegis128, else gcm(aes)."""
        self.load_group("aegis", None)  # aegis128_aesni may fail without AES-NI; the generic aegis128 still works
        if crypto_available("aegis128"):
            self.aead = AEADS[0]
        elif not self.load_group("gcm", None):  # gcm(aes) is a template: listed in /proc/crypto only once used
            self.aead = AEADS[1]
        else:
            raise Missing("no AEAD cipher: neither aegis128 nor gcm(aes) can be loaded")

    @staticmethod
    def _tag_store_kib(disk_sectors: int) -> int:
        """The tag store's size for this disk: room for the largest tag any confidential stack uses."""
        return tagstore.capacity_kib(disk_sectors, max(INTERNAL_HASH[1], *(a[3] for a in AEADS)))

    def _build(self, mode: str, disk: tuple[str, tuple[int, int], int]) -> None:
        device, major_minor, sectors = disk
        # Never under authenticated: its tags are in the host file (policy.validate, DISCARD_MODES).
        discard = self.discard and mode in DISCARD_MODES
        if self.discard and not discard:  # stepped down from confidential: say what is lost with it
            warning = f"swap discards are off: swap mode {mode} cannot take them safely"
            self.report["warnings"].append(warning)
            self.log(warning)
        if discard:
            swap.mark_nonrotational(device.removeprefix("/dev/"))
        usable = sectors - sectors % SECTOR_ALIGN
        table: list[str] = []
        if mode == "plain":
            top = device
        else:
            ctl = dm.DeviceMapper()
            try:
                top, usable, table = self._crypt_stack(ctl, mode, disk, usable, discard)
                if mode == "confidential":
                    self._segments(ctl, usable, table, device, discard)
                    return
            except OSError as exc:
                names = [segments.NAME.format(k) for k in range(segments.MAX_SEGMENTS)] + [CRYPT_NAME, INTEGRITY_NAME]
                for name in names:
                    try:
                        ctl.remove(name)
                    except OSError:
                        pass
                raise SetupError(f"swap mode {mode} setup failed: {exc.strerror or exc}") from None
            finally:
                ctl.close()
        swap.write_header(top, usable * 512, os.urandom(16))
        self._lap("swap_header")
        swap.swapon(top, DISK_PRIORITY, discard)
        self._lap("swapon")
        self.report["devices"].append({"device": top, "kind": "disk", "priority": DISK_PRIORITY, "mode": mode,
                                       "backing": device, "size_bytes": usable * 512, "table": table,
                                       "discard": discard})

    def _segments(self, ctl: dm.DeviceMapper, sectors: int, table: list[str], device: str, discard: bool) -> None:
        """confidential: the crypt device in slices, each a swap area (guest/segments.py); the first two swapped
        on now, the rest by PID 1's watcher (`self.segments.watch()`) as they fill."""
        tags_at = integrity.metadata_start(table[0])
        tag_size = INTERNAL_HASH[1] if discard else self.aead[3]
        self.segments = segments.Segments(self.crypt_dev, sectors, tags_at, tag_size, DISK_PRIORITY, discard,
                                          self.log)
        nodes = self.segments.create(ctl)
        for _ in range(min(2, len(nodes))):
            self.segments.activate()
        self._lap("swapon")
        self.report["tag_store"]["setup_bytes"] = tagstore.used_bytes()  # superblock, journal, first segments
        for k, ((start, length), node) in enumerate(zip(self.segments.slices, nodes, strict=True)):
            self.report["devices"].append({
                "device": node, "kind": "disk", "priority": self.segments.priority_of(k), "mode": "confidential",
                "backing": device,
                "size_bytes": length * 512, "table": [*table, describe(ctl, segments.NAME.format(k))],
                "discard": discard, "segment": k, "offset_bytes": start * 512})

    def _crypt_stack(self, ctl: dm.DeviceMapper, mode: str, disk: tuple[str, tuple[int, int], int],
                     sectors: int, discard: bool) -> tuple[str, int, list[str]]:
        """integrity (authenticated, confidential) and crypt over the disk; returns (top node, sectors, tables)."""
        lower = f"{disk[1][0]}:{disk[1][1]}"
        table: list[str] = []
        cipher, key_size = XTS
        options: tuple[str, ...] = ("sector_size:4096", *CRYPT_FLAGS, *(("allow_discards",) if discard else ()))
        if mode in AEAD_MODES:
            integ, sectors = self._integrity(ctl, mode, disk, discard)
            table.append(describe(ctl, INTEGRITY_NAME))
            lower = f"{integ[0]}:{integ[1]}"
            if not discard:  # the AEAD's tags go down to dm-integrity (discard: dm-integrity hashes itself)
                cipher, _name, key_size, tag_size = self.aead
                options = (f"integrity:{tag_size}:aead", "sector_size:4096", *CRYPT_FLAGS)
        serial = logon_key(key_size, blockio.find_disk(contract.KEY_HANDOVER_SERIAL)[0] if self.key_handover else None)
        params = crypt_params(cipher, key_size, lower, options)
        try:
            crypt = ctl.create(CRYPT_NAME)
            ctl.load(CRYPT_NAME, [dm.Target(0, sectors, "crypt", params)], secret=True)
        finally:
            invalidate_key(serial)  # dm-crypt copied it at table load; nothing else may ever find it
        ctl.resume(CRYPT_NAME)
        self.crypt_dev = crypt
        self._lap("crypt_device")
        self.report["cipher"] = cipher
        table.append(describe(ctl, CRYPT_NAME))
        return ctl.node(crypt), sectors, table

    def _integrity(self, ctl: dm.DeviceMapper, mode: str, disk: tuple[str, tuple[int, int], int],
                   discard: bool) -> tuple[tuple[int, int], int]:
        """The dm-integrity device over the disk: tags interleaved in the host file (authenticated) or on the
        tag store in guest RAM (confidential). Returns its (major, minor) and size in sectors."""
        device, major_minor, _sectors = disk
        meta: tuple[str, tuple[int, int]] | None = None
        internal_hash = None
        tag_size = self.aead[3]
        if mode == "confidential":
            kib = self._tag_store_kib(disk[2])
            meta = tagstore.device(kib)
            tagstore.mount_debugfs()
            if discard:
                internal_hash, tag_size = INTERNAL_HASH
            self.report["tag_store"] = {"device": meta[0], "capacity_bytes": kib * 1024,
                                        "tags": internal_hash or "aead", "tag_bytes": tag_size}
        provided = integrity.format_device(ctl, device, major_minor, tag_size, "memvisor-swap-format", meta)
        self._lap("integrity_format")
        sectors = provided - provided % SECTOR_ALIGN
        integ = ctl.create(INTEGRITY_NAME)
        params = integrity.target_params(f"{major_minor[0]}:{major_minor[1]}", tag_size,
                                         f"{meta[1][0]}:{meta[1][1]}" if meta else None, internal_hash, discard)
        ctl.load(INTEGRITY_NAME, [dm.Target(0, sectors, "integrity", params)])
        ctl.resume(INTEGRITY_NAME)
        self._lap("integrity_device")
        return integ, sectors


def describe(ctl: dm.DeviceMapper, name: str) -> str:
    """`name: start length type params` of a live device (dm.table masks crypt keys)."""
    start, length, type_, params = ctl.table(name)[0]
    return f"{name}: {start} {length} {type_} {params}"
