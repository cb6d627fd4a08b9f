"""The guest and swap sections of the `--json` report, built from the guest's HELLO, STARTED and EXIT messages.

Pure functions of those messages and the policy: no I/O. The top-level report (timings on the host's clock, the
VMM, the image) is assembled by host/sandbox.py.
"""

from __future__ import annotations

from typing import Any

from memvisor import policy as pol

MEMINFO_KEYS = ("MemTotal", "MemFree", "MemAvailable", "SwapTotal", "SwapFree", "Shmem", "AnonPages")


def guest_section(hello: dict[str, Any] | None, started: dict[str, Any] | None,
                  exit_body: dict[str, Any] | None) -> dict[str, Any]:
    """What the guest said of itself: kernel, MemTotal, init step timings, uptimes, memory at exit."""
    guest: dict[str, Any] = {}
    if hello is not None:
        steps = {name: seconds for name, seconds in hello["steps"]}
        guest = {"kernel": hello.get("kernel"), "memtotal_kib": hello["memtotal_kib"],
                 "init_started_uptime": round(hello["uptime"] - sum(steps.values()), 3),
                 "ready_uptime": round(hello["uptime"], 3), "init_steps": steps}
    if started is not None:
        guest["command_started_uptime"] = round(started["uptime"], 3)
    if exit_body is not None and "meminfo" in exit_body:
        guest["meminfo_at_exit_kib"] = {k: exit_body["meminfo"].get(k) for k in MEMINFO_KEYS}
    return guest


def swap_section(policy: pol.Policy, hello: dict[str, Any] | None,
                exit_body: dict[str, Any] | None) -> dict[str, Any]:
    """The report's swap section: what was asked, what the guest set up, and how much was used."""
    setup = (hello or {}).get("swap") or {}
    out: dict[str, Any] = {
        "asked": str(policy.effective_swap_mode),
        "effective": setup.get("effective", "off"),
        "setup_seconds": setup.get("setup_seconds"),
        "setup_timings": setup.get("timings", {}),
        "cipher": setup.get("cipher"),
        "warnings": setup.get("warnings", []),
        "devices": setup.get("devices", []),
    }
    if exit_body is not None:
        usage = {s["device"]: s for s in exit_body.get("swaps", [])}
        for device in out["devices"]:
            active = usage.get(device["device"], {})
            device["active"] = bool(active)
            device["used_kib"] = active.get("used_kib")
            device["size_kib"] = active.get("size_kib")
            if active:
                device["priority"] = active.get("priority")
        out.update(exit_body.get("vmstat", {}))
        zram = exit_body.get("zram") or {}
        if zram:
            orig, compr = zram.get("orig_data_size", 0), zram.get("compr_data_size", 0)
            out["zram"] = {**zram, "ratio": round(orig / compr, 2) if compr else None}
    return out
