"""The policy reference must name every setting by every name it has."""

from __future__ import annotations

from pathlib import Path

from memvisor import policy

DOC = Path(__file__).parents[2] / "docs" / "policy.md"


def test_policy_reference_lists_every_setting() -> None:
    text = DOC.read_text()
    for s in policy.SETTINGS:
        row = next((line for line in text.splitlines() if line.startswith(f"| {s.field} |")), None)
        assert row is not None, f"docs/policy.md has no row for {s.field}"
        assert f"`{s.flag}" in row and f"`{s.toml_key}`" in row, row
        if s.cmdline:
            assert f"`memvisor.{s.cmdline}`" in row, row
