"""Who may in: every page, API path and MCP tool refuses anonymous callers, read-only staff
cannot control runs or change models anywhere, the session-authenticated API checks CSRF, and a
revoked token stops working at once on the API and on MCP."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from django.contrib import admin
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from routing.models import ModelChange, ModelRoute
from runs.models import HumanNote, Run
from runs.states import RunState
from tests.runs.test_mcp import TOOLS, connected, token_transport
from tests.security.conftest import make_user, new_run, session_client, token_client

# Public on purpose: the admin's own login and logout, and the token exchange (which needs a
# password); the site root only redirects to the dashboard, which asks for a login.
PUBLIC = {"/admin/login/", "/admin/logout/", "/api/token/", "/"}
ARG = re.compile(r"<(?:(\w+):)?(\w+)>")
pytestmark = pytest.mark.django_db


def _site_paths(patterns: list[Any], prefix: str = "") -> Iterator[str]:
    """Every URL of the project (admin excluded), with each parameter filled in."""
    for entry in patterns:
        route = str(entry.pattern)
        if isinstance(entry, URLResolver):
            if route == "admin/":
                continue
            yield from _site_paths(entry.url_patterns, prefix + route)
        elif isinstance(entry, URLPattern):
            yield "/" + prefix + ARG.sub("{id}", route)


def _admin_paths(run: Run) -> list[str]:
    paths = [reverse("admin:index"), reverse("admin:password_change"), reverse("admin:jsi18n")]
    for model in admin.site._registry:
        app, name = model._meta.app_label, model._meta.model_name
        paths.append(reverse("admin:app_list", args=[app]))
        paths.append(reverse(f"admin:{app}_{name}_changelist"))
        paths.append(reverse(f"admin:{app}_{name}_add"))
        for view in ("change", "delete", "history"):
            paths.append(reverse(f"admin:{app}_{name}_{view}", args=[run.pk]))
    return sorted(set(paths))


def every_path(run: Run) -> list[str]:
    site = {p.format(id=run.pk) for p in _site_paths(get_resolver().url_patterns)}
    return sorted(site - PUBLIC) + _admin_paths(run)


def refused(response: Any) -> bool:
    """401/403, or the admin's redirect to its login page: never the content."""
    if response.status_code in (401, 403):
        return True
    return response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_every_page_and_api_path_refuses_an_anonymous_caller() -> None:
    run = new_run(start=True)
    paths = every_path(run)
    # The walk found the site and the admin, not an empty list that passes trivially.
    assert "/dashboard/" in paths and f"/runs/{run.pk}/pause" in paths
    assert "/admin/runs/run/" in paths and len(paths) > 80
    anonymous = Client()
    for path in paths:
        for method in ("get", "post"):
            response = getattr(anonymous, method)(path)
            assert refused(response), (method, path, response.status_code)
    run.refresh_from_db()
    assert run.state == RunState.RUNNING
    assert ModelChange.objects.count() == 0 and HumanNote.objects.count() == 0


def test_a_user_who_is_not_staff_gets_no_page_or_api_path() -> None:
    run = new_run()
    visitor = make_user("visitor", "control_run", "override_model", staff=False)
    web, api = session_client(visitor), token_client(visitor)
    for path in every_path(run):
        assert refused(web.get(path)), path
        assert refused(api.get(path)), path
    assert api.post(f"/runs/{run.pk}/cancel").status_code == 403
    run.refresh_from_db()
    assert run.state == RunState.PENDING


def test_the_patch_download_and_a_phases_changes_need_a_staff_login(reader: User) -> None:
    run = new_run(start=True)
    phase = run.phases.get(position=1)
    anonymous = APIClient().get(f"/runs/{run.pk}/patch")
    assert anonymous.status_code == 401 and anonymous["WWW-Authenticate"] == "Token"
    assert anonymous.json() == {"detail": "Authentication credentials were not provided."}
    visitor = make_user("visitor", "control_run", staff=False)
    for client in (token_client(visitor), session_client(visitor)):
        response = client.get(f"/runs/{run.pk}/patch")
        assert response.status_code == 403 and response["Content-Type"] == "application/json"
    changes = f"/dashboard/phases/{phase.pk}/changes"
    assert refused(Client().get(changes)) and refused(session_client(visitor).get(changes))
    # Staff who may only read: no branch yet (409), and the phase's changes view.
    assert token_client(reader).get(f"/runs/{run.pk}/patch").status_code == 409
    assert session_client(reader).get(changes).status_code == 200


OVERRIDE = {
    "role": "builder",
    "category": "ui",
    "complexity": "low",
    "model": "glm-4.6",
    "scope": "global",
}


def test_a_read_only_user_cannot_control_runs_or_change_models_through_the_api(
    reader: User,
) -> None:
    run = new_run(start=True)
    api = token_client(reader)
    for action in ("pause", "resume", "cancel"):
        assert api.post(f"/runs/{run.pk}/{action}").status_code == 403, action
    assert api.post("/runs/start", {"name": "x"}, format="json").status_code == 403
    for scope in ("global", "run"):
        body = {**OVERRIDE, "scope": scope, "run_id": run.pk if scope == "run" else None}
        assert api.post("/dashboard/models/override", body, format="json").status_code == 403
    # reading still works
    assert api.get(f"/dashboard/runs/{run.pk}/status").status_code == 200
    run.refresh_from_db()
    assert (run.state, Run.objects.count(), ModelChange.objects.count()) == ("running", 1, 0)


def test_a_read_only_user_cannot_control_runs_or_change_models_on_the_dashboard(
    reader: User,
) -> None:
    run = new_run(start=True)
    web = session_client(reader)
    page = web.get(f"/dashboard/?run={run.pk}")
    assert page.status_code == 200
    # No control is offered ...
    assert b'id="run-pause"' not in page.content and b'name="scope"' not in page.content
    assert b'id="note-save"' not in page.content and b'id="start-run"' not in page.content
    # ... and posting one anyway is refused.
    for action in ("pause", "stop"):
        response = web.post(f"/dashboard/runs/{run.pk}/control", {"action": action})
        assert response.status_code == 403
    assert web.post(f"/dashboard/runs/{run.pk}/notes", {"text": "hi"}).status_code == 403
    assert web.post("/dashboard/mapping", {**OVERRIDE, "run": run.pk}).status_code == 403
    assert web.post("/dashboard/start", {}).status_code == 403
    run.refresh_from_db()
    assert run.state == RunState.RUNNING
    assert (ModelChange.objects.count(), HumanNote.objects.count(), Run.objects.count()) == (
        0,
        0,
        1,
    )


def test_a_read_only_user_cannot_control_runs_or_change_models_in_the_admin(
    reader: User,
) -> None:
    run = new_run(start=True)
    web = session_client(reader)
    changelist = web.get("/admin/runs/run/")
    assert changelist.status_code == 200
    assert b"pause_runs" not in changelist.content
    response = web.post("/admin/runs/run/", {"action": "pause_runs", "_selected_action": [run.pk]})
    assert response.status_code in (200, 302, 403)
    route = ModelRoute.objects.select_related("model").first()
    assert route is not None
    before = route.model_id
    other = ModelRoute.objects.exclude(model_id=before).values_list("model_id", flat=True)[0]
    edit = web.post(f"/admin/routing/modelroute/{route.pk}/change/", {"model": other})
    assert edit.status_code == 403
    run.refresh_from_db()
    route.refresh_from_db()
    assert run.state == RunState.RUNNING and route.model_id == before
    assert ModelChange.objects.count() == 0


def test_staff_without_the_override_permission_cannot_edit_the_mapping_in_the_admin() -> None:
    route = ModelRoute.objects.first()
    assert route is not None
    before = route.model_id
    other = ModelRoute.objects.exclude(model_id=before).values_list("model_id", flat=True)[0]
    editor = session_client(make_user("editor", "view_modelroute", "change_modelroute"))
    edit = editor.post(f"/admin/routing/modelroute/{route.pk}/change/", {"model": other})
    assert edit.status_code == 403
    route.refresh_from_db()
    assert route.model_id == before and ModelChange.objects.count() == 0
    # The override permission is what lets a person change models, here as on the API.
    overrider = session_client(make_user("overrider", "view_modelroute", "override_model"))
    done = overrider.post(f"/admin/routing/modelroute/{route.pk}/change/", {"model": other})
    assert done.status_code == 302
    route.refresh_from_db()
    assert route.model_id == other and ModelChange.objects.count() == 1


def test_staff_with_change_but_not_control_permission_cannot_pause_through_admin_actions() -> None:
    run = new_run(start=True)
    editor = make_user("editor", "view_run", "change_run")
    web = session_client(editor)
    assert b"pause_runs" not in web.get("/admin/runs/run/").content
    web.post("/admin/runs/run/", {"action": "pause_runs", "_selected_action": [run.pk]})
    run.refresh_from_db()
    assert run.state == RunState.RUNNING


def test_the_session_authenticated_api_enforces_csrf(operator: User) -> None:
    run = new_run(start=True)
    web = session_client(operator, enforce_csrf=True)
    refused_post = web.post(f"/runs/{run.pk}/pause")
    assert refused_post.status_code == 403
    assert "CSRF" in refused_post.json()["detail"]
    refused_override = web.post(
        "/dashboard/models/override", json.dumps(OVERRIDE), content_type="application/json"
    )
    assert refused_override.status_code == 403
    run.refresh_from_db()
    assert run.state == RunState.RUNNING and ModelChange.objects.count() == 0

    # The same session with the CSRF token the dashboard page hands out is let through.
    page = web.get(f"/dashboard/?run={run.pk}")
    csrf = re.search(rb'"X-CSRFToken": "([^"]+)"', page.content)
    assert csrf is not None
    allowed = web.post(f"/runs/{run.pk}/pause", HTTP_X_CSRFTOKEN=csrf.group(1).decode())
    assert allowed.status_code == 200
    run.refresh_from_db()
    assert run.state == RunState.PAUSED


def test_the_dashboard_forms_enforce_csrf(operator: User) -> None:
    run = new_run(start=True)
    web = session_client(operator, enforce_csrf=True)
    assert web.post(f"/dashboard/runs/{run.pk}/control", {"action": "stop"}).status_code == 403
    assert web.post(f"/dashboard/runs/{run.pk}/notes", {"text": "x"}).status_code == 403
    run.refresh_from_db()
    assert run.state == RunState.RUNNING and HumanNote.objects.count() == 0


# --- token revocation, on the API and on MCP over HTTP ----------------------------------------


def mcp_call(url: str, token: str | None, tool: str, **arguments: Any) -> httpx2.Response:
    headers = {"Accept": "application/json, text/event-stream"}
    if token:
        headers["Authorization"] = f"Token {token}"
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }
    return httpx2.post(url, json=body, headers=headers, timeout=10)


ANY_ARGS: dict[str, dict[str, Any]] = {
    "list_runs": {},
    "run_status": {"run_id": 1},
    "usage_summary": {},
    "current_mapping": {},
    "override_model_for_run": {
        "run_id": 1,
        "role": "builder",
        "category": "ui",
        "complexity": "low",
        "model": "glm-4.6",
    },
    "pause_run": {"run_id": 1},
    "resume_run": {"run_id": 1},
    "stop_run": {"run_id": 1},
    "add_budget_guard": {
        "run_id": 1,
        "provider": "anthropic",
        "period": "week",
        "threshold_percent": 80,
        "action": "stop",
    },
    "list_budget_guards": {"run_id": 1},
    "remove_budget_guard": {"run_id": 1, "guard_id": 1},
}


@pytest.mark.django_db(transaction=True)
def test_every_mcp_tool_refuses_an_anonymous_caller_and_a_revoked_token(
    operator: User, http_url: str
) -> None:
    run = new_run(start=True)
    old = Token.objects.create(user=operator).key
    with connected(token_transport(http_url, old)) as client:
        assert client.tools() == TOOLS == set(ANY_ARGS)
    call_command("drf_create_token", "-r", operator.username, stdout=io.StringIO())
    new = Token.objects.get(user=operator).key
    assert new != old
    for tool, args in ANY_ARGS.items():
        args = {k: (run.pk if k == "run_id" else v) for k, v in args.items()}
        for token in (None, old):
            response = mcp_call(http_url, token, tool, **args)
            assert response.status_code == 401, (tool, token, response.text)
            assert old not in response.text
    with connected(token_transport(http_url, new)) as client:
        assert client.text("pause_run", run_id=run.pk) == f"run {run.pk}: paused"


def test_a_token_regenerated_with_drf_create_token_gets_401_on_the_api(operator: User) -> None:
    run = new_run(start=True)
    old_client = token_client(operator)
    assert old_client.get("/runs/").status_code == 200
    out = io.StringIO()
    call_command("drf_create_token", "-r", operator.username, stdout=out)
    for path in ("/runs/", f"/dashboard/runs/{run.pk}/status"):
        response = old_client.get(path)
        assert response.status_code == 401 and response["WWW-Authenticate"] == "Token"
    assert old_client.post(f"/runs/{run.pk}/pause").status_code == 401
    run.refresh_from_db()
    assert run.state == RunState.RUNNING
    assert token_client(operator).get("/runs/").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_a_token_deleted_in_the_admin_gets_401_on_the_api_and_mcp(
    operator: User, http_url: str
) -> None:
    token = Token.objects.create(user=operator).key
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert api.get("/runs/").status_code == 200
    with connected(token_transport(http_url, token)) as client:
        assert client.text("list_runs") == "no runs yet"

    root = session_client(User.objects.create_superuser("root", "root@example.com", "x"))
    page = root.get(f"/admin/authtoken/tokenproxy/{operator.pk}/delete/")
    assert page.status_code == 200
    done = root.post(f"/admin/authtoken/tokenproxy/{operator.pk}/delete/", {"post": "yes"})
    assert done.status_code == 302
    assert not Token.objects.filter(user=operator).exists()
    assert api.get("/runs/").status_code == 401
    assert mcp_call(http_url, token, "list_runs").status_code == 401
