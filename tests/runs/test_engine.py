"""Whole runs on real Celery worker processes, PostgreSQL, Redis and the simulated provider."""

from __future__ import annotations

import io
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import current_app
from django.core.management import call_command
from django.db.models import Sum
from django.test import Client
from django.urls import reverse

from runs import services
from runs.models import Phase, PhaseAttempt, PhaseEvent, Run
from runs.plans import parse_plan_bytes
from runs.prompts import BUILDER_SYSTEM, builder_prompt
from runs.states import PhaseState, RunState
from tests.conftest import WorkerProcess, wait_for
from tests.reliability.checks import assert_no_phase_ran_twice, assert_usage_equals_reported
from usage.models import UsageEvent
from usage.selectors import get_provider_usage_summary

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.needs_broker]

SMALL_PLAN = b"""
name: Small plan
tiers:
  - name: One
    phases:
      - {name: First, category: core_backend, complexity: low}
      - {name: Second, category: ui, complexity: medium}
  - name: Two
    phases:
      - {name: Third, category: docs, complexity: low}
"""


def start(raw: bytes) -> Run:
    run = services.run_create(plan=parse_plan_bytes(raw))
    services.run_start(run_id=run.pk)
    return run


def state_of(run: Run) -> str:
    run.refresh_from_db()
    return run.state


def wait_state(run: Run, *states: str, timeout: float = 90) -> Run:
    wait_for(lambda: state_of(run) in states, timeout=timeout, what=f"run {run.pk} in {states}")
    return run


def phase_in(run: Run, *states: str) -> Phase | None:
    return Phase.objects.filter(run=run, state__in=states).first()


def provider_calls(sim: Any, role: str | None = None) -> list[dict[str, Any]]:
    return [r for r in sim.requests() if role is None or r.get("role") == role]


def test_a_whole_plan_runs_to_completed_on_a_worker(celery_worker: WorkerProcess, sim: Any) -> None:
    run = start(EXAMPLE.read_bytes())
    wait_state(run, RunState.COMPLETED, RunState.FAILED)
    assert run.state == RunState.COMPLETED, run.state_reason
    assert (run.completed_phases, run.completed_tiers, run.percent_complete) == (9, 3, 100)
    assert set(run.phases.values_list("state", flat=True)) == {PhaseState.COMPLETE}
    for phase in run.phases.all():
        approved = phase.attempts.filter(outcome=PhaseAttempt.Outcome.APPROVED)
        assert approved.count() == 1 and phase.builder_output
        assert phase.routing_decisions.filter(role="builder").exists()
    # A builder writes whole files: its calls may answer at length, a verdict needs less.
    assert {r["max_tokens"] for r in provider_calls(sim, "builder")} == {16384}
    assert {r["max_tokens"] for r in provider_calls(sim, "auditor")} == {4096}
    # every token the provider reported is metered once, per phase and role
    events = UsageEvent.objects.filter(run_id=run.pk)
    assert events.count() == len(provider_calls(sim))
    per_phase = events.values("phase_id", "role").annotate(t=Sum("prompt_tokens"))
    assert {row["role"] for row in per_phase} == {"builder", "auditor"}
    assert sum(row["t"] for row in per_phase) == events.aggregate(t=Sum("prompt_tokens"))["t"]

    out = io.StringIO()
    call_command("run_status", str(run.pk), stdout=out)
    text = out.getvalue()
    assert "State: Completed" in text and "All 9 phases done (100%)" in text
    run.refresh_from_db()
    assert f"Branch: autopack/run-{run.pk} at {run.head_commit[:12]}" in text
    assert "checks passed" in text
    prompt_total = events.aggregate(t=Sum("prompt_tokens"))["t"]
    assert f"Tokens: {prompt_total:,} in" in text


def test_pause_takes_effect_after_the_current_phase_and_resume_finishes_the_run(
    celery_worker: WorkerProcess, sim: Any
) -> None:
    sim.configure(delay=0.4)
    run = start(SMALL_PLAN)
    wait_for(lambda: phase_in(run, PhaseState.BUILDING), what="first phase building")
    services.run_pause(run_id=run.pk)
    assert state_of(run) == RunState.PAUSE_REQUESTED
    wait_state(run, RunState.PAUSED)
    assert run.completed_phases == 1
    assert not run.phases.filter(
        state__in=[PhaseState.QUEUED, PhaseState.BUILDING, PhaseState.AUDITING]
    ).exists()
    calls = len(provider_calls(sim))

    time.sleep(1.5)  # nothing moves while paused
    assert len(provider_calls(sim)) == calls and state_of(run) == RunState.PAUSED

    services.run_resume(run_id=run.pk)
    wait_state(run, RunState.COMPLETED)
    assert run.completed_phases == 3


def test_stop_mid_phase_ends_stopped_with_no_further_provider_calls(
    celery_worker: WorkerProcess, sim: Any
) -> None:
    sim.configure(delay=1.5)
    run = start(SMALL_PLAN)
    wait_for(
        lambda: provider_calls(sim) or phase_in(run, PhaseState.BUILDING), what="the builder call"
    )
    wait_for(lambda: phase_in(run, PhaseState.BUILDING), what="first phase building")
    services.run_stop(run_id=run.pk)
    wait_state(run, RunState.STOPPED)
    calls_at_stop = len(provider_calls(sim))
    assert calls_at_stop == 1  # the builder call in flight; no auditor call after the stop
    assert provider_calls(sim)[0].get("role") == "builder"
    assert set(run.phases.values_list("state", flat=True)) == {PhaseState.CANCELLED}
    first = run.phases.get(position=1)
    assert first.builder_output  # saved before the checkpoint cancelled it

    time.sleep(1.0)
    assert len(provider_calls(sim)) == calls_at_stop


def test_a_duplicate_delivery_of_a_phase_task_runs_the_phase_once(
    celery_worker: WorkerProcess, sim: Any
) -> None:
    sim.configure(delay=0.3)
    run = services.run_create(plan=parse_plan_bytes(SMALL_PLAN))
    services.run_start(run_id=run.pk)  # sends the task once on commit
    phase = run.phases.get(position=1)
    current_app.send_task("runs.tasks.execute_phase", args=[phase.pk, phase.dispatch_token])
    current_app.send_task("runs.tasks.execute_phase", args=[phase.pk, phase.dispatch_token])
    wait_state(run, RunState.COMPLETED)
    phase.refresh_from_db()
    assert phase.attempts.count() == phase.attempt_count
    # Three deliveries, one claim: a revise verdict starts the next attempt inside the same
    # claim, so attempts may exceed claims but every attempt made exactly one builder call.
    assert phase.events.filter(kind=PhaseEvent.Kind.CLAIMED).count() == 1
    builder_calls = [r for r in provider_calls(sim, "builder") if "Phase 1: First" in r["prompt"]]
    assert len(builder_calls) == phase.attempt_count


def test_a_worker_killed_mid_phase_has_its_phase_retried_and_the_run_completes(
    start_worker: Callable[..., WorkerProcess], sim: Any, admin_client: Client
) -> None:
    sim.configure(delay=2.0)
    doomed = start_worker("doomed", beat=False)
    run = start(SMALL_PLAN)
    wait_for(lambda: provider_calls(sim, "builder"), what="the builder call to start")
    doomed.kill()  # SIGKILL in the middle of the builder call
    phase = run.phases.get(position=1)
    assert phase.state == PhaseState.BUILDING

    sim.configure(delay=0.05)
    start_worker("rescuer")
    wait_state(run, RunState.COMPLETED, RunState.FAILED, timeout=120)
    assert run.state == RunState.COMPLETED, run.state_reason
    phase.refresh_from_db()
    assert phase.lost_worker_count == 1
    assert phase.events.filter(kind=PhaseEvent.Kind.WORKER_LOST).count() == 1
    assert phase.attempts.filter(outcome=PhaseAttempt.Outcome.ABANDONED).count() == 1
    # every metered call is distinct
    ids = list(UsageEvent.objects.filter(run_id=run.pk).values_list("call_id", flat=True))
    assert len(ids) == len(set(ids))
    # usage = what the provider reported in every answer that arrived (all but the killed
    # call's), plus the killed call as one lost call; each attempt made one builder call
    # (docs/reliability.md)
    assert_usage_equals_reported(run, sim, None, unanswered=1, lost=1)
    assert_no_phase_ran_twice(run, sim, None, killed_in_builder=1)

    # The killed call was billed but never answered: one lost call, its input estimated from
    # the prompt it sent (characters / 4, rounded up), no output.
    killed = provider_calls(sim, "builder")[0]
    lost = UsageEvent.objects.get(run_id=run.pk, estimated=True)
    phase = Phase.objects.select_related("run", "tier").get(pk=phase.pk)
    sent = BUILDER_SYSTEM + builder_prompt(phase=phase, attempt=1, feedback=[])
    estimate = math.ceil(len(sent) / 4)
    assert (lost.phase_id, lost.role, lost.provider, lost.model) == (
        phase.pk,
        "builder",
        killed["provider"],
        killed["model"],
    )
    assert (lost.prompt_tokens, lost.completion_tokens) == (estimate, 0)
    assert not lost.provider_request_id
    # ... counted against the provider's cap: the day's summary holds it beside the answers
    answered = UsageEvent.objects.filter(provider=lost.provider, estimated=False)
    metered = answered.aggregate(t=Sum("prompt_tokens") + Sum("completion_tokens"))["t"] or 0
    (day,) = [
        row for row in get_provider_usage_summary(period="day") if row["provider"] == lost.provider
    ]
    assert day["total_tokens"] == metered + estimate
    # ... and listed, as estimated, on the phase's admin page and on the progress page.
    page = admin_client.get(reverse("admin:runs_phase_change", args=[phase.pk]))
    assert page.status_code == 200
    assert re.search(
        rf"lost call.*{re.escape(lost.model)}.*{estimate:,} tokens in \(estimated\)",
        page.content.decode(),
        re.S | re.I,
    )
    progress = admin_client.get(reverse("dashboard-progress", args=[run.pk]))
    assert progress.status_code == 200
    assert re.search(
        rf"Phase 1.*{re.escape(lost.model)}.*{estimate:,} tokens in \(estimated\)",
        progress.content.decode(),
        re.S,
    )
