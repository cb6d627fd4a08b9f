"""A small synchronous front to `qemu.qmp`'s QMPClient, for memvisor's single-threaded host code.

Each QMP object owns its asyncio event loop; calls run it until the reply (or the timeout).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from memvisor.errors import MemvisorError


class QMP:
    """One QMP connection to a VMM's monitor socket."""

    def __init__(self, path: Path, name: str = "memvisor") -> None:
        self.path = path
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)

    def connect(self, timeout: float = 5.0) -> None:
        """Connect and negotiate capabilities."""
        self._run(self._client.connect(str(self.path)), timeout, "connect")

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
        """Run one QMP command and return its "return" value."""
        return self._run(self._client.execute(command, arguments), timeout, command)

    def sysrq(self, keys: str, timeout: float = 5.0) -> None:
        """Press Alt+SysRq+<key> on the guest's keyboard for each key in `keys`: the guest kernel handles them in
        its keyboard interrupt, so they work even when no guest process can run (the guest must allow them:
        kernel.sysrq, see guest/init.py)."""
        for key in keys:
            self.execute("send-key", {"keys": [{"type": "qcode", "data": "alt"}, {"type": "qcode", "data": "sysrq"},
                                               {"type": "qcode", "data": key}]}, timeout)

    def pass_fd(self, fd: int, name: str) -> None:
        """Hand `fd` to the VMM under `name` (SCM_RIGHTS + getfd): it opens no path itself (-sandbox)."""
        self._client.send_fd_scm(fd)
        self.execute("getfd", {"fdname": name})

    def dump_memory(self, fd: int, timeout: float = 120.0) -> None:
        """Write the guest's RAM as an ELF core to `fd` (an open writable file: the VMM opens no path), with the
        guest paused while it is written. For tests that look into guest memory (tests/vm/test_keydump.py)."""
        self._client.send_fd_scm(fd)
        self.execute("getfd", {"fdname": "memvisor-dump"}, timeout=5.0)
        self.execute("dump-guest-memory", {"paging": False, "protocol": "fd:memvisor-dump"}, timeout)

    def close(self) -> None:
        """Disconnect and drop the event loop, in at most 2 s whatever the VMM did."""
        try:
            self._bounded(self._client.disconnect(), 2.0)
        except (QMPError, OSError, EOFError, TimeoutError):
            # disconnect() re-raises what ended the session: EOFError is the normal end after `quit`.
            pass
        finally:
            self._loop.close()

    def __enter__(self) -> QMP:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Any, timeout: float, what: str) -> Any:
        try:
            return self._bounded(coro, timeout)
        except (QMPError, OSError, EOFError, TimeoutError) as exc:
            raise MemvisorError(f"QMP {what} on {self.path} failed: {exc or type(exc).__name__}") from None

    def _bounded(self, coro: Any, timeout: float) -> Any:
        """Run `coro` for at most `timeout` seconds. Not asyncio.wait_for: on timeout it waits for the task's
        cancellation to finish, however long that takes, so its bound is not a bound."""
        task = self._loop.create_task(coro)
        done, _ = self._loop.run_until_complete(asyncio.wait({task}, timeout=timeout))
        if task not in done:
            task.cancel()
            self._loop.run_until_complete(asyncio.wait({task}, timeout=0.1))  # let it unwind if it will
            if not task.done():
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
            raise TimeoutError(f"no answer within {timeout:g} s")
        return task.result()
