"""One sandbox's lifecycle on an ExitStack: runtime directory, sockets, VMM process, its commands, teardown.

Everything acquired is registered on the stack as it is acquired, so any failure, Ctrl-C or SIGTERM (the CLI
turns it into an exception) unwinds it: the VMM is asked to quit over QMP, then killed, the sockets closed and
the runtime directory removed. A one-shot sandbox's VMM also dies with memvisor on SIGKILL (launch.py), and the
runtime directory is then swept by the next memvisor command (runtime.py).

A daemon's sandbox (`outlive_owner`) survives its owner instead: its VMM inherits memvisor's own ends of the
control channel and the console (and holds its disks and RAM memfd anyway), so when the daemon dies nothing the
guest sees closes, and its bytes wait in the socket buffers. `Instance.adopt` is the next daemon's way back in:
it takes those descriptors from the VMM with pidfd_getfd(2), checks each is the one recorded in state.json
(device and inode), and rebuilds the session on them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from memvisor import contract, paths, proc, proto
from memvisor import policy as pol
from memvisor.errors import GuestError, MemvisorError
from memvisor.host import ksm, launch, memctl, report, runtime, stall, stats, swapfile
from memvisor.host.channel import HostChannel
from memvisor.host.console import ConsoleLog
from memvisor.host.result import TIMEOUT_EXIT, Collected, OutputFn, RunResult
from memvisor.host.session import Session
from memvisor.host.stall import Stall
from memvisor.host.vmm import Disk, Nvdimm, VMMBackend, VMSpec, backend, qemu
from memvisor.host.vmm.qmp import QMP
from memvisor.image import rootfs as image_rootfs
from memvisor.image import store
from memvisor.image.build import Image

log = logging.getLogger("memvisor")
ADOPT_ANSWER_S = 30.0  # the guest's ADOPTED: it kills its commands (TCG)
LOCKED_RANGES = "memctl-locked.json"  # in the runtime directory: [[offset, length], ...] memctl holds locked
BOOT_TIMEOUT_S = 120.0  # from VMM start to the guest's HELLO; TCG boots take ~4 s
POWEROFF_TIMEOUT_S = 10.0
CONSOLE_TAIL_LINES = 25
# A --debug guest: kernel messages on the console, and hung-task reports after 10 s instead of 120 s.
DEBUG_KERNEL_ARGS = ("loglevel=7", "sysctl.kernel.hung_task_timeout_secs=10")
EXEC_GRACE_S = 10.0  # past an exec's timeout, how long the host waits for the guest's own report



def reserved_kernel_arg(word: str) -> str | None:
    """Why memvisor will not let `word` onto the guest's kernel command line (None: it may). memvisor owns its
    `memvisor.*` settings, what starts the guest's init, the console, and every word it sets itself: a later
    word would override them (the kernel and the guest's init take the last one), so an extra argument could
    weaken the policy the host enforces, e.g. turn authenticated swap into plain."""
    key = word.partition("=")[0]
    if key.startswith("memvisor."):
        return f"memvisor owns the memvisor.* settings ({key})"
    if key in ("init", "rdinit", "console", "earlycon", "earlyprintk"):
        return f"memvisor owns {key}="
    own = {w.partition("=")[0] for w in (*qemu.KERNEL_ARGS, *qemu.PMEM_KERNEL_ARGS, *DEBUG_KERNEL_ARGS)}
    if key in own:
        return f"memvisor sets {key} itself"
    return None


class AdoptError(MemvisorError):
    """A dead daemon's sandbox cannot be taken over: its VMM is gone, or is not the one its state records."""


class Instance:
    """A running sandbox VM. Use as a context manager; `run()` is the one-shot life of `memvisor run`, and
    `exec()` runs commands (many, at once) in a sandbox that stays up until `shutdown()` or `close()`."""

    def __init__(self, policy: pol.Policy, image: Image, vmm: VMMBackend | None = None,
                 sandbox_id: str | None = None, kernel_args: tuple[str, ...] = (),
                 on_warning: Callable[[str], None] | None = None, debug: bool = False,
                 key_handover: Path | None = None, outlive_owner: bool = False,
                 service: dict[str, Any] | None = None) -> None:
        """`kernel_args`: extra guest kernel command-line words (debugging, tests: e.g. module_blacklist=...).
        `on_warning`: called with each warning the sandbox raises (default: logged).
        `debug`: boot the guest with kernel messages on its console and a 10 s hung-task timeout.
        `key_handover`: tests only (tests/vm/test_keydump.py): a file of at least 4 KiB the guest also writes its
        swap key to, so a test can look for copies of the key in a dump of guest RAM. No user path sets it.
        `outlive_owner`: a daemon's sandbox, whose VMM keeps running if this process dies (see the module's
        docstring); the next daemon takes it over with Instance.adopt. `service`: the daemon's own record of it,
        kept in state.json from the start (record() replaces it)."""
        for arg in kernel_args:
            if not arg or any(c.isspace() for c in arg):
                raise MemvisorError(f"kernel argument {arg!r} must be one word without spaces")
            reserved = reserved_kernel_arg(arg)
            if reserved:
                raise MemvisorError(f"kernel argument {arg!r} is refused: {reserved}",
                                    hint="set it through the policy (docs/policy.md), not --kernel-arg")
        self.debug = debug
        self.outlive_owner = outlive_owner
        self.service = service or {}
        self.key_handover = key_handover
        # The user's image (docs/image.md): resolved now, so a wrong name fails before anything starts.
        self.user_image: store.UserImage | None = store.get(policy.image) if policy.image else None
        self.kernel_args = (*DEBUG_KERNEL_ARGS, *kernel_args) if debug else kernel_args
        self.warn = on_warning or log.warning
        self.policy = policy
        self.image = image
        self.vmm = vmm or backend()
        self.id = sandbox_id or runtime.new_id()
        self.name = f"memvisor-{self.id}"
        self.dir: Path | None = None
        self.argv: list[str] = []
        self.process: launch.VMMProcess | None = None
        self.channel: HostChannel | None = None
        self.state: runtime.SandboxState | None = None
        self._stack = contextlib.ExitStack()
        self._stack.callback(self._close_kept_disks)
        self._vmm_socks: list[socket.socket] = []
        self._ksm: bool | None = None
        self.spawned_at = 0.0
        self.last_stats: dict[str, Any] = {}
        # Called (on the channel's reader thread, so it must not block) with each memory report the guest sends:
        # the daemon's supervisor decides on it at once.
        self.on_report: Callable[[], None] | None = None
        self.session: Session | None = None
        # Guest RAM as a memfd memvisor owns (policy memctl, or templatable: snapshot/template.py seals it)
        self.memctl: memctl.Backing | None = None
        self._fds: list[int] = []  # files the VMM inherits
        self.disk_fds: dict[str, int] = {}  # the sandbox's own disks ("swap.img", "scratch.img"): O_RDWR fds
        # Resuming a parked sandbox (snapshot/park.py): its disks, kept as files, instead of new ones: name -> an
        # O_RDWR fd the resume opened without following a link and checked on the descriptor. The Instance owns
        # them (closed by close()), and QEMU gets exactly those files.
        self.kept_disks: dict[str, int] = {}
        self.resume_hello: dict[str, Any] | None = None  # ... and the HELLO its guest sent when it booted
        # A template's clone (snapshot/template.py): the template's sealed RAM memfd, mapped copy-on-write.
        self.clone_ram_fd: int | None = None
        self._adopted_clone = False  # adopted: a clone, whose template memfd this process never had
        self._swap_fd: int | None = None
        self._vmm_user: tuple[int, int] | None = None
        self._hello_seen = False
        self._released = False  # release(): teardown leaves the VMM and its directory alone
        self.failed = False  # keep the console log at teardown
        self.kept_log: Path | None = None  # where that log was kept

    # -- setting up ----------------------------------------------------------------------------------------
    def plan(self) -> list[str]:
        """Create the runtime directory and sockets, and decide the VMM command line (nothing runs yet)."""
        runtime.sweep()
        self.dir = runtime.create(self.id)
        self._stack.callback(self._remove_dir)
        self._stack.callback(self.keep_console)
        me = os.getpid()
        self.state = runtime.SandboxState(
            id=self.id, owner_pid=me, owner_started=runtime.process_start_time(me) or 0.0, created=time.time(),
            runtime_dir=str(self.dir), policy=pol.to_json(self.policy), summary=self.policy.summary(),
            vmm_name=self.name, outlives_owner=self.outlive_owner, hello=self.resume_hello,
            clone=self.clone_ram_fd is not None, service=self.service,
            files={"state": str(self.dir / runtime.STATE), "console": str(self.console_log),
                   "vmm_log": str(self.dir / "vmm.log"), "qmp": str(self.qmp_path)})
        runtime.write_state(self.state)

        self._vmm_user = paths.vmm_user(self.id)  # before anything is created: a bad user is a clear error
        # The VMM opens no file by its path: every one is an fd it inherits (QEMU reopens /proc/self/fd/N for
        # the kernel and initramfs, world-readable images; the swap file is dup'ed from an fd set).
        rootfs = self.policy.rootfs
        initrd = self.image.initramfs if rootfs == "initramfs" else self.image.stage0
        self._fds = [self._open(self.image.vmlinux, os.O_RDONLY), self._open(initrd, os.O_RDONLY)]
        disks: tuple[Disk, ...] = ()
        nvdimms: tuple[Nvdimm, ...] = ()
        # The image's one shared copy, and the user's image if any: opened read-only here, attached read-only
        # (docs/image.md); with an initramfs root the user's image goes on a disk.
        shared = [(self.image.rootfs, contract.ROOTFS_NVDIMM_SLOT, contract.ROOTFS_DISK_SERIAL)] \
            if rootfs != "initramfs" else []
        if self.user_image is not None:
            shared.append((self.user_image.rootfs, contract.IMAGE_NVDIMM_SLOT, contract.IMAGE_DISK_SERIAL))
        for path, slot, serial in shared:
            offset = image_rootfs.erofs_offset(path)  # an image built before the NVDIMM header is refused here
            fd = self._open(path, os.O_RDONLY)
            self._fds.append(fd)
            if rootfs == "pmem":
                nvdimms += (Nvdimm(fd, os.fstat(fd).st_size, slot),)
            else:
                disks += (Disk(path, serial, direct_io=False, fds=(fd,), readonly=True, offset=offset),)
        image_kind = "none" if self.user_image is None else "pmem" if rootfs == "pmem" else "blk"
        words: tuple[str, ...] = (f"memvisor.{contract.USER_IMAGE_SETTING}={image_kind}",)
        if self.policy.effective_swap_mode is not pol.SwapMode.OFF:
            fds, direct = self._held_file("swap.img", self.policy.swap_size_mib, "swap file")
            if not direct:
                self.warn(f"{self.dir} does not support O_DIRECT (tmpfs?): swapped guest pages will stay in the "
                          "host page cache; set MEMVISOR_RUNTIME_DIR to a disk-backed directory")
            self._swap_fd = fds[0]
            disks += (Disk(self.swap_path, contract.SWAP_DISK_SERIAL, direct, discard=self.policy.swap_discard,
                           fds=fds),)
        if self.policy.scratch_mib:
            # Where the workload's writes to its root go instead of guest RAM (docs/image.md).
            fds, direct = self._held_file("scratch.img", self.policy.scratch_mib, "scratch disk")
            disks += (Disk(Path(f"/proc/{os.getpid()}/fd/{fds[0]}"), contract.SCRATCH_DISK_SERIAL,
                           direct_io=direct, discard=True, fds=fds),)
        if self.key_handover is not None:
            fds = (self._open(self.key_handover, os.O_RDWR), self._open(self.key_handover, os.O_RDONLY))
            self._fds += fds
            disks += (Disk(self.key_handover, contract.KEY_HANDOVER_SERIAL, direct_io=False, fds=fds),)
            words += (f"memvisor.{contract.KEY_HANDOVER_SETTING}=1",)
        qmp_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stack.callback(qmp_sock.close)
        qmp_sock.bind(str(self.qmp_path))
        qmp_sock.listen(4)
        self.channel, theirs = HostChannel.pair()
        self._stack.callback(self.channel.close)
        self._stack.callback(theirs.close)
        self._console_sock, console_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stack.callback(self._console_sock.close)
        self._stack.callback(console_theirs.close)
        self._console = ConsoleLog(self.console_log, self.policy.console_log_kib << 10)
        self._stack.callback(self._console.close)
        self._vmm_socks = [qmp_sock, theirs, console_theirs]
        if self.clone_ram_fd is not None:
            ram_fd, ram_shared = self._open(Path(f"/proc/self/fd/{self.clone_ram_fd}"), os.O_RDONLY), False
            self._fds.append(ram_fd)
        elif self.policy.memctl or self.policy.templatable:  # guest RAM in a memfd memvisor owns
            self.memctl = memctl.Backing(self.policy.memory_mib, sealable=self.policy.templatable)
            self._stack.callback(self.memctl.close)
            ram_fd, ram_shared = self.memctl.fd, True
        else:
            ram_fd, ram_shared = None, True
        spec = VMSpec(
            name=self.name, memory_mib=self.policy.memory_mib, cpus=self.policy.cpus,
            kernel=Path(f"/proc/self/fd/{self._fds[0]}"), initrd=Path(f"/proc/self/fd/{self._fds[1]}"),
            cmdline=(f"memvisor.id={self.id}", *pol.to_cmdline(self.policy), *words, *self.kernel_args),
            console_fd=console_theirs.fileno(), qmp_fd=qmp_sock.fileno(), channel_fd=theirs.fileno(),
            ksm=self.ksm_in_effect(), disks=disks, balloon=self.policy.balloon,
            deflate_on_oom=self.policy.balloon_deflates_on_oom, nvdimms=nvdimms,
            ram_fd=ram_fd, ram_shared=ram_shared, incoming=self.resume_hello is not None)
        self.argv = self.vmm.command(spec)
        return self.argv

    @property
    def is_clone(self) -> bool:
        """Its guest RAM maps a template's (privately): memvisor does not own it."""
        return self.clone_ram_fd is not None or self._adopted_clone

    # -- taking over a dead daemon's sandbox -------------------------------------------------------------------
    @classmethod
    def adopt(cls, state: runtime.SandboxState, image: Image, vmm: VMMBackend | None = None,
              on_warning: Callable[[str], None] | None = None) -> Instance:
        """Take over a daemon's sandbox whose daemon died (runtime.orphans(): `state` is its state.json): the
        VMM's pidfd, memvisor's ends of its channel and console and its disks and RAM memfd (pidfd_getfd, each
        checked against the device and inode recorded), the runtime directory (its owner is now this process),
        and a session that knows the guest's HELLO. The guest is not spoken to yet (its VM may be paused): the
        caller decides about the VM, then calls take_over(). AdoptError if it cannot be taken over; the VMM is
        then left as it was (the caller decides)."""
        if state.hello is None:
            raise AdoptError(f"sandbox {state.id} was still booting (its guest had not reported ready)")
        if state.hello.get("version") != proto.VERSION:
            raise AdoptError(f"sandbox {state.id}'s guest speaks protocol {state.hello.get('version')}, this memvisor "
                             f"{proto.VERSION}: a daemon of another version left it")
        try:
            policy = pol.merge(("adopted", pol.layer_from_mapping(state.policy, f"sandbox {state.id}")))
        except MemvisorError as exc:
            raise AdoptError(f"sandbox {state.id}: its recorded policy: {exc.message}") from None
        inst = cls(policy, image, vmm, sandbox_id=state.id, on_warning=on_warning, outlive_owner=True)
        try:
            inst._take_descriptors(state)
        except BaseException:
            inst._stack.pop_all().close()  # closes what was taken; leaves the VMM and its directory alone
            raise
        return inst

    def _take_descriptors(self, state: runtime.SandboxState) -> None:
        pid = state.vmm_pid
        if pid is None or not runtime.same_process(pid, state.vmm_started):
            raise AdoptError(f"the VMM of sandbox {state.id} (pid {pid}) is gone")
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            raise AdoptError(f"the VMM of sandbox {state.id} (pid {pid}) is gone") from None
        process = launch.Adopted(pid, pidfd)
        self._stack.callback(process.close)
        if not runtime.same_process(pid, state.vmm_started) or not runtime.is_vmm(pid, state):
            raise AdoptError(f"pid {pid} is no longer the VMM of sandbox {state.id}")
        taken: dict[str, int] = {}
        for name, (number, dev, ino) in state.kept_fds.items():
            fd = _take_fd(pidfd, pid, number, dev, ino)
            if fd is None:
                raise AdoptError(f"the VMM of sandbox {state.id} (pid {pid}) no longer holds its {name}")
            self._stack.callback(os.close, fd)
            taken[name] = fd
        missing = {"channel", "console"} - set(taken)
        if missing:
            raise AdoptError(f"sandbox {state.id} records no {' or '.join(sorted(missing))} to take over")
        self.dir = Path(state.runtime_dir)
        self.state = state
        self.service = dict(state.service)
        self.process = process
        self._adopted_clone = state.clone
        # The console's own descriptor: the stack closes the duplicate taken above, the socket closes its own.
        self._console_sock = socket.socket(fileno=os.dup(taken["console"]))
        self._stack.callback(self._console_sock.close)
        self.channel = HostChannel(socket.socket(fileno=os.dup(taken["channel"])))
        self._stack.callback(self.channel.close)
        self._console = ConsoleLog(self.console_log, self.policy.console_log_kib << 10)
        self._stack.callback(self._console.close)
        for name, fd in taken.items():
            if name.startswith("disk:"):
                self.disk_fds[name.removeprefix("disk:")] = fd
        self._swap_fd = self.disk_fds.get("swap.img")
        if "ram" in taken:
            self.memctl = memctl.Backing(self.policy.memory_mib, fd=os.dup(taken["ram"]))
            self._stack.callback(self.memctl.close)
            self._relock()
        # From here on the teardown stops the VMM and removes the directory, as for a sandbox this process started.
        self._stack.callback(self._remove_dir)
        self._stack.callback(self.keep_console)
        self._stack.callback(self._stop_vmm)
        self.spawned_at = time.monotonic()
        self._hello_seen = True
        self.session = Session(self.channel, pid, on_stats=self._store_guest_stats,
                               on_memctl=self._memctl_request if self.memctl and self.policy.memctl else None,
                               console=(self._console_sock, self._console.write),
                               max_bad_frames=self.policy.max_bad_frames, hello=state.hello)
        self._stack.callback(self.session.close)
        me = os.getpid()
        state.owner_pid, state.owner_started = me, runtime.process_start_time(me) or 0.0
        runtime.write_state(state)

    def _memctl_request(self, body: dict[str, Any]) -> dict[str, Any]:
        """A guest's MEMCTL (on the channel's reader thread). The ranges memvisor holds locked for the guest are
        kept in the runtime directory as they change: its mlock dies with this process, and a daemon that adopts
        the sandbox locks them again (_relock)."""
        assert self.memctl is not None and self.dir is not None
        answer = self.memctl.handle(body)
        if answer.get("ok") and body.get("code") in ("MLOCK", "MUNLOCK") and self.outlive_owner:
            runtime.write_json(self.dir / LOCKED_RANGES, self.memctl.locked_ranges(), durable=True)
        return answer

    def _relock(self) -> None:
        """Lock again what a dead daemon held locked for an adopted guest (its memctl MLOCKs)."""
        assert self.memctl is not None and self.dir is not None
        try:
            ranges = json.loads((self.dir / LOCKED_RANGES).read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self.warn(f"sandbox {self.id}: cannot read the ranges its memctl had locked: {exc}")
            return
        spans = [(int(a), int(b)) for a, b in ranges] if isinstance(ranges, list) and all(
            isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) for r in ranges) else None
        if spans is None:
            self.warn(f"sandbox {self.id}: its {LOCKED_RANGES} is malformed: nothing locked again")
            return
        try:
            self.memctl.lock_ranges(spans)
        except (OSError, ValueError) as exc:
            self.warn(f"sandbox {self.id}: cannot lock again what its memctl had locked: {exc}")

    def take_over(self) -> dict[str, Any]:
        """Tell an adopted guest a new daemon has it (ADOPT, after the filler that resynchronises its decoder):
        it ends every command the dead daemon had started. Returns its ADOPTED answer ({ended, parked}).
        MemvisorError if it does not answer (its VM must be running)."""
        assert self.session is not None
        try:
            self.session.channel.sendraw(bytes(proto.ADOPT_FILLER))
            return self.session.ask(proto.Kind.ADOPT, {}, proto.Kind.ADOPTED, ADOPT_ANSWER_S)
        except (OSError, TimeoutError, ConnectionError) as exc:
            raise MemvisorError(f"the guest of sandbox {self.id} did not answer its new daemon: {exc}") from None

    def ksm_in_effect(self) -> bool:
        """Whether this VMM's memory will be mergeable: asked for, and possible here (warns once if not)."""
        if not self.policy.ksm:
            return False
        if self._ksm is None:
            reason = ksm.merge_supported()
            if reason:
                self.warn(f"KSM asked for but not available: {reason}; the sandbox runs without KSM")
            elif not ksm.state().running:
                self.warn("KSM is on for this sandbox but ksmd is not running, so nothing will be merged: "
                          "run `memvisor ksm start` (or echo 1 > /sys/kernel/mm/ksm/run)")
            self._ksm = reason is None
        return self._ksm

    @property
    def console_log(self) -> Path:
        assert self.dir is not None
        return self.dir / "console.log"

    @property
    def swap_path(self) -> Path:
        """The swap file, which has no name on disk: memvisor's own open fd to it (readable by root)."""
        assert self._swap_fd is not None
        return Path(f"/proc/{os.getpid()}/fd/{self._swap_fd}")

    def _held_file(self, name: str, size_mib: int, what: str) -> tuple[tuple[int, int], bool]:
        """The VMM's disk `name`, opened O_RDWR and O_RDONLY (QEMU dups one of each from its fd set): a new sparse
        file in the runtime directory with no name (O_TMPFILE: held open, so a SIGKILL leaves nothing behind,
        and a park can still name it), or, when resuming, the parked sandbox's file. Returns the two fds and
        whether the file's filesystem takes O_DIRECT."""
        assert self.dir is not None
        kept = self.kept_disks.get(name)
        if kept is not None:
            rw = kept  # closed with the other kept disks
        else:
            rw = swapfile.create_unnamed(self.dir, size_mib, what)
            self._stack.callback(os.close, rw)
        fds = (rw, self._open(Path(f"/proc/self/fd/{rw}"), os.O_RDONLY))
        self._fds += fds
        self.disk_fds[name] = rw
        return fds, swapfile.supports_direct_io(f"/proc/self/fd/{rw}")

    def _close_kept_disks(self) -> None:
        for fd in self.kept_disks.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kept_disks = {}

    def _open(self, path: Path, flags: int) -> int:
        fd = os.open(path, flags | os.O_CLOEXEC)
        self._stack.callback(os.close, fd)
        return fd

    @property
    def qmp_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "qmp.sock"

    def start(self) -> None:
        """Plan (if not done) and start the VMM. The VMM dies with the thread that calls this (PR_SET_PDEATHSIG
        is per thread): call it from a thread that outlives the sandbox (the daemon has one for that)."""
        if not self.argv:
            self.plan()
        assert self.dir is not None and self.state is not None
        self.spawned_at = time.monotonic()
        fds = [s.fileno() for s in self._vmm_socks] + self._fds + ([self.memctl.fd] if self.memctl else [])
        assert self.channel is not None
        kept = self._kept_fds()
        if self.outlive_owner:  # memvisor's own ends too: the VMM holds them (untouched) for the next daemon
            fds += [kept["channel"][0], kept["console"][0]]
        self.process = launch.spawn_vmm(self.argv, pass_fds=tuple(fds), user=self._vmm_user,
                                        log=self.dir / "vmm.log", ksm=self.ksm_in_effect(),
                                        huge_pages=not self.policy.balloon, outlive_owner=self.outlive_owner)
        self._stack.callback(self._stop_vmm)
        self.session = Session(self.channel, self.process.pid, on_stats=self._store_guest_stats,
                               on_memctl=self._memctl_request if self.memctl and self.policy.memctl else None,
                               console=(self._console_sock, self._console.write),
                               max_bad_frames=self.policy.max_bad_frames, hello=self.resume_hello)
        self._stack.callback(self.session.close)
        for sock in self._vmm_socks:  # the VMM has its copies now
            sock.close()
        self.state.vmm_pid = self.process.pid
        if self._swap_fd is not None:  # memvisor's own fd to it (QEMU dups the fds of an -add-fd set)
            self.state.files["swap"] = str(self.swap_path)
        self.state.vmm_started = runtime.process_start_time(self.process.pid)
        if self.outlive_owner:
            self.state.kept_fds = kept
        runtime.write_state(self.state)

    def _kept_fds(self) -> dict[str, list[int]]:
        """What a next daemon takes over from this VMM (runtime.SandboxState.kept_fds): memvisor's ends of the
        channel and console, the disks' read-write descriptors, the guest RAM memfd memvisor owns; each with the
        device and inode that prove it is the same file. The VMM inherits them at these very numbers."""
        assert self.channel is not None
        fds = {"channel": self.channel.sock.fileno(), "console": self._console_sock.fileno(),
               **{f"disk:{name}": fd for name, fd in self.disk_fds.items()}}
        if self.memctl is not None:
            fds["ram"] = self.memctl.fd
        kept = {}
        for name, fd in fds.items():
            st = os.fstat(fd)
            kept[name] = [fd, st.st_dev, st.st_ino]
        return kept

    def record(self, **changes: Any) -> None:
        """Update the daemon's own record of this sandbox in its state.json (durably), for the next daemon."""
        self.service = {**self.service, **changes}
        if self.state is not None:
            self.state.service = self.service
            runtime.write_state(self.state)

    def __enter__(self) -> Instance:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the VMM if it still runs and release everything."""
        self._stack.close()

    # -- running a command ---------------------------------------------------------------------------------
    def wait_ready(self, deadline: float = float("inf")) -> dict[str, Any] | None:
        """Wait until the guest's agent is up (its HELLO); return the HELLO, or None if `deadline` (monotonic)
        passed first. Raises GuestError if the guest failed to set up, died, or took BOOT_TIMEOUT_S."""
        assert self.session is not None
        limit = min(deadline, self.spawned_at + BOOT_TIMEOUT_S)
        # Short waits: the main thread stays responsive to signals whatever thread the kernel handed them to.
        while not self.session.ready.wait(min(1.0, max(0.0, limit - time.monotonic()))):
            if time.monotonic() >= limit:
                break
        if self.session.fatal is not None:
            self.failed = True
            # Set-up errors are already one clear line; an init crash shows the console too.
            crash = self.session.fatal.startswith("guest init failed")
            raise GuestError(f"the sandbox failed to start: {self.session.fatal}",
                             console_tail=self.console_tail() if crash else "")
        if self.session.hello is None:
            if self.session.gone.is_set():
                self._raise_death()
            if time.monotonic() >= deadline:
                return None
            self.failed = True
            raise GuestError(f"the guest did not report ready within {BOOT_TIMEOUT_S:.0f} s",
                             console_tail=self.console_tail())
        if not self._hello_seen:
            self._hello_seen = True
            hello = self.session.hello
            if hello["version"] != proto.VERSION:
                raise GuestError(f"the guest speaks protocol {hello['version']}, the host {proto.VERSION}",
                                 hint="rebuild the image")
            self.swap_ready(hello.get("swap") or {})
            assert self.state is not None
            if self.state.hello != hello:  # what a next daemon gives the session it rebuilds
                self.state.hello = hello
                runtime.write_state(self.state)
        return self.session.hello

    def exec(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
             uid: int | None = None, stdin: bytes | None = None, timeout: float | None = None,
             on_stdout: OutputFn | None = None, on_stderr: OutputFn | None = None) -> RunResult:
        """Run one command in the running sandbox and wait for its end; other commands may run at the same
        time (from other threads). `stdin`: bytes fed to it, then end of input (None: /dev/null). `timeout`:
        the guest kills the command's process group after that many seconds (exit 124, `timed_out`); the host
        gives up EXEC_GRACE_S later if the guest never reports. Output goes to the callbacks, or is collected
        in the result."""
        assert self.session is not None
        argv, env, cwd, uid, gid = self.image_defaults(argv, env, cwd, uid)
        self.wait_ready()
        out, err = self._collectors()
        command = self.session.begin(argv, env=env, cwd=cwd, uid=uid, gid=gid, stdin=stdin is not None,
                                     timeout=timeout,
                                     on_stdout=on_stdout or out.extend, on_stderr=on_stderr or err.extend)
        try:
            if stdin is not None:
                self.session.write_stdin(command, stdin)
                if stdin:
                    self.session.write_stdin(command, b"")
            limit = time.monotonic() + timeout + EXEC_GRACE_S if timeout else float("inf")
            while not command.done.wait(min(1.0, max(0.0, limit - time.monotonic()))):
                if time.monotonic() >= limit:
                    self.session.kill(command)
                    return RunResult.of(TIMEOUT_EXIT, None, None, True, out, err)
            if command.refused is not None:
                raise MemvisorError(f"sandbox {self.id} refused the command: {command.refused}",
                                    hint="run it again: the sandbox is resumed first if it was being parked")
            if command.exit is None:
                self._raise_death()
            return self._exit_result(command.exit, out, err)
        finally:
            self.session.finish(command)

    def image_defaults(self, argv: list[str], env: dict[str, str] | None, cwd: str | None, uid: int | None
                       ) -> tuple[list[str], dict[str, str] | None, str | None, int | None, int | None]:
        """A command as it runs in the user's image (docs/image.md): the image's Env under the caller's, its
        WorkingDir unless the caller names one, its User (and group) unless the caller or the policy's `root`
        decides (an image whose User is root runs as root, as its author asked), and its Entrypoint + Cmd when
        no command is given. Without a user's image, the command as given. Returns argv, env, cwd, uid, gid."""
        if self.user_image is None:
            if not argv:
                raise MemvisorError("no command to run", hint="give one after `--`, or run an image with a Cmd "
                                                              "(--image)")
            return argv, env, cwd, uid, None
        config = self.user_image.config
        if not argv:
            argv = config.default_argv()
            if not argv:
                raise MemvisorError(f"image {self.user_image.name!r} has no Entrypoint or Cmd",
                                    hint="give the command to run after `--`")
        gid = None
        if uid is None:
            uid, gid = (0, 0) if self.policy.root else (config.uid, config.gid)
        return argv, {**config.env_dict(), **(env or {})}, cwd or config.working_dir or "/", uid, gid

    def shutdown(self) -> None:
        """Ask the guest to power off (killing what still runs) and wait for the VMM to exit; teardown kills
        it if it does not."""
        assert self.session is not None and self.process is not None
        with contextlib.suppress(OSError):
            self.session.send(proto.Kind.SHUTDOWN, {})
        self._wait_poweroff()

    def run(self, argv: list[str], *, env: dict[str, str] | None = None, on_stdout: OutputFn | None = None,
            on_stderr: OutputFn | None = None, on_phase: Callable[[str], None] | None = None) -> RunResult:
        """The one-shot life of `memvisor run`: wait for the guest, run `argv`, power off. The policy's timeout
        counts from the VMM's start, boot included; when it passes, the guest is asked for a diagnostic dump
        and the result says `timed_out` (exit 124)."""
        assert self.process is not None and self.session is not None
        argv, env, cwd, uid, gid = self.image_defaults(argv, env, None, None)
        out, err = self._collectors()
        emit_out = on_stdout or out.extend
        emit_err = on_stderr or err.extend
        phase = on_phase or (lambda _p: None)
        timeout = self.policy.timeout
        deadline = self.spawned_at + timeout if timeout else float("inf")
        marks: dict[str, float] = {}
        phase("booting")
        hello = self.wait_ready(deadline)
        if hello is None:
            diagnosis = self._diagnose(f"--timeout of {timeout:g} s passed", ready=False)
            return self._timed_out(out, err, marks, None, None, diagnosis)
        marks["hello"] = self.session.hello_at
        phase("running")
        command = self.session.begin(argv, env=env, cwd=cwd, uid=uid, gid=gid, on_stdout=emit_out,
                                     on_stderr=emit_err)
        try:
            while not command.done.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    diagnosis = self._diagnose(f"--timeout of {timeout:g} s passed", ready=True)
                    if command.started is not None:
                        marks["started"] = command.started_at
                    return self._timed_out(out, err, marks, hello, command.started, diagnosis)
            if command.exit is None:
                self._raise_death()
        finally:
            self.session.finish(command)
        if command.started is not None:
            marks["started"] = command.started_at
        marks["exit"] = command.ended_at
        assert command.exit is not None
        phase("stopping")
        self.shutdown()
        result = self._exit_result(command.exit, out, err)
        result.report = self._report(result, marks, hello, command.started, command.exit)
        return result

    def _raise_death(self) -> NoReturn:
        """The VMM exited (or the channel closed) with work outstanding: say why, with the console."""
        assert self.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=POWEROFF_TIMEOUT_S)
        self.failed = True
        raise GuestError(self._death_message(), console_tail=self.console_tail())

    def _diagnose(self, reason: str, ready: bool) -> Stall:
        """Have the guest kernel report its blocked tasks, ask PID 1 for its dump (if the agent is up) and wait
        up to DUMP_TIMEOUT_S for it; then keep the console log. Never raises on what the guest does."""
        assert self.session is not None
        self.failed = True
        kernel = stall.kernel_dump(self.qmp_path, self.console_log, restore_level=7 if self.debug else 4)
        if ready and not self.session.gone.is_set():
            try:
                self.session.send(proto.Kind.DUMP, {"reason": reason})
                self.session.dump_done.wait(stall.DUMP_TIMEOUT_S)
            except OSError as exc:
                log.warning("could not ask the guest for its dump: %s", exc)
        summary = self.session.dumped
        kept = self.keep_console()
        blocked = stall.parse_blocked(stall.read_end(self.console_log)) if kernel else []
        return Stall(blocked=blocked or (summary or {}).get("blocked", []), dumped=summary is not None,
                     last_stats=self.last_stats, console_log=str(kept) if kept else None,
                     console_tail=self.console_tail())

    def _store_guest_stats(self, body: dict[str, Any]) -> None:
        """Keep the guest's latest memory figures where `memvisor stats` (another process) can read them."""
        assert self.dir is not None
        self.last_stats = body
        runtime.write_json(self.dir / stats.GUEST_STATS, body)
        if self.on_report is not None:
            self.on_report()
        if self.memctl is not None and self.policy.memctl:  # the host's own memctl counters, at STATS pace
            runtime.write_json(self.dir / stats.MEMCTL, self.memctl.counters.to_json())

    def swap_ready(self, swap: dict[str, Any]) -> None:
        """The guest reported its swap stack: pass on step-down warnings, show the mode in `memvisor ps`. A
        templatable sandbox sets none up (its clones do, when they wake: snapshot/template.py calls this then)."""
        if self.policy.templatable and not self.is_clone and not swap:
            assert self.state is not None
            self.state.summary = self.policy.summary(swap_in_effect="deferred")
            runtime.write_state(self.state)
            return
        for warning in swap.get("warnings", []):
            self.warn(warning)
        assert self.state is not None
        effective = swap.get("effective") or pol.SwapMode.OFF.value
        asked = self.policy.effective_swap_mode  # the host's own policy, not what the guest says it was asked
        order = list(pol.SwapMode)  # weakest first
        if effective not in order:
            self.failed = True
            raise GuestError(f"the guest reported swap mode {str(effective)[:40]!r}, which is not a mode")
        if order.index(pol.SwapMode(effective)) < order.index(asked):
            if not self.policy.allow_weaker_swap:
                self.failed = True
                raise GuestError(f"the guest set up swap mode {effective}, weaker than {asked} as the policy asks",
                                 hint="allow it with --allow-weaker-swap, or use a guest kernel with the mode")
            self.warn(f"swap runs in mode {effective}, not {asked} as asked")
        self.state.summary = self.policy.summary(swap_in_effect=effective)
        runtime.write_state(self.state)

    def _death_message(self) -> str:
        assert self.process is not None
        if self.session is not None and self.session.cutoff:
            return self.session.cutoff
        rc = self.process.returncode
        panic = next((line for line in self.console_tail(1000).splitlines() if "Kernel panic" in line), None)
        if panic:
            return f"the guest kernel panicked before the command finished ({panic.split('] ', 1)[-1].strip()})"
        if rc is not None and rc < 0:
            return f"the VMM (pid {self.process.pid}) was killed by {signal.Signals(-rc).name}"
        vmm_log = self.vmm_log_tail()
        detail = f"; VMM said: {vmm_log}" if vmm_log else ""
        return f"the guest stopped without reporting the command's end (VMM exit status {rc}){detail}"

    def _wait_poweroff(self) -> None:
        assert self.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=POWEROFF_TIMEOUT_S)

    def _timed_out(self, out: Collected, err: Collected, marks: dict[str, float], hello: dict[str, Any] | None,
                   started: dict[str, Any] | None, diagnosis: Stall) -> RunResult:
        result = RunResult.of(TIMEOUT_EXIT, None, None, True, out, err, stall=diagnosis)
        result.report = self._report(result, marks, hello, started, None)
        result.report["stall"] = diagnosis.to_json()
        return result

    def _collectors(self) -> tuple[Collected, Collected]:
        limit = self.policy.output_limit_mib << 20 if self.policy.output_limit_mib else None
        return Collected(limit), Collected(limit)

    def _exit_result(self, body: dict[str, Any], out: Collected, err: Collected) -> RunResult:
        code, sig = body["code"], body["signal"]
        timed_out = bool(body.get("timed_out"))
        exit_code = TIMEOUT_EXIT if timed_out else 128 + sig if sig else (code if code is not None else 255)
        result = RunResult.of(exit_code, code, sig, timed_out, out, err)
        oom = body.get("oom_kills", 0)
        result.oom_kills = oom if isinstance(oom, int) and 0 < oom < 1 << 31 else 0
        return result

    def _report(self, result: RunResult, marks: dict[str, float], hello: dict[str, Any] | None,
                started: dict[str, Any] | None, exit_body: dict[str, Any] | None) -> dict[str, Any]:
        """The --json report: timings from the host's clock, facts from the guest's messages."""
        def since_spawn(mark: str) -> float | None:
            return round(marks[mark] - self.spawned_at, 3) if mark in marks else None

        assert self.process is not None and self.channel is not None
        return {
            "id": self.id,
            "exit_code": result.exit_code,
            "code": result.code,
            "signal": result.signal,
            "timed_out": result.timed_out,
            "oom_kills": result.oom_kills,
            "truncated": result.truncated,
            "boot_seconds": since_spawn("hello"),
            "time_to_command_seconds": since_spawn("started"),
            "total_seconds": round(time.monotonic() - self.spawned_at, 3),
            "guest": report.guest_section(hello, started, exit_body),
            "vmm": {"backend": self.vmm.name, "accel": self.vmm.accel(), "pid": self.process.pid,
                    "ksm": self.ksm_in_effect(), "balloon": self.policy.balloon},
            "image": self.image.manifest.get("key"),
            "policy": pol.to_json(self.policy),
            "swap": report.swap_section(self.policy, hello, exit_body),
            "protocol_errors": self.channel.errors,
            "memctl": self.memctl.counters.to_json() if self.memctl and self.policy.memctl else None,
        }

    # -- tearing down --------------------------------------------------------------------------------------
    def release(self) -> None:
        """Let a daemon's sandbox go without stopping it (a daemon that ends with --on-exit leave, for an upgrade):
        memvisor's descriptors and reader thread are closed, the VMM runs on and its runtime directory stays for
        the next daemon, which adopts it."""
        if not self.outlive_owner:
            raise MemvisorError(f"sandbox {self.id} does not outlive its owner: it cannot be left running")
        self._released = True
        self.close()

    def _remove_dir(self) -> None:
        if self.dir is not None and not self._released:
            runtime.remove(self.dir)

    def _stop_vmm(self) -> None:
        """Quit over QMP, then SIGKILL if it lingers; always reap."""
        proc = self.process
        if proc is None or proc.poll() is not None or self._released:
            return
        try:
            with QMP(self.qmp_path) as qmp:
                qmp.execute("quit", timeout=2.0)
            proc.wait(timeout=3.0)
        except (MemvisorError, subprocess.TimeoutExpired) as exc:
            log.debug("QMP quit did not stop the VMM (%s); killing it", exc)
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def keep_console(self) -> Path | None:
        """Copy the console log out of the runtime directory before teardown: for a sandbox that failed or
        timed out into the log directory (paths.log_dir(), the newest LOGS_KEPT kept), and for every sandbox
        into $MEMVISOR_KEEP_CONSOLE if set (tests). Returns where a failed sandbox's log now is."""
        if self.dir is None or not self.console_log.exists():
            return None
        keep = os.environ.get("MEMVISOR_KEEP_CONSOLE")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.console_log, Path(keep) / f"{self.id}.log")
        if not self.failed:
            return None
        try:
            self.kept_log = runtime.keep_log(self.console_log, f"{self.id}.console.log")
            return self.kept_log
        except OSError as exc:
            log.warning("could not keep the console log of sandbox %s: %s", self.id, exc)
            return None

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        """The last lines the guest wrote on its serial console."""
        return _tail(self.console_log, lines) if self.dir else ""

    def vmm_log_tail(self, lines: int = 3) -> str:
        return _tail(self.dir / "vmm.log", lines).replace("\n", "; ") if self.dir else ""


def _take_fd(pidfd: int, pid: int, hint: int, dev: int, ino: int) -> int | None:
    """A descriptor of the file (device `dev`, inode `ino`) that process `pid` holds open read-write (or, a
    socket, at all), taken with pidfd_getfd; None if it holds none. `hint`: the number it was inherited at (QEMU
    keeps memvisor's own ends there; it moves a disk's into an fd set, so the others are looked up by inode in
    /proc/PID/fdinfo)."""
    candidates = [hint]
    try:
        for entry in os.listdir(f"/proc/{pid}/fdinfo"):
            number = int(entry)
            if number != hint:
                with open(f"/proc/{pid}/fdinfo/{entry}") as f:
                    if any(line.split() == ["ino:", str(ino)] for line in f):
                        candidates.append(number)
    except (OSError, ValueError):
        pass
    for number in candidates:
        try:
            fd = proc.pidfd_getfd(pidfd, number)
        except OSError:
            continue
        st = os.fstat(fd)
        writable = stat.S_ISSOCK(st.st_mode) or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        if (st.st_dev, st.st_ino) == (dev, ino) and writable:
            return fd
        os.close(fd)
    return None


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.rstrip().splitlines()[-lines:])
