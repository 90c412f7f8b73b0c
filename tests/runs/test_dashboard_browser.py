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

from routing.models import ModelRoute
from routing.router import router
from runs.guards import guard_create
from runs.models import BudgetGuard, PhaseRoutingDecision, Run
from runs.notes import notes_file, run_note_add
from runs.states import PhaseState, RunState
from tests.conftest import ROOT, WorkerProcess, wait_for
from tests.factories import metered_call
from usage.models import ProviderWindow
from usage.services import provider_quota_upsert

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


VIEWPORTS = {"desk": (1280, 900), "phone": (390, 844)}
PAGES = {
    "run": "/dashboard/?run={run}",
    "runs": "/dashboard/runs/",
    "usage": "/dashboard/caps/",
    "models": "/dashboard/routing/",
    "guards": "/dashboard/guards/",
}


def caps(provider: str, *, weekly: int) -> None:
    provider_quota_upsert(
        provider=provider,
        daily_cap_tokens=None,
        weekly_cap_tokens=weekly,
        monthly_cap_tokens=None,
        autopack_share="1",
        soft_limit="0.8",
    )


def text(page: Any, selector: str) -> str:
    return " ".join((page.text_content(selector) or "").split())


def fits_the_width(page: Any) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


@pytest.mark.parametrize("size", list(VIEWPORTS))
def test_a_person_watches_every_panel_follow_a_run_and_steers_it_from_the_page(
    size: str,
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
    caps("anthropic", weekly=10_000_000)
    # The plan's own windows out of the way: the legacy weekly cap is anthropic's one window.
    ProviderWindow.objects.filter(provider="anthropic").delete()
    shots = SCREENSHOTS / size
    shots.mkdir(parents=True, exist_ok=True)
    width, height = VIEWPORTS[size]
    base = live_server.url

    # One browser context: the pages opened below share the login.
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # Stop's and Remove's confirmations
    log_in(page, base, operator_login)

    # --- a new run from a plan file, from the runs page -----------------------------------
    page.goto(f"{base}/dashboard/runs/")
    page.click("#new-run summary")
    page.set_input_files("#plan-file", str(EXAMPLE))
    page.click("#start-run")
    page.wait_for_url(re.compile(r".*/dashboard/\?run=\d+"))
    run = Run.objects.order_by("-pk").first()
    assert run is not None and run.name == "Team invitations feature"
    assert page.get_attribute("#progress", "data-state") in ("running", "pending")
    # Everything below happens in this one document: no reload, no navigation.
    page.evaluate("window.sameDocument = true")

    # --- every panel follows the run --------------------------------------------------------
    start = percent(page)
    wait_for(lambda: percent(page) > start, timeout=60, what="the progress bar to advance")
    # From here every new call waits until released: the run cannot run ahead of the steps
    # below (on a fast machine it would finish first), and nothing waits on a guess of time.
    hold(sim)
    wait_for(
        lambda: (
            "Progress: Working on phase" in text(page, "#chat-context")
            and "(none finished yet)" not in text(page, "#chat-context")
        ),
        timeout=60,
        what="the chat context to list a finished phase",
    )
    # Usage an agent reports, a note and a guard that others add: each panel shows them.
    metered_call(
        "anthropic",
        "claude-haiku-5-5",
        prompt=4_000_000,
        completion=1_000_000,
        role="agent:claude-code",
    )
    wait_for(
        lambda: "anthropic week 50%" in text(page, "#provider-badges"),
        timeout=30,
        what="the anthropic badge to show 50% of its weekly cap",
    )
    run_note_add(run_id=run.pk, text="Keep the <i>public</i> API as it is.")
    page.wait_for_selector("#note-list li:has-text('Keep the <i>public</i> API as it is.')")
    guard_create(
        run_id=run.pk, provider="openai", period="week", threshold_percent=90, action="pause"
    )
    page.wait_for_selector("#guards:has-text('Pause the run when OpenAI passes 90%')")
    page.screenshot(path=str(shots / "run-live.png"), full_page=True)

    # --- pause: the steps below reach the phase that comes next, whatever the machine's pace
    page.click("#run-pause")
    wait_for(
        lambda: Run.objects.get(pk=run.pk).state == RunState.PAUSE_REQUESTED,
        timeout=30,
        what="the pause to be requested",
    )
    go_on(sim)  # the phase in flight ends, then the run pauses
    wait_for(
        lambda: page.get_attribute("#progress", "data-state") == "paused",
        timeout=60,
        what="the page to show paused",
    )
    run.refresh_from_db()
    assert run.state == RunState.PAUSED
    done_at_pause = run.completed_phases
    wait_for(
        lambda: (
            "Paused" in text(page, "#run-select option:checked")
            and "State: **Paused**" in text(page, "#chat-context")
        ),
        timeout=30,
        what="the run picker and the chat context to say paused",
    )
    upcoming = run.phases.filter(state=PhaseState.PENDING).order_by("position").first()
    assert upcoming is not None, "the run paused after its last phase"
    key = f"{upcoming.category}:{upcoming.complexity}"

    # --- a model for this run only, through the change dialog --------------------------------
    page.click(f'#mapping tr[data-key="auditor:{key}"] .map-change')
    page.wait_for_selector("#model-dialog[open] #model-form")
    assert "For run #" in text(page, "#model-effect-run")
    page.select_option("#model-dialog-model", "glm-4.6")
    page.screenshot(path=str(shots / "model-dialog.png"))
    page.click("#model-apply-run")
    page.wait_for_function("!document.querySelector('#model-dialog').open")
    page.wait_for_selector("#mapping-saved")
    run.refresh_from_db()
    assert run.run_context["model_overrides"]["auditor"][key] == "glm-4.6"
    row = f'#mapping tr[data-key="auditor:{key}"]'
    assert "glm-4.6" in text(page, row)

    # --- a global default: refused until confirmed ------------------------------------------
    page.click(f'#mapping tr[data-key="builder:{key}"] .map-change')
    page.wait_for_selector("#model-dialog[open] #model-form")
    page.select_option("#model-dialog-model", "claude-haiku-5-5")
    page.click("#model-apply-global")
    page.wait_for_selector("#model-dialog[open] #model-dialog-error")
    global_row = ModelRoute.objects.filter(
        layer=ModelRoute.Layer.GLOBAL_OVERRIDE,
        role="builder",
        category=upcoming.category,
        complexity=upcoming.complexity,
        model__name="claude-haiku-5-5",
    )
    assert not global_row.exists()
    page.check("#model-confirm-global")
    page.click("#model-apply-global")
    page.wait_for_function("!document.querySelector('#model-dialog').open")
    assert global_row.exists()

    # --- "show all rows" stays shown across ticks -------------------------------------------
    rows_used = page.locator("#mapping tr.map-row").count()
    page.click("#mapping-show-all")
    page.wait_for_selector("#mapping-show-used")
    assert page.locator("#mapping tr.map-row").count() > rows_used
    tick_seen(page)
    assert page.locator("#mapping-show-used").count() == 1

    # --- a guard from the form, and its removal ---------------------------------------------
    page.select_option("#guard-action", "stop")
    page.select_option("#guard-scope", "run")
    page.select_option("#guard-provider", "anthropic")
    page.fill("#guard-percent", "80")
    page.select_option("#guard-window", "week")
    page.click("#guard-add")
    sentence = "Stop the run when Anthropic passes 80% of its week window"
    page.wait_for_selector(f"#guards:has-text('{sentence}')")
    guard = BudgetGuard.objects.get(run=run, provider="anthropic")
    page.click(f"#guard-remove-{guard.pk}")
    page.wait_for_function(f"!document.querySelector('#guards').textContent.includes({sentence!r})")
    assert not BudgetGuard.objects.filter(pk=guard.pk).exists()

    # --- a note to the supervisor lands in the notes file and the next builder prompt --------
    page.fill("#note-text", "Use the existing EmailService <b>not</b> a new one.")
    page.click("#note-save")
    page.wait_for_selector("#note-list li:has-text('EmailService')")
    assert "Use the existing EmailService <b>not</b> a new one." in notes_file(run).read_text()
    assert page.locator("#note-list li b").count() == 0  # shown escaped, as text

    # --- a finished phase's diff stays open across ticks ------------------------------------
    finished = run.phases.filter(state=PhaseState.COMPLETE).order_by("-position").first()
    if finished is not None and page.locator(f"#changes-{finished.pk}").count():
        page.click(f"#changes-{finished.pk} summary")
        page.wait_for_selector(f"#changes-slot-{finished.pk} .attempt")
        tick_seen(page)
        assert page.get_attribute(f"#changes-{finished.pk}", "open") is not None

    # --- resume: the upcoming phase is audited by the model chosen for this run -------------
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
    hold(sim)  # the run stays under way while the other pages are looked at
    assert (decision.model, decision.reason) == ("glm-4.6", "run override")
    assert decision.phase.position > done_at_pause
    prompts = [r["prompt"] for r in sim.requests() if r.get("role") == "builder"]
    assert any("EmailService" in p for p in prompts)
    tick_seen(page)
    assert "State: **Running**" in text(page, "#chat-context")
    assert "Running" in text(page, "#run-select option:checked")
    assert page.evaluate("window.sameDocument") is True
    page.screenshot(path=str(shots / "run.png"), full_page=True)
    assert fits_the_width(page), "the run page scrolls sideways"

    # --- the other pages: usage (periods, sort), models, guards, runs ----------------------
    usage = context.new_page()
    usage.goto(f"{base}/dashboard/caps/")
    usage.click("#period-day")
    usage.wait_for_selector("#period-day.current")
    usage.click("#sort-in")
    usage.wait_for_selector("th[aria-sort] #sort-in")
    tokens_before = text(usage, "#usage .cards")
    metered_call("openai", "gpt-6-luna", prompt=1_234, completion=567, role="agent:codex")
    wait_for(
        lambda: text(usage, "#usage .cards") != tokens_before,
        timeout=30,
        what="the usage cards to follow the usage an agent reported",
    )
    assert usage.locator("#period-day.current").count() == 1  # the tick kept the period
    assert usage.locator("th[aria-sort] #sort-in").count() == 1  # and the sort
    usage.screenshot(path=str(shots / "usage.png"), full_page=True)
    assert fits_the_width(usage), "the usage page scrolls sideways"
    for name in ("models", "guards", "runs"):
        usage.goto(base + PAGES[name])
        usage.wait_for_selector("nav a[aria-current=page]")
        usage.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        assert fits_the_width(usage), f"the {name} page scrolls sideways"
    runs_row = f"#runs-row-{run.pk}"
    assert "Running" in text(usage, runs_row)

    # --- stop, asked once; every panel says so ----------------------------------------------
    # Back to the run's tab: a confirmation dialog shows (and is answered) in the front tab.
    page.bring_to_front()
    page.click("#run-stop")
    wait_for(
        lambda: page.get_attribute("#progress", "data-state") in ("stopping", "stopped"),
        timeout=60,
        what="the page to show the stop",
    )
    go_on(sim)  # the held call ends; the phase is cancelled at its next checkpoint
    wait_for(
        lambda: Run.objects.get(pk=run.pk).state == RunState.STOPPED,
        timeout=90,
        what="the run to stop",
    )
    usage.wait_for_selector(f"{runs_row}:has-text('Stopped')")
    page.wait_for_function("document.querySelector('#progress').dataset.state == 'stopped'")
    assert page.locator("#run-stop").count() == 0
    page.wait_for_selector(
        "#live[hx-trigger='every 10s']", state="attached"
    )  # nothing moves: a slower pace
    page.screenshot(path=str(shots / "run-stopped.png"), full_page=True)


def hold(sim: Any) -> None:
    """Calls made from now on wait (for up to 10 minutes) until go_on releases them."""
    sim.configure(delay=600.0)


def go_on(sim: Any) -> None:
    sim.configure(delay=0.6)
    sim.release()


def tick_seen(page: Any) -> None:
    """Waits until two ticks have been swapped in after this call: the second one has replaced
    every panel the page showed before it. (Counted on the new #live each tick brings, as the
    element that sent the request is gone from the page when its events fire.)"""
    page.evaluate(
        "window.tickCount = 0; if (!window.countingTicks) { window.countingTicks = true;"
        " document.addEventListener('htmx:oobAfterSwap', e => {"
        " if (e.target.id === 'live') window.tickCount += 1 }) }"
    )
    page.wait_for_function("window.tickCount >= 2", timeout=30_000)
