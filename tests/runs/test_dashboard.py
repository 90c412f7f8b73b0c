"""The progress page and its partials, without a browser: access, content, and query cost."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from runs import services
from runs.models import HumanNote, Phase, Run
from runs.plans import validate_plan
from runs.states import PhaseState
from tests.factories import set_provider_keys
from usage.services import UsageRecord, record_usage_bulk
from usage.types import TokenUsage

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    set_provider_keys(monkeypatch)


@pytest.fixture
def operator() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("op", "op@example.com", "pw"))
    return client


def make_run(phases: int, *, finished: int, events_per_phase: int) -> Run:
    categories = ["core_backend", "ui", "tests", "docs"]
    plan: dict[str, Any] = {
        "name": f"{phases}-phase run",
        "tiers": [
            {
                "name": f"Tier {t}",
                "phases": [
                    {
                        "name": f"Phase {t}.{i}",
                        "category": categories[i % 4],
                        "complexity": ["low", "medium", "high"][i % 3],
                    }
                    for i in range(10)
                ],
            }
            for t in range(phases // 10)
        ],
    }
    run = services.run_create(plan=validate_plan(plan))
    services.run_start(run_id=run.pk)
    done = list(run.phases.order_by("position")[:finished])
    Phase.objects.filter(pk__in=[p.pk for p in done]).update(
        state=PhaseState.COMPLETE,
        attempt_count=2,
        auditor_verdict={
            "decision": "approve",
            "summary": "fine",
            "issues": [{"severity": "minor", "title": "t", "detail": "d"}],
        },
    )
    record_usage_bulk(
        records=(
            UsageRecord(
                call_id=f"{run.pk}-{p.pk}-{n}",
                provider="anthropic",
                model="claude-sonnet-4-5",
                role="builder" if n % 2 else "auditor",
                usage=TokenUsage(prompt_tokens=100, completion_tokens=10),
                run_id=run.pk,
                phase_id=p.pk,
            )
            for p in run.phases.all()
            for n in range(events_per_phase)
        )
    )
    for n in range(3):
        HumanNote.objects.create(run=run, text=f"note {n}")
    return run


def queries_for(client: Client, url: str, **headers: str) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url, headers=headers)
    assert response.status_code == 200, response.content[:500]
    return len(captured.captured_queries)


def test_the_page_costs_the_same_queries_for_10_and_1000_phases(operator: Client) -> None:
    small = make_run(10, finished=5, events_per_phase=2)
    large = make_run(1000, finished=700, events_per_phase=4)
    for url in (
        "/dashboard/?run={}",
        "/dashboard/runs/{}/progress",
        "/admin/runs/run/{}/change/",
    ):
        queries_for(operator, url.format(small.pk))  # warms per-process caches (content types)
        small_count = queries_for(operator, url.format(small.pk))
        large_count = queries_for(operator, url.format(large.pk))
        assert small_count == large_count, url
    queries_for(operator, "/dashboard/usage/partial?period=week")
    usage_small = queries_for(operator, "/dashboard/usage/partial?period=week")
    make_run(10, finished=0, events_per_phase=20)
    assert queries_for(operator, "/dashboard/usage/partial?period=week") == usage_small


def test_the_page_needs_a_staff_login(operator: Client) -> None:
    response = Client().get("/dashboard/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    User.objects.create_user("plain", password="pw")
    plain = Client()
    plain.login(username="plain", password="pw")
    assert plain.get("/dashboard/").status_code == 302


def test_the_progress_partial_polls_until_the_run_finishes(operator: Client) -> None:
    run = make_run(10, finished=0, events_per_phase=0)
    polling = operator.get(f"/dashboard/runs/{run.pk}/progress", headers={"HX-Request": "true"})
    assert b'hx-trigger="every 2s"' in polling.content
    services.run_pause(run_id=run.pk)
    paused = operator.get(f"/dashboard/runs/{run.pk}/progress", headers={"HX-Request": "true"})
    assert b'data-state="paused"' in paused.content
    assert b'hx-trigger="every 2s"' in paused.content  # a quota pause may resume by itself
    services.run_stop(run_id=run.pk)
    stopped = operator.get(f"/dashboard/runs/{run.pk}/progress", headers={"HX-Request": "true"})
    assert b'data-state="stopped"' in stopped.content
    assert b"hx-trigger" not in stopped.content


def test_a_control_posted_with_htmx_answers_with_the_new_progress(operator: Client) -> None:
    run = make_run(10, finished=0, events_per_phase=0)
    response = operator.post(
        f"/dashboard/runs/{run.pk}/control", {"action": "pause"}, headers={"HX-Request": "true"}
    )
    assert response.status_code == 200
    assert b'data-state="paused"' in response.content
    refused = operator.post(
        f"/dashboard/runs/{run.pk}/control", {"action": "explode"}, headers={"HX-Request": "true"}
    )
    assert refused.status_code == 200
    run.refresh_from_db()
    assert run.state == "paused"


def test_applying_the_any_category_row_as_global_default_changes_what_new_runs_get(
    operator: Client, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):  # the router reloads on commit
        response = operator.post(
            "/dashboard/mapping",
            {
                "role": "auditor",
                "category": "*",
                "complexity": "low",
                "model": "glm-4.6",
                "scope": "global",
            },
            headers={"HX-Request": "true"},
        )
    assert response.status_code == 200
    assert b"Saved: auditor *:low" in response.content
    run = make_run(10, finished=0, events_per_phase=0)
    run.refresh_from_db()
    ui_low = run.run_context["mapping"]["auditor"]["ui:low"]
    assert ui_low == ["glm-4.6", "global override (any category)"]
