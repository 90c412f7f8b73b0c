"""Hostile and bad input through every door: each is refused with a message naming what is
wrong, and nothing is written. The plan parser's own cases live in tests/runs/test_plans.py;
here the same cases go through the REST API and the dashboard upload."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command

from routing.models import ModelChange, ModelRoute
from routing.router import router
from runs.models import HumanNote, Phase, Run, Tier
from runs.notes import NoteError, notes_file, run_note_add
from runs.states import RunState
from tests.runs.test_plans import BAD_PLANS, plan_dict
from tests.security.conftest import new_run, session_client, token_client
from usage.models import ProviderQuota
from usage.services import provider_quota_upsert

pytestmark = pytest.mark.django_db


def nothing_written() -> bool:
    return (Run.objects.count(), Tier.objects.count(), Phase.objects.count()) == (0, 0, 0)


def filename(raw: bytes) -> str:
    return "plan.json" if raw.startswith(b"{") else "plan.yaml"


# --- plans --------------------------------------------------------------------------------------


def _plan_with_phase(**phase: object) -> bytes:
    phase = {"name": "P", "category": "ui", "complexity": "low", **phase}
    return json.dumps(plan_dict(tiers=[{"name": "T", "phases": [phase]}])).encode()


# Hostile cases beyond the parser's own list in tests/runs/test_plans.py.
HOSTILE_PLANS = {
    **BAD_PLANS,
    "script tag in a phase name": (
        _plan_with_phase(name="<script>alert(1)</script>"),
        "tiers[0].phases[0].name: must be plain text",
    ),
    "script tag in a tier name": (
        json.dumps(
            plan_dict(tiers=[{"name": "<img src=x onerror=alert(1)>", "phases": []}])
        ).encode(),
        "tiers[0].name: must be plain text",
    ),
    "markup as a category": (
        _plan_with_phase(category="<b>ui</b>"),
        "tiers[0].phases[0].category: a lower-case identifier",
    ),
    "complexity of the wrong type": (
        _plan_with_phase(complexity=3),
        "tiers[0].phases[0].complexity: unknown complexity 3",
    ),
    "YAML python tag": (
        b'name: !!python/object/apply:os.system ["touch /tmp/pwned"]\ntiers: []\n',
        "not valid YAML",
    ),
    "not UTF-8": (b"\xff\xfename: x", "not UTF-8"),
    "deeply nested JSON": (
        b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "nested too deeply",
    ),
    "deeply nested YAML": (b"name: " + b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
}


@pytest.mark.parametrize("case", list(HOSTILE_PLANS), ids=list(HOSTILE_PLANS))
def test_the_api_refuses_a_bad_plan_file_with_400_and_writes_nothing(
    case: str, operator: User
) -> None:
    raw, message = HOSTILE_PLANS[case]
    upload = SimpleUploadedFile(filename(raw), raw)
    response = token_client(operator).post("/runs/start", {"file": upload}, format="multipart")
    assert response.status_code == 400, response.content[:300]
    assert message in response.json()["plan"][0]
    assert nothing_written()


JSON_CASES = [case for case, (raw, _) in HOSTILE_PLANS.items() if raw.startswith(b"{")]


@pytest.mark.parametrize("case", JSON_CASES, ids=JSON_CASES)
def test_the_api_refuses_a_bad_plan_json_body_with_400_and_writes_nothing(
    case: str, operator: User
) -> None:
    raw, message = HOSTILE_PLANS[case]
    response = token_client(operator).post("/runs/start", raw, content_type="application/json")
    assert response.status_code == 400, response.content[:300]
    shown = json.dumps(response.json())
    # A body that is not JSON at all is refused by DRF's parser before the plan is looked at.
    assert message in shown or (case == "malformed JSON" and "JSON parse error" in shown), shown
    assert nothing_written()


@pytest.mark.parametrize("case", list(HOSTILE_PLANS), ids=list(HOSTILE_PLANS))
def test_the_dashboard_refuses_a_bad_plan_upload_and_writes_nothing(
    case: str, operator: User
) -> None:
    raw, message = HOSTILE_PLANS[case]
    web = session_client(operator)
    upload = SimpleUploadedFile(filename(raw), raw)
    response = web.post("/dashboard/start", {"plan": upload}, follow=True)
    assert response.status_code == 200
    shown = [str(m) for m in response.context["messages"]]
    assert any(message in m for m in shown), shown
    assert nothing_written()


def _big_plan(size: int) -> bytes:
    """A plan that is valid in every field but is larger than the byte limit."""
    phases = [
        {"name": f"p{i}", "category": "ui", "complexity": "low", "description": "d" * 19_000}
        for i in range(size // 19_000 + 1)
    ]
    return json.dumps(plan_dict(tiers=[{"name": "T", "phases": phases}])).encode()


def test_a_plan_over_the_byte_limit_is_refused_as_a_json_body_and_as_a_file(
    operator: User,
) -> None:
    raw = _big_plan(settings.AUTOPACK_MAX_PLAN_BYTES + 1)
    assert len(raw) > settings.AUTOPACK_MAX_PLAN_BYTES
    api = token_client(operator)
    as_body = api.post("/runs/start", raw, content_type="application/json")
    as_file = api.post(
        "/runs/start", {"file": SimpleUploadedFile("p.json", raw)}, format="multipart"
    )
    for response in (as_body, as_file):
        assert response.status_code == 400, response.content[:300]
        assert "limit" in response.json()["plan"][0]
        assert "1,000,000 bytes" in response.json()["plan"][0]
    assert nothing_written()


def test_a_10_mb_plan_body_gets_a_json_413_and_writes_nothing(operator: User) -> None:
    raw = _big_plan(10_000_000)
    api = token_client(operator)
    response = api.post("/runs/start", raw, content_type="application/json")
    assert response.status_code == 413
    assert "over the limit" in response.json()["detail"]
    assert nothing_written()


def test_a_plan_body_that_is_not_an_object_is_refused(operator: User) -> None:
    api = token_client(operator)
    for body in (b"[1, 2]", b'"plan"', b"42", b"null", b"{}"):
        response = api.post("/runs/start", body, content_type="application/json")
        assert response.status_code == 400, (body, response.status_code)
    assert nothing_written()


# --- model overrides ----------------------------------------------------------------------------

GOOD = {"role": "builder", "category": "ui", "complexity": "low", "model": "glm-4.6"}


@pytest.fixture
def glm_unconfigured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLM_API_KEY")
    router.invalidate()


def mapping_state() -> tuple[int, list[tuple[Any, ...]]]:
    routes = sorted(ModelRoute.objects.values_list("layer", "role", "category", "model_id"))
    return ModelChange.objects.count(), routes


def test_an_override_to_a_model_of_an_unconfigured_provider_is_refused_everywhere(
    operator: User, glm_unconfigured: None
) -> None:
    run = new_run(start=True)
    before = mapping_state()
    api = token_client(operator)
    for scope, run_id in (("global", None), ("run", run.pk)):
        body = {**GOOD, "scope": scope, "run_id": run_id}
        response = api.post("/dashboard/models/override", body, format="json")
        assert response.status_code == 400, response.content
        assert "not configured" in response.json()["model"][0]
    web = session_client(operator)
    for scope in ("global", "run"):
        page = web.post(
            "/dashboard/mapping", {**GOOD, "scope": scope, "run": run.pk}, HTTP_HX_REQUEST="true"
        )
        assert page.status_code == 200
        assert "not configured" in page.context["mapping_error"]
    run.refresh_from_db()
    assert mapping_state() == before and "model_overrides" not in run.run_context


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"model": "gpt-99"}, "not in the catalogue"),
        ({"role": "janitor"}, "unknown role"),
        ({"role": "<script>"}, "unknown role"),
        ({"complexity": "huge"}, "complexity"),
        ({"category": ""}, "category"),
        ({"scope": "run", "run": ""}, "choose a run"),
        ({"scope": "everywhere"}, "scope"),
    ],
)
def test_the_dashboard_refuses_a_bad_override_and_changes_nothing(
    operator: User, change: dict[str, str], error: str
) -> None:
    run = new_run(start=True)
    before = mapping_state()
    data = {**GOOD, "scope": "global", "run": str(run.pk), **change}
    page = session_client(operator).post("/dashboard/mapping", data, HTTP_HX_REQUEST="true")
    assert page.status_code == 200
    assert error in page.context["mapping_error"]
    assert mapping_state() == before


def test_an_override_for_a_finished_run_is_refused_on_the_dashboard(operator: User) -> None:
    run = new_run(start=True)
    Run.objects.filter(pk=run.pk).update(state=RunState.COMPLETED)
    before = mapping_state()
    data = {**GOOD, "scope": "run", "run": str(run.pk)}
    page = session_client(operator).post("/dashboard/mapping", data, HTTP_HX_REQUEST="true")
    assert "completed" in page.context["mapping_error"]
    assert mapping_state() == before


@pytest.mark.parametrize(
    "body",
    [
        {**GOOD, "scope": "run"},  # no run id
        {**GOOD, "scope": "run", "run_id": "abc"},
        {**GOOD, "scope": "run", "run_id": -1},
        {**GOOD, "scope": "global", "category": "../etc"},
        {**GOOD, "scope": "global", "role": "x" * 500},
        {**GOOD, "scope": "global", "model": ["gpt-5"]},
    ],
)
def test_the_api_refuses_a_malformed_override_with_400(operator: User, body: dict) -> None:
    before = mapping_state()
    response = token_client(operator).post("/dashboard/models/override", body, format="json")
    assert response.status_code == 400, response.content
    assert mapping_state() == before


# --- provider caps ------------------------------------------------------------------------------

CAPS: dict[str, Any] = {
    "provider": "anthropic",
    "daily_cap_tokens": 1000,
    "weekly_cap_tokens": 5000,
    "monthly_cap_tokens": 20000,
    "autopack_share": "0.5",
    "soft_limit": "0.8",
}


def quota_row() -> tuple[Any, ...]:
    return tuple(ProviderQuota.objects.filter(provider="anthropic").values_list().get())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"daily_cap_tokens": -1}, "daily_cap_tokens"),
        ({"weekly_cap_tokens": "lots"}, "weekly_cap_tokens"),
        ({"monthly_cap_tokens": 1.5}, "monthly_cap_tokens"),
        ({"autopack_share": "1.5"}, "autopack_share"),
        ({"autopack_share": "-0.1"}, "autopack_share"),
        ({"autopack_share": "half"}, "autopack_share"),
        ({"autopack_share": "NaN"}, "autopack_share"),
        ({"soft_limit": "0"}, "soft_limit"),
        ({"soft_limit": "2"}, "soft_limit"),
    ],
)
def test_bad_caps_are_refused_by_the_service_and_the_admin_and_nothing_changes(
    change: dict[str, Any], field: str
) -> None:
    provider_quota_upsert(**CAPS)
    before = quota_row()
    with pytest.raises(ValidationError) as info:
        provider_quota_upsert(**{**CAPS, **change})
    assert field in info.value.message_dict
    assert quota_row() == before

    root = session_client(User.objects.create_superuser("root", "root@example.com", "x"))
    pk = ProviderQuota.objects.get(provider="anthropic").pk
    form = {k: ("" if v is None else v) for k, v in {**CAPS, **change}.items()}
    page = root.post(f"/admin/usage/providerquota/{pk}/change/", form)
    assert page.status_code == 200, page.status_code  # the form again, with the error
    assert field in page.context["adminform"].form.errors
    assert quota_row() == before


def test_import_models_refuses_bad_caps_and_keeps_the_mapping(tmp_path: Path) -> None:
    before, routes = list(ProviderQuota.objects.values_list()), mapping_state()
    for field, value in (
        ("daily_cap_tokens", -5),
        ("weekly_cap_tokens", "many"),
        ("autopack_share", 1.5),
        ("autopack_share", -0.5),
        ("soft_limit", 0),
    ):
        config = yaml.safe_load(settings.AUTOPACK_MODELS_FILE.read_text())
        config["providers"]["anthropic"][field] = value
        path = tmp_path / "models.yaml"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(CommandError, match=f"providers.anthropic.{field}"):
            call_command("import_models", str(path), stdout=io.StringIO())
    assert list(ProviderQuota.objects.values_list()) == before
    assert mapping_state() == routes


# --- notes to the supervisor --------------------------------------------------------------------


@pytest.fixture
def workspaces(tmp_path: Path, settings: Any) -> Path:
    settings.AUTOPACK_WORKSPACE_ROOT = tmp_path / "workspaces"
    return tmp_path


def test_a_note_reaches_only_the_runs_own_notes_file_outside_every_tree(
    workspaces: Path, operator: User
) -> None:
    run, other = new_run(), new_run()
    note = run_note_add(run_id=run.pk, text="use the EmailService", author=operator)
    written = notes_file(run)
    assert note.pk and "use the EmailService" in written.read_text()
    root = (workspaces / "workspaces").resolve()
    assert written == root / ".runs" / "notes" / f"run-{run.pk}.md"
    # Two runs of one plan (one workspace) never share a notes file.
    assert notes_file(other) != written and not notes_file(other).exists()
    # The dashboard names the file really written.
    page = session_client(operator).get(f"/dashboard/?run={run.pk}").content.decode()
    assert f"<code>{written}</code>" in page


@pytest.mark.parametrize("link", ["notes", "notes/run-{id}.md"])
def test_a_note_is_not_written_through_a_symlink_out_of_the_workspace_root(
    workspaces: Path, operator: User, link: str
) -> None:
    run = new_run()
    base = workspaces / "workspaces" / ".runs"
    base.mkdir(parents=True)
    outside = workspaces / "outside"
    outside.mkdir()
    target = outside if link == "notes" else outside / "stolen.md"
    place = base / link.format(id=run.pk)
    place.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, place)

    page = session_client(operator).post(
        f"/dashboard/runs/{run.pk}/notes", {"text": "secret plan"}, HTTP_HX_REQUEST="true"
    )
    assert page.status_code == 200
    assert "symlink" in page.context["note_error"]
    assert list(outside.iterdir()) == []
    assert HumanNote.objects.count() == 0


@pytest.mark.parametrize("workspace", ["../../outside", "/etc", "a/../../..", ".", ""])
def test_a_note_goes_to_the_runs_own_file_whatever_its_workspace_row_says(
    workspaces: Path, operator: User, workspace: str
) -> None:
    run = new_run()
    Run.objects.filter(pk=run.pk).update(workspace=workspace)
    run_note_add(run_id=run.pk, text="x", author=operator)
    assert notes_file(run).read_text().endswith("\nx\n")
    assert not (workspaces / "outside").exists()


@pytest.mark.parametrize(
    ("text", "error"), [("", "empty"), ("x" * 10_001, "at most"), ("a\x00b", "NUL")]
)
def test_a_bad_note_is_refused_and_nothing_is_written(
    workspaces: Path, operator: User, text: str, error: str
) -> None:
    run = new_run()
    page = session_client(operator).post(
        f"/dashboard/runs/{run.pk}/notes", {"text": text}, HTTP_HX_REQUEST="true"
    )
    assert error in page.context["note_error"]
    assert HumanNote.objects.count() == 0
    assert not notes_file(run).exists()


def test_a_note_with_a_lone_surrogate_is_refused_and_nothing_is_written(
    workspaces: Path, operator: User
) -> None:
    # A form post cannot carry one (Django decodes it as U+FFFD); a service caller can.
    run = new_run()
    with pytest.raises(NoteError, match=r"text: contains a lone surrogate \(U\+DFFF\)"):
        run_note_add(run_id=run.pk, text="use \udfff", author=operator)
    assert HumanNote.objects.count() == 0
    assert not notes_file(run).exists()


# --- text PostgreSQL cannot store, in overrides ---------------------------------------------------

UNSTORABLE = [
    ("category", "ui\x00"),
    ("category", "ui\udfff"),
    ("role", "builder\x00"),
    ("model", "glm-4.6\x00"),
    ("model", "glm-4.6\ud800"),
    ("complexity", "low\x00"),
]


@pytest.mark.parametrize(("field", "value"), UNSTORABLE)
def test_an_override_service_refuses_text_postgres_cannot_store_and_writes_nothing(
    field: str, value: str
) -> None:
    from routing.mapping import MappingError, model_override_global
    from runs.services import run_model_override

    run = new_run(start=True)
    before = mapping_state()
    key = {**{k: v for k, v in GOOD.items()}, field: value}
    with pytest.raises(MappingError, match=f"^{field}: "):
        model_override_global(**key)
    with pytest.raises(MappingError, match=f"^{field}: "):
        run_model_override(run_id=run.pk, **key)
    run.refresh_from_db()
    assert mapping_state() == before and "model_overrides" not in run.run_context


@pytest.mark.parametrize("scope", ["global", "run"])
@pytest.mark.parametrize("field", ["role", "category", "complexity", "model"])
def test_the_dashboard_refuses_an_override_with_a_nul_and_changes_nothing(
    operator: User, scope: str, field: str
) -> None:
    run = new_run(start=True)
    before = mapping_state()
    data = {**GOOD, "scope": scope, "run": str(run.pk), field: GOOD[field] + "\x00"}
    page = session_client(operator).post("/dashboard/mapping", data, HTTP_HX_REQUEST="true")
    assert page.status_code == 200
    assert page.context["mapping_error"].startswith(f"{field}: ")
    run.refresh_from_db()
    assert mapping_state() == before and "model_overrides" not in run.run_context


@pytest.mark.parametrize(("field", "value"), UNSTORABLE)
def test_the_api_refuses_an_override_with_text_postgres_cannot_store(
    operator: User, field: str, value: str
) -> None:
    before = mapping_state()
    # json.dumps escapes NUL and surrogates as \u0000 / \udfff, as any client would send them.
    body = json.dumps({**GOOD, "scope": "global", field: value})
    response = token_client(operator).post(
        "/dashboard/models/override", body, content_type="application/json"
    )
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert mapping_state() == before


# --- budget guards in the admin -----------------------------------------------------------------

GUARD_FORM = {
    "provider": "anthropic",
    "period": "week",
    "threshold_percent": "80",
    "action": "stop",
}


@pytest.fixture
def root(db: None) -> Any:
    return session_client(User.objects.create_superuser("root", "root@example.com", "x"))


def guard_rows() -> list[tuple[Any, ...]]:
    from runs.models import BudgetGuard

    return list(BudgetGuard.objects.order_by("pk").values_list())


@pytest.mark.parametrize(
    ("provider", "error"),
    [
        ("openrouter", "is not a provider in the catalogue"),
        ("anthropic\u202e", "is not a provider in the catalogue"),
        ("anthropic\x00", "Null characters are not allowed"),
    ],
)
def test_the_admin_refuses_a_guard_for_a_provider_not_in_the_catalogue(
    root: Any, provider: str, error: str
) -> None:
    page = root.post("/admin/runs/budgetguard/add/", {**GUARD_FORM, "provider": provider})
    assert page.status_code == 200, page.status_code  # the form again, with the error
    assert any(error in e for e in page.context["adminform"].form.errors["provider"])
    assert guard_rows() == []


def test_the_admin_adds_a_guard_for_a_catalogue_provider_and_refuses_a_change_to_another(
    root: Any,
) -> None:
    page = root.post("/admin/runs/budgetguard/add/", GUARD_FORM)
    assert page.status_code == 302, page.context["adminform"].form.errors
    before = guard_rows()
    ((pk, *_),) = before
    page = root.post(f"/admin/runs/budgetguard/{pk}/change/", {**GUARD_FORM, "provider": "mistral"})
    assert page.status_code == 200
    assert "provider" in page.context["adminform"].form.errors
    assert guard_rows() == before


@pytest.mark.parametrize(
    "categories", ['["ui\\u0000"]', '["ui\\udfff"]', '[{"a": 1}]', '"ui"', '["Not A Category"]']
)
def test_the_admin_refuses_critical_categories_postgres_cannot_store_or_that_are_not_categories(
    root: Any, categories: str
) -> None:
    from routing.models import RoutingPolicy

    before = list(RoutingPolicy.objects.values_list())
    page = root.post(
        "/admin/routing/routingpolicy/1/change/",
        {"critical_categories": categories, "quota_policy": "keep_primary"},
    )
    assert page.status_code == 200, page.status_code
    assert "critical_categories" in page.context["adminform"].form.errors
    assert list(RoutingPolicy.objects.values_list()) == before


def test_the_note_admin_has_no_add_form_and_its_change_form_changes_nothing(
    root: Any, workspaces: Path, operator: User
) -> None:
    run = new_run()
    note = run_note_add(run_id=run.pk, text="keep me", author=operator)
    assert root.get("/admin/runs/humannote/add/").status_code == 403
    page = root.post(f"/admin/runs/humannote/{note.pk}/change/", {"text": "a\x00b"})
    assert page.status_code in (200, 302), page.status_code
    note.refresh_from_db()
    assert note.text == "keep me" and HumanNote.objects.count() == 1
