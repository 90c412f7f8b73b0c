"""The status poll answered from memory (runs.pollcache), and never staler than promised:
tokens, users and runs changed in this process or in another session are seen by the next
request, counts within AUTOPACK_STATUS_CACHE_SECONDS, and a cut notification connection
sends requests back to the database until it is back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from runs import pollcache, services
from runs.models import Run
from runs.plans import parse_plan_bytes
from runs.states import RunState
from tests.conftest import wait_for
from tests.factories import metered_call
from tests.security.conftest import EXAMPLE

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def token() -> str:
    user = User.objects.create_user("poller", is_staff=True)
    return Token.objects.create(user=user).key


@pytest.fixture
def run() -> Run:
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    services.run_start(run_id=run.pk)
    return run


@pytest.fixture
def other_session() -> Iterator[psycopg.Connection]:
    """Another database session, as another process's would be: its writes go past this
    process's Django connection."""
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    with psycopg.connect(**params, autocommit=True) as conn:
        yield conn


def poll(token: str, run: Run) -> tuple[int, dict[str, object]]:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    response = client.get(f"/dashboard/runs/{run.pk}/status")
    return response.status_code, response.json()


def queries_of_a_poll(token: str, run: Run) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert poll(token, run)[0] == 200
    return len(captured.captured_queries)


@pytest.fixture
def status_kept(settings: Any) -> None:
    """A kept status also expires with age (AUTOPACK_STATUS_CACHE_SECONDS, a second): on a busy
    machine that second can pass between two polls, and the second poll then reads the run
    again, as it should. Tests of what is answered from memory hold the entry; the age has a
    test of its own."""
    settings.AUTOPACK_STATUS_CACHE_SECONDS = 3600.0


def test_a_repeated_poll_is_answered_without_a_query(
    token: str, run: Run, status_kept: None
) -> None:
    assert poll(token, run)[0] == 200
    assert queries_of_a_poll(token, run) == 0
    assert pollcache.LISTENER.backend_pid() is not None


def test_a_token_revoked_in_this_process_is_refused_by_the_very_next_poll(
    token: str, run: Run
) -> None:
    for _ in range(20):  # a race would show in some of these
        assert poll(token, run)[0] == 200
        user = Token.objects.get(key=token).user
        Token.objects.filter(key=token).delete()
        assert poll(token, run)[0] == 401
        token = Token.objects.create(user=user).key


def test_right_after_this_process_writes_its_cache_has_caught_up(token: str, run: Run) -> None:
    # Closer than a request can come: PostgreSQL delivers a notification a moment after the
    # COMMIT returns, so without the sync after own writes many of these would still hit.
    user = User.objects.get(username="poller")
    for _ in range(100):
        assert poll(token, run)[0] == 200
        assert pollcache.auth_row(token) is not None
        Token.objects.filter(key=token).delete()
        assert pollcache.LISTENER.ready()
        assert pollcache.auth_row(token) is None
        token = Token.objects.create(user=user).key


def test_a_user_deactivated_in_this_process_is_refused_by_the_very_next_poll(
    token: str, run: Run
) -> None:
    assert poll(token, run)[0] == 200
    User.objects.filter(username="poller").update(is_active=False)
    assert poll(token, run)[0] == 401
    User.objects.filter(username="poller").update(is_active=True, is_staff=False)
    assert poll(token, run)[0] == 403


def test_a_run_paused_in_this_process_shows_paused_on_the_very_next_poll(
    token: str, run: Run
) -> None:
    for _ in range(10):
        assert poll(token, run)[1]["state"] == RunState.RUNNING
        services.run_pause(run_id=run.pk)
        assert poll(token, run)[1]["state"] == RunState.PAUSED
        services.run_resume(run_id=run.pk)


def test_changes_from_another_session_reach_the_next_polls(
    token: str, run: Run, other_session: psycopg.Connection
) -> None:
    assert poll(token, run)[0] == 200
    other_session.execute(
        "UPDATE runs_run SET state = 'paused', updated_at = now() WHERE id = %s", (run.pk,)
    )
    # PostgreSQL delivers the notification a moment after the COMMIT returned.
    wait_for(lambda: poll(token, run)[1]["state"] == "paused", timeout=5, interval=0.001)
    other_session.execute("DELETE FROM authtoken_token WHERE key = %s", (token,))
    wait_for(lambda: poll(token, run)[0] == 401, timeout=5, interval=0.001)


def test_counts_are_refreshed_after_the_status_cache_age(
    token: str, run: Run, settings: object
) -> None:
    settings.AUTOPACK_STATUS_CACHE_SECONDS = 0.3  # type: ignore[attr-defined]
    assert poll(token, run)[1]["tokens_in"] == 0
    metered_call("openai", "gpt-5", prompt=7, completion=3, run_id=run.pk)
    # Usage does not touch the run row: the cached counts may lag, at most by the age.
    time.sleep(0.35)
    assert poll(token, run)[1]["tokens_in"] == 7


def test_after_the_notification_connection_is_cut_polls_read_the_database(
    token: str, run: Run, other_session: psycopg.Connection, status_kept: None
) -> None:
    assert poll(token, run)[0] == 200
    pid = pollcache.LISTENER.backend_pid()
    assert pid is not None
    other_session.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_for(
        lambda: (
            not other_session.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
        ),
        timeout=5,
        what="the listening session to end",
    )
    # Sent while nobody listened: lost. The poll must not trust what it kept.
    other_session.execute(
        "UPDATE runs_run SET state = 'paused', updated_at = now() WHERE id = %s", (run.pk,)
    )
    assert poll(token, run)[1]["state"] == "paused"
    other_session.execute("DELETE FROM authtoken_token WHERE key = %s", (token,))
    assert poll(token, run)[0] == 401
    # Listening again a moment later, and answering from memory again.
    token = Token.objects.create(user=User.objects.get(username="poller")).key
    wait_for(
        lambda: (
            queries_of_a_poll(token, run) == 0
            and pollcache.LISTENER.backend_pid() not in (None, pid)
        ),
        timeout=5,
        what="the cache to be used again",
    )


@pytest.mark.django_db(transaction=False)
def test_inside_a_transaction_polls_read_the_database(token: str, run: Run) -> None:
    assert poll(token, run)[0] == 200
    assert queries_of_a_poll(token, run) > 0
    services.run_pause(run_id=run.pk)
    assert poll(token, run)[1]["state"] == RunState.PAUSED
