"""The tree says which layer may import which (STYLE.md 14, DESIGN.md's layout): host/ knows nothing above it;
snapshot/ drives host/ but knows neither the daemon nor the fleet; fleet/ is used by the daemon and never imports
it; the guest side is stdlib-only and imports nothing of the host's."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "memvisor"
# package -> the memvisor packages it must never import
FORBIDDEN = {
    "host": ("memvisor.snapshot", "memvisor.service", "memvisor.fleet", "memvisor.cli", "memvisor.sdk"),
    "snapshot": ("memvisor.service", "memvisor.fleet", "memvisor.cli", "memvisor.sdk"),
    "fleet": ("memvisor.service", "memvisor.cli", "memvisor.sdk"),
    "guest": ("memvisor.host", "memvisor.snapshot", "memvisor.service", "memvisor.fleet", "memvisor.image"),
}


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; `from memvisor import x` counts as memvisor.x)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []:
        for name in sorted(imports(path)):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    assert not bad, "\n".join(bad)
