"""Issue 15, item 11: `manage.py` commands print only their own words on stderr.

django-axes logged its start-up banner at INFO and kombu warned "No hostname was supplied" for
the embedded file broker, so every command the README shows printed two stray lines.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STRAY = ("AXES", "axes.", "kombu", "No hostname was supplied")


def _manage(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The README's way: `.venv/bin/python manage.py …` with the embedded defaults of `make run`
    # (SQLite and the file broker under the state folder), not the test suite's PostgreSQL/Redis.
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env["AUTOPACK_STATE_DIR"] = str(state_dir)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _stray_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(word in line for word in STRAY)]


@pytest.mark.slow
def test_commands_print_no_axes_banner_or_kombu_hostname_warning(tmp_path: Path) -> None:
    migrate = _manage(tmp_path, "migrate", "-v0")
    assert migrate.returncode == 0, migrate.stderr
    assert _stray_lines(migrate.stderr) == []

    # start_run enqueues the first phase, which opens a broker connection (kombu's warning).
    started = _manage(tmp_path, "start_run", "examples/plan.yaml")
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip().isdigit()
    assert _stray_lines(started.stderr) == [], started.stderr

    missing = _manage(tmp_path, "run_status", "999999")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "CommandError: run 999999 does not exist"

    report = _manage(tmp_path, "usage_report")
    assert report.returncode == 0, report.stderr
    assert report.stderr == ""


def test_real_warnings_of_axes_and_kombu_still_reach_the_console() -> None:
    # Only axes' start-up banner is turned down: a lockout (axes.handlers.*) and kombu's own
    # warnings (a Redis URL without a host, say) are still shown.
    assert logging.getLogger("axes.handlers.database").isEnabledFor(logging.WARNING)
    assert logging.getLogger("kombu.connection").isEnabledFor(logging.WARNING)
    assert not logging.getLogger("axes.apps").isEnabledFor(logging.INFO)
