"""The daemon's own errors, which the API answers with 404 and 409."""

from __future__ import annotations

from memvisor.errors import MemvisorError


class NotFound(MemvisorError):
    """No sandbox (or template) by that id or name."""


class Conflict(MemvisorError):
    """The request clashes with the current state (a name in use, too many sandboxes, a template in use)."""
