"""The guest agent: serves the host's commands for the life of the sandbox, many at once.

Each EXEC names its command by an exec id; the agent spawns it (argv, env, cwd, uid, stdin pipe or /dev/null,
its own session), streams its stdout/stderr under that id, feeds it the STDIN frames the host sends, kills its
process group on KILL or when its timeout passes, and reports EXIT with how it ended. One poll loop, no threads:
while nothing runs it sleeps in poll(2) and wakes only for the host or the periodic STATS, so an idle sandbox
costs the host next to nothing. SHUTDOWN kills what still runs and returns (PID 1 then powers off).

PARK freezes the workload and the scratch filesystem (guest/quiesce.py) until RESUMED or CLONED thaws them; an
EXEC in between is refused. ADOPT (a new host daemon took over after the old one died) ends every command
without an EXIT (nobody is left to read one) and says which it ended; it is answered in any state, parked too.

Every frame from the host is validated; a bad one gets an ERROR reply and a console line, never a crash. Guest
only, stdlib only, and cheap to import (see proto.py on why no selectors/subprocess/pathlib).
"""

from __future__ import annotations

import errno
import os
import select
import time

from memvisor import contract, proto
from memvisor.errors import ProtocolError
from memvisor.guest import cgroups, quiesce, spawn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from memvisor.guest.clone import Waker as CloneHooks
    from memvisor.guest.memctld import Memctld

PORTS = "/sys/class/virtio-ports"
DRAIN_GRACE = 1.0  # seconds to keep reading output held open by the workload's orphans after it exits
STATS_INTERVAL = 2.0  # seconds between STATS frames while a command runs
IDLE_STATS_INTERVAL = 10.0  # ... and while none runs (the host's supervisor still wants figures)
STDIN_BUFFER = 1 << 20  # bytes of a command's stdin held in the guest before the host is told to wait
# A PSI trigger (Documentation/accounting/psi.rst): wake the agent when tasks stalled on memory for 100 ms
# within 1 s, and send STATS at once: the host's supervisor gives memory back within its next interval instead
# of waiting up to IDLE_STATS_INTERVAL for the figures.
PSI_TRIGGER = b"some 100000 1000000"
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}


def uptime() -> float:
    """Seconds since the guest kernel started."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Channel:
    """The guest end of the control channel: one read-write fd on the virtio-serial port."""

    def __init__(self, fd: int, log: Callable[[str], None]) -> None:
        self.fd = fd
        self.log = log
        self.decoder = proto.Decoder()
        self.eof = False  # nobody on the host end (virtio-serial reads return 0)

    @classmethod
    def open(cls, name: str, deadline: float, log: Callable[[str], None]) -> Channel:
        """Wait for the port named `name` to appear, then open it once, read-write (FACTS.md)."""
        while True:
            for port in sorted(os.listdir(PORTS)) if os.path.isdir(PORTS) else []:
                try:
                    with open(f"{PORTS}/{port}/name") as f:
                        if f.read().strip() == name:
                            return cls(os.open(f"/dev/{port}", os.O_RDWR | os.O_CLOEXEC), log)
                except OSError:
                    pass  # the node may not exist yet
            if time.monotonic() > deadline:
                raise OSError(f"virtio-serial port {name!r} did not appear")
            time.sleep(0.01)

    def send(self, kind: proto.MessageKind, body: dict[str, Any]) -> None:
        """Send one frame (blocking until the host has room)."""
        self._write(proto.encode(kind, body))

    def send_output(self, kind: proto.MessageKind, data: bytes, exec_id: int) -> None:
        for frame in proto.encode_output(kind, data, exec_id):
            self._write(frame)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def read_frames(self) -> list[proto.Frame]:
        """Read what is available; answer malformed input with an ERROR frame and drop it."""
        data = os.read(self.fd, 65536)
        self.eof = not data
        frames = []
        for item in self.decoder.feed(data):
            if isinstance(item, ProtocolError):
                self.log(f"bad frame from host: {item.message}")
                self.send(proto.Kind.ERROR, {"message": f"bad frame: {item.message}"})
            else:
                frames.append(item)
        return frames


def answer(channel: Channel, frame: proto.Frame) -> bool:
    """Answer the requests the host may make at any time (DUMP); False if `frame` is not one of them."""
    if frame.kind is not proto.Kind.DUMP or frame.body is None:
        return False
    from memvisor.guest import diag  # only when asked: never at boot

    channel.log(f"diagnostic dump asked for: {frame.body['reason'][:200]}")
    channel.send(proto.Kind.DUMPED, diag.dump(frame.body["reason"], uptime()))
    return True


class Command:
    """One running command: its child, the output streams still open, its stdin backlog and its deadline."""

    def __init__(self, exec_id: int, child: spawn.Child, timeout: float | None, cgroup: str | None,
                 oom_base: int) -> None:
        self.id = exec_id
        self.argv0 = ""  # what ADOPTED names it by
        self.child = child
        self.cgroup = cgroup  # the cgroup it runs in (removed when it ends)
        self.oom_base = oom_base  # that cgroup's OOM kills before it started (an exec id can be used again)
        self.streams = {child.stdout: proto.Kind.STDOUT, child.stderr: proto.Kind.STDERR}
        self.stdin = bytearray()
        self.stdin_eof = False  # the host ended its input: close the pipe once the backlog is written
        self.deadline = time.monotonic() + timeout if timeout else None
        self.timed_out = False
        self.exited_at: float | None = None

    def done(self, now: float) -> bool:
        """Exited, and its output drained (or DRAIN_GRACE passed: orphans may hold the pipes open)."""
        return self.exited_at is not None and (not self.streams or now - self.exited_at >= DRAIN_GRACE)


class Agent:
    """The command server: one poll loop over the channel and every command's pipes and pidfd."""

    def __init__(self, channel: Channel, uid: int, report: Callable[[], dict[str, Any]],
                 memctl: Memctld | None = None, chroot: str | None = None, exec_cgroups: bool = False,
                 clone: CloneHooks | None = None) -> None:
        self.channel = channel
        self.clone = clone  # a templatable sandbox's (and so its clones') park and wake steps (guest/init.py)
        self.chroot = chroot
        self.exec_cgroups = exec_cgroups  # a cgroup per command (guest/cgroups.py; init mounted the tree)
        self.uid = uid
        self.report = report
        self.commands: dict[int, Command] = {}
        self.fds: dict[int, tuple[str, Command | None]] = {channel.fd: ("channel", None)}
        self.poller = select.poll()
        self.poller.register(channel.fd, select.POLLIN)
        self.stopping = False
        self.parked = False  # between PARK and RESUMED: the VM is about to be (or is) paused; send nothing
        self.frozen: quiesce.Frozen | None = None  # what the PARK froze (thawed by RESUMED or CLONED)
        # What a PARK freezes besides the workload's cgroups (those only in a guest, where init mounted the tree).
        self.freeze_mounts: tuple[str, ...] = (contract.SCRATCH_MOUNT,) if exec_cgroups else ()
        self.memctl = memctl  # memctl's socket server (memctld), when the policy enables it
        if memctl is not None:
            self.fds[memctl.listener.fileno()] = ("memctl-listen", None)
            self.poller.register(memctl.listener.fileno(), select.POLLIN)
        # The workload's stall (guest/cgroups.py): only inside a guest, whose tree init mounted.
        pressure = cgroups.pressure_file() if exec_cgroups else None
        self.pressure_fd = psi_trigger(channel.log, pressure) if pressure else None
        self.next_stats = time.monotonic()
        if self.pressure_fd is not None:
            self.fds[self.pressure_fd] = ("pressure", None)
            self.poller.register(self.pressure_fd, select.POLLPRI)

    # -- the loop --------------------------------------------------------------------------------------------
    def serve(self) -> None:
        """Serve until SHUTDOWN."""
        while not self.stopping:
            now = time.monotonic()
            if now >= self.next_stats and not self.parked:
                self.channel.send(proto.Kind.STATS, {"uptime": uptime(), **self.report()})
                self.next_stats = now + (STATS_INTERVAL if self.commands else IDLE_STATS_INTERVAL)
            wake = min([self.next_stats if not self.parked else now + IDLE_STATS_INTERVAL, *self._deadlines()])
            for fd, events in self.poller.poll(max(0, int((wake - time.monotonic()) * 1000)) + 1):
                self._event(fd, events)
            self._reap(time.monotonic())
            if self.memctl is not None:
                self.memctl.expire(time.monotonic())
        if self.pressure_fd is not None:
            self._forget(self.pressure_fd)
            os.close(self.pressure_fd)
        if self.memctl is not None:
            self.memctl.abandon()  # no answer will come now: thaw whoever still waits
        for command in list(self.commands.values()):
            self._signal(command, 9)
            self._close(command)
            command.child.wait()

    def _deadlines(self) -> list[float]:
        out = []
        for c in self.commands.values():
            if c.deadline is not None and not c.timed_out:
                out.append(c.deadline)
            if c.exited_at is not None:
                out.append(c.exited_at + DRAIN_GRACE)
        return out

    def _event(self, fd: int, events: int) -> None:
        role, command = self.fds.get(fd, ("", None))
        if role == "channel":
            frames = self.channel.read_frames()
            for frame in frames:
                self._frame(frame)
            if self.channel.eof:
                time.sleep(0.05)  # nobody on the host end yet: poll gently
        elif role == "pressure":  # the trigger fires at most once per window: figures now
            self.next_stats = time.monotonic()
        elif role.startswith("memctl"):
            self._memctl_event(role, fd)
        elif command is None:
            return
        elif role == "out":
            data = os.read(fd, proto.CHUNK)
            if data:
                self.channel.send_output(command.streams[fd], data, command.id)
            else:
                self._forget(fd)
                del command.streams[fd]
                os.close(fd)
        elif role == "pidfd":
            self._forget(fd)
            command.exited_at = time.monotonic()
        elif role == "stdin":
            self._write_stdin(command)

    def _memctl_event(self, role: str, fd: int) -> None:
        assert self.memctl is not None
        if role == "memctl-listen":
            conn = self.memctl.accept()
            if conn is not None:
                self.fds[conn.fileno()] = ("memctl-client", None)
                self.poller.register(conn.fileno(), select.POLLIN)
        elif not self.memctl.readable(fd):
            self._forget(fd)
            self.memctl.close_client(fd)

    def _reap(self, now: float) -> None:
        for command in list(self.commands.values()):
            if command.deadline is not None and not command.timed_out and now >= command.deadline:
                command.timed_out = True
                self.channel.log(f"command {command.id} ran past its timeout: killing it")
                self._signal(command, 9)
            if command.done(now):
                self._close(command)
                status = command.child.wait()
                oom = 0
                if command.cgroup:
                    oom = cgroups.oom_kills(command.cgroup) - command.oom_base
                    cgroups.drop(command.cgroup)
                sig = -status if status < 0 else None
                end: dict[str, Any] = {"id": command.id, "code": None if sig else status, "signal": sig,
                                       "timed_out": command.timed_out, "uptime": uptime(), **self.report()}
                if oom > 0:  # the guest's OOM killer ended this many of the command's processes
                    end["oom_kills"] = oom
                self.channel.send(proto.Kind.EXIT, end)

    # -- frames from the host --------------------------------------------------------------------------------
    def _frame(self, frame: proto.Frame) -> None:
        body = frame.body
        if frame.kind is proto.Kind.EXEC and body is not None:
            self._exec(body)
        elif frame.kind is proto.Kind.STDIN:
            command = self.commands.get(frame.stream)
            if command is None or command.child.stdin is None or command.stdin_eof:
                self._error(f"STDIN for exec {frame.stream}, which takes no more input", frame.stream)
            elif not frame.data:
                command.stdin_eof = True
                self._write_stdin(command)
            elif len(command.stdin) + len(frame.data) > STDIN_BUFFER:
                self._error(f"exec {frame.stream}: stdin backlog over {STDIN_BUFFER} bytes; data dropped",
                            frame.stream)
            else:
                command.stdin += frame.data
                self._write_stdin(command)
        elif frame.kind is proto.Kind.KILL and body is not None:
            command = self.commands.get(body["id"])
            if command is None:
                self._error(f"KILL for exec {body['id']}, which is not running", body["id"])
            else:
                self._signal(command, body["signal"])
        elif frame.kind is proto.Kind.MEMCTL_ACK and body is not None and self.memctl is not None:
            self.memctl.ack(body)
        elif frame.kind is proto.Kind.PARK:
            self._park()
        elif frame.kind is proto.Kind.RESUMED and body is not None:
            self._resumed(body)
        elif frame.kind is proto.Kind.CLONED and body is not None:
            self._cloned(body)
        elif frame.kind is proto.Kind.ADOPT:
            self._adopt()
        elif frame.kind is proto.Kind.SHUTDOWN:
            self.channel.log("shutdown asked for")
            self.stopping = True
        elif not answer(self.channel, frame):
            self.channel.log(f"unexpected {frame.kind.name} from host")
            self._error(f"unexpected {frame.kind.name}", 0)

    def _park(self) -> None:
        """Get ready to be paused and saved (docs/parking.md): freeze the workload and the scratch filesystem
        (nothing may change a kept disk until RESUMED: guest/quiesce.py), write dirty pages out, drop the page
        cache and compact free memory, so the snapshot carries live pages only (free pages are zero pages in
        QEMU's stream, or already handed back by free-page reporting); then go quiet until RESUMED, so no frame
        is left in a VMM that is about to exit."""
        if self.parked:  # asked again (a host that retries): already frozen and quiet
            self.channel.send(proto.Kind.PARKING, {"uptime": uptime(), "ok": True, "seconds": 0.0})
            return
        if self.commands:
            self.channel.send(proto.Kind.PARKING, {"uptime": uptime(), "ok": False,
                                                   "reason": f"{len(self.commands)} command(s) still run"})
            return
        start = time.monotonic()
        try:
            frozen = quiesce.freeze(cgroups.ROOT if self.exec_cgroups else None, self.freeze_mounts)
        except quiesce.FreezeError as exc:
            self.channel.log(f"park refused: {exc}")
            self.channel.send(proto.Kind.PARKING, {"uptime": uptime(), "ok": False,
                                                   "reason": f"the workload cannot be frozen: {exc}"[:proto.MAX_TEXT]})
            return
        self.frozen = frozen
        os.sync()
        for knob, value in (("drop_caches", "3"), ("compact_memory", "1")):
            try:
                with open(f"/proc/sys/vm/{knob}", "w") as f:
                    f.write(value)
            except OSError as exc:  # a smaller snapshot is lost, not the park
                self.channel.log(f"park: cannot write vm.{knob}: {exc.strerror}")
        if self.clone is not None:
            self.clone.park()
        self.parked = True
        self.channel.send(proto.Kind.PARKING, {"uptime": uptime(), "ok": True,
                                               "seconds": round(time.monotonic() - start, 3)})

    def _resumed(self, body: dict[str, Any]) -> None:
        """Running again after a resume (or a park the host gave up): set the wall clock from the host's (it
        stood still while the VM was parked), report again."""
        answer: dict[str, Any] = {"uptime": uptime()}
        set_clock(body, answer)
        self._thaw(answer)
        self.parked = False
        self.next_stats = time.monotonic()
        self.channel.send(proto.Kind.RESUMED, answer)

    def _cloned(self, body: dict[str, Any]) -> None:
        """Running for the first time as a template's clone: the wall clock, then PID 1's wake steps (a new RNG
        state, id, hostname, swap, the FORKED event: guest/clone.py); any failure is sent back (the host stops the
        clone rather than let it run as a copy)."""
        answer: dict[str, Any] = {"uptime": uptime()}
        set_clock(body, answer)
        if "error" not in answer:
            if self.clone is None:
                answer["error"] = "this guest was not started templatable: it cannot wake as a clone"
            else:
                try:
                    answer.update(self.clone.wake(body))
                except Exception as exc:  # noqa: BLE001 - reported to the host, which stops the clone
                    answer["error"] = f"waking as a clone failed: {exc}"[:proto.MAX_TEXT]
        self._thaw(answer)  # after the wake: no workload code runs before the clone is its own machine
        self.parked = False
        self.next_stats = time.monotonic()
        self.channel.send(proto.Kind.CLONED, answer)

    def _thaw(self, answer: dict[str, Any]) -> None:
        """Thaw what the PARK froze (RESUMED, CLONED); a failure goes into the answer's `error`."""
        problems = quiesce.thaw(self.frozen)
        self.frozen = None
        if problems:
            self.channel.log("; ".join(problems))
            answer["error"] = "; ".join([answer.get("error", ""), *problems]).lstrip("; ")[:proto.MAX_TEXT]

    def _adopt(self) -> None:
        """A new host daemon took over (proto ADOPT): its predecessor died with these commands' streams, so each
        is killed (its process group), its pipes closed, its child reaped and forgotten, without an EXIT; the
        answer names them and says whether the guest is parked (the new daemon must then resume or park it)."""
        ended = []
        for command in list(self.commands.values()):
            self._signal(command, 9)
            self._close(command)
            command.child.wait()
            if command.cgroup:
                cgroups.drop(command.cgroup)
            ended.append([command.id, command.argv0[:64]])
        if self.memctl is not None:  # requests the dead daemon never answered: thaw and tell their callers
            self.memctl.abandon("the host's daemon was replaced")
        self.channel.log(f"adopted by a new host daemon: {len(ended)} command(s) ended"
                         f"{', parked' if self.parked else ''}")
        self.channel.send(proto.Kind.ADOPTED, {"uptime": uptime(), "ended": ended, "parked": self.parked})

    def _exec(self, body: dict[str, Any]) -> None:
        exec_id = body["id"]
        if self.parked:  # the VM is being saved: a command started now would be frozen into the snapshot
            self._error(f"exec {exec_id} refused: the sandbox is being parked", exec_id)
            return
        if exec_id in self.commands:
            self._error(f"exec {exec_id} is already running", exec_id)
            return
        if len(self.commands) >= proto.MAX_EXECS:
            self._error(f"{proto.MAX_EXECS} commands already run; exec {exec_id} refused", exec_id, exited=True)
            return
        uid = body.get("uid", self.uid)
        home, user = ("/root", "root") if uid == 0 else (contract.WORKLOAD_HOME, contract.WORKLOAD_USER)
        env = {**BASE_ENV, "HOME": home, "USER": user, "LOGNAME": user, "SHELL": "/bin/sh", **body.get("env", {})}
        cgroup = cgroups.for_exec(exec_id) if self.exec_cgroups else None
        oom_base = cgroups.oom_kills(cgroup) if cgroup else 0
        try:
            child = spawn.spawn(body["argv"], env, body.get("cwd", home), uid, stdin=body.get("stdin", False),
                                cgroup=cgroup, root=self.chroot, gid=body.get("gid"))
        except OSError as exc:
            if cgroup:
                cgroups.drop(cgroup)
            # The shell's conventions: 127 not found, 126 found but not runnable.
            code = 127 if exc.errno == errno.ENOENT else 126
            self.channel.send_output(proto.Kind.STDERR, f"memvisor: {body['argv'][0]}: {exc.strerror}\n".encode(),
                                     exec_id)
            self.channel.send(proto.Kind.EXIT, {"id": exec_id, "code": code, "signal": None, "uptime": uptime(),
                                                **self.report()})
            return
        command = Command(exec_id, child, body.get("timeout"), cgroup, oom_base)
        command.argv0 = body["argv"][0]
        self.commands[exec_id] = command
        for fd in command.streams:
            self._watch(fd, "out", command, select.POLLIN)
        self._watch(child.pidfd, "pidfd", command, select.POLLIN)
        self.channel.log(f"exec {exec_id}: a {len(body['argv'])}-word command as uid {uid}")
        self.channel.send(proto.Kind.STARTED, {"id": exec_id, "pid": child.pid, "uptime": uptime()})

    def _error(self, message: str, exec_id: int, exited: bool = False) -> None:
        body: dict[str, Any] = {"message": message}
        if exec_id:
            body["id"] = exec_id
        self.channel.send(proto.Kind.ERROR, body)
        if exited:  # the command never started: end it for the host
            self.channel.send(proto.Kind.EXIT, {"id": exec_id, "code": 125, "signal": None, "uptime": uptime()})

    # -- helpers ---------------------------------------------------------------------------------------------
    def _watch(self, fd: int, role: str, command: Command, events: int) -> None:
        self.fds[fd] = (role, command)
        self.poller.register(fd, events)

    def _forget(self, fd: int) -> None:
        if self.fds.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def _write_stdin(self, command: Command) -> None:
        fd = command.child.stdin
        if fd is None:
            return
        try:
            while command.stdin:
                del command.stdin[:os.write(fd, command.stdin)]
        except BlockingIOError:
            pass
        except OSError:  # the command closed its stdin: drop the rest
            command.stdin.clear()
            command.stdin_eof = True
        if command.stdin and fd not in self.fds:
            self._watch(fd, "stdin", command, select.POLLOUT)
        elif not command.stdin:
            self._forget(fd)
            if command.stdin_eof:
                os.close(fd)
                command.child.stdin = None

    def _signal(self, command: Command, signo: int) -> None:
        """Signal the command's whole process group (it runs in its own session)."""
        try:
            os.killpg(command.child.pid, signo)
        except ProcessLookupError:
            pass

    def _close(self, command: Command) -> None:
        """Stop watching a command and close its pipes (its pidfd is closed by Child.wait)."""
        for fd in (*command.streams, command.child.stdin):
            if fd is not None:
                self._forget(fd)
                os.close(fd)
        command.streams.clear()
        self._forget(command.child.pidfd)
        del self.commands[command.id]


def psi_trigger(log: Callable[[str], None], path: str) -> int | None:
    """An fd that polls POLLPRI when the workload stalls on memory (PSI_TRIGGER on `path`, a memory.pressure
    file), or None if the kernel has no PSI triggers (the host then sees pressure at the next periodic STATS)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        log(f"no memory pressure trigger ({exc.strerror}): pressure is reported every few seconds only")
        return None
    try:
        os.write(fd, PSI_TRIGGER + b"\0")
    except OSError as exc:
        os.close(fd)
        log(f"no memory pressure trigger ({exc.strerror}): pressure is reported every few seconds only")
        return None
    return fd


def set_clock(body: dict[str, Any], answer: dict[str, Any]) -> None:
    """Set the wall clock to the host's `realtime` (RESUMED, CLONED): `clock_step` or `error` in `answer`."""
    realtime = body.get("realtime")
    if realtime is not None:
        step = float(realtime) - time.time()
        try:
            time.clock_settime(time.CLOCK_REALTIME, float(realtime))
            answer["clock_step"] = round(step, 3)
        except (OSError, ValueError, OverflowError) as exc:
            answer["error"] = f"cannot set the clock: {exc}"


def serve(channel: Channel, uid: int, report: Callable[[], dict[str, Any]], memctl: bool = False,
          chroot: str | None = None, exec_cgroups: bool = False, clone: CloneHooks | None = None) -> None:
    """Serve the host's commands until it asks for a shutdown; with `memctl`, workloads' memctl requests too
    (memctl needs `exec_cgroups`). `chroot`: the user's image root every command runs in (guest/userroot.py).
    `exec_cgroups`: run each command in a cgroup of its own (guest/cgroups.py), which tells OOM kills apart."""
    server = None
    if memctl:  # imported only then: a sandbox without memctl does not pay for `socket` at boot
        from memvisor.guest import memctld

        server = memctld.Memctld(memctld.setup(), lambda body: channel.send(proto.Kind.MEMCTL, body), channel.log)
    Agent(channel, uid, report, server, chroot, exec_cgroups, clone).serve()
