"""Imports go one way (DESIGN.md "Layout"): runs → routing → usage, and inside runs, the guards
act through the services, which never import them back. Every import is read from the source,
those inside functions too: a lazy import is still a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it, as an absolute dotted name."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            # `from . import services` imports the module runs.services.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def sources(app: str) -> list[Path]:
    return sorted(p for p in (ROOT / app).rglob("*.py") if "migrations" not in p.parts)


@pytest.mark.parametrize(
    ("app", "forbidden"),
    [("usage", ("routing", "runs")), ("routing", ("runs",))],
)
def test_an_app_never_imports_an_app_above_it(app: str, forbidden: tuple[str, ...]) -> None:
    upward = {
        f"{path.relative_to(ROOT)}: {module}"
        for path in sources(app)
        for module in imported_modules(path)
        if module.split(".")[0] in forbidden
    }
    assert not upward


@pytest.mark.parametrize("module", ["services", "plans"])
def test_the_services_and_the_plans_never_import_the_guards(module: str) -> None:
    imported = imported_modules(ROOT / "runs" / f"{module}.py")
    assert "runs.guards" not in imported


def test_the_guards_act_through_the_services() -> None:
    assert "runs.services" in imported_modules(ROOT / "runs" / "guards.py")
