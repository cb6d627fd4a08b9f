"""What a command in a sandbox came to: its exit, its output (capped when collected in memory), its report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memvisor.host.stall import Stall

TIMEOUT_EXIT = 124  # like timeout(1)
OutputFn = Callable[[bytes], None]


class Collected:
    """A command's output stream kept in memory, up to `limit` bytes: past it the rest is dropped (the command
    keeps running) and `truncated` says so."""

    def __init__(self, limit: int | None) -> None:
        self.data = bytearray()
        self.limit = limit
        self.truncated = False

    def extend(self, chunk: bytes) -> None:
        if self.limit is not None and len(self.data) + len(chunk) > self.limit:
            chunk = chunk[:max(0, self.limit - len(self.data))]
            self.truncated = True
        self.data += chunk

    def __bytes__(self) -> bytes:
        return bytes(self.data)


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
    truncated: bool = False  # collected output passed the policy's output_limit_mib and was cut there
    oom_kills: int = 0  # processes of the command that the guest's OOM killer ended

    @classmethod
    def of(cls, exit_code: int, code: int | None, signal: int | None, timed_out: bool, out: Collected,
           err: Collected, stall: Stall | None = None) -> RunResult:
        """A result from the collected streams (empty when the output went to callbacks instead)."""
        return cls(exit_code, code, signal, timed_out, bytes(out), bytes(err), stall=stall,
                   truncated=out.truncated or err.truncated)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def oom_message(self) -> str | None:
        """One line for a command the guest's OOM killer hit (None if it did not)."""
        if not self.oom_kills:
            return None
        whom = "the command" if self.signal == 9 else f"{self.oom_kills} of the command's processes"
        return (f"{whom} was killed by the guest's OOM killer (exit status {self.exit_code}): the sandbox ran out "
                "of memory; give it more (--memory) or swap (--swap-size)")
