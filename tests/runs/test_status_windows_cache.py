"""The status API's cap windows are shared through the cache for a slot of
AUTOPACK_STATUS_CACHE_SECONDS (runs.selectors.status_window_rows): a run that changes is
answered with its new state at once, without reading the windows again; the windows' counts
lag by at most the slot."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from runs import services
from runs.models import Run
from runs.plans import parse_plan_bytes
from runs.selectors import status_window_rows
from tests.factories import metered_call
from tests.security.conftest import EXAMPLE
from usage.models import ProviderQuota, ProviderWindow, UsageEvent, UsageRollup

pytestmark = pytest.mark.django_db(transaction=True)

SLOT = 60.0
T0 = datetime(2026, 3, 2, 12, tzinfo=UTC)  # the start of a slot of SLOT seconds


def used(tokens: int, at: datetime) -> None:
    metered_call("openai", "gpt-5", prompt=tokens, completion=0, at=at)


@pytest.fixture
def session_window(settings: Any) -> None:
    ProviderWindow.objects.all().delete()
    ProviderQuota.objects.all().delete()
    ProviderWindow.objects.create(
        provider="openai", name="session", kind="rolling", hours=5, cap_tokens=1_000_000
    )
    cache.clear()


def session_tokens(rows: list[dict[str, Any]]) -> int:
    [row] = [r for r in rows if (r["provider"], r["window"]) == ("openai", "session")]
    return int(row["tokens"])


def reads_usage(captured: CaptureQueriesContext) -> bool:
    table = UsageRollup._meta.db_table
    return any(table in q["sql"] for q in captured.captured_queries)


def test_the_windows_are_read_once_per_slot(settings: Any, session_window: None) -> None:
    settings.AUTOPACK_STATUS_CACHE_SECONDS = SLOT
    assert T0.timestamp() % SLOT == 0
    used(10, T0 - timedelta(hours=2))
    assert session_tokens(status_window_rows(now=T0 + timedelta(seconds=1))) == 10
    used(100, T0 - timedelta(hours=1))
    assert UsageEvent.objects.count() == 2
    with CaptureQueriesContext(connection) as captured:
        rows = status_window_rows(now=T0 + timedelta(seconds=SLOT - 1))
    assert len(captured.captured_queries) == 0
    assert session_tokens(rows) == 10  # the same slot: the counts lag
    assert session_tokens(status_window_rows(now=T0 + timedelta(seconds=SLOT))) == 110
    settings.AUTOPACK_STATUS_CACHE_SECONDS = 0  # no cache: read every time
    used(1, T0 - timedelta(hours=1))
    assert session_tokens(status_window_rows(now=T0 + timedelta(seconds=SLOT))) == 111


def test_a_changed_run_is_answered_with_its_state_at_once_and_the_windows_kept(
    settings: Any, session_window: None
) -> None:
    # A slot far longer than the test: the windows are read once (the status itself is kept
    # until the run changes, see runs.api.RunStatusApi).
    settings.AUTOPACK_STATUS_CACHE_SECONDS = 10.0**9
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    services.run_start(run_id=run.pk)
    user = User.objects.create_user("poller", is_staff=True)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")

    def poll() -> dict[str, Any]:
        response = client.get(f"/dashboard/runs/{run.pk}/status")
        assert response.status_code == 200
        return dict(response.json())

    with CaptureQueriesContext(connection) as captured:
        first = poll()
    assert first["state"] == "running" and reads_usage(captured)
    [session] = [w for w in first["windows"] if (w["provider"], w["name"]) == ("openai", "session")]
    used(500, timezone.now() - timedelta(minutes=1))  # counted from the next slot on
    # As every change of a run does (services), the update moves its updated_at.
    Run.objects.filter(pk=run.pk).update(state="paused", updated_at=timezone.now())
    assert poll()["state"] == "paused"
    Run.objects.filter(pk=run.pk).update(state="running", updated_at=timezone.now())
    with CaptureQueriesContext(connection) as captured:
        assert poll()["state"] == "running"
    assert not reads_usage(captured)  # the status was computed again, its windows not read
    [again] = [w for w in poll()["windows"] if (w["provider"], w["name"]) == ("openai", "session")]
    assert again["used"] == session["used"]
