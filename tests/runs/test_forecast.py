"""Issue 16, "Per run": the tokens a run still needs (estimated from its own finished phases, or
from earlier runs of the same categories while it has none), its ETA from its phase durations,
and whether it fits each cap window before the reset; on the progress page, in the status API,
in MCP's run_status and in the run_status command.

Real database: runs made by the services, usage recorded by record_usage, cap windows set as
models.yaml's import sets them. The clock is moved by passing `now`, never by sleeping.
"""

from __future__ import annotations

import importlib
import io
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TextIO

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from routing.router import router
from runs import services
from runs.forecast import run_forecast
from runs.models import Phase, Run
from runs.plans import validate_plan
from runs.states import PhaseState, RunState
from tests.factories import set_provider_keys
from tests.runs.test_mcp import make_user, stdio_server
from usage import display
from usage.models import UsageEvent
from usage.services import UsageRecord, provider_windows_set, record_usage
from usage.types import TokenUsage
from usage.windows import window_from_config

# A Wednesday, late in the UTC day: the day window resets at midnight, 2 h from the usage.
USED_AT = datetime(2026, 3, 4, 22, 0, tzinfo=UTC)
NOW = USED_AT + timedelta(minutes=30)
PHASE = timedelta(minutes=10)
# core_backend:medium goes to claude-sonnet-5-5 (anthropic) for the builder and gpt-6.1-sol
# (openai) for the auditor (config/models.yaml).
BUILDER = ("anthropic", "claude-sonnet-5-5")
AUDITOR = ("openai", "gpt-6.1-sol")


@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    set_provider_keys(monkeypatch)
    # Starting a run queues its first phase; no worker runs here, so send the message nowhere.
    monkeypatch.setattr(services, "current_app", SimpleNamespace(send_task=lambda *a, **k: None))
    yield
    router.invalidate()


def started_run(name: str, phases: int, *, category: str = "core_backend") -> Run:
    plan = {
        "name": name,
        "tiers": [
            {
                "name": "Only tier",
                "phases": [
                    {"name": f"Step {i}", "category": category, "complexity": "medium"}
                    for i in range(1, phases + 1)
                ],
            }
        ],
    }
    run = services.run_create(plan=validate_plan(plan))
    services.run_start(run_id=run.pk)
    return run


def call(
    run: Run, phase: Phase, who: tuple[str, str], role: str, tokens: int, at: datetime
) -> None:
    provider, model = who
    record_usage(
        record=UsageRecord(
            call_id=f"forecast-{uuid.uuid4().hex}",
            provider=provider,
            model=model,
            role=role,
            usage=TokenUsage(prompt_tokens=tokens * 4 // 5, completion_tokens=tokens // 5),
            run_id=run.pk,
            phase_id=phase.pk,
            created_at=at,
        )
    )


def finish(
    run: Run,
    count: int,
    *,
    builder: int,
    auditor: int,
    took: timedelta | None = PHASE,
    used_at: datetime | None = USED_AT,
) -> None:
    """The run's next `count` phases complete through the services, as a worker moves them
    (claim, builder, checks, verdict: the phase's usage totals are written when it completes),
    each with two builder calls of half `builder` tokens (a retried call) and an auditor call of
    `auditor` tokens recorded before its verdict; then each is made `took` long, the last
    ending `count` phases ago."""
    for n in range(count):
        phase = Phase.objects.get(run=run, state=PhaseState.QUEUED)
        ticket = services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token)
        assert ticket is not None
        at = used_at or datetime.now(UTC)
        call(run, phase, BUILDER, "builder", builder // 2, at)
        call(run, phase, BUILDER, "builder", builder // 2, at)
        assert services.phase_builder_done(ticket=ticket, model=BUILDER[1], output="built")
        assert services.phase_checks_record(ticket=ticket, checks=[]).outcome == "audit"
        call(run, phase, AUDITOR, "auditor", auditor, at)
        outcome = services.phase_verdict_record(
            ticket=ticket, model=AUDITOR[1], verdict={"verdict": "approve", "issues": []}
        )
        assert outcome.outcome == "complete"
        end = (used_at or datetime.now(UTC)) - (count - 1 - n) * (took or PHASE)
        Phase.objects.filter(pk=phase.pk).update(
            started_at=end - took if took is not None else None,
            finished_at=end if took is not None else None,
        )


def anthropic_caps(**caps: int) -> None:
    """Anthropic's cap windows: calendar windows in UTC named as given, with these token caps."""
    provider_windows_set(
        provider="anthropic",
        windows=[
            window_from_config(
                {"name": name, "kind": "calendar", "unit": name, "cap_tokens": cap},
                provider="anthropic",
            )
            for name, cap in caps.items()
        ],
    )
    router.invalidate()


def windows_of(forecast: Any, provider: str) -> dict[str, Any]:
    need = next(p for p in forecast.providers if p.provider == provider)
    return {w.window: w for w in need.windows}


@pytest.mark.django_db
def test_a_run_that_needs_more_than_a_window_has_left_names_the_phase_near_which_it_pauses() -> (
    None
):
    run = started_run("Billing", 20)
    finish(run, 4, builder=50_000, auditor=10_000)
    # 200 k of each used by the four phases: 500 k left in both windows. The 16 phases left
    # need 16 × 50 k = 800 k anthropic tokens; the running need passes 500 k at the 11th of
    # them, phase 15, reached after 10 phases of 10 min: 00:10 tomorrow.
    anthropic_caps(day=700_000, week=700_000)

    forecast = run_forecast(run_id=run.pk, now=NOW)

    assert forecast is not None
    assert forecast.remaining_phases == 16
    assert forecast.estimated_phases == 16
    assert forecast.basis == "from 4 finished phases of this run"
    assert {p.provider: p.tokens_estimate for p in forecast.providers} == {
        "anthropic": 800_000,
        "openai": 160_000,
    }
    # Three calls per finished phase: two of the builder (two attempts), one of the auditor.
    assert {p.provider: p.requests_estimate for p in forecast.providers} == {
        "anthropic": 32,
        "openai": 16,
    }
    week = windows_of(forecast, "anthropic")["week"]
    assert (week.fits, week.pause_near_phase, week.left, week.need_estimate) == (
        False,
        15,
        500_000,
        800_000,
    )
    assert week.text == (
        "needs about 800 k more anthropic tokens, 500 k are left this week: "
        "it would pause near phase 15 unless a fallback takes over"
    )
    # The day resets at midnight, before the run gets to phase 15: it fits after the reset.
    day = windows_of(forecast, "anthropic")["day"]
    midnight = datetime(2026, 3, 5, tzinfo=UTC)
    assert (day.fits, day.fits_after_reset, day.pause_near_phase, day.reset) == (
        True,
        True,
        15,
        midnight,
    )
    assert day.text == (
        "needs about 800 k more anthropic tokens, 500 k are left today, and it resets "
        f"{display.when_text(midnight, now=NOW)} (in 1 h 30 min) before the run reaches "
        "phase 15: it fits after the reset"
    )
    # OpenAI's windows (models.yaml's) hold the auditor's 160 k easily: no sentence.
    assert all(w.fits and not w.text for w in windows_of(forecast, "openai").values())
    assert forecast.lines[1:] == [day.text, week.text]
    assert forecast.lines[0].startswith(
        "Forecast: about 960 k more tokens (anthropic 800 k, openai 160 k) for 16 phases left"
    )
    assert forecast.lines[0].endswith("· est. from 4 finished phases of this run")


@pytest.mark.django_db
def test_a_window_that_resets_before_the_run_gets_far_enough_fits() -> None:
    run = started_run("Billing", 20)
    finish(run, 4, builder=50_000, auditor=10_000)
    anthropic_caps(day=700_000)
    # Phases of an hour: phase 15 is 10 h away, long after midnight.
    Phase.objects.filter(run=run, state=PhaseState.COMPLETE).update(
        finished_at=NOW, started_at=NOW - timedelta(hours=1)
    )
    forecast = run_forecast(run_id=run.pk, now=NOW)
    assert forecast is not None
    day = windows_of(forecast, "anthropic")["day"]
    assert day.fits and day.fits_after_reset
    # With phases of a minute the run reaches phase 15 at 22:40, before midnight: it pauses.
    Phase.objects.filter(run=run, state=PhaseState.COMPLETE).update(
        finished_at=NOW, started_at=NOW - timedelta(minutes=1)
    )
    forecast = run_forecast(run_id=run.pk, now=NOW)
    assert forecast is not None
    day = windows_of(forecast, "anthropic")["day"]
    assert (day.fits, day.fits_after_reset, day.pause_near_phase) == (False, False, 15)
    assert day.text.endswith(
        "left today: it would pause near phase 15 unless a fallback takes over"
    )


@pytest.mark.django_db
def test_the_eta_follows_the_median_phase_and_the_clock() -> None:
    run = started_run("Billing", 20)
    finish(run, 4, builder=50_000, auditor=10_000)
    # One slow phase does not move a median.
    first = run.phases.get(position=1)
    assert first.finished_at is not None
    Phase.objects.filter(pk=first.pk).update(started_at=first.finished_at - timedelta(hours=5))

    forecast = run_forecast(run_id=run.pk, now=NOW)
    assert forecast is not None
    assert forecast.phase_duration_estimate == PHASE
    assert forecast.work_left_estimate == 16 * PHASE
    assert forecast.eta_estimate == NOW + 16 * PHASE
    assert (
        f"ETA about {display.when_text(NOW + 16 * PHASE, now=NOW)} (in 2 h 40 min)"
        in forecast.lines[0]
    )
    # An hour later with no progress the ETA is an hour later.
    later = run_forecast(run_id=run.pk, now=NOW + timedelta(hours=1))
    assert later is not None and later.eta_estimate == NOW + timedelta(hours=1) + 16 * PHASE
    # The phase in flight for 4 min has 6 min left.
    Phase.objects.filter(run=run, position=5).update(
        state=PhaseState.BUILDING, started_at=NOW - timedelta(minutes=4)
    )
    forecast = run_forecast(run_id=run.pk, now=NOW)
    assert forecast is not None
    assert forecast.eta_estimate == NOW + 16 * PHASE - timedelta(minutes=4)
    # Paused: no clock runs, only the work left is said.
    Run.objects.filter(pk=run.pk).update(state=RunState.PAUSED)
    paused = run_forecast(run_id=run.pk, now=NOW)
    assert paused is not None and paused.eta_estimate is None
    assert "· about 2 h 36 min of work left ·" in paused.lines[0]


@pytest.mark.django_db
def test_a_run_with_no_finished_phase_estimates_from_an_earlier_run_of_its_categories() -> None:
    earlier = started_run("Earlier billing", 6)
    finish(earlier, 2, builder=30_000, auditor=6_000, took=timedelta(minutes=20))
    unrelated = started_run("Docs", 3, category="docs")
    finish(unrelated, 3, builder=1_000, auditor=1_000, took=timedelta(minutes=1))
    run = started_run("Billing", 5)

    forecast = run_forecast(run_id=run.pk, now=NOW)

    assert forecast is not None
    assert forecast.basis == "from 2 finished phases of earlier runs of the same categories"
    assert (forecast.basis_run_phases, forecast.basis_earlier_phases) == (0, 2)
    assert {p.provider: p.tokens_estimate for p in forecast.providers} == {
        "anthropic": 150_000,
        "openai": 30_000,
    }
    # The ETA from the earlier run's phases of the same category: 5 × 20 min.
    assert forecast.phase_duration_estimate == timedelta(minutes=20)
    assert forecast.eta_estimate == NOW + timedelta(minutes=100)
    assert forecast.lines[0].endswith(
        "· est. from 2 finished phases of earlier runs of the same categories "
        "· fits every cap window before its reset"
    )
    # Once it has finished a phase of its own, its own phases are the estimate.
    finish(run, 1, builder=10_000, auditor=2_000)
    own = run_forecast(run_id=run.pk, now=NOW)
    assert own is not None and own.basis == "from 1 finished phase of this run"
    assert {p.provider: p.tokens_estimate for p in own.providers} == {
        "anthropic": 40_000,
        "openai": 8_000,
    }


@pytest.mark.django_db
def test_without_an_earlier_phase_of_its_category_it_takes_the_same_complexity_elsewhere() -> None:
    docs = started_run("Docs", 4, category="docs")
    finish(docs, 2, builder=20_000, auditor=4_000, took=timedelta(minutes=15))
    run = started_run("Billing", 5)
    forecast = run_forecast(run_id=run.pk, now=NOW)
    assert forecast is not None
    assert forecast.basis == (
        "from 2 finished phases of earlier runs of the same complexity (other categories)"
    )
    # Routed as this run's own category is: core_backend's builder on anthropic.
    assert {p.provider: p.tokens_estimate for p in forecast.providers} == {
        "anthropic": 100_000,
        "openai": 20_000,
    }
    # Durations only from the same categories: none.
    assert forecast.eta_estimate is None
    assert "· ETA unknown (no phase duration to go by) ·" in forecast.lines[0]


@pytest.mark.django_db
def test_a_run_not_started_yet_is_told_the_work_left_not_an_eta() -> None:
    earlier = started_run("Earlier billing", 4)
    finish(earlier, 2, builder=10_000, auditor=2_000, took=timedelta(minutes=20))
    plan = validate_plan(
        {
            "name": "Billing",
            "tiers": [
                {
                    "name": "Only tier",
                    "phases": [
                        {"name": f"Step {i}", "category": "core_backend", "complexity": "medium"}
                        for i in range(3)
                    ],
                }
            ],
        }
    )
    run = services.run_create(plan=plan)
    forecast = run_forecast(run_id=run.pk, now=NOW)
    assert forecast is not None
    assert (forecast.eta_estimate, forecast.work_left_estimate) == (None, timedelta(hours=1))
    assert "· about 1 h of work left ·" in forecast.lines[0]


@pytest.mark.django_db
def test_with_nothing_finished_anywhere_it_says_there_is_nothing_to_estimate_from() -> None:
    run = started_run("Billing", 5)
    forecast = run_forecast(run_id=run.pk, now=NOW)
    assert forecast is not None
    assert (forecast.estimated_phases, forecast.tokens_estimate, forecast.providers) == (0, 0, [])
    assert forecast.eta_estimate is None
    assert forecast.lines == ["Forecast: 5 phases left, no finished phase to estimate from yet"]


@pytest.mark.django_db
def test_a_finished_run_has_no_forecast() -> None:
    run = started_run("Billing", 3)
    finish(run, 3, builder=1_000, auditor=1_000)
    Run.objects.filter(pk=run.pk).update(state=RunState.COMPLETED)
    assert run_forecast(run_id=run.pk, now=NOW) is None


@pytest.mark.django_db
def test_the_status_api_the_progress_page_and_the_command_show_it() -> None:
    run = started_run("Billing", 20)
    finish(run, 4, builder=50_000, auditor=10_000, used_at=None)
    # 200 k used this month: 100 k left, the 16 phases need 800 k.
    anthropic_caps(month=300_000)
    user = User.objects.create_superuser("op", "op@example.com", "pw")
    api = APIClient()
    api.force_authenticate(user)
    body = api.get(f"/dashboard/runs/{run.pk}/status").json()
    forecast = body["forecast"]
    assert forecast["remaining_phases"] == 16
    assert forecast["basis"] == "from 4 finished phases of this run"
    assert forecast["phase_duration_estimate"] == 600.0
    month = next(p for p in forecast["providers"] if p["provider"] == "anthropic")["windows"][0]
    assert (month["window"], month["fits"], month["pause_near_phase"]) == ("month", False, 7)
    sentence = (
        "needs about 800 k more anthropic tokens, 100 k are left this month: "
        "it would pause near phase 7 unless a fallback takes over"
    )
    assert month["text"] == sentence
    assert forecast["lines"][1:] == [sentence]
    schema = json.loads(api.get("/api/schema/?format=json").content)
    assert "forecast" in schema["components"]["schemas"]["RunStatusOutput"]["properties"]

    page = Client()
    page.force_login(user)
    html = page.get(f"/dashboard/?run={run.pk}").content.decode()
    assert 'id="run-forecast"' in html
    assert "est. from 4 finished phases of this run" in html
    assert sentence in html

    out = io.StringIO()
    call_command("run_status", str(run.pk), stdout=out)
    assert sentence in out.getvalue().splitlines()
    out = io.StringIO()
    call_command("run_status", str(run.pk), "--json", stdout=out)
    assert json.loads(out.getvalue())["forecast"]["remaining_phases"] == 16

    # updated_at moves with the state (as services do it): the status cache sees the change.
    Run.objects.filter(pk=run.pk).update(state=RunState.COMPLETED, updated_at=timezone.now())
    assert api.get(f"/dashboard/runs/{run.pk}/status").json()["forecast"] is None


@pytest.mark.django_db(transaction=True)
def test_mcp_run_status_says_where_the_run_would_pause(tmp_path: Path, server_log: TextIO) -> None:
    make_user("operator")
    run = started_run("Billing", 20)
    finish(run, 4, builder=50_000, auditor=10_000, used_at=None, took=timedelta(seconds=1))
    anthropic_caps(month=300_000)
    with stdio_server("operator", tmp_path, server_log) as client:
        status = client.text("run_status", run_id=run.pk)
    lines = status.splitlines()
    assert any(
        line.startswith("Forecast: about 960 k more tokens") and "est. from 4 finished" in line
        for line in lines
    )
    # Before the change line, which stays last.
    assert lines[-2] == (
        "needs about 800 k more anthropic tokens, 100 k are left this month: "
        "it would pause near phase 7 unless a fallback takes over"
    )
    assert lines[-1].startswith("Change: ")


@pytest.fixture
def server_log(tmp_path: Path) -> Iterator[TextIO]:
    with (tmp_path / "mcp-server.log").open("w+") as log:
        yield log


@pytest.mark.django_db
def test_the_forecast_costs_the_same_statements_for_10_and_1000_phases() -> None:
    small = started_run("Small", 10)
    finish(small, 5, builder=50_000, auditor=10_000)
    large = started_run("Large", 1000)
    finish(large, 100, builder=1_000, auditor=1_000)
    # 350 k used, 280 k left: the small run's 5 phases need 250 k, the large run's 900 need
    # 900 k. The running sums are read for both, fitting or not.
    anthropic_caps(week=630_000)
    run_forecast(run_id=small.pk, now=NOW)  # loads the router's mapping, held in memory
    counts = []
    for run in (small, large):
        with CaptureQueriesContext(connection) as captured:
            forecast = run_forecast(run_id=run.pk, now=NOW)
        assert forecast is not None and forecast.estimated_phases == forecast.remaining_phases
        counts.append(len(captured.captured_queries))
    # The run's row, its phases with their usage totals (one aggregate), the median phase, the
    # running sums, and the windows' usage (three, not handed in here).
    assert counts == [7, 7]
    started = time.perf_counter()
    run_forecast(run_id=large.pk, now=NOW)
    print(f"\nforecast of a run of 1000 phases: {(time.perf_counter() - started) * 1000:.1f} ms")
    small_week, large_week = (
        windows_of(run_forecast(run_id=r.pk, now=NOW), "anthropic")["week"] for r in (small, large)
    )
    # 1 k per phase: the 281st phase left, phase 381, passes the 280 k left.
    assert (small_week.fits, large_week.fits, large_week.pause_near_phase) == (True, False, 381)


@pytest.mark.django_db
def test_a_phase_keeps_its_usage_totals_from_its_end_and_the_forecast_reads_no_event() -> None:
    run = started_run("Billing", 6)
    finish(run, 2, builder=50_000, auditor=10_000)
    first = run.phases.get(position=1)
    # Two builder calls of 25 k and an auditor call of 10 k, all priced (models.yaml's prices).
    assert (first.builder_tokens, first.builder_calls, first.builder_unpriced_calls) == (
        50_000,
        2,
        0,
    )
    assert (first.auditor_tokens, first.auditor_calls, first.auditor_unpriced_calls) == (
        10_000,
        1,
        0,
    )
    assert first.builder_cost_usd > 0 and first.auditor_cost_usd > 0
    # Usage recorded after the terminal state is not in the totals: they were written then.
    call(run, first, BUILDER, "builder", 1_000_000, USED_AT)
    first.refresh_from_db()
    assert first.builder_tokens == 50_000
    # The forecast reads the phases' totals, never the events: none of its statements names
    # the events' table (the window rows handed in, as the status API and the page do).
    with CaptureQueriesContext(connection) as captured:
        forecast = run_forecast(run_id=run.pk, now=NOW, window_rows=[])
    assert forecast is not None
    assert {p.provider: p.tokens_estimate for p in forecast.providers} == {
        "anthropic": 200_000,
        "openai": 40_000,
    }
    table = UsageEvent._meta.db_table
    assert captured.captured_queries
    assert not [q["sql"] for q in captured.captured_queries if table in q["sql"]]


@pytest.mark.django_db
def test_a_failed_phase_counts_and_an_unpriced_call_leaves_the_usd_unknown() -> None:
    run = started_run("Billing", 4)
    phase = Phase.objects.get(run=run, state=PhaseState.QUEUED)
    ticket = services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token)
    assert ticket is not None
    call(run, phase, BUILDER, "builder", 30_000, USED_AT)
    # A model the catalogue has no price for: the call is counted, its USD is unknown.
    call(run, phase, ("anthropic", "claude-unpriced-test"), "builder", 10_000, USED_AT)
    services.phase_fail(ticket=ticket, reason="the builder gave up")
    phase.refresh_from_db()
    assert phase.state == PhaseState.FAILED
    assert (phase.builder_tokens, phase.builder_calls, phase.builder_unpriced_calls) == (
        40_000,
        2,
        1,
    )
    assert (phase.auditor_tokens, phase.auditor_calls) == (0, 0)
    # The run failed with it; the forecast of a later run of the same category samples it.
    later = started_run("Billing again", 3)
    forecast = run_forecast(run_id=later.pk, now=NOW, window_rows=[])
    assert forecast is not None
    assert forecast.basis == "from 1 finished phase of earlier runs of the same categories"
    anthropic = next(p for p in forecast.providers if p.provider == "anthropic")
    assert (anthropic.tokens_estimate, anthropic.requests_estimate) == (120_000, 6)
    assert anthropic.usd_estimate is None


@pytest.mark.django_db
def test_the_migration_fills_the_totals_of_phases_already_terminal() -> None:
    from django.apps import apps

    fill_totals = importlib.import_module("runs.migrations.0008_phase_usage_totals").fill_totals
    run = started_run("Billing", 3)
    done, cancelled, pending = run.phases.order_by("position")
    # As before the migration: terminal phases with events and no totals.
    Phase.objects.filter(pk=done.pk).update(state=PhaseState.COMPLETE)
    Phase.objects.filter(pk=cancelled.pk).update(state=PhaseState.CANCELLED)
    for phase in (done, cancelled, pending):
        call(run, phase, BUILDER, "builder", 5_000, USED_AT)
        call(run, phase, AUDITOR, "auditor", 1_000, USED_AT)
    call(run, done, ("anthropic", "claude-unpriced-test"), "auditor", 2_000, USED_AT)
    with connection.schema_editor() as editor:
        fill_totals(apps, editor)
    totals = {
        p.position: (p.builder_tokens, p.builder_calls, p.auditor_tokens, p.auditor_calls)
        for p in run.phases.all()
    }
    # The pending phase is left alone: its totals are written when it ends.
    assert totals == {1: (5_000, 1, 3_000, 2), 2: (5_000, 1, 1_000, 1), 3: (0, 0, 0, 0)}
    first = run.phases.get(position=1)
    assert (first.builder_unpriced_calls, first.auditor_unpriced_calls) == (0, 1)
    assert first.builder_cost_usd > 0
