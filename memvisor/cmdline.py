"""The `memvisor.<key>=<value>` kernel-command-line codec, shared by the host (which encodes the policy's
guest-side settings, see policy.to_cmdline) and the guest init (which decodes them).

Kept apart from policy.py because the guest decodes its settings before anything else and must not pay for
dataclasses/typing at boot (under TCG, their first use costs ~1 s of code translation). Stdlib only, no imports.
"""

from __future__ import annotations

PREFIX = "memvisor."
# arch/x86/include/asm/setup.h: COMMAND_LINE_SIZE; the kernel silently truncates longer command lines.
COMMAND_LINE_MAX = 2048
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def encode_value(value: object) -> str:
    """bool -> 1/0, enum -> its value, anything else -> str(); no spaces allowed."""
    if isinstance(value, bool):
        text = "1" if value else "0"
    else:
        text = str(getattr(value, "value", value))
    if not text or any(c.isspace() for c in text) or '"' in text:
        raise ValueError(f"cannot put {value!r} on the kernel command line")
    return text


def word(key: str, value: object) -> str:
    return f"{PREFIX}{key}={encode_value(value)}"


def parse(cmdline: str) -> dict[str, str]:
    """Every memvisor.<key>=<value> word of a kernel command line, as text (a later word wins)."""
    out = {}
    for item in cmdline.split():
        if item.startswith(PREFIX) and "=" in item:
            key, _, value = item[len(PREFIX):].partition("=")
            out[key] = value
    return out


def parse_bool(text: str) -> bool:
    """Decode a boolean the way encode_value writes it (and a few spellings people type)."""
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean")
