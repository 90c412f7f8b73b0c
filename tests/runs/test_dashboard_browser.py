"""The progress page in a real browser (Playwright driving the machine's Chromium) against a
live server, a real worker, PostgreSQL, Redis and the simulated provider."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connections

from routing.router import router
from runs import services
from runs.models import Phase, PhaseRoutingDecision, Run
from runs.notes import notes_file
from runs.plans import parse_plan_bytes
from runs.states import PhaseState, RunState
from tests.conftest import ROOT, WorkerProcess, wait_for

playwright_sync = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
EXAMPLE = ROOT / "examples" / "plan.yaml"
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.needs_broker,
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists() and os.environ.get("CI") != "true",
        reason="Chromium not installed: apt-get install chromium (make test does it)",
    ),
]
# Playwright's sync API runs an event loop in this thread; the ORM calls the test makes between
# browser steps are plain synchronous calls, so Django's async guard is relaxed for this module.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield browser
        browser.close()
        # With Playwright's loop running, the test's ORM calls got connections of their own
        # (asgiref keeps them per context); close them, or the test database cannot be dropped.
        connections.close_all()


@pytest.fixture
def operator_login(db: None) -> tuple[str, str]:
    User.objects.create_superuser("operator", "op@example.com", "correct-horse-battery")
    return "operator", "correct-horse-battery"


def log_in(page: Any, base: str, login: tuple[str, str]) -> None:
    page.goto(f"{base}/admin/login/?next=/dashboard/")
    page.fill("#id_username", login[0])
    page.fill("#id_password", login[1])
    page.click("input[type=submit]")
    page.wait_for_url(re.compile(r".*/dashboard/.*"))


def percent(page: Any) -> int:
    return int(page.text_content("#run-percent").strip().rstrip("%"))


def test_a_person_watches_and_steers_a_run_from_the_progress_page(
    live_server: Any,
    celery_worker: WorkerProcess,
    sim: Any,
    browser: Any,
    operator_login: tuple[str, str],
    settings: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.AUTOPACK_WORKSPACE_ROOT = tmp_path / "workspaces"
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GLM_API_KEY"):
        monkeypatch.setenv(key, "sim-key")
    router.invalidate()
    sim.configure(delay=0.6)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    services.run_start(run_id=run.pk)

    page = browser.new_page(viewport={"width": 1440, "height": 900})
    log_in(page, live_server.url, operator_login)
    page.goto(f"{live_server.url}/dashboard/?run={run.pk}")
    assert page.get_attribute("#progress", "data-state") in ("running", "pending")

    # the bar advances by itself (htmx polling)
    start = percent(page)
    wait_for(lambda: percent(page) > start, timeout=60, what="the progress bar to advance")
    page.screenshot(path=str(SCREENSHOTS / "dashboard-1440x900.png"), full_page=True)

    # pause: takes effect after the current phase. The steps below are taken while the run is
    # paused, so they reach the phase that comes next whatever the machine's speed: done while
    # it ran, the worker could start the phase they were meant for first (on a busy machine it
    # did, and the override then never applied).
    page.click("#run-pause")
    wait_for(
        lambda: page.get_attribute("#progress", "data-state") == "paused",
        timeout=60,
        what="the page to show paused",
    )
    run.refresh_from_db()
    assert run.state == RunState.PAUSED
    done_at_pause = run.completed_phases
    # Unclaimed phases go back to pending when the run pauses: the first is the next to start.
    upcoming = run.phases.filter(state=PhaseState.PENDING).order_by("position").first()
    assert upcoming is not None, "the run paused after its last phase"
    key = f"{upcoming.category}:{upcoming.complexity}"

    # override the auditor of the upcoming phase's category and complexity for this run only
    form = page.locator(f'form[data-key="auditor:{key}"]')
    form.locator("select").select_option("glm-4.6")
    form.locator('button[value="run"]').click()
    page.wait_for_selector("#mapping-saved")
    run.refresh_from_db()
    assert run.run_context["model_overrides"]["auditor"][key] == "glm-4.6"

    # a note to the supervisor lands in the workspace file and the next builder prompt
    page.fill("#note-text", "Use the existing EmailService <b>not</b> a new one.")
    page.click("#note-save")
    page.wait_for_selector("#note-list li")
    assert "Use the existing EmailService <b>not</b> a new one." in notes_file(run).read_text()
    assert page.locator("#note-list li b").count() == 0  # shown escaped, as text

    # resume, and the upcoming phase is audited by the overridden model. The wait is for its
    # auditor to be chosen, whichever model that is, so a wrong choice fails here at once.
    page.click("#run-resume")
    decision = wait_for(
        lambda: (
            PhaseRoutingDecision.objects.filter(phase=upcoming, role="auditor")
            .select_related("phase")
            .first()
        ),
        timeout=90,
        what=f"the auditor of phase {upcoming.position} ({key}) to be chosen",
    )
    assert (decision.model, decision.reason) == ("glm-4.6", "run override")
    assert decision.phase.position > done_at_pause
    prompts = [r["prompt"] for r in sim.requests() if r.get("role") == "builder"]
    assert any("EmailService" in p for p in prompts)

    # phone-sized: no horizontal scrolling
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    log_in(phone, live_server.url, operator_login)
    phone.goto(f"{live_server.url}/dashboard/?run={run.pk}")
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    phone.screenshot(path=str(SCREENSHOTS / "dashboard-390x844.png"), full_page=True)

    # the usage period switch
    page.click("#period-day")
    page.wait_for_selector("#period-day.current")
    assert "daily cap" in page.text_content("#usage")

    wait_for(
        lambda: Run.objects.get(pk=run.pk).state in (RunState.COMPLETED, RunState.FAILED),
        timeout=120,
        what="the run to finish",
    )
    run.refresh_from_db()
    # A failed run is a failure of its own, named here: the page would never show completed.
    assert run.state == RunState.COMPLETED, (
        run.state_reason,
        list(run.phases.exclude(failure_reason="").values_list("position", "failure_reason")),
    )
    page.wait_for_function(
        "document.querySelector('#progress').dataset.state == 'completed'", timeout=15_000
    )
    assert not page.locator("#progress[hx-trigger]").count()  # polling stopped
    assert Phase.objects.filter(run=run).count() == 9
