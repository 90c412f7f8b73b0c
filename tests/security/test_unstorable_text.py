"""Text PostgreSQL cannot store (a NUL, a lone surrogate) from the two doors that are not the
REST API or the dashboard: a model's own reply, through a real worker and the simulated
provider, and MCP tool arguments, through the real `manage.py mcp_server` (issue 12, item 1).
A reply is stored with U+FFFD in place of what cannot be stored; an argument is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

import httpx2
import pytest
from django.contrib.auth.models import User

from routing.models import ModelChange
from runs import services
from runs.models import Phase, PhaseAttempt, PhaseEvent, Run
from runs.plans import parse_plan_bytes
from runs.states import PhaseState, RunState
from tests.conftest import WorkerProcess, wait_for
from tests.runs.test_mcp import (  # noqa: F401
    http_url,
    make_user,
    run,
    server_log,
    stdio_server,
    token_for,
)
from tests.sim_fixtures import write_reply

pytestmark = pytest.mark.django_db(transaction=True)

ONE_PHASE = b"""
name: Replies
tiers:
  - name: One
    phases:
      - {name: Only, category: core_backend, complexity: low}
"""
REPLACEMENT = "\ufffd"


@pytest.mark.needs_broker
def test_a_model_reply_with_a_nul_or_a_lone_surrogate_is_stored_with_replacements(
    celery_worker: WorkerProcess, sim: Any
) -> None:
    # The builder's first call fails with an error text carrying a NUL; the retry answers
    # with a NUL and a lone surrogate; the auditor's verdict carries both in its JSON.
    sim.add_fault(kind="500", role="builder", count=1, message="overloaded\x00 \udfff now")
    sim.add_script(
        role="builder",
        text=write_reply({"a.txt": "a\n"}, note="built it\x00 and \udfff done"),
        count=1,
    )
    verdict = {
        "verdict": "approve",
        "summary": "fine\x00 \ud800",
        "issues": [{"severity": "minor", "title": "t\x00", "detail": "d\udfff"}],
    }
    sim.add_script(role="auditor", verdict=verdict, count=1)
    made = services.run_create(plan=parse_plan_bytes(ONE_PHASE))
    services.run_start(run_id=made.pk)

    def finished() -> bool:
        made.refresh_from_db()
        return made.state in (RunState.COMPLETED, RunState.FAILED)

    wait_for(finished, timeout=60, what=f"run {made.pk} to finish")
    assert made.state == RunState.COMPLETED, made.state_reason
    phase = Phase.objects.get(run=made)
    assert phase.state == PhaseState.COMPLETE
    assert phase.builder_output == write_reply(
        {"a.txt": "a\n"}, note=f"built it{REPLACEMENT} and {REPLACEMENT} done"
    )
    attempt = PhaseAttempt.objects.get(phase=phase)
    assert attempt.builder_output == phase.builder_output
    assert phase.auditor_verdict is not None
    assert phase.auditor_verdict["summary"] == f"fine{REPLACEMENT} {REPLACEMENT}"
    assert phase.auditor_verdict["issues"] == [
        {"severity": "minor", "title": f"t{REPLACEMENT}", "detail": f"d{REPLACEMENT}"}
    ]
    (error,) = PhaseEvent.objects.filter(phase=phase, kind=PhaseEvent.Kind.PROVIDER_ERROR)
    assert error.message.endswith(f"(will retry): overloaded{REPLACEMENT} {REPLACEMENT} now")


# --- MCP ------------------------------------------------------------------------------------------


@pytest.fixture
def mcp_operator(transactional_db: None) -> User:
    return make_user("operator", "control_run", "override_model")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("category", "core_backend\x00"),
        ("model", "glm-4.6\x00"),
        ("role", "auditor\x00"),
        ("category", "core\u202ebackend"),
    ],
)
def test_mcp_refuses_an_override_with_text_postgres_cannot_store_and_writes_nothing(
    mcp_operator: User,
    run: Run,  # noqa: F811
    tmp_path: Path,
    server_log: TextIO,  # noqa: F811
    field: str,
    value: str,
) -> None:
    arguments = {
        "run_id": run.pk,
        "role": "auditor",
        "category": "core_backend",
        "complexity": "medium",
        "model": "glm-4.6",
        field: value,
    }
    with stdio_server("operator", tmp_path, server_log) as client:
        refused = client.error("override_model_for_run", **arguments)
        # The server is still answering after the refusal.
        assert client.text("run_status", run_id=run.pk).startswith(f"#{run.pk} ")
    assert refused.startswith(f"{field}: "), refused
    run.refresh_from_db()
    assert "model_overrides" not in run.run_context
    assert ModelChange.objects.count() == 0


def test_mcp_answers_a_lone_surrogate_in_arguments_with_an_error_and_writes_nothing(
    mcp_operator: User,
    run: Run,  # noqa: F811
    http_url: str,  # noqa: F811
) -> None:
    # The SDK's client cannot even encode one, so this is the raw JSON-RPC a client could send.
    headers = {
        "Authorization": f"Token {token_for(mcp_operator)}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    arguments = {
        "run_id": run.pk,
        "role": "auditor",
        "category": "core_backend",
        "complexity": "medium",
        "model": "glm-4.6\udfff",
    }
    call = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "override_model_for_run", "arguments": arguments},
    }
    response = httpx2.post(http_url, content=json.dumps(call).encode(), headers=headers, timeout=10)
    assert response.status_code == 400
    assert "surrogate" in response.json()["error"]["message"]
    run.refresh_from_db()
    assert "model_overrides" not in run.run_context
    assert ModelChange.objects.count() == 0
