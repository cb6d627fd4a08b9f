"""The memory policy of a sandbox: one typed, frozen value and the single table of its settings.

Each setting is declared once in `SETTINGS`; that declaration drives the CLI flag, the TOML key, the JSON field and
(for settings the guest acts on) the `memvisor.<key>` kernel-command-line key. Partial policies ("layers": the
config file, the flags, the SDK) are plain mappings of field name to an already-coerced value and are merged in
order by `merge()`, which keeps every field.

Stdlib only: the guest init imports this module to decode its kernel command line. Runtime state (pids, paths,
sockets) does not belong here.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memvisor import cmdline
from memvisor.errors import ConfigError, PolicyError


class SwapMode(enum.StrEnum):
    """How the guest swaps to its host-backed disk, weakest first (host/sandbox.py compares modes by this order)."""

    OFF = "off"
    PLAIN = "plain"
    ENCRYPTED = "encrypted"
    AUTHENTICATED = "authenticated"
    CONFIDENTIAL = "confidential"  # authenticated, with the tags in guest RAM: no replay (docs/swap.md)


class ScratchMode(enum.StrEnum):
    """How the guest keeps its scratch disk (docs/image.md, "The scratch disk")."""

    CONFIDENTIAL = "confidential"  # dm-integrity (tags in guest RAM) + dm-crypt AEAD: the host holds ciphertext only
    PLAIN = "plain"  # ext2 straight on the disk: the host reads and can change what the workload wrote


# Modes whose freed swap may be discarded down to the host file. Not authenticated: its tags live in the host file,
# and dm-integrity serves a block whose tag is its discard marker unchecked (docs/swap.md, "Giving freed swap back").
DISCARD_MODES = (SwapMode.PLAIN, SwapMode.ENCRYPTED, SwapMode.CONFIDENTIAL)


ZRAM_ALGORITHMS = ("lzo-rle", "lzo", "lz4", "zstd")
# How the guest gets its root (docs/image.md): the image's shared read-only erofs as an NVDIMM with DAX, or as a
# read-only virtio-blk disk, under a tmpfs overlay; or the older private initramfs copy (for comparison).
ROOTFS_KINDS = ("pmem", "blk", "initramfs")
# A user's image name (memvisor/image/store.py): it becomes a file name.
IMAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
MIN_SCRATCH_MIB = 16
IMAGE_SPEC_KEYS = frozenset({"packages", "pip", "requirements", "copy"})
MIN_SWAP_MIB = 16
# swapon(2) allocates swap_map (1 byte) and swap_cgroup (2 bytes) per 4 KiB slot in guest RAM. Past ~4.7% of
# the guest's memory (64 MiB of swap per MiB of RAM) that bookkeeping can exhaust it during boot: a 32 GiB swap
# (24 MiB of bookkeeping) in a 192 MiB guest panicked with "System is deadlocked on memory".
MAX_SWAP_PER_MIB_RAM = 64


@dataclass(frozen=True)
class Setting:
    """One policy setting and every name it goes by."""

    field: str
    section: str
    key: str
    flag: str
    kind: type
    help: str
    cmdline: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False

    @property
    def toml_key(self) -> str:
        return f"{self.section}.{self.key}"


@dataclass(frozen=True)
class Policy:
    """What a sandbox gets: its size, how it runs, and its memory policy. Immutable; build with `merge()`."""

    memory_mib: int = 256
    memory_floor_mib: int | None = None
    park_after_idle_s: int | None = None  # None: the daemon's default (serve --park-after-idle); 0: never
    cpus: int = 1
    timeout: float | None = None
    root: bool = False
    output_limit_mib: int = 16
    console_log_kib: int = 1024
    max_bad_frames: int = 32
    swap_size_mib: int = 0
    swap_mode: SwapMode | None = None
    allow_weaker_swap: bool = False
    swap_discard: bool = False
    zram_percent: int = 0
    zram_algorithm: str = "lz4"
    ksm: bool = False
    balloon: bool = True
    deflate_on_oom: bool | None = None
    memctl: bool = False
    templatable: bool = False
    rootfs: str = "pmem"
    scratch_mib: int = 0
    scratch_mode: ScratchMode = ScratchMode.CONFIDENTIAL
    image: str | None = None
    # Not a setting: filled in by merge() so reports can tell where each value came from.
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)

    @property
    def balloon_deflates_on_oom(self) -> bool:
        """Whether the guest may take memory back from its balloon rather than OOM-kill: the explicit setting,
        else on whenever there is a balloon."""
        return self.balloon and (self.deflate_on_oom is None or self.deflate_on_oom)

    @property
    def effective_swap_mode(self) -> SwapMode:
        """The swap mode asked for: the explicit one, else `confidential` when a size is given, else off."""
        if self.swap_mode is not None:
            return self.swap_mode
        return SwapMode.CONFIDENTIAL if self.swap_size_mib > 0 else SwapMode.OFF

    def summary(self, swap_in_effect: str | None = None) -> str:
        """One short human line, for `memvisor ps`; `swap_in_effect` is the mode the guest really set up."""
        parts = [f"{self.memory_mib}MiB", f"{self.cpus}cpu"]
        mode = self.effective_swap_mode
        if mode is not SwapMode.OFF:
            shown = swap_in_effect or f"{mode}(asked)"
            parts.append(f"swap={self.swap_size_mib}MiB/{shown}")
        if self.zram_percent:
            parts.append(f"zram={self.zram_percent}%/{self.zram_algorithm}")
        if self.ksm:
            parts.append("ksm")
        if self.memctl:
            parts.append("memctl")
        if self.templatable:
            parts.append("templatable")
        if self.balloon:
            parts.append("balloon")
        if self.root:
            parts.append("root")
        return " ".join(parts)


SETTINGS: tuple[Setting, ...] = (
    Setting("memory_mib", "vm", "memory_mib", "--memory", int, "guest RAM in MiB", minimum=64, maximum=1 << 20),
    Setting("park_after_idle_s", "vm", "park_after_idle_s", "--park-after-idle", int,
            "seconds a daemon sandbox may stay idle (no command running) before the daemon parks it to a sealed "
            "snapshot (docs/parking.md); 0: never; default: the daemon's --park-after-idle",
            minimum=0, maximum=30 * 86400, optional=True),
    Setting("memory_floor_mib", "vm", "floor_mib", "--memory-floor", int,
            "guest RAM in MiB the daemon's supervisor never takes back, beyond what the guest needs (which it "
            "never takes either: its kernel, PID 1, locked memory and a margin; docs/service.md); admission control "
            "reserves the larger of the two", minimum=16, maximum=1 << 20, optional=True),
    Setting("cpus", "vm", "cpus", "--cpus", int, "number of vCPUs", minimum=1, maximum=64),
    Setting("timeout", "run", "timeout", "--timeout", float, "kill the sandbox after this many seconds",
            minimum=0.001, optional=True),
    Setting("root", "run", "root", "--root", bool, "run the command as root in the guest (default: unprivileged)",
            cmdline="root"),
    Setting("output_limit_mib", "run", "output_limit_mib", "--output-limit", int,
            "MiB of each output stream kept when it is collected in memory (SDK, report); past it the result "
            "says truncated and the command keeps running; 0: no limit", minimum=0, maximum=1 << 20),
    Setting("console_log_kib", "run", "console_log_kib", "--console-log", int,
            "KiB of the guest's console kept on disk (the newest; older output is dropped)", minimum=16,
            maximum=1 << 20),
    Setting("max_bad_frames", "run", "max_bad_frames", "--max-bad-frames", int,
            "malformed frames the host takes from a guest before it cuts it off and stops the sandbox",
            minimum=0, maximum=1 << 20),
    Setting("swap_size_mib", "swap", "size_mib", "--swap-size", int, "size of the guest's disk swap in MiB",
            cmdline="swap_size_mib", minimum=0, maximum=1 << 26),
    Setting("swap_mode", "swap", "mode", "--swap-mode", SwapMode,
            "swap mode (default: confidential when a size is given)", cmdline="swap_mode",
            choices=tuple(m.value for m in SwapMode), optional=True),
    Setting("allow_weaker_swap", "swap", "allow_weaker", "--allow-weaker-swap", bool,
            "step down confidential -> authenticated -> encrypted -> plain if the guest kernel lacks the mode",
            cmdline="allow_weaker_swap"),
    Setting("swap_discard", "swap", "discard", "--swap-discard", bool,
            "give freed swap back: the guest discards freed swap clusters and the host file shrinks (plain, "
            "encrypted and confidential; not authenticated; tells the host which slots are free)",
            cmdline="swap_discard"),
    Setting("zram_percent", "zram", "percent", "--zram-pct", int, "zram device size as a percent of guest RAM",
            cmdline="zram_percent", minimum=0, maximum=400),
    Setting("zram_algorithm", "zram", "algorithm", "--zram-algorithm", str, "zram compression algorithm",
            cmdline="zram_algorithm", choices=ZRAM_ALGORITHMS),
    Setting("ksm", "ksm", "enable", "--ksm", bool,
            "let the host merge identical pages of this VMM's memory (a side channel between tenants: off by default)"),
    Setting("balloon", "balloon", "enable", "--balloon", bool,
            "virtio-balloon with free-page reporting: memory the guest frees goes back to the host (default on)",
            cmdline="balloon"),
    Setting("deflate_on_oom", "balloon", "deflate_on_oom", "--deflate-on-oom", bool,
            "let the guest take memory back from the balloon rather than OOM-kill (default on: a guest squeezed "
            "too far must never lose a process, or panic, because of the host)", optional=True),
    Setting("memctl", "memctl", "enable", "--memctl", bool,
            "let the sandbox's workload tell the host how to back its memory (free, lock, ...; docs/memctl.md): "
            "guest RAM becomes a shared memfd", cmdline="memctl"),
    Setting("templatable", "template", "ready", "--templatable", bool,
            "the sandbox may become a template (`memvisor template create NAME --from ID`; docs/templates.md): "
            "guest RAM is a memfd memvisor owns, there is no balloon, and swap is set up in its clones only",
            cmdline="templatable"),
    Setting("rootfs", "image", "rootfs", "--rootfs", str,
            "how the guest gets its root: the image's one shared read-only copy as an NVDIMM with DAX (pmem, "
            "default) or as a read-only virtio-blk disk (blk), or a private copy in guest RAM (initramfs)",
            cmdline="rootfs", choices=ROOTFS_KINDS),
    Setting("scratch_mib", "image", "scratch_mib", "--scratch", int,
            "MiB of per-sandbox scratch disk (a sparse host file, gone with the sandbox) for what the workload writes "
            "to its root, instead of guest RAM (tmpfs); 0: tmpfs", cmdline="scratch_mib", minimum=0,
            maximum=1 << 20),
    Setting("scratch_mode", "image", "scratch_mode", "--scratch-mode", ScratchMode,
            "how the guest keeps its scratch disk: confidential (default: encrypted and authenticated, its tags in "
            "guest RAM, so the host can neither read it nor change or roll back a block unseen) or plain (ext2 "
            "on the bare disk)", cmdline="scratch_mode", choices=tuple(m.value for m in ScratchMode)),
    Setting("image", "image", "name", "--image", str,
            "run in this image of yours (`memvisor image build --name` / `memvisor image import`; docs/image.md) "
            "instead of memvisor's default one; with no command, the image's Entrypoint/Cmd run",
            optional=True),
)

SETTINGS_BY_FIELD = {s.field: s for s in SETTINGS}
DEFAULT = Policy()


def coerce(setting: Setting, raw: object, source: str, *, typed: bool = False) -> object:
    """Turn `raw` (text from a flag or the kernel command line, or a TOML/JSON/SDK value) into the setting's type.

    `typed` sources (TOML, JSON) must use the document's own types: "256" is not a number there.
    Raises PolicyError naming the source, the setting and the value.
    """
    where = f"{source}: {setting.flag}" if source == "flag" else f"{source}: {setting.toml_key}"
    if raw is None and setting.optional:
        return None
    try:
        if typed and isinstance(raw, str) and setting.kind in (int, float, bool):
            raise ValueError(raw)
        if setting.kind is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str):
                return cmdline.parse_bool(raw)
            raise ValueError
        if setting.kind is int:
            if isinstance(raw, bool):
                raise ValueError
            value: Any = int(raw) if isinstance(raw, int | str) else _reject(raw)
        elif setting.kind is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw) if isinstance(raw, int | float | str) else _reject(raw)
        elif issubclass(setting.kind, enum.Enum):
            value = setting.kind(raw)
        else:
            if not isinstance(raw, str):
                raise ValueError
            value = raw
    except ValueError:
        expected = f"choose one of {', '.join(setting.choices)}" if setting.choices else \
            f"expected {_kind_name(setting.kind)}"
        raise PolicyError(f"{where} has invalid value {raw!r}", hint=expected) from None
    if setting.choices and str(value) not in setting.choices:
        raise PolicyError(f"{where} has invalid value {raw!r}", hint=f"choose one of {', '.join(setting.choices)}")
    if setting.minimum is not None and value < setting.minimum:
        raise PolicyError(f"{where} is {value}, below the minimum {setting.minimum:g}")
    if setting.maximum is not None and value > setting.maximum:
        raise PolicyError(f"{where} is {value}, above the maximum {setting.maximum:g}")
    return value


def _reject(raw: object) -> Any:
    raise ValueError(raw)


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(kind, kind.__name__)


def merge(*layers: tuple[str, Mapping[str, object]]) -> Policy:
    """Merge named partial policies in order (later wins) over the defaults, then validate.

    Each layer is (name, {field: coerced value}); unknown fields are a programming error.
    """
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for name, layer in layers:
        for key, value in layer.items():
            if key not in SETTINGS_BY_FIELD:
                raise KeyError(f"unknown policy field {key!r} in layer {name}")
            values[key] = value
            sources[key] = name
    if values.get("templatable") and "balloon" not in values:
        # A clone's balloon would punch holes in the template's sealed RAM: a templatable sandbox has none.
        values["balloon"], sources["balloon"] = False, "templatable"
    policy = Policy(**values, sources=tuple(sorted(sources.items())))  # type: ignore[arg-type]
    validate(policy)
    return policy


def validate(policy: Policy) -> None:
    """Reject values that make no sense together."""
    if policy.swap_mode not in (None, SwapMode.OFF) and policy.swap_size_mib == 0:
        raise PolicyError(f"--swap-mode {policy.swap_mode} needs a swap size", hint="add --swap-size MiB")
    if policy.memory_floor_mib is not None and policy.memory_floor_mib > policy.memory_mib:
        raise PolicyError(f"--memory-floor {policy.memory_floor_mib} MiB is above --memory {policy.memory_mib} MiB",
                          hint="the floor is the part of the guest's memory it always keeps")
    if policy.swap_discard and policy.effective_swap_mode is SwapMode.OFF:
        raise PolicyError("--swap-discard needs disk swap", hint="add --swap-size MiB or drop --swap-discard")
    if policy.swap_discard and policy.effective_swap_mode not in DISCARD_MODES:
        raise PolicyError(
            "--swap-discard cannot be used with authenticated swap: dm-integrity passes discards only with its own "
            "internal hash, and it serves a block whose tag reads all 0xf6 (its discard marker) as authentic; with "
            "the tags in the host file, a host could forge one",
            hint="use --swap-mode confidential (its tags stay in guest RAM) with --swap-discard, or drop it")
    if policy.memctl and policy.ksm:
        raise PolicyError("--memctl and --ksm cannot be used together: memctl backs guest RAM with shared memory "
                          "(a memfd memvisor also maps), and KSM merges only private memory",
                          hint="drop --ksm or --memctl")
    if policy.templatable:
        clash = [flag for flag, on in (("--balloon", policy.balloon), ("--ksm", policy.ksm),
                                       ("--memctl", policy.memctl), ("--scratch", policy.scratch_mib > 0),
                                       ("--rootfs initramfs", policy.rootfs == "initramfs")) if on]
        if clash:
            raise PolicyError(
                f"--templatable cannot be used with {', '.join(clash)}: a template's RAM is one sealed memfd that "
                "its clones map copy-on-write (no balloon may punch holes in it, KSM merges private memory only, "
                "memctl owns guest RAM itself, a scratch disk and an initramfs root would be one copy shared by "
                "every clone)", hint=f"drop {', '.join(clash)}")
    if policy.image is not None and (not IMAGE_NAME.match(policy.image) or ".." in policy.image):
        raise PolicyError(f"--image {policy.image[:80]!r} is not an image name",
                          hint="names are 1-63 characters: a-z, 0-9, '.', '_', '-'; see `memvisor image ls`")
    if policy.deflate_on_oom and not policy.balloon:
        raise PolicyError("--deflate-on-oom needs the balloon", hint="drop --no-balloon or --deflate-on-oom")
    if policy.scratch_mib and policy.rootfs == "initramfs":
        raise PolicyError("--scratch needs a shared root: an initramfs root lives in guest RAM",
                          hint="use --rootfs pmem or blk with --scratch")
    if 0 < policy.scratch_mib < MIN_SCRATCH_MIB:
        raise PolicyError(f"--scratch {policy.scratch_mib} MiB is too small",
                          hint=f"use at least {MIN_SCRATCH_MIB} MiB, or 0 for tmpfs")
    if policy.swap_size_mib > MAX_SWAP_PER_MIB_RAM * policy.memory_mib:
        raise PolicyError(
            f"--swap-size {policy.swap_size_mib} MiB needs ~{policy.swap_size_mib * 3 // 4096} MiB of the guest's "
            f"{policy.memory_mib} MiB for the kernel's swap bookkeeping (3 bytes per 4 KiB)",
            hint=f"use at most {MAX_SWAP_PER_MIB_RAM * policy.memory_mib} MiB of swap, or more --memory")
    if 0 < policy.swap_size_mib < MIN_SWAP_MIB:
        raise PolicyError(f"--swap-size {policy.swap_size_mib} MiB is too small",
                          hint=f"use at least {MIN_SWAP_MIB} MiB, or 0 for no disk swap")


def to_json(policy: Policy) -> dict[str, dict[str, object]]:
    """The policy as nested JSON-ready dicts, one object per TOML section."""
    out: dict[str, dict[str, object]] = {}
    for s in SETTINGS:
        value = getattr(policy, s.field)
        out.setdefault(s.section, {})[s.key] = value.value if isinstance(value, enum.Enum) else value
    return out


def layer_from_mapping(doc: Mapping[str, object], source: str, *, image_spec: bool = False) -> dict[str, object]:
    """Read a TOML document or a JSON policy (same nesting) into a layer; unknown keys are an error.
    `image_spec`: a config file, whose [image] table may also say what the image is built from."""
    known_sections = {s.section for s in SETTINGS}
    layer: dict[str, object] = {}
    for section, table in doc.items():
        if section not in known_sections:
            raise ConfigError(f"{source}: unknown section [{section}]",
                              hint=f"known sections: {', '.join(sorted(known_sections))}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: [{section}] must be a table, not {table!r}")
        by_key = {s.key: s for s in SETTINGS if s.section == section}
        for key, raw in table.items():
            if image_spec and section == "image" and key in IMAGE_SPEC_KEYS:
                continue  # what the image is built from: `memvisor image build` reads those (image/userbuild.py)
            if key not in by_key:
                raise ConfigError(f"{source}: unknown key {section}.{key}",
                                  hint=f"keys in [{section}]: {', '.join(sorted(by_key))}")
            layer[by_key[key].field] = coerce(by_key[key], raw, source, typed=True)
    return layer


def to_toml(policy: Policy) -> str:
    """The policy as a TOML document that `layer_from_mapping(tomllib.loads(...))` reads back."""
    lines: list[str] = []
    for section, table in to_json(policy).items():
        body = [f"{key} = {json.dumps(value)}" for key, value in table.items() if value is not None]
        if body:
            lines += [f"[{section}]", *body, ""]
    return "\n".join(lines)


def to_cmdline(policy: Policy) -> list[str]:
    """Every guest-side setting as a `memvisor.<key>=<value>` kernel command-line word, defaults included and
    decided here (the swap mode as it is in effect): the guest reads them and derives nothing
    (memvisor/contract.py)."""
    explicit = {"swap_mode": policy.effective_swap_mode}
    return [cmdline.word(s.cmdline, explicit.get(s.field, getattr(policy, s.field))) for s in SETTINGS
            if s.cmdline is not None]


def parse_cmdline(text: str) -> dict[str, object]:
    """Decode the guest-side settings of a kernel command line into a typed policy layer (host-side check of
    what the guest will see; the guest itself reads them with memvisor.cmdline)."""
    raw = cmdline.parse(text)
    return {s.field: coerce(s, raw[s.cmdline], "kernel command line") for s in SETTINGS
            if s.cmdline is not None and s.cmdline in raw}
