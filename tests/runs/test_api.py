"""The REST API: success, 400, 401, 403, 404 and 409 for every endpoint."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from routing.models import ModelChange
from routing.router import router
from runs import services
from runs.models import ChecksState, Phase, Run
from runs.plans import parse_plan_bytes
from runs.states import RunState
from tests.runs.changes import PASSED_CHECK, record_change

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"
pytestmark = pytest.mark.django_db
KEYS = {
    "OPENAI_API_KEY": "k1",
    "ANTHROPIC_API_KEY": "k2",
    "GEMINI_API_KEY": "k3",
    "GLM_API_KEY": "k4",
}


@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)
    router.invalidate()


def client_for(user: User | None) -> APIClient:
    client = APIClient()
    if user is not None:
        token, _ = Token.objects.get_or_create(user=user)
        client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def reader() -> APIClient:
    return client_for(User.objects.create_user("reader", is_staff=True))


@pytest.fixture
def operator() -> APIClient:
    user = User.objects.create_user("operator", is_staff=True)
    user.user_permissions.add(
        Permission.objects.get(codename="control_run"),
        Permission.objects.get(codename="override_model"),
    )
    return client_for(user)


@pytest.fixture
def run() -> Run:
    return services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))


def plan_json() -> dict[str, Any]:
    return parse_plan_bytes(EXAMPLE.read_bytes()).as_dict()


READS = ["/runs/", "/dashboard/models", "/dashboard/usage?period=week", "/api/schema/"]


@pytest.mark.parametrize("path", READS)
def test_an_anonymous_read_gets_401(path: str) -> None:
    response = APIClient().get(path)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


@pytest.mark.parametrize("path", READS)
def test_a_staff_reader_can_read(reader: APIClient, path: str) -> None:
    assert reader.get(path).status_code == 200


def test_a_user_who_is_not_staff_gets_403() -> None:
    plain = client_for(User.objects.create_user("plain"))
    assert plain.get("/runs/").status_code == 403


def test_run_status_has_the_contract_fields(reader: APIClient, run: Run) -> None:
    response = reader.get(f"/dashboard/runs/{run.pk}/status")
    assert response.status_code == 200
    body = response.json()
    for field in (
        "run_id",
        "state",
        "current_tier_name",
        "current_phase_name",
        "current_tier_index",
        "current_phase_index",
        "total_tiers",
        "total_phases",
        "completed_tiers",
        "completed_phases",
        "percent_complete",
        "tokens_in",
        "tokens_out",
        "issues",
        "attempts",
        "state_reason",
    ):
        assert field in body
    assert (body["total_tiers"], body["total_phases"], body["state"]) == (3, 9, "pending")


def test_run_status_of_an_unknown_run_is_404(reader: APIClient) -> None:
    assert reader.get("/dashboard/runs/999999/status").status_code == 404


def test_runs_are_listed_newest_first_with_pagination(reader: APIClient) -> None:
    for _ in range(3):
        services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    body = reader.get("/runs/?page_size=2").json()
    assert body["count"] == 3 and len(body["results"]) == 2 and body["next"]
    ids = [r["run_id"] for r in body["results"]]
    assert ids == sorted(ids, reverse=True)


def test_starting_a_run_from_a_json_body_creates_and_starts_it(operator: APIClient) -> None:
    response = operator.post("/runs/start", plan_json(), format="json")
    assert response.status_code == 201, response.content
    run = Run.objects.get(pk=response.json()["run_id"])
    assert run.state == RunState.RUNNING and run.total_phases == 9


def test_starting_a_run_from_an_uploaded_yaml_file(operator: APIClient) -> None:
    upload = SimpleUploadedFile("plan.yaml", EXAMPLE.read_bytes(), "application/x-yaml")
    response = operator.post("/runs/start?start=false", {"file": upload}, format="multipart")
    assert response.status_code == 201
    assert Run.objects.get(pk=response.json()["run_id"]).state == RunState.PENDING


def test_a_bad_plan_gets_400_naming_the_field_and_writes_nothing(operator: APIClient) -> None:
    plan = plan_json()
    plan["tiers"][0]["phases"][0]["complexity"] = "huge"
    response = operator.post("/runs/start", plan, format="json")
    assert response.status_code == 400
    assert "tiers[0].phases[0].complexity" in response.json()["plan"][0]
    assert Run.objects.count() == 0 and Phase.objects.count() == 0


def test_a_reader_cannot_start_or_control_runs(reader: APIClient, run: Run) -> None:
    assert reader.post("/runs/start", plan_json(), format="json").status_code == 403
    assert reader.post(f"/runs/{run.pk}/pause").status_code == 403
    assert Run.objects.count() == 1


def test_anonymous_control_gets_401(run: Run) -> None:
    assert APIClient().post(f"/runs/{run.pk}/cancel").status_code == 401
    run.refresh_from_db()
    assert run.state == RunState.PENDING


def test_pause_resume_and_cancel_through_the_api(operator: APIClient, run: Run) -> None:
    services.run_start(run_id=run.pk)
    first = operator.post(f"/runs/{run.pk}/pause")
    again = operator.post(f"/runs/{run.pk}/pause")
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json()["state"] == "paused"
    assert operator.post(f"/runs/{run.pk}/resume").json()["state"] == "running"
    assert operator.post(f"/runs/{run.pk}/cancel").json()["state"] == "stopped"


def test_resuming_a_completed_run_is_409_with_the_current_state(
    operator: APIClient, run: Run
) -> None:
    Run.objects.filter(pk=run.pk).update(state=RunState.COMPLETED)
    response = operator.post(f"/runs/{run.pk}/resume")
    assert response.status_code == 409
    assert response.json()["state"] == "completed"
    run.refresh_from_db()
    assert run.state == RunState.COMPLETED


def test_controlling_an_unknown_run_is_404(operator: APIClient) -> None:
    assert operator.post("/runs/424242/pause").status_code == 404


def test_the_mapping_lists_rows_and_choices(reader: APIClient) -> None:
    body = reader.get("/dashboard/models").json()
    row = next(
        r
        for r in body["rows"]
        if r["role"] == "builder" and r["category"] == "*" and r["complexity"] == "low"
    )
    assert (row["model"], row["scope"]) == ("gpt-6-luna", "baseline")
    # Today's models and the earlier ones a stored override may still name.
    assert {"claude-opus-5-5", "claude-opus-4-1"} <= set(
        body["choices"]["models_by_provider"]["anthropic"]
    )
    assert body["choices"]["complexities"] == ["low", "medium", "high"]


def test_a_run_override_through_the_api_shows_in_that_runs_mapping_only(
    operator: APIClient, run: Run
) -> None:
    services.run_start(run_id=run.pk)
    response = operator.post(
        "/dashboard/models/override",
        {
            "role": "auditor",
            "category": "core_backend",
            "complexity": "medium",
            "model": "glm-4.6",
            "scope": "run",
            "run_id": run.pk,
        },
        format="json",
    )
    assert response.status_code == 200, response.content
    row = next(
        r
        for r in response.json()["rows"]
        if r["role"] == "auditor"
        and r["category"] == "core_backend"
        and r["complexity"] == "medium"
    )
    assert (row["model"], row["scope"]) == ("glm-4.6", "run")
    glob = operator.get("/dashboard/models").json()["rows"]
    assert not any(
        r["model"] == "glm-4.6" and r["role"] == "auditor" and r["category"] == "core_backend"
        for r in glob
    )
    change = ModelChange.objects.get()
    assert (change.scope, change.run_id, change.old_model, change.new_model) == (
        "run",
        run.pk,
        "gpt-6.1-sol",
        "glm-4.6",
    )


def test_a_run_override_of_the_any_category_row_round_trips_through_the_api(
    operator: APIClient, run: Run
) -> None:
    # "*" at the edge (the request, the stored run_context, the rows, the change log), the
    # any-category key inside: each row says where its model came from.
    services.run_start(run_id=run.pk)
    response = operator.post(
        "/dashboard/models/override",
        {
            "role": "builder",
            "category": "*",
            "complexity": "low",
            "model": "gemini-2.5-flash",
            "scope": "run",
            "run_id": run.pk,
        },
        format="json",
    )
    assert response.status_code == 200, response.content
    run.refresh_from_db()
    assert run.run_context["model_overrides"] == {"builder": {"*:low": "gemini-2.5-flash"}}
    rows = {
        (r["category"], r["complexity"]): r
        for r in response.json()["rows"]
        if r["role"] == "builder"
    }
    star = rows[("*", "low")]
    assert (star["model"], star["scope"], star["reason"]) == (
        "gemini-2.5-flash",
        "run",
        "run override (any category)",
    )
    # A category whose model came from the any-category row follows it; one with an override
    # of its own in the snapshot keeps it.
    own = {
        (r["category"], r["complexity"]): (r["model"], r["scope"])
        for r in rows.values()
        if r["complexity"] == "low" and r["category"] != "*"
    }
    assert own and all(
        scope == "run" if model == "gemini-2.5-flash" else scope == "baseline"
        for model, scope in own.values()
    )
    change = ModelChange.objects.get()
    assert (change.category, change.complexity, change.scope) == ("*", "low", "run")


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"model": "gpt-99"}, "model"),
        ({"role": "janitor"}, "role"),
        ({"scope": "run"}, "run_id"),
        ({"complexity": "huge"}, "complexity"),
        ({"scope": "everywhere"}, "scope"),
    ],
)
def test_a_bad_override_gets_400_with_the_field_and_changes_nothing(
    operator: APIClient, payload: dict, field: str
) -> None:
    body = {
        "role": "builder",
        "category": "ui",
        "complexity": "low",
        "model": "glm-4.6",
        "scope": "global",
        **payload,
    }
    response = operator.post("/dashboard/models/override", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert ModelChange.objects.count() == 0


def test_an_override_for_a_finished_run_is_409(operator: APIClient, run: Run) -> None:
    Run.objects.filter(pk=run.pk).update(state=RunState.STOPPED)
    response = operator.post(
        "/dashboard/models/override",
        {
            "role": "builder",
            "category": "ui",
            "complexity": "low",
            "model": "glm-4.6",
            "scope": "run",
            "run_id": run.pk,
        },
        format="json",
    )
    assert response.status_code == 409
    assert ModelChange.objects.count() == 0


def test_an_override_for_an_unknown_run_is_404(operator: APIClient) -> None:
    response = operator.post(
        "/dashboard/models/override",
        {
            "role": "builder",
            "category": "ui",
            "complexity": "low",
            "model": "glm-4.6",
            "scope": "run",
            "run_id": 987654,
        },
        format="json",
    )
    assert response.status_code == 404


def test_a_reader_cannot_override_models(reader: APIClient) -> None:
    response = reader.post(
        "/dashboard/models/override",
        {
            "role": "builder",
            "category": "ui",
            "complexity": "low",
            "model": "glm-4.6",
            "scope": "global",
        },
        format="json",
    )
    assert response.status_code == 403


def test_usage_rejects_an_unknown_period(reader: APIClient) -> None:
    response = reader.get("/dashboard/usage?period=year")
    assert response.status_code == 400 and "period" in response.json()


def test_usage_lists_providers_against_their_caps(reader: APIClient) -> None:
    body = reader.get("/dashboard/usage?period=day").json()
    providers = {row["provider"]: row for row in body["providers"]}
    assert set(providers) >= {"openai", "anthropic", "google_gemini", "glm"}
    assert providers["anthropic"]["percent_of_cap"] == 0


def test_every_path_in_the_openapi_schema_is_served(reader: APIClient, run: Run) -> None:
    schema = reader.get("/api/schema/?format=json")
    assert schema.status_code == 200
    paths = json.loads(schema.content)["paths"]
    expected = {
        "/runs/",
        "/runs/start",
        "/runs/{run_id}/pause",
        "/runs/{run_id}/resume",
        "/runs/{run_id}/cancel",
        "/dashboard/runs/{run_id}/status",
        "/dashboard/models",
        "/dashboard/models/override",
        "/dashboard/usage",
        "/runs/{run_id}/patch",
    }
    assert expected <= set(paths)
    for path, operations in paths.items():
        url = path.replace("{run_id}", str(run.pk)).replace("{guard_id}", "1")
        for method in operations:
            response = getattr(reader, method)(url)
            # served: the reader may be refused (403) or send no body (400), never 404/405;
            # the patch of a run that has not started is 409 (no branch yet)
            assert response.status_code in (200, 400, 403, 409), (
                method,
                path,
                response.status_code,
            )


# --- the run's change (issue 13) -------------------------------------------------------------


@pytest.fixture
def workspaces(settings: Any, tmp_path: Path) -> Path:
    settings.AUTOPACK_WORKSPACE_ROOT = tmp_path / "workspaces"
    return tmp_path


def git(path: Path, *args: str) -> str:
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "GIT_CONFIG_GLOBAL": os.devnull}
    env |= {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env |= {"GIT_COMMITTER_EMAIL": "t@t"}
    done = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_status_carries_the_runs_branch_head_files_lines_and_checks(
    reader: APIClient, run: Run, workspaces: Path
) -> None:
    services.run_start(run_id=run.pk)
    first, second, third = run.phases.order_by("position")[:3]
    record_change(run, first, {"app/a.py": "a\n", "app/b.py": "b\nb\n"})
    record_change(run, second, {"app/a.py": "a2\n", "tests/test_a.py": "t\n"})
    failing = {**PASSED_CHECK, "outcome": "failed", "exit_code": 1}
    record_change(run, third, {"z.py": "z\n"}, checks=[failing], approve=False, fail_phase=True)
    run.refresh_from_db()
    body = reader.get(f"/dashboard/runs/{run.pk}/status").json()
    assert body["branch"] == f"autopack/run-{run.pk}"
    assert body["workspace_path"] == run.workspace_path != ""
    assert len(body["head_commit"]) == 40 and body["head_commit"] == run.head_commit
    assert body["base_commit"] == run.base_commit != body["head_commit"]
    # Distinct files of the approved phases only (the failed phase's z.py is not on the branch).
    assert body["files_changed"] == ["app/a.py", "app/b.py", "tests/test_a.py"]
    assert body["files_changed_count"] == 3
    assert (body["lines_added"], body["lines_removed"]) == (3 + 2, 1)
    assert body["checks_state"] == ChecksState.FAILED
    assert body["phase_checks"] == {"failed": 1, "not_run": 0, "passed": 2}


def test_the_status_lists_at_most_50_changed_files_and_counts_them_all(
    reader: APIClient, run: Run
) -> None:
    phases = list(run.phases.order_by("position")[:2])
    for n, phase in enumerate(phases):
        files = [f"pkg/m{n}_{i:03}.py" for i in range(40)] + ["shared.py"]
        Phase.objects.filter(pk=phase.pk).update(state="complete", files_changed=files)
    body = reader.get(f"/dashboard/runs/{run.pk}/status").json()
    assert body["files_changed_count"] == 81
    assert (
        body["files_changed"]
        == sorted([f"pkg/m{n}_{i:03}.py" for n in (0, 1) for i in range(40)])[:50]
    )
    assert body["checks_state"] == "none" and body["branch"] == "" and body["head_commit"] == ""


def test_the_patch_is_the_runs_approved_commits_as_a_series_git_am_applies(
    reader: APIClient, run: Run, workspaces: Path
) -> None:
    services.run_start(run_id=run.pk)
    first, second = run.phases.order_by("position")[:2]
    record_change(run, first, {"app/a.py": "one\n"})
    record_change(run, second, {"app/a.py": "two\n"}, approve=False)  # rejected: not in it
    record_change(run, second, {"app/a.py": "three\n", "app/b.py": "b\n"}, number=2)
    run.refresh_from_db()
    response = reader.get(f"/runs/{run.pk}/patch")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/x-patch; charset=utf-8"
    name = f"autopack-run-{run.pk}.patch"
    assert response["Content-Disposition"] == f'attachment; filename="{name}"'
    patch = response.content.decode()
    assert patch.count("\nSubject: [PATCH ") == 2 and "+two" not in patch
    # Applied to the commit the run started from, it gives the run's head tree.
    clone = workspaces / "clone"
    git(workspaces, "clone", "-q", str(Path(run.workspace_path)), str(clone))
    git(clone, "checkout", "-q", run.base_commit)
    (workspaces / name).write_text(patch)
    git(clone, "am", "-q", str(workspaces / name))
    assert git(clone, "rev-parse", "HEAD^{tree}") == git(
        Path(run.workspace_path), "rev-parse", f"{run.head_commit}^{{tree}}"
    )


def test_the_patch_is_empty_before_a_phase_is_approved_and_409_before_the_first_claim(
    reader: APIClient, run: Run, workspaces: Path
) -> None:
    before = reader.get(f"/runs/{run.pk}/patch")
    assert before.status_code == 409
    assert before.json() == {
        "detail": f"run {run.pk} has no branch yet: its first phase has not started",
        "state": "pending",
        "requested": "patch",
    }
    services.run_start(run_id=run.pk)
    phase = run.phases.order_by("position").first()
    assert phase is not None
    record_change(run, phase, {"x.py": "x\n"}, approve=False)
    empty = reader.get(f"/runs/{run.pk}/patch", HTTP_ACCEPT="text/x-patch")
    assert (empty.status_code, empty.content) == (200, b"")
    assert empty["Content-Type"] == "text/x-patch; charset=utf-8"


def test_the_patch_of_an_unknown_run_is_a_json_404_whatever_the_client_accepts(
    reader: APIClient,
) -> None:
    for accept in ("application/json", "text/x-patch", "*/*"):
        response = reader.get("/runs/999999/patch", HTTP_ACCEPT=accept)
        assert response.status_code == 404, accept
        assert response["Content-Type"] == "application/json"
        assert response.json() == {"detail": "Run matching query does not exist."}
