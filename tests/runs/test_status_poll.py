"""The status poll without the notification cache (SQLite, inside a transaction, or while
the notification session is down): cached by the run's updated_at and never staler than
promised. One statement per token poll (the token and the run's updated_at), counts within
AUTOPACK_STATUS_CACHE_SECONDS. A revoked token, a deactivated user or a paused run on this
path: tests/runs/test_authentication.py's `database` mode; the cache's own tests:
tests/runs/test_pollcache.py."""

from __future__ import annotations

import time

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from runs import services
from runs.models import Run
from runs.states import RunState
from tests.factories import metered_call
from tests.runs.test_pollcache import poll, run, status_kept, token

# Inside the test's transaction the notification cache is not used (runs.pollcache).
pytestmark = pytest.mark.django_db
__all__ = ["run", "status_kept", "token"]  # the fixtures, shared with the cache's tests


def test_a_repeated_poll_is_one_statement_for_the_token_and_the_runs_updated_at(
    token: str, run: Run, status_kept: None
) -> None:
    assert poll(token, run)[0] == 200
    with CaptureQueriesContext(connection) as captured:
        assert poll(token, run)[0] == 200
    [query] = captured.captured_queries
    assert "authtoken_token" in query["sql"] and "runs_run" in query["sql"]


def test_a_staff_sessions_repeated_poll_reads_its_session_and_the_runs_updated_at(
    run: Run, status_kept: None
) -> None:
    client = APIClient()
    client.force_login(User.objects.create_user("browser", is_staff=True))
    path = f"/dashboard/runs/{run.pk}/status"
    assert client.get(path).json()["state"] == RunState.RUNNING
    with CaptureQueriesContext(connection) as captured:
        assert client.get(path).status_code == 200
    tables = [q["sql"].split(" FROM ")[1].split()[0].strip('"') for q in captured.captured_queries]
    assert tables == ["django_session", "auth_user", "runs_run"], tables
    services.run_pause(run_id=run.pk)
    assert client.get(path).json()["state"] == RunState.PAUSED


def test_counts_are_refreshed_after_the_status_cache_age(
    token: str, run: Run, settings: object
) -> None:
    settings.AUTOPACK_STATUS_CACHE_SECONDS = 0.3  # type: ignore[attr-defined]
    assert poll(token, run)[1]["tokens_in"] == 0
    metered_call("openai", "gpt-5", prompt=7, completion=3, run_id=run.pk)
    # Usage does not touch the run row: the cached counts may lag, at most by the age.
    time.sleep(0.35)
    assert poll(token, run)[1]["tokens_in"] == 7


def test_an_unknown_run_is_404_and_a_deleted_run_is_404_on_the_next_poll(
    token: str, run: Run, status_kept: None
) -> None:
    assert poll(token, run)[0] == 200
    Run.objects.filter(pk=run.pk).delete()
    assert poll(token, run)[0] == 404
