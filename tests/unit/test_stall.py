"""The host's reading of a stalled guest: the kernel's blocked-task report parsed from its console (a real
SysRq w report, from a guest whose swap disk was throttled to 1 IOPS), DUMPED frames, and the text the CLI
prints."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memvisor import proto, views
from memvisor.errors import ProtocolError
from memvisor.host import stall

REPORT = (Path(__file__).parent / "data" / "sysrq_blocked.txt").read_text()


def test_blocked_tasks_from_a_real_report() -> None:
    rows = stall.parse_blocked("boot noise\n" + REPORT)
    assert rows[0] == [2, "kthreadd", "D", "mempool_alloc<bio_alloc_bioset"]
    assert [r[1] for r in rows] == ["kthreadd", "kworker/0:0", "python3"]
    assert all(r[2] == "D" and r[3] for r in rows)


def test_only_the_last_report_counts_and_none_means_empty() -> None:
    assert stall.parse_blocked("no sysrq here") == []
    older = REPORT.replace("task:python3 ", "task:older ")
    assert "older" not in [r[1] for r in stall.parse_blocked(older + "\n" + REPORT)]


@given(st.text(max_size=2000))
def test_parse_never_raises_and_stays_bounded(noise: str) -> None:
    rows = stall.parse_blocked("sysrq: Show Blocked State\n" + noise + REPORT * 20)
    assert len(rows) <= proto.MAX_BLOCKED


def test_dumped_frames_are_validated() -> None:
    good = {"uptime": 1.0, "blocked": [[7, "kswapd0", "D", "mempool_alloc"]], "bytes": 10}
    proto.check(proto.Kind.DUMPED, good)
    for blocked in ([[7, "x" * 65, "D", ""]], [["7", "a", "D", ""]], [[True, "a", "D", ""]], [[1, "a", "D"]],
                    [[1, "a", "D", ""]] * (proto.MAX_BLOCKED + 1)):
        with pytest.raises(ProtocolError):
            proto.check(proto.Kind.DUMPED, {**good, "blocked": blocked})


def test_stall_text_names_memory_tasks_log_and_strips_control_characters() -> None:
    text = views.stall_text({"dumped": False, "blocked": [[9, "evil\x1b[2J", "D", "new_read<x"]],
                             "console_log": "/var/lib/memvisor/logs/x.console.log",
                             "meminfo": {"MemFree": 3072, "MemAvailable": 6144, "Writeback": 452},
                             "vmstat": {"pswpout": 6000}, "swaps": [{"used_kib": 1024, "size_kib": 4096}]},
                            "line one\n\x1b]0;title\x07")
    assert "MemFree 3.0 MiB" in text and "Writeback 452 KiB" in text and "pswpout 6000" in text
    assert "9 evil?[2J (new_read<x)" in text
    assert "PID 1 did not answer" in text and "kept at /var/lib/memvisor/logs/x.console.log" in text
    assert "\x1b" not in text and "\x07" not in text
