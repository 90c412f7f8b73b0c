"""Steering a run end to end: API overrides, budget guards, caps and the usage a run leaves.

Real Celery worker processes, PostgreSQL, Redis and the simulated provider over HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db.models import Sum
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from routing.router import router
from routing.types import DecisionScope
from runs import services
from runs.models import GuardFiring, Phase, PhaseRoutingDecision, Run
from runs.plans import parse_plan_bytes
from runs.selectors import run_status
from runs.states import PhaseState, RunState
from tests.conftest import WorkerProcess, wait_for
from tests.factories import CONTROL, OVERRIDE, legacy_caps_only, metered_call, staff_user
from usage.models import UsageEvent
from usage.selectors import phase_usage_totals, run_usage_totals
from usage.services import provider_quota_upsert

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.needs_broker]


@pytest.fixture
def worker(
    worker_env: dict[str, str], start_worker: Callable[..., WorkerProcess], sim: Any
) -> WorkerProcess:
    # Caps and mappings the test changes reach the worker's router within half a second.
    worker_env["AUTOPACK_QUOTA_REFRESH_SECONDS"] = "0.2"
    worker_env["AUTOPACK_ROUTER_REFRESH_SECONDS"] = "0.2"
    worker_env["AUTOPACK_USAGE_FOLD_SECONDS"] = "0.5"  # beat folds usage into the rollups
    router.invalidate()
    return start_worker("steering")


def refreshed(run: Run) -> Run:
    run.refresh_from_db()
    return run


def wait_state(run: Run, *states: str, timeout: float = 120) -> Run:
    wait_for(
        lambda: refreshed(run).state in states, timeout=timeout, what=f"run {run.pk} in {states}"
    )
    return run


def billed(provider: str, usage: dict[str, Any]) -> tuple[int, int]:
    """Input and output tokens as each provider's own usage block bills them (the counting
    rule, restated from the wire formats independently of routing.providers)."""
    if provider == "anthropic":
        tokens_in = (
            usage["input_tokens"]
            + usage.get("cache_read_input_tokens", 0)
            + usage.get("cache_creation_input_tokens", 0)
        )
        return tokens_in, usage["output_tokens"]
    if provider == "google_gemini":
        out = usage.get("candidatesTokenCount", 0) + usage.get("thoughtsTokenCount", 0)
        return usage["promptTokenCount"], out
    return usage["prompt_tokens"], usage["completion_tokens"]


def operator_client() -> APIClient:
    user = staff_user("operator", CONTROL, OVERRIDE)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def caps(provider: str, weekly: int | None, *, soft_limit: str = "0.8") -> None:
    legacy_caps_only(provider)
    provider_quota_upsert(
        provider=provider,
        daily_cap_tokens=None,
        weekly_cap_tokens=weekly,
        monthly_cap_tokens=None,
        autopack_share="1",
        soft_limit=soft_limit,
    )


def test_an_auditor_override_made_through_the_api_serves_the_next_phase_not_the_current(
    worker: WorkerProcess, sim: Any
) -> None:
    sim.configure(delay=1.0)
    api = operator_client()
    plan = parse_plan_bytes(EXAMPLE.read_bytes()).as_dict()
    started = api.post("/runs/start", data=plan, format="json")
    assert started.status_code == 201, started.content
    run = Run.objects.get(pk=started.json()["run_id"])

    first = run.phases.get(position=1)  # core_backend:medium, like phase 4
    wait_for(
        lambda: Phase.objects.get(pk=first.pk).state == PhaseState.BUILDING,
        what="phase 1 building",
    )
    response = api.post(
        "/dashboard/models/override",
        data={
            "role": "auditor",
            "category": "core_backend",
            "complexity": "medium",
            "model": "glm-4.6",
            "scope": "run",
            "run_id": run.pk,
        },
        format="json",
    )
    assert response.status_code == 200, response.content

    fourth = run.phases.get(position=4)
    wait_for(
        lambda: PhaseRoutingDecision.objects.filter(phase=fourth, role="auditor").exists(),
        timeout=120,
        what="phase 4's auditor decision",
    )
    decision = PhaseRoutingDecision.objects.filter(phase=fourth, role="auditor").first()
    assert decision is not None
    assert (decision.model, decision.reason) == ("glm-4.6", "run override")
    assert decision.scope == DecisionScope.RUN_OVERRIDE
    # The phase in flight when the override was made kept the model it was given.
    assert set(
        PhaseRoutingDecision.objects.filter(phase=first, role="auditor").values_list(
            "model", flat=True
        )
    ) == {"gpt-6.1-sol"}
    # The decision is stored just before the call: wait for the call itself to reach glm.
    wait_for(
        lambda: any(r["provider"] == "glm" and r.get("role") == "auditor" for r in sim.requests()),
        what="an auditor call to glm",
    )
    status = api.get(f"/dashboard/runs/{run.pk}/status")
    assert status.status_code == 200 and status.json()["run_id"] == run.pk
    services.run_stop(run_id=run.pk)


def test_a_guard_on_anthropics_weekly_cap_stops_the_run_and_the_status_says_why(
    worker: WorkerProcess, sim: Any
) -> None:
    # One builder call on claude-sonnet-5-5 (phase 1, core_backend:medium) uses a few hundred
    # tokens; with a weekly cap of 1,000 the first or second anthropic call passes 80%.
    # soft_limit 1.0 keeps the router on anthropic until then, so the guard, not a fallback,
    # is what acts.
    caps("anthropic", 1000, soft_limit="1")
    sim.configure(delay=0.2)
    raw = EXAMPLE.read_bytes().replace(
        b"guards: []",
        b"guards: [{provider: anthropic, period: week, threshold_percent: 80, action: stop}]",
    )
    run = services.run_create(plan=parse_plan_bytes(raw))
    services.run_start(run_id=run.pk)
    wait_state(run, RunState.STOPPED, RunState.COMPLETED, RunState.FAILED)

    assert run.state == RunState.STOPPED
    firing = GuardFiring.objects.get(run=run)
    assert firing.percent_of_cap >= 80
    assert "anthropic" in run.state_reason and "week window" in run.state_reason
    assert f"{firing.percent_of_cap:.1f}%" in run.state_reason
    status = run_status(run_id=run.pk).as_dict()
    assert status["state_reason"] == run.state_reason
    assert status["guards"][0]["fired"] is True
    anthropic_in = UsageEvent.objects.filter(provider="anthropic").aggregate(
        t=Sum("prompt_tokens") + Sum("completion_tokens")
    )["t"]
    assert anthropic_in >= 800
    assert refreshed(run).completed_phases < run.total_phases
    calls_at_stop = len(sim.requests())
    time.sleep(1.0)  # a stopped run makes no further calls
    assert not Phase.objects.filter(
        run=run, state__in=[PhaseState.QUEUED, PhaseState.BUILDING, PhaseState.AUDITING]
    ).exists()
    assert len(sim.requests()) == calls_at_stop


def test_a_provider_at_its_cap_pauses_the_run_until_the_cap_is_raised(
    worker: WorkerProcess, sim: Any
) -> None:
    # Every provider is at its cap before the run starts: nothing may be called.
    for provider in ("openai", "anthropic", "google_gemini", "glm"):
        caps(provider, 1)
    for provider, model in (
        ("openai", "gpt-5"),
        ("anthropic", "claude-sonnet-4-5"),
        ("google_gemini", "gemini-2.5-pro"),
        ("glm", "glm-4.6"),
    ):
        metered_call(provider, model, prompt=10, completion=1)
    sim.configure(delay=0.05)
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    services.run_start(run_id=run.pk)
    wait_state(run, RunState.PAUSED, timeout=60)
    assert run.state_reason.startswith("paused: ")
    assert "anthropic week at 1100%" in run.state_reason  # 11 tokens of a cap of 1
    assert "resumes at Mon 00:00" in run.state_reason or "resumes at 00:00" in run.state_reason
    assert sim.requests() == []
    first = run.phases.get(position=1)
    assert (first.state, first.attempt_count) == (PhaseState.PENDING, 0)

    for provider in ("openai", "anthropic", "google_gemini", "glm"):
        caps(provider, 10_000_000)
    wait_state(run, RunState.COMPLETED, RunState.FAILED, timeout=180)
    assert run.state == RunState.COMPLETED
    assert run.state_reason == ""
    assert run.completed_phases == run.total_phases == 9


def test_near_openais_soft_limit_each_phase_shows_which_model_served_it_and_why(
    worker: WorkerProcess, sim: Any
) -> None:
    # openai already used 90% of a small weekly cap: its soft limit (80%) is passed, its hard
    # cap not. Non-critical categories fall back; the critical one keeps its primary.
    caps("openai", 100_000)
    metered_call("openai", "gpt-5", prompt=80_000, completion=10_000)
    sim.configure(delay=0.05)
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    services.run_start(run_id=run.pk)
    wait_state(run, RunState.COMPLETED, RunState.FAILED, timeout=180)
    assert run.state == RunState.COMPLETED

    decisions = {
        (d.phase.position, d.role): d
        for d in PhaseRoutingDecision.objects.filter(phase__run=run).select_related("phase")
    }
    # tests:low builder is gpt-6-luna in the baseline: it falls back to claude-haiku-5-5.
    tests_low = decisions[(3, "builder")]
    assert tests_low.model == "claude-haiku-5-5"
    assert tests_low.reason.startswith("quota fallback: openai over soft limit")
    assert tests_low.scope == DecisionScope.QUOTA_FALLBACK
    assert tests_low.candidates[0] == "gpt-6-luna"
    # security_auth_change:medium auditor is gpt-6.2-astra and the category is critical: kept.
    critical = decisions[(7, "auditor")]
    assert critical.model == "gpt-6.2-astra"
    assert "kept (critical, keep_primary)" in critical.reason
    # Kept where its row put it: the mapping's scope, the quota only in the words.
    assert critical.scope == DecisionScope.CATEGORY_OVERRIDE
    # Every phase shows a decision for both roles, each with its reason.
    assert {pos for pos, _ in decisions} == set(range(1, 10))
    assert all(d.reason for d in decisions.values())
    assert {d.scope for d in decisions.values()} <= {scope.value for scope in DecisionScope}


def test_a_whole_run_leaves_usage_per_phase_and_role_that_adds_up_to_its_status(
    worker: WorkerProcess, sim: Any
) -> None:
    sim.configure(delay=0.05)
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    services.run_start(run_id=run.pk)
    wait_state(run, RunState.COMPLETED, RunState.FAILED, timeout=180)
    assert run.state == RunState.COMPLETED

    rows = phase_usage_totals(run_ids=[run.pk])
    assert {r["role"] for r in rows} == {"builder", "auditor"}
    assert {r["phase_id"] for r in rows} == set(run.phases.values_list("pk", flat=True))
    total = run_usage_totals(run_id=run.pk)
    status = run_status(run_id=run.pk).as_dict()
    assert sum(r["tokens_in"] for r in rows) == total["tokens_in"] == status["tokens_in"] > 0
    assert sum(r["tokens_out"] for r in rows) == total["tokens_out"] == status["tokens_out"] > 0
    # ... and equals what the provider itself reported, call by call.
    reported = [billed(r["provider"], r["usage"]) for r in sim.requests()]
    assert len(reported) == total["calls"] == UsageEvent.objects.filter(run_id=run.pk).count()
    assert sum(i for i, _ in reported) == status["tokens_in"]
    assert sum(o for _, o in reported) == status["tokens_out"]
    # The worker's beat folds the run's usage into the rollups; the totals stay the same.
    wait_for(
        lambda: not UsageEvent.objects.filter(run_id=run.pk, rolled_up=False).exists(),
        timeout=10,
        what="beat to fold the run's usage",
    )
    assert run_usage_totals(run_id=run.pk) == total
