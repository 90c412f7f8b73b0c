"""POST /usage/events in process (DRF's test client through the whole stack): what is stored,
what is refused and with which field errors, and that a refused or replayed batch changes no
count (issue 17, "Recording from outside"; the HTTP and concurrency cases are in
test_ingest_http.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.core.cache import cache
from django.db import connection
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from runs.models import Run
from tests.security.conftest import new_run
from usage.models import RunUsageRollup, UsageEvent, UsageRollup
from usage.selectors import get_usage_overview

pytestmark = pytest.mark.django_db
URL = "/usage/events"


@pytest.fixture(autouse=True)
def fresh_throttles() -> Iterator[None]:
    cache.clear()
    yield


def agent_client(username: str = "planner", *, permitted: bool = True) -> APIClient:
    """A token of a plain user (not staff) holding usage.record_usage and nothing else."""
    user = User.objects.create_user(username)
    if permitted:
        user.user_permissions.add(Permission.objects.get(codename="record_usage"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def event(call_id: str = "call-1", **fields: Any) -> dict[str, Any]:
    return {
        "provider": "anthropic",
        "model": "claude-sonnet-4-5",
        "role": "agent:planner",
        "call_id": call_id,
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        **fields,
    }


def post(client: APIClient, body: Any) -> Any:
    return client.post(URL, json.dumps(body), content_type="application/json")


def stored() -> dict[str, int]:
    """Everything a refused request must leave as it was."""
    return {
        "events": UsageEvent.objects.count(),
        "rollup_calls": UsageRollup.objects.aggregate(n=Sum("calls"))["n"] or 0,
        "run_rollup_calls": RunUsageRollup.objects.aggregate(n=Sum("calls"))["n"] or 0,
    }


def test_one_event_is_stored_as_the_agents_usage_and_a_replay_is_not_counted_again() -> None:
    client = agent_client()
    first = post(client, event(cached_input_tokens=200, reasoning_tokens=50))
    assert first.status_code == 201, first.content
    assert first.json() == {"new": ["call-1"], "already_recorded": []}
    row = UsageEvent.objects.get(call_id="call-1")
    assert (row.provider, row.role, row.prompt_tokens, row.completion_tokens) == (
        "anthropic",
        "agent:planner",
        1200,
        300,
    )
    assert (row.cached_input_tokens, row.reasoning_tokens) == (200, 50)
    assert row.source == "api"
    before = stored()

    again = post(client, event())
    assert again.status_code == 200
    assert again.json() == {"new": [], "already_recorded": ["call-1"]}
    assert stored() == before
    anthropic = {r["provider"]: r for r in get_usage_overview(period="day")["providers"]}[
        "anthropic"
    ]
    assert (anthropic["aux_tokens_in"], anthropic["aux_tokens_out"]) == (1200, 300)
    assert (anthropic["core_tokens_in"], anthropic["core_tokens_out"]) == (0, 0)


def test_a_batch_answers_which_call_ids_were_new_and_which_were_recorded_before() -> None:
    client = agent_client()
    assert post(client, {"events": [event("a"), event("b")]}).status_code == 201
    response = post(client, {"events": [event("b"), event("c"), event("a"), event("d")]})
    assert response.status_code == 201
    assert response.json() == {"new": ["c", "d"], "already_recorded": ["b", "a"]}
    assert UsageEvent.objects.count() == 4
    assert UsageRollup.objects.aggregate(n=Sum("calls"))["n"] == 4  # rolled up once each


def test_an_event_may_name_a_run_and_its_phase_and_a_phase_alone_brings_its_run() -> None:
    run = new_run()
    phase = run.phases.order_by("pk").first()
    assert phase is not None
    client = agent_client()
    response = post(
        client,
        {"events": [event("r", run=run.pk, phase=phase.pk), event("p", phase=phase.pk)]},
    )
    assert response.status_code == 201, response.content
    assert set(UsageEvent.objects.values_list("call_id", "run_id", "phase_id")) == {
        ("r", run.pk, phase.pk),
        ("p", run.pk, phase.pk),
    }


def test_every_problem_of_a_refused_batch_is_keyed_by_its_event_and_nothing_is_stored() -> None:
    run, other = new_run(), new_run()
    phase_of_other = other.phases.order_by("pk").first()
    assert phase_of_other is not None
    missing_run = (Run.objects.order_by("-pk").values_list("pk", flat=True).first() or 0) + 100
    client = agent_client()
    before = stored()
    soon = datetime.now(UTC) + timedelta(hours=2)
    batch = [
        event("ok-0"),
        event("e1", provider="nobody"),
        event("e2", role="planner"),
        event("e3", prompt_tokens=-5),
        event("e4", prompt_tokens=10, cached_input_tokens=8, cache_write_tokens=8),
        event("e5", completion_tokens=10, reasoning_tokens=11),
        event("e6", run=missing_run),
        event("e7", run=run.pk, phase=phase_of_other.pk),
        event("e8", time=soon.isoformat()),
        event("e9", time="2025-03-12T15:30:00"),
        event("ok-0"),
        event("e11", cache_write_tokens=10, cache_write_1h_tokens=11),
        event("lost:x"),
        event("e13", model="bad\x00model"),
        "not an event",
    ]
    response = post(client, {"events": batch})
    assert response.status_code == 400
    errors = response.json()
    assert set(errors) == {
        "events[1].provider",
        "events[2].role",
        "events[3].prompt_tokens",
        "events[4].cached_input_tokens",
        "events[5].reasoning_tokens",
        "events[6].run",
        "events[7].phase",
        "events[8].time",
        "events[9].time",
        "events[10].call_id",
        "events[11].cache_write_1h_tokens",
        "events[12].call_id",
        "events[13].model",
        "events[14]",
    }
    assert "unknown provider 'nobody'" in errors["events[1].provider"][0]
    assert "anthropic" in errors["events[1].provider"][0]  # it names the providers there are
    assert "agent:<name>" in errors["events[2].role"][0]
    assert f"no run {missing_run}" in errors["events[6].run"][0]
    assert f"is in run {other.pk}, not run {run.pk}" in errors["events[7].phase"][0]
    assert "in the future" in errors["events[8].time"][0]
    assert "offset" in errors["events[9].time"][0]
    assert "events[0]" in errors["events[10].call_id"][0]
    assert stored() == before  # not even the good first event


def test_a_single_event_is_refused_with_plain_field_names() -> None:
    response = post(agent_client(), event(role="agent:", prompt_tokens="many"))
    assert response.status_code == 400
    assert set(response.json()) == {"prompt_tokens"}
    response = post(agent_client("second"), event(role="agent:"))
    assert set(response.json()) == {"role"}
    assert UsageEvent.objects.count() == 0


@pytest.mark.parametrize(
    "body",
    [[event()], "text", {"events": []}, {"events": {"a": 1}}, {"events": [event()], "x": 1}],
)
def test_a_body_that_is_neither_an_event_nor_a_batch_is_a_400(body: Any) -> None:
    response = post(agent_client(), body)
    assert response.status_code == 400
    assert UsageEvent.objects.count() == 0


def test_a_batch_past_the_limit_is_refused_naming_the_limit_before_any_event_is_read(
    settings: Any,
) -> None:
    # 100,000 events: the body limit is lifted so that the batch limit is what answers.
    settings.AUTOPACK_USAGE_MAX_BODY_BYTES = 50_000_000
    batch = {"events": [event(f"c{i}") for i in range(100_000)]}
    response = post(agent_client(), batch)
    assert response.status_code == 400
    (detail,) = response.json()["events"]
    assert "at most 5,000 events" in detail and "100,000" in detail
    assert UsageEvent.objects.count() == 0


def test_a_body_past_the_byte_limit_is_a_413_in_json(settings: Any) -> None:
    settings.AUTOPACK_USAGE_MAX_BODY_BYTES = 1_000
    response = post(agent_client(), {"events": [event(f"c{i}") for i in range(20)]})
    assert response.status_code == 413
    assert "over the limit of 1,000 bytes" in response.json()["detail"]
    assert UsageEvent.objects.count() == 0


def test_a_wrong_token_a_missing_permission_and_no_token_store_nothing() -> None:
    wrong = APIClient()
    wrong.credentials(HTTP_AUTHORIZATION="Token 0123456789abcdef0123456789abcdef01234567")
    assert post(wrong, event()).status_code == 401
    assert post(APIClient(), event()).status_code == 401
    refused = post(agent_client("nobody", permitted=False), event())
    assert refused.status_code == 403
    assert "usage.record_usage" in refused.json()["detail"]
    # Staff status is no substitute for the permission.
    staff = User.objects.create_user("reader", is_staff=True)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=staff).key}")
    assert post(client, event()).status_code == 403
    assert UsageEvent.objects.count() == 0


def test_the_schema_documents_the_route_with_its_event_and_batch_bodies() -> None:
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    operation = schema["paths"]["/usage/events"]["post"]
    assert operation["operationId"] == "usage_events_record"
    assert {"200", "201", "400", "401", "403", "413"} <= set(operation["responses"])
    components = schema["components"]["schemas"]
    assert len(components["UsageEventsInputRequest"]["oneOf"]) == 2
    events = components["UsageEventBatchInputRequest"]["properties"]["events"]
    assert events["maxItems"] == 5000
    required = set(components["UsageEventInputRequest"]["required"])
    assert required == {
        "provider",
        "model",
        "role",
        "call_id",
        "prompt_tokens",
        "completion_tokens",
    }


def test_a_batchs_statements_do_not_grow_with_its_events() -> None:
    run = new_run()
    phase = run.phases.order_by("pk").first()
    assert phase is not None
    client = agent_client()
    post(client, event("warm-up"))  # the router's state, the permission cache's first read

    def statements(n: int, tag: str) -> int:
        batch = [event(f"{tag}{i}", run=run.pk, phase=phase.pk) for i in range(n)]
        with CaptureQueriesContext(connection) as queries:
            assert post(client, {"events": batch}).status_code == 201
        return len(queries)

    # Auth, permission, run, phase, the stored call_ids, and the bulk insert's own statements.
    assert statements(1, "one-") == statements(500, "many-") <= 14
