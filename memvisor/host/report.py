"""The guest and swap sections of the `--json` report, built from the guest's HELLO, STARTED and EXIT messages.

Pure functions of those messages and the policy: no I/O. The top-level report (timings on the host's clock, the
VMM, the image) is assembled by host/sandbox.py.
"""

from __future__ import annotations

from typing import Any

from memvisor import policy as pol
from memvisor.host.guestdata import number

MEMINFO_KEYS = ("MemTotal", "MemFree", "MemAvailable", "SwapTotal", "SwapFree", "Shmem", "AnonPages")


def guest_section(hello: dict[str, Any] | None, started: dict[str, Any] | None,
                  exit_body: dict[str, Any] | None) -> dict[str, Any]:
    """What the guest said of itself: kernel, MemTotal, init step timings, uptimes, memory at exit."""
    guest: dict[str, Any] = {}
    if hello is not None:
        steps = {str(p[0]): number(p[1]) for p in _list(hello.get("steps"))
                 if isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)}
        uptime = number(hello.get("uptime"))
        guest = {"kernel": hello.get("kernel"), "memtotal_kib": hello.get("memtotal_kib"),
                 "init_started_uptime": round(uptime - sum(steps.values()), 3),
                 "ready_uptime": round(uptime, 3), "init_steps": steps}
    if started is not None:
        guest["command_started_uptime"] = round(number(started.get("uptime")), 3)
    if exit_body is not None and isinstance(exit_body.get("meminfo"), dict):
        guest["meminfo_at_exit_kib"] = {k: exit_body["meminfo"].get(k) for k in MEMINFO_KEYS}
    return guest


def swap_section(policy: pol.Policy, hello: dict[str, Any] | None,
                exit_body: dict[str, Any] | None) -> dict[str, Any]:
    """The report's swap section: what was asked, what the guest set up, and how much was used."""
    setup = _dict((hello or {}).get("swap"))
    out: dict[str, Any] = {
        "asked": str(policy.effective_swap_mode),  # the host's policy; the guest's own words are below
        "effective": setup.get("effective", "off"),
        "setup_seconds": setup.get("setup_seconds"),
        "setup_timings": _dict(setup.get("timings")),
        "cipher": setup.get("cipher"),
        "tag_store": _dict(setup.get("tag_store")) or None,  # confidential: the tags' RAM disk in the guest
        "warnings": [w for w in _list(setup.get("warnings")) if isinstance(w, str)],
        "devices": [d for d in _list(setup.get("devices")) if isinstance(d, dict) and isinstance(d.get("device"), str)],
    }
    if exit_body is not None:
        usage = {s["device"]: s for s in _list(exit_body.get("swaps"))
                 if isinstance(s, dict) and isinstance(s.get("device"), str)}
        for device in out["devices"]:
            active = usage.get(device["device"], {})
            device["active"] = bool(active)
            device["used_kib"] = active.get("used_kib")
            device["size_kib"] = active.get("size_kib")
            if active:
                device["priority"] = active.get("priority")
        if out["tag_store"] is not None:  # guest RAM the tags took, at the command's end
            out["tag_store"]["used_bytes"] = _dict(exit_body.get("reclaim")).get("tags_kib", 0) * 1024
        vmstat = _dict(exit_body.get("vmstat"))
        for key in ("pswpin", "pswpout"):  # named fields only: a guest key never replaces one of the host's
            out[key] = vmstat.get(key)
        zram = _dict(exit_body.get("zram"))
        if zram:
            orig, compr = zram.get("orig_data_size", 0), zram.get("compr_data_size", 0)
            out["zram"] = {**zram, "ratio": round(orig / compr, 2) if compr else None}
    return out


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
