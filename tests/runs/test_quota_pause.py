"""The quota pause over cap windows (issue 16): a run whose providers are all spent in a window
pauses with the reset it waits for, and resumes at that reset, not before; the test moves the
clock of the resume check (as beat calls it), it does not sleep.

Real Celery worker (with beat), PostgreSQL, Redis and the simulated provider over HTTP.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from routing.router import reset_words, router
from runs import services
from runs.context import PAUSED_FOR_QUOTA, RunContext
from runs.models import Run
from runs.plans import parse_plan_bytes
from runs.states import PhaseState, RunState
from tests.conftest import WorkerProcess, wait_for
from tests.factories import legacy_caps_only
from usage.services import UsageRecord, provider_windows_set, record_usage
from usage.types import TokenUsage
from usage.windows import window_from_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"
PROVIDERS = {
    "openai": "gpt-5",
    "anthropic": "claude-sonnet-4-5",
    "google_gemini": "gemini-2.5-pro",
    "glm": "glm-4.6",
}
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.needs_broker]


@pytest.fixture
def worker(
    worker_env: dict[str, str], start_worker: Callable[..., WorkerProcess], sim: Any
) -> WorkerProcess:
    worker_env["AUTOPACK_QUOTA_REFRESH_SECONDS"] = "0.2"
    worker_env["AUTOPACK_ROUTER_REFRESH_SECONDS"] = "0.2"
    worker_env["AUTOPACK_USAGE_FOLD_SECONDS"] = "0.5"  # beat folds usage into the rollups
    router.invalidate()
    return start_worker("quota-pause")


def wait_state(run: Run, *states: str, timeout: float = 120) -> Run:
    def reached() -> bool:
        run.refresh_from_db()
        return run.state in states

    wait_for(reached, timeout=timeout, what=f"run {run.pk} in {states}")
    return run


def spend_a_session(provider: str, model: str, at: datetime) -> None:
    """The provider's plan: a 5-hour session of 1,000 tokens, all spent at `at`."""
    session = {"name": "session", "kind": "rolling", "hours": 5, "cap_tokens": 1_000}
    provider_windows_set(
        provider=provider, windows=[window_from_config(session, provider=provider)]
    )
    record_usage(
        record=UsageRecord(
            call_id=uuid.uuid4().hex,
            provider=provider,
            model=model,
            role="builder",
            usage=TokenUsage(prompt_tokens=1_000, completion_tokens=0),
            created_at=at,
        )
    )


def test_a_run_paused_for_a_spent_window_resumes_at_its_reset_not_before(
    worker: WorkerProcess, sim: Any
) -> None:
    spent = timezone.now() - timedelta(hours=1)
    for provider, model in PROVIDERS.items():
        spend_a_session(provider, model, spent)
    sim.configure(delay=0.05)
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    services.run_start(run_id=run.pk)
    wait_state(run, RunState.PAUSED, timeout=60)
    assert sim.requests() == []
    first = run.phases.get(position=1)
    assert (first.state, first.attempt_count) == (PhaseState.PENDING, 0)

    # The pause stores the reset it waits for: the spent usage leaves the 5-hour windows.
    context = RunContext.from_json(run.run_context)
    assert context.paused_for == PAUSED_FOR_QUOTA
    assert context.resume_at is not None
    assert spent + timedelta(hours=5) <= context.resume_at <= spent + timedelta(hours=5, seconds=1)
    assert run.state_reason.startswith("paused: ")
    assert "anthropic session at 100%" in run.state_reason
    assert run.state_reason.endswith(f", resumes at {reset_words(context.resume_at)}")

    # Beat's check before the reset leaves it paused; at the reset it resumes.
    before = context.resume_at - timedelta(seconds=1)
    assert services.runs_resume_after_quota(now=before) == []
    run.refresh_from_db()
    assert run.state == RunState.PAUSED
    assert services.runs_resume_after_quota(now=context.resume_at) == [run.pk]

    # The worker's own clock has not moved: it may pause the run again, for the same reset.
    # A person lifting the windows (a change of caps) lets beat resume it at once.
    legacy_caps_only(*PROVIDERS)
    wait_state(run, RunState.COMPLETED, RunState.FAILED, timeout=180)
    assert run.state == RunState.COMPLETED
    assert run.completed_phases == run.total_phases == 9
