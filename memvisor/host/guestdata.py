"""What the guest says, made safe to show and to compute with: the guest is an untrusted peer.

memvisor.proto checks a frame's fields and their types. This module bounds what is inside them, for every JSON
body the host takes from the guest (host/session.py applies `clean` before anything else sees a body):
text loses its control characters (no terminal escape sequences reach a terminal or a log) and is cut, a
traceback to its last few lines; figure maps (meminfo, vmstat, zram) keep only named non-negative integers;
PSI only percentages; lists, maps and nesting are bounded. The host then keeps guest figures under their own
keys: nothing here can overwrite a host-measured value.
"""

from __future__ import annotations

import math
import re
from typing import Any

MAX_TEXT = 500
MAX_ITEMS = 64
MAX_DEPTH = 6  # HELLO.swap.devices[].table[] is 5 deep
MAX_FIGURE = 1 << 60
MAX_LINES = 6  # of a multi-line message (a traceback): its last lines
_NAME = re.compile(r"[A-Za-z0-9_().:/-]{1,64}")
FIGURE_MAPS = ("meminfo", "vmstat", "zram", "reclaim")


def printable(text: str) -> str:
    """Guest text made safe for a terminal: every character Python does not call printable (control
    characters and escape sequences, format characters such as bidi overrides, line separators) becomes '?';
    newlines and tabs stay."""
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text)


def text(value: object, limit: int = MAX_TEXT) -> str:
    """Printable text (see `printable`), at most MAX_LINES lines (the last ones: a traceback's end says what
    went wrong) and `limit` characters."""
    s = value if isinstance(value, str) else str(value)
    lines = printable(s.replace("\r", "")).split("\n")
    if len(lines) > MAX_LINES:
        lines = [f"[{len(lines) - MAX_LINES} lines cut]", *lines[-MAX_LINES:]]
    out = "\n".join(lines)
    return out if len(out) <= limit else out[:limit] + "..."


def figures(value: object) -> dict[str, int]:
    """A map of named non-negative integers (meminfo, vmstat, zram); anything else in it is dropped."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in list(value.items())[:4 * MAX_ITEMS]
            if isinstance(k, str) and _NAME.fullmatch(k) and isinstance(v, int) and not isinstance(v, bool)
            and 0 <= v < MAX_FIGURE}


def percents(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {k: float(v) for k, v in list(value.items())[:MAX_ITEMS]
            if isinstance(k, str) and _NAME.fullmatch(k) and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v) and 0 <= v <= 100}


def clean(value: object, depth: int = 0) -> Any:
    """Any JSON value, bounded: text cleaned, numbers finite and bounded, at most MAX_ITEMS per list or map,
    map keys that are short names, nesting at most MAX_DEPTH (deeper: dropped)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -MAX_FIGURE < value < MAX_FIGURE else None
    if isinstance(value, float):
        return value if math.isfinite(value) and abs(value) < MAX_FIGURE else None
    if isinstance(value, str):
        return text(value)
    if depth >= MAX_DEPTH:
        return None
    if isinstance(value, list):
        return [clean(v, depth + 1) for v in value[:MAX_ITEMS]]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in list(value.items())[:MAX_ITEMS]:
            if isinstance(k, str) and _NAME.fullmatch(k):
                if k in FIGURE_MAPS:
                    out[k] = figures(v)
                elif k == "psi":
                    out[k] = percents(v)
                else:
                    out[k] = clean(v, depth + 1)
        return out
    return None


def number(value: object, default: float = 0.0) -> float:
    """A finite number from the guest, or `default`."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return default
