"""The error types memvisor raises. Stdlib only: the guest imports this too.

`MemvisorError` is the one error the CLI prints as a single line (plus a hint) without a traceback; anything
else reaching the CLI is a bug and is shown with its traceback.
"""

from __future__ import annotations


class MemvisorError(Exception):
    """An error the user can act on: `message` names the offending value, `hint` says what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class PolicyError(MemvisorError):
    """A setting has a bad value, a bad type, or asks for something not implemented."""


class ConfigError(MemvisorError):
    """The TOML config file cannot be read or has unknown keys."""


class MissingDependencyError(MemvisorError):
    """A host program or package memvisor needs is not installed."""


class ImageError(MemvisorError):
    """The guest image cannot be built or found."""


class GuestError(MemvisorError):
    """The guest died, hung or misbehaved; `console_tail` holds its last console lines."""

    def __init__(self, message: str, hint: str | None = None, console_tail: str = "") -> None:
        super().__init__(message, hint)
        self.console_tail = console_tail


class TimeoutExpired(MemvisorError):
    """The sandbox ran longer than its --timeout and was killed."""


class SetupError(MemvisorError):
    """Raised in the guest: the sandbox cannot be set up as asked (e.g. the swap mode's kernel feature is
    missing); the message names the feature and the fix, and travels to the host as a fatal ERROR."""


class ProtocolError(MemvisorError):
    """A host<->guest frame was malformed, unknown or too large."""
