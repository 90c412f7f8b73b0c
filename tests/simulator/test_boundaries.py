"""The simulated provider is development tooling: no production module imports it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ("autopack_site", "usage", "routing", "runs")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_production_module_imports_the_simulator() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for app in PRODUCTION
        for path in sorted((ROOT / app).rglob("*.py"))
        for name in imported_modules(path)
        if name == "simulator" or name.startswith("simulator.")
    ]
    assert offenders == []
    assert not (ROOT / "routing" / "simulator").exists()
