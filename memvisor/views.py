"""Human-readable renderings of stats and ksmd state, as rich tables (the CLI prints them; --json skips them)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from memvisor.host.guestdata import printable

MIB = 2**20


def mib(value: object) -> str:
    return f"{value / MIB:.1f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def stats_table(snapshot: dict[str, Any]) -> Table:
    """One row per sandbox, then host totals in the caption."""
    table = Table(title="memvisor stats (MiB)", title_justify="left")
    for col in ("ID", "VMM PID", "guest RAM", "VMM RSS", "guest RAM RSS", "KSM merged", "KSM profit",
                "balloon", "target", "need", "guest avail", "swap used", "zram x", "policy"):
        table.add_column(col, justify="left" if col in ("ID", "policy") else "right")
    for sb in snapshot["sandboxes"]:
        k = sb.get("ksm") or {}
        g = sb.get("guest") or {}
        swap_used = sum(d["used_bytes"] for d in g.get("swap", []))
        table.add_row(
            sb["id"], str(sb.get("vmm_pid") or "-"), str(sb.get("memory_mib", "-")), mib(sb.get("vmm_rss_bytes")),
            mib(sb.get("guest_ram_rss_bytes")), mib(k.get("merging_pages", 0) * 4096 if k else None),
            mib(k.get("profit_bytes")), mib(sb.get("balloon_actual_bytes")),
            mib((sb.get("supervisor") or {}).get("target_bytes")), mib((sb.get("supervisor") or {}).get("need_bytes")),
            mib(g.get("memavailable_bytes")),
            mib(swap_used if g else None), str(g.get("zram_ratio", "-")), sb.get("summary", ""))
    host = snapshot["host"]
    ksm = host["ksm"]
    ksm_text = (f"ksmd {'running' if ksm.get('running') else 'stopped'}, saved {mib(ksm.get('saved_bytes'))} MiB"
                if ksm.get("available") else "no KSM")
    table.caption = (f"host: {mib(host['memavailable_bytes'])} of {mib(host['memtotal_bytes'])} MiB available; "
                     f"{ksm_text}")
    decisions = [f"{sb['id']}: {sb['supervisor']['reason']}" for sb in snapshot["sandboxes"] if sb.get("supervisor")]
    if decisions:
        table.caption += "\nsupervisor: " + "; ".join(printable(d) for d in decisions)
    tags = [f"{sb['id']}: {mib(sb['guest']['swap_tags_bytes'])} MiB" for sb in snapshot["sandboxes"]
            if (sb.get("guest") or {}).get("swap_tags_bytes")]
    if tags:  # confidential swap: guest RAM its integrity tags take (docs/swap.md)
        table.caption += "\nswap tag store (guest RAM): " + "; ".join(tags)
    memctl = [f"{sb['id']}: " + memctl_text(sb["memctl"]) for sb in snapshot["sandboxes"] if sb.get("memctl")]
    if memctl:
        table.caption += "\nmemctl: " + "; ".join(memctl)
    return table


def memctl_text(counters: dict[str, Any]) -> str:
    """"FREE 16 (64.0 MiB), MLOCK 1 (2.0 MiB); locked 2.0 MiB; refused: unsupported 1"."""
    requests, sizes = counters.get("requests") or {}, counters.get("bytes") or {}
    parts = [f"{code} {n} ({mib(sizes.get(code, 0))} MiB)" for code, n in requests.items() if code != "INFO"]
    text = ", ".join(parts) or "no requests"
    text += f"; locked {mib(counters.get('locked_bytes', 0))} MiB"
    rejects = counters.get("rejects") or {}
    if rejects:
        text += "; refused: " + ", ".join(f"{why} {n}" for why, n in rejects.items())
    return text


def ksm_table(values: dict[str, int], running: bool, cpu_seconds: float | None, saved_bytes: int) -> Table:
    table = Table(title=f"ksmd: {'running' if running else 'stopped'}", title_justify="left", show_header=False)
    table.add_column("key")
    table.add_column("value", justify="right")
    for key, value in values.items():
        table.add_row(key, str(value))
    table.add_row("saved (MiB)", mib(saved_bytes))
    table.add_row("ksmd cpu seconds", f"{cpu_seconds:.2f}" if cpu_seconds is not None else "-")
    return table


def stall_text(stall: dict[str, Any], console_tail: str) -> str:
    """What a timed-out sandbox looked like: the guest's last memory figures, its blocked tasks, where the
    console log with the full dump is, and the console's last lines."""
    mem = stall.get("meminfo") or {}
    vm = stall.get("vmstat") or {}
    lines = []
    if mem:
        swap = stall.get("swaps") or []
        used = sum(s.get("used_kib", 0) for s in swap) / 1024
        size = sum(s.get("size_kib", 0) for s in swap) / 1024
        lines.append(f"guest memory at the last report: MemFree {mem.get('MemFree', 0) / 1024:.1f} MiB, "
                     f"MemAvailable {mem.get('MemAvailable', 0) / 1024:.1f} MiB, Writeback {mem.get('Writeback', 0)}"
                     f" KiB, swap used {used:.1f} of {size:.1f} MiB, pswpout {vm.get('pswpout', '-')}, "
                     f"pswpin {vm.get('pswpin', '-')}")
    else:
        lines.append("the guest sent no memory figures")
    if stall.get("blocked"):
        tasks = ", ".join(f"{pid} {comm} ({where or '?'})" for pid, comm, _state, where in stall["blocked"])
        lines.append(f"tasks in uninterruptible sleep (D): {tasks}")
    else:
        lines.append("no guest task was in uninterruptible sleep")
    if not stall.get("dumped"):
        lines.append("the guest's PID 1 did not answer the request for its dump (it may be waiting for memory "
                     "itself); the kernel's own report is in the console log")
    if stall.get("console_log"):
        lines.append(f"console log with the guest's diagnostic dump kept at {stall['console_log']}")
    out = "\n".join(f"memvisor: {printable(line)}" for line in lines)
    if console_tail:
        out += "\nmemvisor: last guest console lines:\n" + "\n".join(
            f"  | {printable(line)}" for line in console_tail.splitlines())
    return out
