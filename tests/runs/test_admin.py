"""The Django admin as the control panel for runs: pages, actions and who may use them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from runs import services
from runs.models import BudgetGuard, HumanNote, Phase, PhaseAttempt, PhaseRoutingDecision, Run
from runs.plans import parse_plan_bytes, validate_plan
from runs.states import PhaseState, RunState
from tests.factories import metered_call, set_provider_keys, staff_user
from tests.runs.changes import PASSED_CHECK, record_change

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"
pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    set_provider_keys(monkeypatch)


@pytest.fixture
def superuser_client() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    return client


@pytest.fixture
def staff_reader_client() -> Client:
    """Staff who may view runs in the admin but hold no control permission."""
    user = staff_user("reader", "view_run", "change_run")
    client = Client()
    client.force_login(user)
    return client


def make_run() -> Run:
    return services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))


def act(client: Client, action: str, *runs: Run) -> str:
    response = client.post(
        reverse("admin:runs_run_changelist"),
        {"action": action, "_selected_action": [r.pk for r in runs]},
        follow=True,
    )
    assert response.status_code == 200
    return " ".join(str(m) for m in response.context["messages"])


def state(run: Run) -> str:
    run.refresh_from_db()
    return run.state


def test_each_run_action_goes_through_the_services(superuser_client: Client) -> None:
    run = make_run()

    assert "Start: run(s)" in act(superuser_client, "start_runs", run)
    assert state(run) == RunState.RUNNING
    assert run.phases.get(position=1).state == PhaseState.QUEUED

    # Nothing is being built yet, so a pause takes effect at once and un-queues the phase.
    assert "Pause: run(s)" in act(superuser_client, "pause_runs", run)
    assert state(run) == RunState.PAUSED
    assert run.phases.get(position=1).state == PhaseState.PENDING

    assert "Resume: run(s)" in act(superuser_client, "resume_runs", run)
    assert state(run) == RunState.RUNNING

    assert "Stop: run(s)" in act(superuser_client, "stop_runs", run)
    assert state(run) == RunState.STOPPED
    assert set(run.phases.values_list("state", flat=True)) == {PhaseState.CANCELLED}


def test_an_action_a_run_cannot_take_is_reported_and_changes_nothing(
    superuser_client: Client,
) -> None:
    done, fresh = make_run(), make_run()
    services.run_start(run_id=done.pk)
    services.run_stop(run_id=done.pk)

    message = act(superuser_client, "resume_runs", done, fresh)
    assert message.startswith("Cannot resume: ")
    assert f"run {done.pk} is stopped" in message and f"run {fresh.pk} is pending" in message
    assert (state(done), state(fresh)) == (RunState.STOPPED, RunState.PENDING)


def test_staff_without_the_control_permission_are_not_offered_the_actions(
    staff_reader_client: Client,
) -> None:
    run = make_run()
    page = staff_reader_client.get(reverse("admin:runs_run_changelist"))
    assert page.status_code == 200
    assert b"start_runs" not in page.content and b"stop_runs" not in page.content

    response = staff_reader_client.post(
        reverse("admin:runs_run_changelist"),
        {"action": "start_runs", "_selected_action": [run.pk]},
    )
    assert response.status_code in (200, 302)
    assert state(run) == RunState.PENDING


def test_the_run_list_shows_progress_and_tokens_in_a_constant_number_of_queries(
    superuser_client: Client, django_assert_max_num_queries: object
) -> None:
    runs = [make_run() for _ in range(3)]
    services.run_start(run_id=runs[0].pk)
    first = runs[0].phases.get(position=1)
    metered_call(
        "openai", "gpt-5", prompt=1234, completion=567, run_id=runs[0].pk, phase_id=first.pk
    )
    url = reverse("admin:runs_run_changelist")
    with django_assert_max_num_queries(12):  # type: ignore[operator]
        page = superuser_client.get(url)
    assert page.status_code == 200
    html = page.content.decode()
    # The progress page's words, each row's phase read in the list's own query.
    assert (
        "Working on phase 1 of 9 (Invitation model and migration) · tier 1 of 3 (Foundations)"
        " · 0 of 9 phases done"
    ) in html
    assert "Not started: 9 phases in 3 tiers" in html
    assert "1,234 / 567" in html

    for _ in range(20):
        make_run()
    with django_assert_max_num_queries(12):  # type: ignore[operator]
        assert superuser_client.get(url).status_code == 200

    filtered = superuser_client.get(url, {"state__exact": "running"})
    assert filtered.status_code == 200
    assert len(filtered.context["cl"].result_list) == 1


def test_a_run_page_shows_its_phases_read_only_with_models_used(
    superuser_client: Client,
) -> None:
    run = make_run()
    phase = run.phases.get(position=1)
    PhaseRoutingDecision.objects.create(
        phase=phase,
        attempt_number=1,
        role="builder",
        category=phase.category,
        complexity=phase.complexity,
        model="claude-sonnet-4-5",
        provider="anthropic",
        reason="baseline",
    )
    Phase.objects.filter(pk=phase.pk).update(builder_output="<script>alert(1)</script>")
    page = superuser_client.get(reverse("admin:runs_run_change", args=[run.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "builder: claude-sonnet-4-5" in html
    assert 'name="phases-0-state"' not in html  # read-only, not an input

    phase_page = superuser_client.get(reverse("admin:runs_phase_change", args=[phase.pk]))
    assert phase_page.status_code == 200
    assert "<script>alert(1)</script>" not in phase_page.content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in phase_page.content.decode()


@pytest.mark.parametrize(
    "name",
    [
        "runs_run",
        "runs_phase",
        "runs_budgetguard",
        "runs_guardfiring",
        "runs_humannote",
        "runs_phaseroutingdecision",
        "routing_modelroute",
        "routing_modelchange",
        "routing_cataloguemodel",
        "routing_providerendpoint",
        "routing_routingpolicy",
        "usage_providerquota",
        "usage_usageevent",
    ],
)
def test_every_admin_list_opens(superuser_client: Client, name: str) -> None:
    make_run()
    response = superuser_client.get(reverse(f"admin:{name}_changelist"))
    assert response.status_code == 200


def test_budget_guards_are_edited_in_the_admin_and_bad_values_are_refused(
    superuser_client: Client,
) -> None:
    add = reverse("admin:runs_budgetguard_add")
    form = {
        "provider": "anthropic",
        "period": "week",
        "threshold_percent": "80",
        "action": "stop",
        "enabled": "on",
    }
    response = superuser_client.post(add, form)
    assert response.status_code == 302
    guard = BudgetGuard.objects.get()
    assert (guard.run_id, guard.enabled) == (None, True)
    # A period names the window of that name.
    assert (guard.window, guard.period) == ("week", "week")
    assert str(guard) == "anthropic > 80% week → stop"

    refused = superuser_client.post(add, {**form, "threshold_percent": "150"})
    assert refused.status_code == 200 and refused.context["adminform"].form.errors
    unknown = superuser_client.post(add, {**form, "period": "", "window": "fortnight"})
    assert unknown.context["adminform"].form.errors["window"] == [
        "anthropic has no 'fortnight' window (its windows: session, week, day, month)"
    ]
    assert BudgetGuard.objects.count() == 1
    by_window = superuser_client.post(add, {**form, "period": "", "window": "session"})
    assert by_window.status_code == 302
    assert BudgetGuard.objects.filter(window="session", period="").count() == 1


def test_a_long_runs_page_lists_the_phases_around_the_current_one_and_links_to_all(
    superuser_client: Client,
) -> None:
    plan = {
        "name": "Long run",
        "tiers": [
            {
                "name": f"Tier {t}",
                "phases": [
                    {"name": f"P{t}.{i}", "category": "core_backend", "complexity": "low"}
                    for i in range(1, 21)
                ],
            }
            for t in range(1, 7)
        ],
    }
    run = services.run_create(plan=validate_plan(plan))
    Run.objects.filter(pk=run.pk).update(
        state=RunState.RUNNING, completed_phases=79, current_tier_index=4, current_phase_index=80
    )
    page = superuser_client.get(reverse("admin:runs_run_change", args=[run.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "Phases: 50 of 120, around the current one" in html
    assert "P4.10" in html and "P6.19" in html  # phases 70 and 119
    assert "P4.9<" not in html and "P6.20<" not in html  # 69 and 120: outside the window
    listing = f"{reverse('admin:runs_phase_changelist')}?run__id__exact={run.pk}"
    assert f'href="{listing}"' in html
    every = superuser_client.get(listing)
    assert every.status_code == 200 and every.context["cl"].result_count == 120


# --- the phase page: per attempt, what was asked, answered, changed, checked and judged -------


@pytest.fixture
def workspaces(settings: Any, tmp_path: Path) -> Path:
    settings.AUTOPACK_WORKSPACE_ROOT = tmp_path / "workspaces"
    return tmp_path


def test_the_phase_page_shows_each_attempts_prompt_reply_diff_checks_refusal_and_verdict(
    superuser_client: Client, workspaces: Path
) -> None:
    run = make_run()
    services.run_start(run_id=run.pk)
    phase = run.phases.get(position=1)
    record_change(
        run,
        phase,
        {"app/models.py": "class Invitation:\n    pass\n"},
        approve=False,
        prompt="Autopack-Role: builder\nAttempt: 1\nHuman notes:\n- use the EmailService\n",
        reply="WRITE app/models.py ...",
        checks=[{**PASSED_CHECK, "outcome": "failed", "exit_code": 1, "output": "E  NameError"}],
        verdict={},
    )
    PhaseAttempt.objects.filter(phase=phase, number=1).update(
        edit_error="block 2: the search text was not found in app/views.py"
    )
    record_change(
        run,
        phase,
        {"app/models.py": "class Invitation:\n    email = ''\n"},
        number=2,
        verdict={
            "decision": "approve",
            "summary": "Looks right",
            "issues": [{"severity": "minor", "title": "naming", "detail": "rename x"}],
        },
    )
    page = superuser_client.get(reverse("admin:runs_phase_change", args=[phase.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "- use the EmailService" in html  # the note reached the builder's prompt
    assert "WRITE app/models.py ..." in html
    assert "block 2: the search text was not found in app/views.py" in html
    assert (
        "<code>python -m pytest -q</code>: <strong>failed</strong> (exit 1, 0.8 s, sandboxed)"
        in html
    )
    assert '<pre class="check-output"' in html and "E  NameError" in html
    assert 'class="meta">diff --git a/app/models.py b/app/models.py</span>' in html
    assert 'class="add">+    pass</span>' in html  # attempt 1's, rejected
    assert 'class="add">+    email = &#x27;&#x27;</span>' in html
    assert "<strong>approve</strong> Looks right" in html
    assert "<li>[minor] naming: rename x</li>" in html
    attempt = PhaseAttempt.objects.get(phase=phase, number=2)
    assert f"commit <code>{attempt.commit_sha}</code> · 1 file(s), +2 −0 · checks Passed" in html
    # Read-only: nothing of an attempt can be edited from this page.
    assert 'name="attempts-0-builder_prompt"' not in html and 'name="attempts-0-diff"' not in html


def test_the_run_page_shows_the_real_working_tree_branch_and_the_patch_link(
    superuser_client: Client, workspaces: Path
) -> None:
    run = make_run()
    services.run_start(run_id=run.pk)
    record_change(run, run.phases.get(position=1), {"a.py": "a\n"})
    run.refresh_from_db()
    html = superuser_client.get(reverse("admin:runs_run_change", args=[run.pk])).content.decode()
    assert run.workspace_path in html and f"autopack/run-{run.pk}" in html
    assert run.head_commit in html
    assert f'href="/runs/{run.pk}/patch"' in html
    assert 'name="branch"' not in html and 'name="head_commit"' not in html


# --- issue 15, items 10 and 8: read-only pages, readable JSON, seconds, wide lists, notes --------


def test_read_only_run_and_phase_pages_offer_no_save_and_delete_only_for_an_ended_run(
    superuser_client: Client,
) -> None:
    live, ended = make_run(), make_run()
    services.run_start(run_id=ended.pk)
    services.run_stop(run_id=ended.pk)

    html = superuser_client.get(reverse("admin:runs_run_change", args=[live.pk])).content.decode()
    assert 'name="_save"' not in html and 'name="_continue"' not in html
    assert 'class="deletelink"' not in html  # a pending run is not deleted from under a worker
    assert "closelink" in html
    delete = superuser_client.get(reverse("admin:runs_run_delete", args=[live.pk]))
    assert delete.status_code == 403

    html = superuser_client.get(reverse("admin:runs_run_change", args=[ended.pk])).content.decode()
    assert 'name="_save"' not in html
    assert 'class="deletelink"' in html  # a stopped run may go

    phase = live.phases.get(position=1)
    html = superuser_client.get(
        reverse("admin:runs_phase_change", args=[phase.pk])
    ).content.decode()
    assert 'name="_save"' not in html and 'class="deletelink"' not in html
    phases = superuser_client.get(reverse("admin:runs_phase_changelist"))
    assert "delete_selected" not in phases.content.decode()
    assert Run.objects.count() == 2


def test_the_run_page_shows_run_context_and_plan_as_indented_escaped_json(
    superuser_client: Client,
) -> None:
    run = make_run()
    Run.objects.filter(pk=run.pk).update(
        run_context={"mapping": {"builder": {"ui:low": {"model": "<b>haiku</b>"}}}}
    )
    html = superuser_client.get(reverse("admin:runs_run_change", args=[run.pk])).content.decode()
    assert '<pre class="json"' in html
    # Indented, one key a line; escaped (quotes too), as it is partly model- and user-written.
    assert "\n  &quot;mapping&quot;: {\n    &quot;builder&quot;: {" in html
    assert "&lt;b&gt;haiku&lt;/b&gt;" in html and "<b>haiku</b>" not in html
    assert "\n  &quot;name&quot;: &quot;Team invitations feature&quot;," in html  # the plan
    assert 'name="run_context"' not in html and 'name="plan"' not in html  # not text boxes


def test_admin_times_are_shown_to_the_second(superuser_client: Client) -> None:
    run = make_run()
    started = datetime(2026, 3, 4, 5, 6, 37, tzinfo=UTC)
    Run.objects.filter(pk=run.pk).update(started_at=started)
    page = superuser_client.get(reverse("admin:runs_run_change", args=[run.pk])).content.decode()
    assert "2026-03-04 05:06:37" in page
    listing = superuser_client.get(reverse("admin:runs_run_changelist")).content.decode()
    assert "2026-03-04 05:06:37" in listing


def test_wide_admin_lists_get_the_page_width_below_1600_px(superuser_client: Client) -> None:
    html = superuser_client.get(reverse("admin:runs_phase_changelist")).content.decode()
    # The filters move above the list (the override in templates/admin/base_site.html).
    assert "@media (max-width: 1600px)" in html and "body #changelist-filter" in html


def test_notes_say_which_run_they_belong_to(superuser_client: Client) -> None:
    run = make_run()
    note = HumanNote.objects.create(run=run, text="use the EmailService")
    listing = superuser_client.get(reverse("admin:runs_humannote_changelist")).content.decode()
    assert f'<a href="/admin/runs/run/{run.pk}/change/">Run {run.pk}: ' in listing
    found = superuser_client.get(reverse("admin:runs_humannote_changelist"), {"q": str(run.pk)})
    assert "use the EmailService" in found.content.decode()
    page = superuser_client.get(reverse("admin:runs_humannote_change", args=[note.pk]))
    assert f"Note on run {run.pk}: use the EmailService" in page.content.decode()
    assert 'name="_save"' not in page.content.decode()
