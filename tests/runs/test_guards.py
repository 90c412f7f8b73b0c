"""Budget guards made from the REST API and MCP: one validation everywhere, the permission a guard
for all runs needs, nothing written on refusal, and a guard made over MCP that fires. Then
runs.guards through its own functions: when a guard fires and how often, what pause and stop
leave, a guard for all runs, removal by scope, the list and the wording."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import pytest
from django.contrib.auth.models import User
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from routing.router import router
from runs import services
from runs.guards import (
    guard_create,
    guard_delete,
    guard_sentence,
    guard_text,
    guards_evaluate,
    guards_list,
)
from runs.models import BudgetGuard, GuardFiring, Run
from runs.plans import GuardInvalid, PlanError, parse_plan_bytes, validate_plan
from runs.states import IllegalTransition, PhaseState, RunState
from tests.conftest import WorkerProcess, wait_for
from tests.factories import CONTROL, staff_user
from tests.runs.test_mcp import stdio_server
from tests.runs.test_steering import caps

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"
STOP_AT_80 = {"provider": "anthropic", "period": "week", "threshold_percent": 80, "action": "stop"}


def client_for(user: User) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


@pytest.fixture
def run(db: None) -> Run:
    return services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))


@pytest.fixture
def operator(db: None) -> APIClient:
    return client_for(staff_user("operator", CONTROL))


@pytest.fixture
def reader(db: None) -> APIClient:
    return client_for(staff_user("reader"))


@pytest.fixture
def guard_admin(db: None) -> APIClient:
    return client_for(staff_user("boss", CONTROL, "add_budgetguard", "delete_budgetguard"))


@pytest.fixture
def server_log(tmp_path: Path) -> Iterator[TextIO]:
    with (tmp_path / "mcp-server.log").open("w+") as log:
        yield log


# --- the one validation -----------------------------------------------------------------------


@pytest.mark.django_db
def test_the_validation_names_every_bad_field_and_suggests_the_providers_real_name() -> None:
    with pytest.raises(GuardInvalid) as info:
        guard_create(
            run_id=None, provider="Anthropic", period="weekly", threshold_percent=0, action="halt"
        )
    errors = info.value.errors
    assert errors["provider"] == (
        "'Anthropic' is not a provider in the catalogue "
        "(one of anthropic, glm, google_gemini, openai); did you mean 'anthropic'?"
    )
    assert errors["period"] == "one of day, week, month"
    assert errors["threshold_percent"].startswith("a number above 0 and at most 100")
    assert errors["action"] == "one of pause, stop"
    assert not BudgetGuard.objects.exists()


@pytest.mark.django_db
def test_a_plan_guard_goes_through_the_same_check() -> None:
    plan = parse_plan_bytes(EXAMPLE.read_bytes()).as_dict()
    plan["guards"] = [{**STOP_AT_80, "provider": "Anthropic"}]
    with pytest.raises(PlanError, match=r"guards\[0\].provider: .*did you mean 'anthropic'\?"):
        validate_plan(plan)


@pytest.mark.django_db
def test_the_admin_form_refuses_a_provider_in_the_wrong_case() -> None:
    superuser_client = Client()
    superuser_client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    form = {**STOP_AT_80, "provider": "Anthropic", "threshold_percent": "80", "enabled": "on"}
    response = superuser_client.post("/admin/runs/budgetguard/add/", form)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "did you mean 'anthropic'?" in errors["provider"][0]
    assert not BudgetGuard.objects.exists()


# --- REST API ---------------------------------------------------------------------------------


def test_an_operator_adds_lists_and_removes_a_runs_guard(operator: APIClient, run: Run) -> None:
    made = operator.post(f"/runs/{run.pk}/guards", STOP_AT_80, format="json")
    assert made.status_code == 201, made.content
    guard = BudgetGuard.objects.get()
    assert made.json() == {
        "guard_id": guard.pk,
        "run_id": run.pk,
        "scope": "run",
        "rule": "anthropic > 80% week → stop",
        "provider": "anthropic",
        "window": "week",
        "period": "week",
        "threshold_percent": 80.0,
        "action": "stop",
        "enabled": True,
        "fired": False,
        "message": "",
    }
    listed = operator.get(f"/runs/{run.pk}/guards")
    assert listed.status_code == 200
    assert [g["guard_id"] for g in listed.json()] == [guard.pk]

    # The global path does not reach a run's guard.
    assert operator.delete(f"/runs/guards/{guard.pk}").status_code == 403
    other = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    assert operator.delete(f"/runs/{other.pk}/guards/{guard.pk}").status_code == 404
    assert BudgetGuard.objects.count() == 1

    gone = operator.delete(f"/runs/{run.pk}/guards/{guard.pk}")
    assert gone.status_code == 204
    assert not BudgetGuard.objects.exists()


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"provider": "Anthropic"}, "provider", "did you mean 'anthropic'?"),
        ({"provider": "openrouter"}, "provider", "one of anthropic, glm, google_gemini, openai"),
        ({"period": "year"}, "period", ""),
        ({"threshold_percent": 0}, "threshold_percent", "greater than or equal to 0.01"),
        ({"threshold_percent": 101}, "threshold_percent", "less than or equal to 100"),
        ({"threshold_percent": "eighty"}, "threshold_percent", ""),
        ({"action": "halt"}, "action", ""),
    ],
)
def test_a_bad_guard_is_a_field_error_and_nothing_is_written(
    operator: APIClient, run: Run, body: dict[str, Any], field: str, message: str
) -> None:
    response = operator.post(f"/runs/{run.pk}/guards", {**STOP_AT_80, **body}, format="json")
    assert response.status_code == 400, response.content
    assert message in response.json()[field][0]
    assert not BudgetGuard.objects.exists()


def test_a_finished_or_unknown_run_gets_no_guard(operator: APIClient, run: Run) -> None:
    assert operator.post("/runs/987654/guards", STOP_AT_80, format="json").status_code == 404
    services.run_stop(run_id=run.pk)
    response = operator.post(f"/runs/{run.pk}/guards", STOP_AT_80, format="json")
    assert response.status_code == 409
    assert response.json()["state"] == RunState.STOPPED
    assert not BudgetGuard.objects.exists()


def test_a_reader_lists_guards_but_cannot_add_one(reader: APIClient, run: Run) -> None:
    assert reader.get(f"/runs/{run.pk}/guards").status_code == 200
    assert reader.get("/runs/guards").json() == []
    assert reader.post(f"/runs/{run.pk}/guards", STOP_AT_80, format="json").status_code == 403
    assert APIClient().get(f"/runs/{run.pk}/guards").status_code == 401
    assert not BudgetGuard.objects.exists()


def test_a_guard_for_all_runs_needs_the_permission_to_add_guards(
    operator: APIClient, guard_admin: APIClient, run: Run
) -> None:
    refused = operator.post("/runs/guards", STOP_AT_80, format="json")
    assert refused.status_code == 403
    assert not BudgetGuard.objects.exists()

    made = guard_admin.post("/runs/guards", STOP_AT_80, format="json")
    assert made.status_code == 201, made.content
    guard_id = made.json()["guard_id"]
    assert made.json()["scope"] == "all runs" and made.json()["run_id"] is None
    # It watches every run: a run's list shows it, after the run's own.
    own = guard_admin.post(
        f"/runs/{run.pk}/guards", {**STOP_AT_80, "provider": "openai"}, format="json"
    )
    listed = [g["guard_id"] for g in guard_admin.get(f"/runs/{run.pk}/guards").json()]
    assert listed == [own.json()["guard_id"], guard_id]
    assert [g["guard_id"] for g in operator.get("/runs/guards").json()] == [guard_id]

    assert operator.delete(f"/runs/guards/{guard_id}").status_code == 403
    assert guard_admin.delete(f"/runs/guards/{guard_id}").status_code == 204
    assert list(BudgetGuard.objects.values_list("run_id", flat=True)) == [run.pk]


def test_the_guard_operations_are_in_the_schema(reader: APIClient) -> None:
    schema = reader.get("/api/schema/?format=json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert set(paths["/runs/{run_id}/guards"]) >= {"get", "post"}
    assert "delete" in paths["/runs/{run_id}/guards/{guard_id}"]
    assert set(paths["/runs/guards"]) >= {"get", "post"}
    assert "delete" in paths["/runs/guards/{guard_id}"]


# --- a guard made over MCP fires ---------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.needs_broker
def test_a_guard_made_over_mcp_stops_the_run_when_anthropic_passes_80_percent(
    worker_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    sim: Any,
    tmp_path: Path,
    server_log: TextIO,
) -> None:
    # The set-up of tests/runs/test_steering.py's guard test, with the guard said to MCP
    # instead of written in the plan.
    worker_env["AUTOPACK_QUOTA_REFRESH_SECONDS"] = "0.2"
    worker_env["AUTOPACK_ROUTER_REFRESH_SECONDS"] = "0.2"
    router.invalidate()
    staff_user("operator", CONTROL)
    caps("anthropic", 1000, soft_limit="1")
    sim.configure(delay=0.2)
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    with stdio_server("operator", tmp_path, server_log) as client:
        client.text("add_budget_guard", run_id=run.pk, **STOP_AT_80)
    guard = BudgetGuard.objects.get(run=run)
    start_worker("guards")
    services.run_start(run_id=run.pk)

    def finished() -> bool:
        run.refresh_from_db()
        return run.state in (RunState.STOPPED, RunState.COMPLETED, RunState.FAILED)

    wait_for(finished, timeout=120, what=f"run {run.pk} finished")
    assert run.state == RunState.STOPPED
    firing = GuardFiring.objects.get(run=run)
    assert firing.guard_id == guard.pk and firing.percent_of_cap >= 80
    assert "anthropic" in run.state_reason and "week window" in run.state_reason


# --- guards name a cap window (issue 16) ------------------------------------------------------


def session_window(provider: str, cap_tokens: int) -> None:
    from usage.services import provider_windows_set
    from usage.windows import window_from_config

    raw = {"name": "session", "kind": "rolling", "hours": 5, "cap_tokens": cap_tokens}
    provider_windows_set(provider=provider, windows=[window_from_config(raw, provider=provider)])


@pytest.mark.django_db
def test_a_guard_naming_a_window_the_provider_lacks_is_refused_with_its_windows() -> None:
    with pytest.raises(GuardInvalid) as refused:
        guard_create(
            run_id=None,
            provider="anthropic",
            window="fortnight",
            threshold_percent=80,
            action="stop",
        )
    # config/models.yaml: anthropic's session and week windows, then its legacy day and month.
    assert refused.value.errors == {
        "window": "anthropic has no 'fortnight' window (its windows: session, week, day, month)"
    }
    assert not BudgetGuard.objects.exists()
    # A plan file's guard is checked the same way, by its path.
    plan = EXAMPLE.read_bytes().replace(
        b"guards: []",
        b"guards: [{provider: glm, window: fortnight, threshold_percent: 50, action: stop}]",
    )
    with pytest.raises(PlanError, match=r"guards\[0\]\.window: glm has no 'fortnight' window"):
        parse_plan_bytes(plan)


@pytest.mark.django_db
def test_a_guard_by_window_fires_on_that_windows_usage_and_says_so(run: Run) -> None:
    from tests.factories import metered_call

    session_window("anthropic", 1_000)
    guard = guard_create(
        run_id=run.pk, provider="anthropic", window="session", threshold_percent=80, action="stop"
    )
    assert (guard.window, guard.period) == ("session", "")
    assert guard_text(guard) == "Stop the run when Anthropic passes 80% of its session window"
    services.run_start(run_id=run.pk)
    metered_call("anthropic", "claude-sonnet-5-5", prompt=700, completion=0)
    assert guards_evaluate() == []  # 70%: not yet
    metered_call("anthropic", "claude-sonnet-5-5", prompt=150, completion=0)
    [firing] = guards_evaluate()
    assert firing.message == (
        "budget guard 'anthropic > 80% session → stop' fired: anthropic is at 85.0% of its "
        "session window"
    )
    run.refresh_from_db()
    assert run.state in (RunState.STOPPING, RunState.STOPPED)


@pytest.mark.django_db
def test_a_guard_given_a_period_watches_the_window_of_that_name(run: Run) -> None:
    guard = guard_create(run_id=run.pk, **STOP_AT_80)
    assert (guard.window, guard.period) == ("week", "week")
    assert guard_text(guard) == "Stop the run when Anthropic passes 80% of its week window"
    with pytest.raises(GuardInvalid) as refused:
        guard_create(run_id=run.pk, **{**STOP_AT_80, "window": "session"})
    assert "window or a period, not both" in refused.value.errors["period"]


# --- runs.guards through its own functions ----------------------------------------------------
# The module as the executor, the API, MCP and the progress page call it, on real PostgreSQL.
# Usage is recorded as a provider call records it (tests.factories.metered_call); anthropic's
# only window is a 5-hour session capped at 1,000 tokens, so 10 tokens are 1%.

SESSION_80 = {"provider": "anthropic", "window": "session", "threshold_percent": 80}


def started_run() -> Run:
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    return services.run_start(run_id=run.pk)


def anthropic_tokens(tokens: int) -> None:
    from tests.factories import metered_call

    metered_call("anthropic", "claude-sonnet-5-5", prompt=tokens, completion=0)


def building(run: Run) -> None:
    """Its first phase claimed by a worker, as a worker would (the phase is building)."""
    phase = run.phases.get(state=PhaseState.QUEUED)
    assert services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token) is not None


def state_of(run: Run) -> tuple[str, str]:
    run.refresh_from_db()
    return run.state, run.state_reason


@pytest.fixture
def session_1000(db: None) -> None:
    session_window("anthropic", 1_000)


def test_with_no_guard_the_evaluation_is_one_query(
    session_1000: None, django_assert_num_queries: Any
) -> None:
    started_run()
    anthropic_tokens(900)
    with django_assert_num_queries(1):
        assert guards_evaluate() == []


def test_below_its_threshold_a_guard_fires_nothing(session_1000: None) -> None:
    run = started_run()
    guard_create(run_id=run.pk, action="stop", **SESSION_80)
    anthropic_tokens(799)  # 79.9%
    assert guards_evaluate() == []
    assert state_of(run) == (RunState.RUNNING, "")
    assert not GuardFiring.objects.exists()


def test_at_its_threshold_a_pause_guard_pauses_the_run_and_says_why(session_1000: None) -> None:
    run = started_run()
    guard = guard_create(run_id=run.pk, action="pause", **SESSION_80)
    anthropic_tokens(800)  # exactly 80%: "passes" includes the threshold itself
    [firing] = guards_evaluate()
    message = (
        "budget guard 'anthropic > 80% session → pause' fired: anthropic is at 80.0% of its "
        "session window"
    )
    assert (firing.guard_id, firing.run_id, firing.message) == (guard.pk, run.pk, message)
    assert firing.percent_of_cap == Decimal("80.00")
    # No phase was working: the pause takes effect at once and its queued phase goes back.
    assert state_of(run) == (RunState.PAUSED, message)
    assert not run.phases.exclude(state=PhaseState.PENDING).exists()


def test_a_pause_guard_lets_the_phase_at_work_finish(session_1000: None) -> None:
    run = started_run()
    building(run)
    guard_create(run_id=run.pk, action="pause", **SESSION_80)
    anthropic_tokens(900)
    [firing] = guards_evaluate()
    assert state_of(run) == (RunState.PAUSE_REQUESTED, firing.message)
    assert run.phases.filter(state=PhaseState.BUILDING).count() == 1


def test_a_stop_guard_stops_an_idle_run_and_cancels_its_phases(session_1000: None) -> None:
    run = started_run()
    guard_create(run_id=run.pk, action="stop", **SESSION_80)
    anthropic_tokens(850)
    [firing] = guards_evaluate()
    assert firing.message.endswith("anthropic is at 85.0% of its session window")
    assert state_of(run) == (RunState.STOPPED, firing.message)
    assert set(run.phases.values_list("state", flat=True)) == {PhaseState.CANCELLED}


def test_a_stop_guard_stops_a_working_run_at_its_next_checkpoint(session_1000: None) -> None:
    run = started_run()
    building(run)
    guard_create(run_id=run.pk, action="stop", **SESSION_80)
    anthropic_tokens(850)
    [firing] = guards_evaluate()
    assert state_of(run) == (RunState.STOPPING, firing.message)
    assert run.phases.filter(state=PhaseState.BUILDING).count() == 1


def test_a_guard_fires_once_for_a_run_even_after_the_run_is_resumed(session_1000: None) -> None:
    run = started_run()
    guard_create(run_id=run.pk, action="pause", **SESSION_80)
    anthropic_tokens(850)
    assert len(guards_evaluate()) == 1
    # A person resumes past the guard: the usage is still over it, more comes, and the guard
    # does not pause the run again.
    services.run_resume(run_id=run.pk)
    anthropic_tokens(100)
    assert guards_evaluate() == []
    assert state_of(run)[0] == RunState.RUNNING
    assert GuardFiring.objects.count() == 1


def test_a_second_evaluation_while_the_pause_is_pending_fires_nothing_more(
    session_1000: None,
) -> None:
    run = started_run()
    building(run)
    guard_create(run_id=run.pk, action="pause", **SESSION_80)
    anthropic_tokens(850)
    [firing] = guards_evaluate()
    anthropic_tokens(50)
    assert guards_evaluate() == []
    assert state_of(run) == (RunState.PAUSE_REQUESTED, firing.message)
    assert GuardFiring.objects.count() == 1


def test_a_stop_guard_still_stops_a_run_whose_pause_is_pending(session_1000: None) -> None:
    run = started_run()
    building(run)
    guard_create(run_id=run.pk, action="pause", **SESSION_80)
    stop = guard_create(run_id=run.pk, action="stop", **{**SESSION_80, "threshold_percent": 95})
    anthropic_tokens(850)
    guards_evaluate()
    assert state_of(run)[0] == RunState.PAUSE_REQUESTED
    anthropic_tokens(100)
    [firing] = guards_evaluate()
    assert firing.guard_id == stop.pk
    assert state_of(run) == (RunState.STOPPING, firing.message)


def test_a_guard_for_all_runs_acts_on_every_running_run_and_not_on_the_others(
    session_1000: None,
) -> None:
    first, second = started_run(), started_run()
    pending = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    stopped = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    services.run_stop(run_id=stopped.pk)
    guard = guard_create(run_id=None, action="stop", **SESSION_80)
    anthropic_tokens(900)

    fired = guards_evaluate()
    assert sorted(f.run_id for f in fired) == sorted([first.pk, second.pk])
    assert {f.guard_id for f in fired} == {guard.pk}
    for run in (first, second):
        assert state_of(run)[0] == RunState.STOPPED
    assert state_of(pending) == (RunState.PENDING, "")
    assert state_of(stopped) == (RunState.STOPPED, "stopped by a person")

    # A run started later is stopped by the next evaluation, the usage being over the threshold
    # still; those it fired for already are not fired for again.
    services.run_start(run_id=pending.pk)
    [later] = guards_evaluate()
    assert later.run_id == pending.pk
    assert state_of(pending)[0] == RunState.STOPPED
    assert GuardFiring.objects.count() == 3


def test_a_runs_guard_acts_on_its_run_only(session_1000: None) -> None:
    guarded, other = started_run(), started_run()
    guard_create(run_id=guarded.pk, action="stop", **SESSION_80)
    anthropic_tokens(900)
    [firing] = guards_evaluate()
    assert firing.run_id == guarded.pk
    assert state_of(guarded)[0] == RunState.STOPPED
    assert state_of(other) == (RunState.RUNNING, "")


def test_a_guard_watches_its_own_provider_and_fires_only_when_enabled(session_1000: None) -> None:
    from tests.factories import metered_call

    run = started_run()
    session_window("openai", 1_000)
    guard = guard_create(run_id=run.pk, action="stop", **SESSION_80)
    metered_call("openai", "gpt-5", prompt=950, completion=0)
    assert guards_evaluate() == []  # openai's usage is not anthropic's

    BudgetGuard.objects.filter(pk=guard.pk).update(enabled=False)
    anthropic_tokens(950)
    assert guards_evaluate() == []
    assert state_of(run) == (RunState.RUNNING, "")
    assert not GuardFiring.objects.exists()


def test_a_finished_run_is_given_no_guard(run: Run) -> None:
    services.run_stop(run_id=run.pk)
    with pytest.raises(IllegalTransition) as refused:
        guard_create(run_id=run.pk, action="stop", **SESSION_80)
    assert str(refused.value) == (
        f"Run {run.pk} has stopped, so a guard for it could never act; nothing was added."
    )
    assert refused.value.current == RunState.STOPPED
    assert not BudgetGuard.objects.exists()


def test_guard_delete_refuses_a_guard_of_another_scope(run: Run) -> None:
    other = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    own = guard_create(run_id=run.pk, **STOP_AT_80)
    for_all = guard_create(run_id=None, **{**STOP_AT_80, "action": "pause"})

    with pytest.raises(BudgetGuard.DoesNotExist):
        guard_delete(guard_id=own.pk, run_id=other.pk)  # another run's guard
    with pytest.raises(BudgetGuard.DoesNotExist):
        guard_delete(guard_id=own.pk, run_id=None)  # a run's guard is not a guard for all runs
    with pytest.raises(BudgetGuard.DoesNotExist):
        guard_delete(guard_id=for_all.pk, run_id=run.pk)  # nor the other way round
    assert BudgetGuard.objects.count() == 2

    guard_delete(guard_id=own.pk, run_id=run.pk)
    guard_delete(guard_id=for_all.pk, run_id=None)
    assert not BudgetGuard.objects.exists()


def test_guard_delete_takes_the_guards_firings_with_it(session_1000: None) -> None:
    run = started_run()
    guard = guard_create(run_id=run.pk, action="pause", **SESSION_80)
    anthropic_tokens(900)
    assert len(guards_evaluate()) == 1
    guard_delete(guard_id=guard.pk, run_id=run.pk)
    assert not GuardFiring.objects.exists()
    assert state_of(run)[0] == RunState.PAUSED  # what the guard did stays done


def test_guards_list_gives_a_runs_own_guards_then_those_for_all_runs_with_their_firings(
    session_1000: None,
) -> None:
    run = started_run()
    waiting = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    own = guard_create(run_id=run.pk, action="stop", **{**SESSION_80, "threshold_percent": 90})
    for_all = guard_create(run_id=None, action="pause", **SESSION_80)
    waitings = guard_create(run_id=waiting.pk, **STOP_AT_80)
    anthropic_tokens(850)
    [firing] = guards_evaluate()  # the guard for all runs, for the running run only

    def row(guard: BudgetGuard, **changes: object) -> dict[str, object]:
        guard.refresh_from_db()
        return {
            "guard_id": guard.pk,
            "run_id": guard.run_id,
            "scope": "all runs" if guard.run_id is None else "run",
            "rule": str(guard),
            "provider": guard.provider,
            "window": guard.window,
            "period": guard.period,
            "threshold_percent": guard.threshold_percent,
            "action": guard.action,
            "enabled": True,
            "fired": False,
            "message": "",
            **changes,
        }

    assert guards_list(run_id=run.pk) == [
        row(own),
        row(for_all, fired=True, message=firing.message),
    ]
    assert guards_list(run_id=waiting.pk) == [row(waitings), row(for_all)]
    assert guards_list(run_id=None) == [row(for_all)]
    assert guards_list(run_id=run.pk)[0]["rule"] == "anthropic > 90% session → stop"
    with pytest.raises(Run.DoesNotExist):
        guards_list(run_id=987654)


@pytest.mark.parametrize(
    ("spec", "sentence"),
    [
        (
            ("anthropic", "week", Decimal("80.00"), "stop", False),
            "Stop the run when Anthropic passes 80% of its week window",
        ),
        (
            ("google_gemini", "day", Decimal("80.50"), "pause", True),
            "Pause every run when Google Gemini passes 80.5% of its day window",
        ),
        (
            # normalize() alone would say 1E+2.
            ("glm", "session", Decimal("100.00"), "pause", False),
            "Pause the run when GLM passes 100% of its session window",
        ),
        (
            ("openai", "session", Decimal("0.01"), "stop", True),
            "Stop every run when OpenAI passes 0.01% of its session window",
        ),
        (
            # A provider of the catalogue under a name of its own reads as that name.
            ("lmstudio", "day", Decimal("75"), "stop", False),
            "Stop the run when lmstudio passes 75% of its day window",
        ),
    ],
)
def test_guard_sentence_says_a_guard_as_a_person_would(
    spec: tuple[str, str, Decimal, str, bool], sentence: str
) -> None:
    provider, window, threshold, action, all_runs = spec
    assert (
        guard_sentence(
            provider=provider,
            window=window,
            threshold_percent=threshold,
            action=action,
            all_runs=all_runs,
        )
        == sentence
    )


def test_guard_text_reads_a_stored_guard_for_all_runs(db: None) -> None:
    guard = guard_create(
        run_id=None,
        provider="openai",
        window="session",
        threshold_percent=Decimal("80.5"),
        action="pause",
    )
    guard.refresh_from_db()
    assert guard.threshold_percent == Decimal("80.50")
    assert guard_text(guard) == "Pause every run when OpenAI passes 80.5% of its session window"
