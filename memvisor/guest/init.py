"""PID 1 of the guest: a fixed, ordered list of named steps, each timed on the console, then the agent, then
poweroff. Settings come from the kernel command line (memvisor.cmdline, the codec the host encodes them with).

Run as `python3 -SI` (the image's /init is a shebang wrapper that calls main()). It never returns: whatever
happens it ends in sync + poweroff, and a failure is logged to the console first so the host can show it.
Stdlib only, and only cheap imports: see proto.py for why.
"""

from __future__ import annotations

import os
import sys
import time

from memvisor import cmdline, contract, proto
from memvisor.errors import SetupError
from memvisor.guest import agent, cgroups, linux, memstats

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

MODULES_JSON = "/etc/memvisor/modules.json"
SYSRQ_KEYBOARD = 2 | 8  # Documentation/admin-guide/sysrq.rst: console log level, debugging dumps


class Context:
    """What the steps learn and hand on (runtime state, not policy)."""

    def __init__(self) -> None:
        self.settings: dict[str, str] = {}
        self.modules: dict[str, list[str]] = {}
        self.kernel_version = ""
        self.channel: agent.Channel | None = None
        self.steps: list[tuple[str, float]] = []
        self.swap: dict[str, Any] = {}
        self.chroot: str | None = None  # the root commands run in (guest/userroot.py, guest/scratch.py), if any
        self.scratch: dict[str, Any] = {}  # the confidential scratch disk (guest/scratch.py)
        self.waker: Any = None  # a templatable sandbox's clone.Waker (guest/clone.py)

    def flag(self, key: str) -> bool:
        """A boolean setting the host sent (memvisor/contract.py: never a default of the guest's own)."""
        return cmdline.parse_bool(contract.require(self.settings, key))


def log(message: str) -> None:
    """One line on the console, prefixed with the guest uptime."""
    print(f"memvisor-init [{agent.uptime():7.3f}] {message}", flush=True)


def mount_filesystems(ctx: Context) -> None:
    """/proc, /sys and /dev (devtmpfs: the kernel creates device nodes, root-only by default), and the cgroup v2
    tree every command gets a cgroup of its own in (guest/cgroups.py)."""
    for source, target, fstype, flags in (
        ("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC),
        ("sysfs", "/sys", "sysfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC),
        ("devtmpfs", "/dev", "devtmpfs", linux.MS_NOSUID),
    ):
        linux.mount(source, target, fstype, flags)
    # On a shared root, stage 0 started PID 1 in a cgroup that may not swap (memvisor/image/rootfs.py); commands
    # never inherit it: each runs in its own.
    cgroups.mount()
    # The host's stall dump presses Alt+SysRq+9/w/m/4 (host/sandbox.py): allow console log level changes (2)
    # and debugging dumps (8), nothing else (no reboot, sync, remount, kill or nice from the keyboard).
    # /proc/sysrq-trigger, root's own way in, is not gated by this value.
    with open("/proc/sys/kernel/sysrq", "w") as f:
        f.write(str(SYSRQ_KEYBOARD))


def read_settings(ctx: Context) -> None:
    """memvisor.* keys from the kernel command line (and the hostname from the sandbox id); the module load
    order from the image."""
    with open("/proc/cmdline") as f:
        ctx.settings = cmdline.parse(f.read())
    sandbox_id = ctx.settings.get("id", "")
    linux.sethostname(f"memvisor-{sandbox_id}" if sandbox_id.isalnum() else "memvisor")
    with open(MODULES_JSON) as f:
        info = proto.json_loads(f.read())
    assert isinstance(info, dict)
    ctx.modules = info["groups"]
    ctx.kernel_version = info["kernel"]


def load_group(ctx: Context, group: str, params: dict[str, str] | None = None) -> list[str]:
    """Load a group's modules in dependency order (loaded ones are skipped); return the names that failed
    (e.g. refused by the module_blacklist= kernel parameter). A module whose dependency failed is not tried.
    `params`: module name -> its load-time parameters (brd's size, for the confidential swap's tag store)."""
    base = f"/lib/modules/{ctx.kernel_version}"
    failed: list[str] = []
    for relpath in ctx.modules[group]:
        name = relpath.rsplit("/", 1)[-1].removesuffix(".ko").replace("-", "_")
        if failed:
            failed.append(name)
            continue
        try:
            linux.finit_module(f"{base}/{relpath}", (params or {}).get(name, ""))
        except OSError as exc:
            log(f"module {name}: {exc.strerror}")
            failed.append(name)
    return failed


def load_base_modules(ctx: Context) -> None:
    """virtio-pci and virtio-console (the control channel), and virtio-balloon when the policy has one: with
    free-page reporting, pages the guest frees go back to the host."""
    failed = load_group(ctx, "base")
    if failed:
        raise OSError(f"cannot load the kernel modules the control channel needs: {', '.join(failed)}")
    if ctx.flag("balloon") and load_group(ctx, "balloon"):
        log("warning: virtio_balloon could not be loaded: freed memory will not return to the host")


def open_channel(ctx: Context) -> None:
    """Find the virtio-serial port by name and open it."""
    ctx.channel = agent.Channel.open(proto.PORT_NAME, time.monotonic() + 10, log)


def setup_scratch(ctx: Context) -> None:
    """The scratch disk in confidential mode, and the workload's root on it (guest/scratch.py); a plain one is
    stage 0's (image/rootfs.py). Before swap: the two share the RAM disk module their tags live on."""
    if contract.require(ctx.settings, "scratch_mib") == "0" or \
            contract.require(ctx.settings, "scratch_mode") == "plain":
        return
    from memvisor.guest import scratch  # only with a confidential scratch disk

    ctx.scratch, root = scratch.setup(ctx.settings, lambda group, params: load_group(ctx, group, params), log)
    if root is not None:
        ctx.chroot = root
    log(f"scratch disk {ctx.scratch['backing']} as {ctx.scratch['device']} (confidential, {ctx.scratch['cipher']}, "
        f"tags on {ctx.scratch['tag_store']}) at {contract.SCRATCH_MOUNT}; commands run in {root or 'the image root'}; "
        f"seconds: {ctx.scratch['seconds']}")


def setup_swap(ctx: Context) -> None:
    """zram and the disk swap stack, as the settings ask (nothing when they ask for none). A templatable sandbox
    is frozen with swap off: each of its clones sets up its own when it wakes (guest/clone.py), with a key from
    its own reseeded RNG."""
    if ctx.flag("templatable"):
        from memvisor.guest import clone  # only in a templatable sandbox

        def later() -> dict[str, Any]:
            build_swap(ctx)
            return ctx.swap

        ctx.waker = clone.Waker(later, log)
        log("templatable: swap is set up in each clone, when it wakes")
        return
    build_swap(ctx)


def build_swap(ctx: Context) -> None:
    if contract.require(ctx.settings, "swap_size_mib") == "0" and contract.require(ctx.settings, "zram_percent") == "0":
        return
    # Imported here, not at boot: a sandbox without swap should not pay for it (image/python.py ships it).
    from memvisor.guest import swapstack

    stack = swapstack.SwapStack(ctx.settings, lambda group, params: load_group(ctx, group, params), log)
    # PID 1 must never fault on a swapped page: a tampered page would kill init, and with it the VM. On a shared
    # root mlock does not cover DAX mappings: stage 0 put PID 1 in a cgroup that may not swap as well.
    linux.mlockall()
    ctx.swap = stack.build(memstats.meminfo()["MemTotal"])
    if stack.segments is not None:  # confidential: more swap areas, swapped on as the first ones fill
        stack.segments.watch()
    for device in ctx.swap["devices"]:
        log(f"swap on {device['device']} ({device.get('mode', device['kind'])}, priority {device['priority']})")


def setup_user_image(ctx: Context) -> None:
    """The user's image, when the host attached one: mounted as the root commands run in."""
    kind = contract.require(ctx.settings, contract.USER_IMAGE_SETTING)
    if kind == "none":
        return
    if kind not in ("pmem", "blk"):
        raise SetupError(f"memvisor.{contract.USER_IMAGE_SETTING}={kind[:20]!r} is not none, pmem or blk")
    failed = load_group(ctx, f"rootfs_{kind}")
    if failed:
        raise SetupError(f"cannot load the kernel modules the image needs: {', '.join(failed)}")
    from memvisor.guest import userroot  # only with an image

    ctx.chroot = userroot.setup(kind, ctx.flag("memctl"))
    if ctx.waker is not None:
        ctx.waker.chroot = ctx.chroot
    log(f"image root at {ctx.chroot} ({kind})")


STEPS: list[tuple[str, Callable[[Context], None]]] = [
    ("mount_filesystems", mount_filesystems),
    ("read_settings", read_settings),
    ("load_base_modules", load_base_modules),
    ("open_channel", open_channel),
    ("setup_scratch", setup_scratch),
    ("setup_swap", setup_swap),
    ("setup_user_image", setup_user_image),
]


def run_steps(ctx: Context) -> None:
    """Run STEPS in order, logging each with its duration."""
    log("init started")
    for name, step in STEPS:
        start = time.monotonic()
        step(ctx)
        elapsed = time.monotonic() - start
        ctx.steps.append((name, elapsed))
        log(f"step {name} done in {elapsed * 1000:.0f} ms")


def shutdown() -> None:
    """sync and power off; if ACPI poweroff fails, reboot (QEMU runs with -no-reboot, so it exits either way)."""
    os.sync()
    for cmd in (linux.LINUX_REBOOT_CMD_POWER_OFF, linux.LINUX_REBOOT_CMD_RESTART):
        try:
            linux.reboot(cmd)
        except OSError as exc:
            log(f"reboot({cmd:#x}) failed: {exc}")
    # Returning would make the kernel panic ("Attempted to kill init"), which stops the VM too.


def report_fatal(ctx: Context, message: str) -> None:
    """Tell the host why the guest is giving up (if the channel is open)."""
    if ctx.channel is not None:
        try:
            ctx.channel.send(proto.Kind.ERROR, {"message": message, "fatal": True})
        except OSError:
            pass


def main() -> None:
    """The whole life of the guest."""
    ctx = Context()
    try:
        run_steps(ctx)
        assert ctx.channel is not None
        # What the guest has before the host ever inflates the balloon: the base of its reclaim figures.
        memstats.boot_memtotal_kib = memstats.meminfo()["MemTotal"]
        ctx.channel.send(proto.Kind.HELLO, {
            "version": proto.VERSION,
            "uptime": agent.uptime(),
            "memtotal_kib": memstats.boot_memtotal_kib,
            "steps": [[name, round(t, 6)] for name, t in ctx.steps],
            "kernel": os.uname().release,
            "swap": ctx.swap,
        })
        agent.serve(ctx.channel, uid=0 if ctx.flag("root") else contract.WORKLOAD_UID,
                    report=memstats.report, memctl=ctx.flag("memctl"), chroot=ctx.chroot, exec_cgroups=True,
                    clone=ctx.waker)
    except (SetupError, contract.MissingSetting) as exc:  # a clear, expected failure: no traceback
        log(f"FATAL: {exc}")
        report_fatal(ctx, str(exc))
    except BaseException as exc:  # PID 1 must never die with an exception: report it and power off
        import traceback  # only on this path: it is slow to import at boot

        log("FATAL: " + "".join(traceback.format_exception(exc)).replace("\n", "\n    "))
        report_fatal(ctx, f"guest init failed: {exc!r}")
    finally:
        log("powering off")
        sys.stdout.flush()
        shutdown()


if __name__ == "__main__":
    main()
