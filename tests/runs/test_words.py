"""What a person reads on the progress page and in `run_status` (issue 15, items 4 and 5):
one confirmation for Stop, one Start per run, positions in words, labels, tones, numbers."""

from __future__ import annotations

import io
import re
from decimal import Decimal

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.templatetags.static import static
from django.test import Client
from django.utils import timezone

from runs import services
from runs.models import Phase, Run
from runs.plans import parse_plan_bytes
from runs.states import PhaseState, RunState
from tests.conftest import ROOT
from tests.factories import legacy_caps_only, set_provider_keys
from usage.models import ProviderQuota
from usage.services import UsageRecord, record_usage_bulk
from usage.types import TokenUsage

pytestmark = pytest.mark.django_db
EXAMPLE = ROOT / "examples" / "plan.yaml"  # three tiers, nine phases


@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    set_provider_keys(monkeypatch)


@pytest.fixture
def operator() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("op", "op@example.com", "pw"))
    return client


def new_run(*, start: bool = True) -> Run:
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    if start:
        services.run_start(run_id=run.pk)  # phase 1 queued; its task is sent on commit only
    run.refresh_from_db()
    return run


def phase(run: Run, position: int) -> Phase:
    return run.phases.get(position=position)


def set_phase(run: Run, position: int, state: str, attempts: int) -> None:
    """Test setup: a phase as a worker would have left it."""
    Phase.objects.filter(run=run, position=position).update(
        state=state,
        attempt_count=attempts,
        finished_at=timezone.now() if state == PhaseState.COMPLETE else None,
    )


def progress(client: Client, run: Run) -> str:
    response = client.get(f"/dashboard/runs/{run.pk}/progress", headers={"HX-Request": "true"})
    assert response.status_code == 200
    return response.content.decode()


def text_of(html: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>(.*?)</', html, re.S)
    assert match, element_id
    return match.group(1).strip()


def status_text(run: Run) -> str:
    out = io.StringIO()
    call_command("run_status", str(run.pk), stdout=out)
    return out.getvalue()


# --- item 4: the controls ----------------------------------------------------------------


def test_stop_asks_for_confirmation_once(operator: Client) -> None:
    run = new_run()
    html = progress(operator, run)
    form = html[html.rindex("<form", 0, html.index('id="run-stop"')) : html.index('id="run-stop"')]
    # htmx asks (hx-confirm); a second, browser confirm() on submit asked again.
    assert form.count("confirm") == 1 and "hx-confirm=" in form
    assert "onsubmit" not in form


def test_a_pending_run_shows_one_start_and_a_new_run_from_file_apart(operator: Client) -> None:
    run = new_run(start=False)
    html = operator.get(f"/dashboard/?run={run.pk}").content.decode()
    assert len(re.findall(r">\s*Start\s*</button>", html)) == 1  # the run's own control
    assert 'id="run-start"' in html
    # Making another run is labelled as such and sits by the run selector, not the controls.
    toolbar = html[html.index('class="toolbar') : html.index('id="progress-section"')]
    assert "<summary>New run from file…</summary>" in toolbar and 'id="start-run"' in toolbar
    assert 'id="start-run"' not in html[html.index('id="progress-section"') :]


# --- item 5: the words -----------------------------------------------------------------------


def test_a_running_run_says_which_phase_it_is_on(operator: Client) -> None:
    run = new_run()
    html = progress(operator, run)
    assert text_of(html, "run-state") == "Running"
    assert text_of(html, "run-position").startswith(
        "Working on phase 1 of 9 (Invitation model and migration) · tier 1 of 3 (Foundations)"
    )


def test_a_pause_reads_pausing_then_paused_after_the_finished_phase_in_a_calm_colour(
    operator: Client,
) -> None:
    run = new_run()
    set_phase(run, 1, PhaseState.BUILDING, 1)
    services.run_pause(run_id=run.pk)  # phase 1 is being built: the pause waits for it
    html = progress(operator, run)
    assert text_of(html, "run-state") == "Pause requested"
    assert "pause_requested" not in re.sub(r'(data-state|class)="[^"]*"', "", html)
    assert text_of(html, "run-position").startswith("Pausing after phase 1 of 9")
    page = operator.get(f"/dashboard/?run={run.pk}").content.decode()
    assert f"#{run.pk} Team invitations feature · Pause requested</option>" in page

    # Phase 1 finishes and the pause takes effect: the run waits *after* phase 1.
    set_phase(run, 1, PhaseState.COMPLETE, 1)
    Run.objects.filter(pk=run.pk).update(state=RunState.PAUSED, completed_phases=1)
    html = progress(operator, run)
    assert text_of(html, "run-state") == "Paused"
    assert text_of(html, "run-position").startswith(
        "Paused after phase 1 of 9 (Invitation model and migration)"
    )
    # A person's pause is information, not an error: only failures are red.
    assert '<p class="reason info" id="run-reason">paused by a person</p>' in html
    style = operator.get(static("autopack/site.css")).getvalue().decode()
    assert ".reason.error { color:var(--full); }" in style
    assert not re.search(r"\.reason\s*\{[^}]*var\(--full\)", style)
    assert "Paused after phase 1 of 9" in status_text(run)
    assert "State: Paused (paused by a person)" in status_text(run)


def test_a_quota_pause_warns_and_a_failure_is_red(operator: Client) -> None:
    run = new_run()
    Run.objects.filter(pk=run.pk).update(
        state=RunState.PAUSED, state_reason="paused for quota: anthropic is at its cap"
    )
    assert 'class="reason warn"' in progress(operator, run)
    set_phase(run, 1, PhaseState.FAILED, 3)
    Run.objects.filter(pk=run.pk).update(
        state=RunState.FAILED, state_reason="Phase 1 failed", current_phase_index=None
    )
    html = progress(operator, run)
    assert 'class="reason error"' in html
    assert text_of(html, "run-position").startswith("Failed at phase 1 of 9")


def test_a_stopped_run_says_where_it_stopped_and_lists_the_phases_worked_on(
    operator: Client,
) -> None:
    run = new_run()
    set_phase(run, 1, PhaseState.COMPLETE, 1)
    set_phase(run, 2, PhaseState.QUEUED, 2)  # its second attempt was on its way to a worker
    Run.objects.filter(pk=run.pk).update(
        completed_phases=1, current_phase_index=2, current_tier_index=1
    )
    services.run_stop(run_id=run.pk)
    run.refresh_from_db()
    assert run.state == RunState.STOPPED
    html = progress(operator, run)
    position = text_of(html, "run-position")
    assert position.startswith(
        "Stopped during phase 2 of 9 (Signed invitation tokens) · tier 1 of 3 (Foundations)"
    )
    assert "1 of 9 phases done" in position
    assert not re.search(r"(?i)(tier|phase) 0\b", html)
    # The last phases: the one in flight and the one finished, not the seven never begun.
    table = html[html.index('id="last-phases"') :]
    assert f'id="phase-{phase(run, 2).pk}"' in table and f'id="phase-{phase(run, 1).pk}"' in table
    assert f'id="phase-{phase(run, 3).pk}"' not in table
    assert '<td>Cancelled</td><td class="wide-only">2 attempts</td>' in table
    assert '<td>Complete</td><td class="wide-only">1 attempt</td>' in table
    assert 'class="reason info"' in html
    text = status_text(run)
    assert "State: Stopped (stopped by a person)" in text
    assert "Stopped during phase 2 of 9" in text


def test_a_run_stopped_before_any_phase_began_says_so(operator: Client) -> None:
    run = new_run(start=False)
    services.run_stop(run_id=run.pk)
    html = progress(operator, run)
    assert text_of(html, "run-position") == "Stopped before its first phase"
    assert 'id="last-phases"' not in html


def test_the_chat_context_uses_labels_and_plural_rules(operator: Client) -> None:
    run = new_run()
    set_phase(run, 1, PhaseState.COMPLETE, 1)
    set_phase(run, 2, PhaseState.COMPLETE, 2)
    page = operator.get(f"/dashboard/?run={run.pk}").content.decode()
    chat = page[page.index('id="chat-context"') :]
    assert "(Complete, 1 attempt)" in chat and "(Complete, 2 attempts)" in chat
    assert "1 attempts" not in chat
    assert "State: **Running**" in chat


def test_numbers_are_grouped_and_a_cap_is_shown_beside_its_percentage(operator: Client) -> None:
    legacy_caps_only("anthropic")  # its configured week window would count the weekly cap
    ProviderQuota.objects.update_or_create(
        provider="anthropic",
        defaults={"weekly_cap_tokens": 20_000_000, "autopack_share": Decimal(1)},
    )
    run = new_run()
    record_usage_bulk(
        records=[
            UsageRecord(
                call_id=f"{run.pk}-big",
                provider="anthropic",
                model="claude-sonnet-4-5",
                role="builder",
                usage=TokenUsage(prompt_tokens=1_234_567, completion_tokens=7_654_321),
                run_id=run.pk,
                phase_id=phase(run, 1).pk,
            )
        ]
    )
    page = operator.get(f"/dashboard/?run={run.pk}").content.decode()
    assert text_of(page, "run-tokens") == "1,234,567 tokens in / 7,654,321 out"
    usage = operator.get("/dashboard/caps/?period=week").content.decode()
    usage = usage[usage.index('id="usage"') :]
    assert "1,234,567 in / 7,654,321 out" in usage
    assert "<td>1,234,567</td><td>7,654,321</td>" in usage
    assert re.search(r"44% of weekly cap <span[^>]*>\(20,000,000 tokens\)</span>", usage)


def test_the_30_day_chart_has_dates_on_its_axis(operator: Client) -> None:
    html = operator.get("/dashboard/usage/partial?period=week").content.decode()
    today = timezone.now().date()
    # One chart per provider (the usage panel's SVG); each axis ends with today's date, and
    # four more a week apart.
    axis = html[html.index('id="chart-axis-1"') :]
    axis = axis[: axis.index("</g>")]
    assert axis.endswith(f'data-date="{today:%Y-%m-%d}">{today:%b} {today.day}</text>')
    assert axis.count('class="x-tick"') == 5
    assert f"<title>{today:%b} {today.day}: 0 tokens</title>" in html
