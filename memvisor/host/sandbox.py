"""One sandbox's lifecycle on an ExitStack: runtime directory, sockets, VMM process, the command, teardown.

Everything acquired is registered on the stack as it is acquired, so any failure, Ctrl-C or SIGTERM (the CLI
turns it into an exception) unwinds it: the VMM is asked to quit over QMP, then killed, the sockets closed and
the runtime directory removed. The VMM also dies with memvisor on SIGKILL (launch.py), and the runtime
directory is then swept by the next memvisor command (runtime.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memvisor import policy as pol
from memvisor import proto
from memvisor.errors import GuestError, MemvisorError
from memvisor.host import ksm, launch, report, runtime, stall, stats, swapfile
from memvisor.host.channel import HostChannel
from memvisor.host.stall import Stall
from memvisor.host.vmm import Disk, VMMBackend, VMSpec, backend
from memvisor.host.vmm.qmp import QMP
from memvisor.image.build import Image

log = logging.getLogger("memvisor")
BOOT_TIMEOUT_S = 120.0  # from VMM start to the guest's HELLO; TCG boots take ~4 s
POWEROFF_TIMEOUT_S = 10.0
CONSOLE_TAIL_LINES = 25
# A --debug guest: kernel messages on the console, and hung-task reports after 10 s instead of 120 s.
DEBUG_KERNEL_ARGS = ("loglevel=7", "sysctl.kernel.hung_task_timeout_secs=10")
TIMEOUT_EXIT = 124  # like timeout(1)

OutputFn = Callable[[bytes], None]


@dataclass
class RunResult:
    """How a command ended. `exit_code` is what `memvisor run` exits with: the command's code, 128+signo for a
    signal death, 124 for a timeout."""

    exit_code: int
    code: int | None
    signal: int | None
    timed_out: bool
    stdout: bytes = b""
    stderr: bytes = b""
    report: dict[str, Any] = field(default_factory=dict)
    stall: Stall | None = None  # what the guest looked like when the timeout hit

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Instance:
    """A running sandbox VM. Use as a context manager; `run()` runs one command in it."""

    def __init__(self, policy: pol.Policy, image: Image, vmm: VMMBackend | None = None,
                 sandbox_id: str | None = None, kernel_args: tuple[str, ...] = (),
                 on_warning: Callable[[str], None] | None = None, debug: bool = False) -> None:
        """`kernel_args`: extra guest kernel command-line words (debugging, tests: e.g. module_blacklist=...).
        `on_warning`: called with each warning the sandbox raises (default: logged).
        `debug`: boot the guest with kernel messages on its console and a 10 s hung-task timeout."""
        for arg in kernel_args:
            if not arg or any(c.isspace() for c in arg):
                raise MemvisorError(f"kernel argument {arg!r} must be one word without spaces")
        self.debug = debug
        self.kernel_args = (*DEBUG_KERNEL_ARGS, *kernel_args) if debug else kernel_args
        self.warn = on_warning or log.warning
        self.policy = policy
        self.image = image
        self.vmm = vmm or backend()
        self.id = sandbox_id or runtime.new_id()
        self.name = f"memvisor-{self.id}"
        self.dir: Path | None = None
        self.argv: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: HostChannel | None = None
        self.state: runtime.SandboxState | None = None
        self._stack = contextlib.ExitStack()
        self._vmm_socks: list[socket.socket] = []
        self._ksm: bool | None = None
        self.spawned_at = 0.0
        self.last_stats: dict[str, Any] = {}
        self.failed = False  # keep the console log at teardown
        self.kept_log: Path | None = None  # where that log was kept

    # -- setting up ----------------------------------------------------------------------------------------
    def plan(self) -> list[str]:
        """Create the runtime directory and sockets, and decide the VMM command line (nothing runs yet)."""
        runtime.sweep()
        self.dir = runtime.create(self.id)
        self._stack.callback(runtime.remove, self.dir)
        self._stack.callback(self.keep_console)
        me = os.getpid()
        self.state = runtime.SandboxState(
            id=self.id, owner_pid=me, owner_started=runtime.process_start_time(me) or 0.0, created=time.time(),
            runtime_dir=str(self.dir), policy=pol.to_json(self.policy), summary=self.policy.summary(),
            vmm_name=self.name,
            files={"state": str(self.dir / runtime.STATE), "console": str(self.console_log),
                   "vmm_log": str(self.dir / "vmm.log"), "qmp": str(self.qmp_path)})
        runtime.write_state(self.state)

        disks: tuple[Disk, ...] = ()
        if self.policy.effective_swap_mode is not pol.SwapMode.OFF:
            swapfile.create(self.swap_path, self.policy.swap_size_mib)
            direct = swapfile.supports_direct_io(self.swap_path)
            if not direct:
                self.warn(f"{self.dir} does not support O_DIRECT (tmpfs?): swapped guest pages will stay in the "
                          "host page cache; set MEMVISOR_RUNTIME_DIR to a disk-backed directory")
            disks = (Disk(self.swap_path, "memvisor-swap", direct, discard=self.policy.swap_discard),)
            self.state.files["swap"] = str(self.swap_path)
            runtime.write_state(self.state)
        qmp_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stack.callback(qmp_sock.close)
        qmp_sock.bind(str(self.qmp_path))
        qmp_sock.listen(4)
        self.channel, theirs = HostChannel.pair()
        self._stack.callback(self.channel.close)
        self._stack.callback(theirs.close)
        self._vmm_socks = [qmp_sock, theirs]
        spec = VMSpec(
            name=self.name, memory_mib=self.policy.memory_mib, cpus=self.policy.cpus,
            kernel=self.image.vmlinux, initrd=self.image.initramfs,
            cmdline=(f"memvisor.id={self.id}", *pol.to_cmdline(self.policy), *self.kernel_args),
            console_log=self.console_log, qmp_fd=qmp_sock.fileno(), channel_fd=theirs.fileno(),
            ksm=self.ksm_in_effect(), disks=disks, balloon=self.policy.balloon,
            deflate_on_oom=self.policy.deflate_on_oom)
        self.argv = self.vmm.command(spec)
        return self.argv

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
        assert self.dir is not None
        return self.dir / "swap.img"

    @property
    def qmp_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "qmp.sock"

    def start(self) -> None:
        """Plan (if not done) and start the VMM."""
        if not self.argv:
            self.plan()
        assert self.dir is not None and self.state is not None
        self.spawned_at = time.monotonic()
        self.process = launch.spawn_vmm(self.argv, pass_fds=tuple(s.fileno() for s in self._vmm_socks),
                                        log=self.dir / "vmm.log", ksm=self.ksm_in_effect())
        self._stack.callback(self._stop_vmm)
        for sock in self._vmm_socks:  # the VMM has its copies now
            sock.close()
        self.state.vmm_pid = self.process.pid
        self.state.vmm_started = runtime.process_start_time(self.process.pid)
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
    def run(self, argv: list[str], *, env: dict[str, str] | None = None, on_stdout: OutputFn | None = None,
            on_stderr: OutputFn | None = None, on_phase: Callable[[str], None] | None = None) -> RunResult:
        """Run `argv` in the guest, streaming its output to the callbacks (or collecting it in the result)."""
        assert self.process is not None and self.channel is not None
        out, err = bytearray(), bytearray()
        emit_out = on_stdout or out.extend
        emit_err = on_stderr or err.extend
        phase = on_phase or (lambda _p: None)
        timeout = self.policy.timeout
        deadline = self.spawned_at + timeout if timeout else float("inf")
        boot_deadline = self.spawned_at + BOOT_TIMEOUT_S
        hello: dict[str, Any] | None = None
        started: dict[str, Any] | None = None
        exit_body: dict[str, Any] | None = None
        marks: dict[str, float] = {}

        sel = selectors.DefaultSelector()
        pidfd = os.pidfd_open(self.process.pid)
        sel.register(self.channel.sock, selectors.EVENT_READ, "channel")
        sel.register(pidfd, selectors.EVENT_READ, "vmm")
        phase("booting")
        try:
            while exit_body is None:
                now = time.monotonic()
                limit = min(deadline, boot_deadline if hello is None else float("inf"))
                if now >= limit:
                    if now >= deadline:
                        diagnosis = self._diagnose(f"--timeout of {timeout:g} s passed", sel, emit_out, emit_err,
                                               ready=hello is not None)
                        return self._timed_out(bytes(out), bytes(err), marks, hello, started, diagnosis)
                    self.failed = True
                    raise GuestError(f"the guest did not report ready within {BOOT_TIMEOUT_S:.0f} s",
                                     console_tail=self.console_tail())
                events = sel.select(timeout=min(limit - now, 1.0))
                vmm_gone = any(key.data == "vmm" for key, _ in events)
                for frame in self.channel.receive():
                    if frame.kind is proto.Kind.HELLO and hello is None:
                        assert frame.body is not None
                        if frame.body["version"] != proto.VERSION:
                            raise GuestError(f"the guest speaks protocol {frame.body['version']}, "
                                             f"the host {proto.VERSION}", hint="rebuild the image")
                        hello, marks["hello"] = frame.body, time.monotonic()
                        self._swap_ready(hello.get("swap") or {})
                        self.channel.send(proto.Kind.RUN, {"argv": argv, "env": env or {}})
                        phase("running")
                    elif frame.kind is proto.Kind.STARTED and hello is not None:
                        started, marks["started"] = frame.body, time.monotonic()
                    elif frame.kind is proto.Kind.STDOUT:
                        emit_out(frame.data)
                    elif frame.kind is proto.Kind.STDERR:
                        emit_err(frame.data)
                    elif frame.kind is proto.Kind.STATS:
                        assert frame.body is not None
                        self._store_guest_stats(frame.body)
                    elif frame.kind is proto.Kind.EXIT and hello is not None:
                        exit_body, marks["exit"] = frame.body, time.monotonic()
                    elif frame.kind is proto.Kind.ERROR:
                        assert frame.body is not None
                        log.warning("guest reports: %s", frame.body["message"])
                        if frame.body.get("fatal"):
                            self.failed = True
                            # Set-up errors are already one clear line; an init crash shows the console too.
                            crash = frame.body["message"].startswith("guest init failed")
                            raise GuestError(f"the sandbox failed to start: {frame.body['message']}",
                                             console_tail=self.console_tail() if crash else "")
                    else:
                        self.channel.reject(f"unexpected {frame.kind.name} from the guest")
                if exit_body is None and (vmm_gone or self.channel.closed):
                    self.process.wait(timeout=POWEROFF_TIMEOUT_S)
                    self.failed = True
                    raise GuestError(self._death_message(), console_tail=self.console_tail())
        finally:
            sel.close()
            os.close(pidfd)
        phase("stopping")
        self._wait_poweroff()
        return self._result(exit_body, bytes(out), bytes(err), marks, hello, started)

    def _diagnose(self, reason: str, sel: selectors.BaseSelector, emit_out: OutputFn, emit_err: OutputFn,
                  ready: bool) -> Stall:
        """Ask PID 1 for its diagnostic dump (if the agent is up) and wait up to DUMP_TIMEOUT_S for it, still
        forwarding output and figures; then keep the console log. Never raises on what the guest does."""
        assert self.channel is not None
        self.failed = True
        kernel = stall.kernel_dump(self.qmp_path, self.console_log, restore_level=7 if self.debug else 4)
        summary: dict[str, Any] | None = None
        if ready and not self.channel.closed:
            self.channel.send(proto.Kind.DUMP, {"reason": reason})
            deadline = time.monotonic() + stall.DUMP_TIMEOUT_S
            while summary is None and not self.channel.closed and time.monotonic() < deadline:
                sel.select(timeout=min(deadline - time.monotonic(), 1.0))
                for frame in self.channel.receive():
                    if frame.kind is proto.Kind.DUMPED:
                        summary = frame.body
                    elif frame.kind is proto.Kind.STDOUT:
                        emit_out(frame.data)
                    elif frame.kind is proto.Kind.STDERR:
                        emit_err(frame.data)
                    elif frame.kind is proto.Kind.STATS:
                        assert frame.body is not None
                        self._store_guest_stats(frame.body)
        kept = self.keep_console()
        blocked = stall.parse_blocked(stall.read_end(self.console_log)) if kernel else []
        return Stall(blocked=blocked or (summary or {}).get("blocked", []), dumped=summary is not None,
                     last_stats=self.last_stats, console_log=str(kept) if kept else None,
                     console_tail=self.console_tail())

    def _store_guest_stats(self, body: dict[str, Any]) -> None:
        """Keep the guest's latest memory figures where `memvisor stats` (another process) can read them."""
        assert self.dir is not None
        self.last_stats = body
        path = self.dir / stats.GUEST_STATS
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(path)

    def _swap_ready(self, swap: dict[str, Any]) -> None:
        """The guest reported its swap stack: pass on step-down warnings, show the mode in `memvisor ps`."""
        for warning in swap.get("warnings", []):
            self.warn(warning)
        assert self.state is not None
        effective = swap.get("effective")
        if effective and effective != swap.get("asked"):
            self.warn(f"swap runs in mode {effective}, not {swap.get('asked')} as asked")
        self.state.summary = self.policy.summary(swap_in_effect=effective)
        runtime.write_state(self.state)

    def _death_message(self) -> str:
        assert self.process is not None
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

    def _timed_out(self, out: bytes, err: bytes, marks: dict[str, float], hello: dict[str, Any] | None,
                   started: dict[str, Any] | None, diagnosis: Stall) -> RunResult:
        result = RunResult(TIMEOUT_EXIT, None, None, True, out, err, stall=diagnosis)
        result.report = self._report(result, marks, hello, started, None)
        result.report["stall"] = diagnosis.to_json()
        return result

    def _result(self, body: dict[str, Any], out: bytes, err: bytes, marks: dict[str, float],
                hello: dict[str, Any] | None, started: dict[str, Any] | None) -> RunResult:
        code, sig = body["code"], body["signal"]
        exit_code = 128 + sig if sig else (code if code is not None else 255)
        result = RunResult(exit_code, code, sig, False, out, err)
        result.report = self._report(result, marks, hello, started, body)
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
        }

    # -- tearing down --------------------------------------------------------------------------------------
    def _stop_vmm(self) -> None:
        """Quit over QMP, then SIGKILL if it lingers; always reap."""
        proc = self.process
        if proc is None or proc.poll() is not None:
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


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.rstrip().splitlines()[-lines:])
