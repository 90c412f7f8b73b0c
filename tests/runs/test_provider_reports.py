"""Workers say which providers they can call; a process without the keys reads that (issue 15,
item 1). Real worker processes (tests/conftest.py) hold the keys; this test process has them
removed from its environment, as an MCP server started by hand has none."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from routing.mapping import MappingError, model_change_check
from routing.models import ModelChange, WorkerProviderReport
from runs import services
from runs.models import Run
from runs.plans import parse_plan_bytes
from tests.conftest import WorkerProcess, wait_for
from tests.factories import set_provider_keys

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"
KEYS = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "google_gemini": "GEMINI_API_KEY",
    "glm": "GLM_API_KEY",
}
# Short beats, so that a killed worker is taken for lost within a second or two.
HEARTBEAT, LOST_AFTER = 0.2, 1.5

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def no_keys_here(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    for env in KEYS.values():
        monkeypatch.delenv(env, raising=False)
    settings.AUTOPACK_WORKER_LOST_AFTER_SECONDS = LOST_AFTER


@pytest.fixture
def fast_worker_env(worker_env: dict[str, str]) -> dict[str, str]:
    # start_worker passes this same dict to every worker it starts.
    worker_env["AUTOPACK_WORKER_HEARTBEAT_SECONDS"] = str(HEARTBEAT)
    worker_env["AUTOPACK_WORKER_LOST_AFTER_SECONDS"] = str(LOST_AFTER)
    return worker_env


@pytest.fixture
def run() -> Run:
    # Pending: nothing is queued, so the worker has no phase to run.
    return services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))


def override(run: Run, model: str = "claude-haiku-5-5") -> Run:
    return services.run_model_override(
        run_id=run.pk, role="builder", category="ui", complexity="low", model=model, via="mcp"
    )


def reported() -> set[str]:
    return {p for row in WorkerProviderReport.objects.all() for p in row.providers}


def usable(model: str) -> bool:
    try:
        model_change_check(role="builder", category="ui", complexity="low", model=model)
    except MappingError:
        return False
    return True


def refusal(run: Run) -> str | None:
    try:
        override(run)
    except MappingError as exc:
        return str(exc)
    return None


def test_a_process_without_keys_accepts_a_model_a_live_worker_can_call_until_it_is_lost(
    no_keys_here: None,
    fast_worker_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    run: Run,
) -> None:
    assert "no worker is running" in (refusal(run) or "")
    worker = start_worker("reporter", beat=False)
    wait_for(lambda: reported() == set(KEYS), timeout=30, what="the worker's provider report")
    # Names only: nothing of a key reaches the table.
    row = WorkerProviderReport.objects.get()
    assert "sim-" not in str(row.providers) and row.worker

    override(run)
    run.refresh_from_db()
    assert run.run_context["model_overrides"] == {"builder": {"ui:low": "claude-haiku-5-5"}}
    assert ModelChange.objects.filter(run_id=run.pk).count() == 1

    # SIGKILL: the worker cannot withdraw its report; it must age out as lost. Waited for with
    # the check alone, which writes nothing, then the override itself is refused.
    worker.kill()
    wait_for(lambda: not usable("claude-haiku-5-5"), timeout=30, what="the lost worker")
    assert refusal(run) == (
        "model: 'claude-haiku-5-5' is served by anthropic, but anthropic is not configured in "
        "this process, and no worker is running to tell which providers are configured"
    )
    assert ModelChange.objects.filter(run_id=run.pk).count() == 1


def test_a_provider_no_live_worker_can_call_is_refused_by_name(
    no_keys_here: None,
    fast_worker_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    run: Run,
) -> None:
    del fast_worker_env["ANTHROPIC_API_KEY"]
    start_worker("no-anthropic", beat=False)
    wait_for(lambda: reported(), timeout=30, what="the worker's provider report")
    assert reported() == set(KEYS) - {"anthropic"}

    assert refusal(run) == (
        "model: 'claude-haiku-5-5' is served by anthropic, but anthropic is not configured on "
        "any running worker (no API key in their environment)"
    )
    override(run, model="glm-4.6")  # a provider the worker reports
    assert ModelChange.objects.filter(run_id=run.pk).count() == 1


def test_a_worker_that_stops_cleanly_withdraws_its_report_at_once(
    no_keys_here: None,
    fast_worker_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker("withdraws", beat=False)
    wait_for(lambda: reported(), timeout=30, what="the worker's provider report")
    worker.stop()
    assert not WorkerProviderReport.objects.exists()


def providers_shown(client: APIClient) -> dict[str, dict[str, Any]]:
    response = client.get("/dashboard/models")
    assert response.status_code == 200
    return response.json()["choices"]["providers"]


def admin_reach_column(client: Client) -> dict[str, str]:
    page = client.get(reverse("admin:usage_providerquota_changelist"))
    assert page.status_code == 200
    cl = page.context["cl"]
    return {q.provider: cl.model_admin.key_configured(q) for q in cl.result_list}


def test_the_api_and_the_admin_say_configured_as_the_workers_report_not_as_this_process(
    fast_worker_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
    settings: Any,
) -> None:
    # This process holds every key: it makes no calls, so that says nothing.
    set_provider_keys(monkeypatch, value="sim-key-of-the-web-process")
    settings.AUTOPACK_WORKER_LOST_AFTER_SECONDS = LOST_AFTER
    user = User.objects.create_superuser("root", "root@example.com", "pw")
    api = APIClient()
    api.force_authenticate(user)
    admin_page = Client()
    admin_page.force_login(user)

    nobody = {"configured": False, "reach": "no_worker"}
    assert providers_shown(api) == {name: nobody for name in KEYS}
    assert set(admin_reach_column(admin_page).values()) == {"no worker has reported"}

    del fast_worker_env["ANTHROPIC_API_KEY"]
    start_worker("no-anthropic-key", beat=False)
    wait_for(lambda: reported(), timeout=30, what="the worker's provider report")

    shown = providers_shown(api)
    assert shown["anthropic"] == {"configured": False, "reach": "no_key"}
    assert shown["openai"] == shown["glm"] == {"configured": True, "reach": "reported"}
    column = admin_reach_column(admin_page)
    assert column["anthropic"] == "running workers report no key"
    assert column["openai"] == "a running worker has its key"
    html = admin_page.get(reverse("admin:routing_providerendpoint_changelist")).content.decode()
    assert "running workers report no key" in html and "sim-key" not in html
    # The override answers with the same source: anthropic is refused, glm is taken.
    changed = api.post(
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
    assert changed.status_code == 200, changed.content
    assert changed.json()["choices"]["providers"]["anthropic"]["reach"] == "no_key"
