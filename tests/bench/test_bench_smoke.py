"""The benchmark suite at its smoke size (CI): every figure is still produced.

Benchmarks are not timed tests: this checks that each benchmark runs end to end against the
real services and reports a figure and its floor, never that a target is met.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.needs_broker]

# Every figure of issue 7, and whether it is measured against a floor.
FIGURES = {
    "select_model": True,
    "record_usage": True,
    "bulk_import": True,
    "ingest": True,
    "apply_commit": True,
    "sandbox_start": True,
    "usage_summary": True,
    "window_usage": True,
    "status_api": True,
    "page_queries": False,
    "orchestration": True,
    "worker_memory": True,
    "many_runs": True,
}


def _database_url() -> str:
    # The test database itself: the suite truncates its tables, which the transactional test
    # empties afterwards anyway.
    db = settings.DATABASES["default"]
    user = quote(db.get("USER") or "postgres")
    password = f":{quote(db['PASSWORD'])}" if db.get("PASSWORD") else ""
    host, port = db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{db['NAME']}"


@pytest.mark.timeout(170)
def test_the_smoke_size_produces_every_figure_with_its_floor(tmp_path: Path) -> None:
    figures_path, doc = tmp_path / "figures.json", tmp_path / "benchmarks.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--size",
            "smoke",
            "--database-url",
            _database_url(),
            "--broker-url",
            settings.CELERY_BROKER_URL,
            "--json",
            str(figures_path),
            "--doc",
            str(doc),
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=160,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(figures_path.read_text())
    assert report["failures"] == []
    figures = {f["key"]: f for f in report["figures"]}
    assert set(figures) == set(FIGURES)
    for key, has_floor in FIGURES.items():
        assert figures[key]["value"] is not None, key
        assert (figures[key]["floor"] is not None) == has_floor, key
    page = doc.read_text()
    assert "## Figures" in page and "PostgreSQL" in page and "make bench" in page
