"""Secrets stay secret: provider API keys and users' API tokens appear in no log line of a whole
run (worker and web process, provider errors included), no page, no API answer and no
exception report."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.http import HttpRequest
from django.test import Client, RequestFactory
from django.views.debug import ExceptionReporter
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from routing.router import router
from runs import services
from runs.models import Run
from runs.plans import parse_plan_bytes
from runs.states import RunState
from tests.conftest import WorkerProcess, wait_for
from tests.security.conftest import SECRET_KEYS, session_client
from tests.security.test_access import every_path

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.needs_broker]

PLAN = b"""
name: Secrets check
tiers:
  - name: Only
    phases:
      - {name: First step, category: core_backend, complexity: low}
      - {name: Second step, category: security_auth_change, complexity: high}
      - {name: Third step, category: docs, complexity: medium}
"""


def leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in text]


def test_no_secret_appears_in_the_logs_pages_or_answers_of_a_whole_run(
    start_worker: Callable[..., WorkerProcess],
    worker_env: dict[str, str],
    worker_log_dir: Path,
    sim: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    # `sim` pointed this process at the simulator with its own keys; use the unique ones here too.
    for name, value in SECRET_KEYS.items():
        monkeypatch.setenv(name, value)
    router.invalidate()
    # The worker gets the keys too, and logs everything it would say at DEBUG.
    worker_env.update(SECRET_KEYS, AUTOPACK_LOG_LEVEL="DEBUG")
    (worker_log_dir / "worker-secrets.log").unlink(missing_ok=True)
    worker = start_worker("secrets")
    root = User.objects.create_superuser("root", "root@example.com", "x")
    token = Token.objects.create(user=root).key
    secrets = [*SECRET_KEYS.values(), token]

    # Provider errors on the way: a rate limit and a server error (retried), and a refused
    # key, which fails the second run and puts the provider's error into the run's reason.
    sim.add_fault(kind="429", retry_after=0.05, count=1)
    sim.add_fault(kind="500", count=1)
    first = services.run_create(plan=parse_plan_bytes(PLAN))
    services.run_start(run_id=first.pk)
    wait_for(
        lambda: Run.objects.get(pk=first.pk).state == RunState.COMPLETED,
        timeout=90,
        what="the first run to complete",
    )
    sim.add_fault(kind="auth", count=-1)
    second = services.run_create(plan=parse_plan_bytes(PLAN))
    services.run_start(run_id=second.pk)
    wait_for(
        lambda: Run.objects.get(pk=second.pk).state == RunState.FAILED,
        timeout=90,
        what="the second run to fail",
    )
    sim.reset()

    web = session_client(root)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    paths = [
        *every_path(first),
        f"/dashboard/?run={second.pk}",
        f"/admin/runs/run/{second.pk}/change/",
        f"/admin/authtoken/tokenproxy/{root.pk}/change/",
        f"/admin/authtoken/tokenproxy/{root.pk}/delete/",
        "/admin/authtoken/tokenproxy/",
    ]
    for path in paths:
        for client in (web, api):
            response = client.get(path)
            assert response.status_code < 500, (path, response.status_code)
            assert not leaks(response.content.decode(errors="replace"), secrets), path

    worker.stop()
    logged = worker.log() + "\n".join(r.getMessage() for r in caplog.records)
    assert "runs.tasks" in logged  # the worker's log of the phases is there to search
    assert not leaks(logged, secrets)
    assert not leaks(caplog.text, secrets)


def report_of_a_failing_view(request: HttpRequest) -> tuple[str, str]:
    """Django's report (debug page, error mail) of an exception raised while handling
    `request`; its frames hold only the request, as a view's would."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        reporter = ExceptionReporter(request, *sys.exc_info())
        return reporter.get_traceback_text(), reporter.get_traceback_html()


@pytest.mark.django_db
def test_an_exception_report_of_an_api_request_shows_no_token_or_key() -> None:
    user = User.objects.create_user("someone", is_staff=True)
    token = Token.objects.create(user=user).key
    # The keys as request.META entries too (as a server's environ would carry them).
    meta: dict[str, Any] = dict(SECRET_KEYS)
    request = RequestFactory().post(
        "/runs/1/pause",
        HTTP_AUTHORIZATION=f"Token {token}",
        HTTP_X_API_KEY=SECRET_KEYS["ANTHROPIC_API_KEY"],
        HTTP_COOKIE="sessionid=abc123secretsession",
        **meta,
    )
    request.user = user
    text, html = report_of_a_failing_view(request)
    secrets = [*SECRET_KEYS.values(), token, "abc123secretsession"]
    assert "boom" in text and "HTTP_AUTHORIZATION" in text  # the report covers the request
    assert not leaks(text, secrets) and not leaks(html, secrets)


@pytest.mark.django_db
def test_the_token_admin_names_tokens_by_user_never_by_key() -> None:
    root = User.objects.create_superuser("root", "root@example.com", "x")
    someone = User.objects.create_user("someone", is_staff=True)
    token = Token.objects.create(user=someone).key
    web: Client = session_client(root)
    for path in (
        "/admin/authtoken/tokenproxy/",
        f"/admin/authtoken/tokenproxy/{someone.pk}/change/",
        f"/admin/authtoken/tokenproxy/{someone.pk}/delete/",
    ):
        page = web.get(path)
        assert page.status_code == 200 and "someone" in page.content.decode(), path
        assert token not in page.content.decode(), path
    web.post(f"/admin/authtoken/tokenproxy/{someone.pk}/delete/", {"post": "yes"})
    assert not Token.objects.filter(key=token).exists()
    history = web.get("/admin/").content.decode()
    assert "API token of someone" in history and token not in history
