"""The budget guards panel and its form on the progress page: adding a guard for a run or for all
runs (with the permission that takes), every bad input refused by name with nothing written,
removing, the words of a guard's line, escaping, and the panel's query cost."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from routing.router import router
from runs import services
from runs.guards import guard_create
from runs.models import BudgetGuard, GuardFiring, Run
from runs.plans import parse_plan_bytes
from runs.selectors import guards_context
from runs.states import RunState
from tests.conftest import ROOT
from tests.factories import CONTROL, legacy_caps_only, metered_call, staff_user
from tests.runs.test_dashboard import router_caches_held  # noqa: F401
from usage.services import provider_quota_upsert

pytestmark = pytest.mark.django_db
EXAMPLE = ROOT / "examples" / "plan.yaml"
ADD = "/dashboard/guards/add"
HTMX = {"HX-Request": "true"}
STOP_AT_80 = {
    "provider": "anthropic",
    "period": "week",
    "threshold_percent": "80",
    "action": "stop",
}
ANTHROPIC_80 = "Stop the run when Anthropic passes 80% of its week window"


def login(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def caps(provider: str, *, daily: int | None = None, weekly: int | None = None) -> None:
    legacy_caps_only(provider)
    provider_quota_upsert(
        provider=provider,
        daily_cap_tokens=daily,
        weekly_cap_tokens=weekly,
        monthly_cap_tokens=None,
        autopack_share="1",
        soft_limit="0.8",
    )


def model_of(provider: str) -> str:
    return next(m for m, p in sorted(router.state().catalogue.items()) if p == provider)


def text(response: Any) -> str:
    return response.content.decode()


def flashed(response: Any) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


@pytest.fixture
def run() -> Run:
    return services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))


@pytest.fixture
def operator() -> Client:
    return login(staff_user("operator", CONTROL))


@pytest.fixture
def boss() -> Client:
    return login(staff_user("boss", CONTROL, "add_budgetguard", "delete_budgetguard"))


# --- adding ------------------------------------------------------------------------------------


def test_an_operator_adds_a_guard_for_the_run_and_the_panel_shows_it_at_once(
    operator: Client, run: Run
) -> None:
    page = operator.post(ADD, {**STOP_AT_80, "scope": "run", "run": run.pk}, headers=HTMX)

    assert page.status_code == 200
    guard = BudgetGuard.objects.get()
    assert (guard.run_id, guard.provider, guard.period, guard.action) == (
        run.pk,
        "anthropic",
        "week",
        "stop",
    )
    assert guard.threshold_percent == Decimal("80.00")
    body = text(page)
    # The form comes back cleared, saying what was added; the panel comes with it out of band.
    assert body.startswith('<div id="guard-form">') or '<div id="guard-form">' in body
    assert f"Added: {ANTHROPIC_80}." in body
    assert '<div id="guards" hx-swap-oob="true">' in body
    assert f'id="guard-{guard.pk}"' in body
    assert 'id="guard-form-error"' not in body


def test_without_htmx_adding_a_guard_goes_back_to_the_runs_page_with_a_message(
    operator: Client, run: Run
) -> None:
    page = operator.post(ADD, {**STOP_AT_80, "scope": "run", "run": run.pk})

    assert page.status_code == 302
    assert page["Location"] == f"/dashboard/?run={run.pk}"
    assert flashed(page) == [f"Guard added: {ANTHROPIC_80}."]
    assert BudgetGuard.objects.filter(run=run).count() == 1


def test_a_person_with_the_add_guard_permission_adds_a_guard_for_all_runs(
    boss: Client, run: Run
) -> None:
    page = boss.post(ADD, {**STOP_AT_80, "scope": "all", "run": run.pk}, headers=HTMX)

    assert page.status_code == 200
    guard = BudgetGuard.objects.get()
    assert guard.run_id is None
    assert "Added: Stop every run when Anthropic passes 80% of its week window." in text(page)


def test_the_guards_page_adds_a_guard_for_all_runs_and_goes_back_to_it(boss: Client) -> None:
    page = boss.post(ADD, {**STOP_AT_80, "scope": "all"})

    assert page.status_code == 302
    assert page["Location"] == "/dashboard/guards/"
    assert BudgetGuard.objects.get().run_id is None


def test_a_guard_for_all_runs_is_refused_without_the_add_guard_permission(
    operator: Client, run: Run
) -> None:
    page = operator.post(ADD, {**STOP_AT_80, "scope": "all", "run": run.pk}, headers=HTMX)

    assert page.status_code == 200
    assert (
        "The guard was refused. Scope: a guard for all runs needs the "
        "&#x27;runs.add_budgetguard&#x27; permission; add one for this run instead"
    ) in text(page)
    assert not BudgetGuard.objects.exists()


def test_the_form_offers_all_runs_only_to_people_with_the_permission(
    operator: Client, boss: Client, run: Run
) -> None:
    # The form is part of the page the lead renders; here it comes back after a refusal.
    bad = {**STOP_AT_80, "threshold_percent": "0", "scope": "run", "run": run.pk}
    assert '<option value="all"' not in text(operator.post(ADD, bad, headers=HTMX))
    assert '<option value="all"' in text(boss.post(ADD, bad, headers=HTMX))


def test_a_person_without_the_control_permission_cannot_add_a_guard(run: Run) -> None:
    reader = login(staff_user("reader"))

    page = reader.post(ADD, {**STOP_AT_80, "scope": "run", "run": run.pk}, headers=HTMX)

    assert page.status_code == 403
    assert text(page) == "You need the 'runs.control_run' permission to add a budget guard."
    assert not BudgetGuard.objects.exists()


CATALOGUE = "(one of anthropic, glm, google_gemini, openai)"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"provider": "Anthropic"},
            f"Provider: &#x27;Anthropic&#x27; is not a provider in the catalogue {CATALOGUE}; "
            "did you mean &#x27;anthropic&#x27;?",
        ),
        (
            {"provider": "mistral"},
            f"Provider: &#x27;mistral&#x27; is not a provider in the catalogue {CATALOGUE}",
        ),
        ({"provider": ""}, "Provider: a provider name such as anthropic"),
        ({"threshold_percent": "0"}, "Percent: a number above 0 and at most 100"),
        ({"threshold_percent": "150"}, "Percent: a number above 0 and at most 100"),
        ({"threshold_percent": "-5"}, "Percent: a number above 0 and at most 100"),
        ({"threshold_percent": ""}, "Percent: a number above 0 and at most 100"),
        ({"threshold_percent": "eighty"}, "Percent: a number above 0 and at most 100"),
        ({"threshold_percent": "NaN"}, "Percent: a number above 0 and at most 100"),
        ({"threshold_percent": "1e999"}, "Percent: a number above 0 and at most 100"),
        ({"action": "explode"}, "Action: one of pause, stop"),
        ({"period": "year"}, "Period: one of day, week, month"),
        ({"scope": "everything"}, "Scope: this run or all runs"),
        ({"run": ""}, "Run: choose a run for this guard (or all runs)"),
        ({"run": "999999"}, "Run: run 999999 does not exist"),
    ],
)
def test_each_bad_input_is_refused_by_name_and_nothing_is_written(
    operator: Client, run: Run, change: dict[str, str], message: str
) -> None:
    data: dict[str, Any] = {**STOP_AT_80, "scope": "run", "run": run.pk, **change}

    page = operator.post(ADD, data, headers=HTMX)

    assert page.status_code == 200
    body = text(page)
    assert "The guard was refused." in body
    assert message in body
    assert "Added:" not in body
    assert not BudgetGuard.objects.exists()


def test_every_bad_field_is_named_at_once_and_the_form_keeps_what_was_typed(
    operator: Client, run: Run
) -> None:
    data = {"provider": "mistral", "period": "week", "threshold_percent": "150", "action": "halt"}

    page = operator.post(ADD, {**data, "scope": "run", "run": run.pk}, headers=HTMX)

    body = text(page)
    refused = body.split('id="guard-form-error">', 1)[1].split("</p>", 1)[0]
    assert refused.index("Action:") < refused.index("Provider:") < refused.index("Percent:")
    assert 'value="150"' in body  # kept for the person to correct
    assert body.count('aria-invalid="true"') == 3
    assert not BudgetGuard.objects.exists()


def test_a_finished_run_takes_no_new_guard(operator: Client, run: Run) -> None:
    Run.objects.filter(pk=run.pk).update(state=RunState.COMPLETED)

    page = operator.post(ADD, {**STOP_AT_80, "scope": "run", "run": run.pk}, headers=HTMX)

    assert f"Run: run {run.pk} is completed: a finished run takes no new guard" in text(page)
    assert not BudgetGuard.objects.exists()


def test_without_htmx_a_refusal_is_a_message_on_the_runs_page(operator: Client, run: Run) -> None:
    page = operator.post(
        ADD, {**STOP_AT_80, "threshold_percent": "150", "scope": "run", "run": run.pk}
    )

    assert page.status_code == 302
    assert page["Location"] == f"/dashboard/?run={run.pk}"
    assert flashed(page) == [
        "The guard was refused. Percent: a number above 0 and at most 100 (percent of the cap)"
    ]
    assert not BudgetGuard.objects.exists()


# --- removing ----------------------------------------------------------------------------------


def remove(client: Client, guard: BudgetGuard, run: Run | None = None, **extra: Any) -> Any:
    data = {"run": run.pk} if run else {}
    return client.post(f"/dashboard/guards/{guard.pk}/remove", data, **extra)


def test_an_operator_removes_a_guard_of_the_run(operator: Client, run: Run) -> None:
    guard = guard_create(run_id=run.pk, **{**STOP_AT_80, "threshold_percent": 80})
    kept = guard_create(run_id=run.pk, **{**STOP_AT_80, "threshold_percent": 90})

    page = remove(operator, guard, run, headers=HTMX)

    assert page.status_code == 200
    body = text(page)
    assert body.startswith('<div id="guards">')
    assert f"Removed: {ANTHROPIC_80}." in body
    assert f'id="guard-{guard.pk}"' not in body
    assert f'id="guard-{kept.pk}"' in body
    assert list(BudgetGuard.objects.values_list("pk", flat=True)) == [kept.pk]


def test_without_htmx_removing_goes_back_to_the_runs_page(operator: Client, run: Run) -> None:
    guard = guard_create(run_id=run.pk, **{**STOP_AT_80, "threshold_percent": 80})

    page = remove(operator, guard, run)

    assert page.status_code == 302
    assert page["Location"] == f"/dashboard/?run={run.pk}"
    assert flashed(page) == [f"Removed: {ANTHROPIC_80}."]
    assert not BudgetGuard.objects.exists()


def test_a_guard_for_all_runs_is_removed_only_with_the_delete_guard_permission(
    operator: Client, boss: Client, run: Run
) -> None:
    guard = guard_create(run_id=None, **{**STOP_AT_80, "threshold_percent": 80})

    # The panel offers no Remove button for it without the permission...
    panel = text(remove(operator, guard, run, headers=HTMX))
    assert f'id="guard-remove-{guard.pk}"' not in panel
    # ...and a request made anyway is refused.
    assert (
        "removing a guard for all runs needs the &#x27;runs.delete_budgetguard&#x27; permission"
    ) in panel
    assert BudgetGuard.objects.filter(pk=guard.pk).exists()

    page = remove(boss, guard, run, headers=HTMX)
    assert "Removed: Stop every run when Anthropic passes 80% of its week window." in text(page)
    assert not BudgetGuard.objects.exists()


def test_removing_a_guard_that_is_gone_says_so(operator: Client, run: Run) -> None:
    guard = guard_create(run_id=run.pk, **{**STOP_AT_80, "threshold_percent": 80})
    guard.delete()
    guard.pk = 424242

    page = remove(operator, guard, run, headers=HTMX)

    assert "guard 424242 does not exist (removed already?)" in text(page)


def test_a_person_without_the_control_permission_cannot_remove_a_guard(run: Run) -> None:
    guard = guard_create(run_id=run.pk, **{**STOP_AT_80, "threshold_percent": 80})

    page = remove(login(staff_user("reader")), guard, run, headers=HTMX)

    assert page.status_code == 403
    assert text(page) == "You need the 'runs.control_run' permission to remove a budget guard."
    assert BudgetGuard.objects.filter(pk=guard.pk).exists()


# --- what the panel says -----------------------------------------------------------------------


def panel_for(client: Client, run: Run | None) -> str:
    """The panel as a remove of a guard that does not exist re-renders it."""
    data = {"run": run.pk} if run else {}
    return text(client.post("/dashboard/guards/999999/remove", data, headers=HTMX))


def test_each_guard_reads_as_a_sentence_with_its_providers_percent_of_that_cap(
    operator: Client, run: Run
) -> None:
    caps("anthropic", weekly=1000)
    caps("glm", daily=None, weekly=None)
    metered_call("anthropic", model_of("anthropic"), prompt=600, completion=30)
    own = guard_create(
        run_id=run.pk, provider="glm", period="day", threshold_percent=90.5, action="pause"
    )
    every = guard_create(run_id=None, **{**STOP_AT_80, "threshold_percent": 80})
    GuardFiring.objects.create(
        guard=every,
        run=run,
        percent_of_cap=Decimal("81.00"),
        message="budget guard fired: anthropic is at 81.0% of its week window",
    )

    body = panel_for(operator, run)

    mine = body.split(f'id="guard-{own.pk}"', 1)[1].split("</li>", 1)[0]
    assert "Pause the run when GLM passes 90.5% of its day window" in mine
    assert f"run #{run.pk}" in mine
    assert "GLM has no day window with a cap: this guard cannot fire" in mine
    assert "Not fired for this run." in mine
    assert f'id="guard-remove-{own.pk}"' in mine
    assert (
        'hx-confirm="Remove the guard “Pause the run when GLM passes 90.5% of its day window”?"'
        in mine
    )

    theirs = body.split(f'id="guard-{every.pk}"', 1)[1].split("</li>", 1)[0]
    assert "Stop every run when Anthropic passes 80% of its week window" in theirs
    assert "all runs" in theirs
    assert "Anthropic is at <strong" in theirs
    assert "63.0%</strong> of its week window, cap 1,000 tokens" in theirs
    assert "Fired: budget guard fired: anthropic is at 81.0% of its week window" in theirs
    # The operator may not remove a guard for all runs.
    assert f'id="guard-remove-{every.pk}"' not in theirs
    # The run's own guards first, then those for all runs.
    assert body.index("This run's own") < body.index("For all runs")


def test_a_guard_past_its_threshold_that_has_not_fired_says_it_will(
    operator: Client, run: Run
) -> None:
    caps("anthropic", weekly=1000)
    metered_call("anthropic", model_of("anthropic"), prompt=850, completion=0)
    guard = guard_create(run_id=run.pk, **{**STOP_AT_80, "threshold_percent": 80})

    body = panel_for(operator, run)

    assert f'id="guard-{guard.pk}" class="guard past"' in body
    assert "past the threshold: fires at its next call" in body


def test_without_a_run_the_panel_groups_every_guard_by_run_and_all_runs(
    boss: Client, run: Run
) -> None:
    other = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    g_all = guard_create(run_id=None, **{**STOP_AT_80, "threshold_percent": 80})
    g_run = guard_create(run_id=run.pk, **{**STOP_AT_80, "threshold_percent": 70})
    g_other = guard_create(run_id=other.pk, **{**STOP_AT_80, "threshold_percent": 60})
    GuardFiring.objects.create(
        guard=g_all, run=run, percent_of_cap=Decimal("81"), message="fired for the first run"
    )
    GuardFiring.objects.create(
        guard=g_all, run=other, percent_of_cap=Decimal("82"), message="fired for the other run"
    )

    body = panel_for(boss, None)

    assert body.index('id="guard-group-all"') < body.index(f'id="guard-group-{other.pk}"')
    assert body.index(f'id="guard-group-{other.pk}"') < body.index(f'id="guard-group-{run.pk}"')
    assert body.index(f'id="guard-{g_all.pk}"') < body.index(f'id="guard-{g_other.pk}"')
    assert body.index(f'id="guard-{g_other.pk}"') < body.index(f'id="guard-{g_run.pk}"')
    assert "Fired for 2 runs:" in body
    assert body.index("fired for the other run") < body.index("fired for the first run")
    # With the delete permission every guard can be removed, those for all runs too.
    for guard in (g_all, g_run, g_other):
        assert f'id="guard-remove-{guard.pk}"' in body
    assert "It watches every run." in body


def test_html_in_a_guards_message_and_a_runs_name_is_shown_escaped(boss: Client, run: Run) -> None:
    Run.objects.filter(pk=run.pk).update(name="<b>bold</b> run")
    guard = guard_create(run_id=run.pk, **{**STOP_AT_80, "threshold_percent": 80})
    GuardFiring.objects.create(
        guard=guard,
        run=run,
        percent_of_cap=Decimal("81"),
        message='<script>alert("guard")</script><img src=x onerror=alert(1)>',
    )

    for body in (panel_for(boss, run), panel_for(boss, None)):
        assert "<script>alert" not in body
        assert "<img src=x" not in body
        assert "<b>bold</b>" not in body
        assert "&lt;script&gt;alert(&quot;guard&quot;)&lt;/script&gt;" in body
    assert "&lt;b&gt;bold&lt;/b&gt; run" in panel_for(boss, None)


# --- query cost --------------------------------------------------------------------------------


def count_queries(run_id: int | None) -> int:
    router.state()  # loaded (and held: see the test) before the panel asks for it
    with CaptureQueriesContext(connection) as queries:
        guards_context(run_id=run_id)
    return len(queries)


def add_guards(run: Run, n: int) -> None:
    for i in range(n):
        period = ("day", "week", "month")[i % 3]
        provider = ("anthropic", "openai", "glm", "google_gemini")[i % 4]
        for run_id in (run.pk, None):
            guard = guard_create(
                run_id=run_id,
                provider=provider,
                period=period,
                threshold_percent=50 + i,
                action="pause",
            )
            if i % 2:
                GuardFiring.objects.create(
                    guard=guard, run=run, percent_of_cap=Decimal("99"), message="fired"
                )


@pytest.mark.usefixtures("router_caches_held")
def test_the_panels_queries_do_not_grow_with_its_guards(run: Run) -> None:
    # router_caches_held: the router re-checks its catalogue on a timer, and a re-check inside
    # one of the measured calls would be timing, not what the panel costs.
    add_guards(run, 3)
    few = (count_queries(run.pk), count_queries(None))
    add_guards(run, 30)
    many = (count_queries(run.pk), count_queries(None))

    assert few == many
    # With a run: the run, its guards, their firings, and every provider's cap windows with
    # their usage (window_usage: three). Without: the guards (with their firing counts), their
    # latest firings, and the same three.
    assert many == (6, 5), many


# --- on the pages --------------------------------------------------------------------------------


def test_the_runs_page_and_the_guards_page_show_the_panel_and_the_form(
    boss: Client, run: Run
) -> None:
    guard = guard_create(run_id=run.pk, **{**STOP_AT_80, "threshold_percent": 80})

    run_page = text(boss.get(f"/dashboard/?run={run.pk}"))
    assert run_page.count('<div id="guards">') == 1
    assert run_page.count('<div id="guard-form">') == 1
    assert f'<option value="run" selected>this run (#{run.pk})</option>' in run_page
    assert ANTHROPIC_80 in run_page
    # The form offers each provider's own windows (config/models.yaml's, then the legacy ones).
    assert '<optgroup label="Anthropic"><option value="session">session · last 5 h</option>' in (
        run_page
    )

    guards_page = text(boss.get("/dashboard/guards/"))
    assert f'id="guard-{guard.pk}"' in guards_page
    assert '<option value="run"' not in guards_page  # no run there: a guard for all runs only
    assert '<option value="all"' in guards_page


def test_the_tick_brings_the_panel_out_of_band(boss: Client, run: Run) -> None:
    guard_create(run_id=run.pk, **{**STOP_AT_80, "threshold_percent": 80})

    tick = text(boss.get(f"/dashboard/live?page=run&run={run.pk}", headers=HTMX))

    assert '<div id="guards" hx-swap-oob="true">' in tick
    assert ANTHROPIC_80 in tick
    assert 'id="guard-form"' not in tick  # the form a person may be typing into is not swapped
