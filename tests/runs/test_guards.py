"""Budget guards made from the REST API and MCP: one validation everywhere, the permission a guard
for all runs needs, nothing written on refusal, and a guard made over MCP that fires."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
from django.contrib.auth.models import User
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from routing.router import router
from runs import services
from runs.guards import guard_create, guard_text, guards_evaluate
from runs.models import BudgetGuard, GuardFiring, Run
from runs.plans import GuardInvalid, PlanError, parse_plan_bytes, validate_plan
from runs.states import RunState
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
