"""memvisor: secure memory oversubscription for microVM sandboxes.

This package is imported by the guest init too, so importing it must stay stdlib-only and cheap: the SDK
names are resolved lazily on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the guest must not import typing at boot
if TYPE_CHECKING:
    from memvisor.policy import Policy, SwapMode
    from memvisor.sdk import RunResult, Sandbox

__all__ = ["Policy", "RunResult", "Sandbox", "SwapMode", "__version__"]


def __getattr__(name: str) -> object:
    if name in ("Sandbox", "RunResult"):
        from memvisor import sdk

        return getattr(sdk, name)
    if name in ("Policy", "SwapMode"):
        from memvisor import policy

        return getattr(policy, name)
    raise AttributeError(f"module 'memvisor' has no attribute {name!r}")
