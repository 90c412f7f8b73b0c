"""The provider misbehaves: 429 with Retry-After, 500, a hang past the timeout, a malformed body,
a body or stream cut in the middle. Each is retried, then handed to the router's next model,
then fails the phase with a reason naming every model tried; no failed call leaves usage."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings as django_settings

from routing.router import RoutingDecision
from routing.services import model_invoke
from routing.types import DecisionScope, RouteKey
from runs.models import PhaseAttempt, PhaseEvent, PhaseRoutingDecision
from runs.states import PhaseState, RunState
from tests.conftest import WorkerProcess
from usage.models import UsageEvent
from usage.selectors import run_usage_totals

from .checks import (
    PROVIDER_MAX_RETRIES,
    PROVIDER_TIMEOUT,
    assert_completed,
    assert_no_phase_ran_twice,
    assert_usage_equals_reported,
    calls_of,
    phase_of,
    reported_tokens,
    start_run,
    wait_finished,
)

ATTEMPTS_PER_MODEL = PROVIDER_MAX_RETRIES + 1


def _same_call(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["role"], a["attempt"], phase_of(a)) == (
        b["role"],
        b["attempt"],
        phase_of(b),
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.needs_broker
def test_transient_provider_faults_are_retried_and_the_run_completes_with_exact_usage(
    celery_worker: WorkerProcess, sim: Any
) -> None:
    tag = "transient"
    sim.configure(revise_rate=0)
    # A bare 429 (no Retry-After, no reset): retried on the same model. One that announces its
    # reset moves to the fallback at once (test_a_429_announcing_its_reset_… below).
    sim.add_fault(kind="429", retry_after=None, role="builder", match=f"{tag} step 1")
    sim.add_fault(kind="500", role="auditor", match=f"{tag} step 1")
    sim.add_fault(
        kind="hang", hang_seconds=PROVIDER_TIMEOUT + 4, role="builder", match=f"{tag} step 2"
    )
    sim.add_fault(kind="malformed", role="auditor", match=f"{tag} step 2")
    sim.add_fault(kind="cut_stream", role="builder", match=f"{tag} step 3")

    run = wait_finished(start_run(tag, phases=3))

    assert_completed(run)
    assert_usage_equals_reported(run, sim, tag)
    assert_no_phase_ran_twice(run, sim, tag)
    calls = calls_of(sim, tag)
    faulted = [c for c in calls if c["outcome"] != "ok"]
    assert sorted(c["outcome"] for c in faulted) == sorted(
        ["429", "500", "hang", "malformed", "cut_stream"]
    )
    for fault in faulted:
        # Retried on the same model (not a fallback), and the retry was answered.
        retry = next(c for c in calls if c["seq"] > fault["seq"] and _same_call(c, fault))
        assert retry["model"] == fault["model"] and retry["outcome"] == "ok", fault
        if fault["outcome"] == "hang":
            assert retry["time"] - fault["time"] >= PROVIDER_TIMEOUT * 0.9
    errors = list(
        PhaseEvent.objects.filter(phase__run=run, kind=PhaseEvent.Kind.PROVIDER_ERROR).values_list(
            "message", flat=True
        )
    )
    assert len(errors) == 5 and all("(will retry)" in m for m in errors)
    for kind in ("rate_limited", "server_error", "timeout", "malformed"):
        assert any(f": {kind} (will retry)" in m for m in errors), (kind, errors)
    assert not PhaseRoutingDecision.objects.filter(
        phase__run=run, reason__startswith="error fallback"
    ).exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.needs_broker
def test_a_provider_that_keeps_failing_is_replaced_by_the_routers_fallback_model(
    celery_worker: WorkerProcess, sim: Any
) -> None:
    tag = "fallback"
    sim.configure(revise_rate=0)
    # medium builder: claude-sonnet-5-5, whose first fallback (models.yaml) is gpt-6.1-sol
    sim.add_fault(kind="500", provider="anthropic", count=-1)

    run = wait_finished(start_run(tag, phases=2, complexity="medium"))

    assert_completed(run)
    assert_usage_equals_reported(run, sim, tag)
    assert_no_phase_ran_twice(run, sim, tag)
    for phase in run.phases.all():
        decisions = list(
            phase.routing_decisions.filter(role="builder")
            .order_by("id")
            .values_list("model", "reason")
        )
        assert decisions == [
            ("claude-sonnet-5-5", "baseline"),
            (
                "gpt-6.1-sol",
                "error fallback: anthropic server_error; claude-sonnet-5-5 → gpt-6.1-sol",
            ),
        ]
        assert set(phase.attempts.values_list("builder_model", flat=True)) == {"gpt-6.1-sol"}
    anthropic = [c for c in calls_of(sim, tag) if c["provider"] == "anthropic"]
    assert len(anthropic) == ATTEMPTS_PER_MODEL * 2  # retried to the limit, for each phase
    assert {c["outcome"] for c in anthropic} == {"500"}
    assert not UsageEvent.objects.filter(run_id=run.pk, provider="anthropic").exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.needs_broker
def test_a_call_every_candidate_fails_fails_the_run_with_each_models_reason_and_no_usage(
    celery_worker: WorkerProcess, sim: Any
) -> None:
    tag = "exhausted"
    # low builder: gpt-6-luna, then claude-haiku-5-5, gemini-3.8-flash, glm-5.3-flash (models.yaml)
    sim.add_fault(kind="429", retry_after=0.2, provider="openai", role="builder", count=-1)
    sim.add_fault(kind="500", provider="anthropic", role="builder", count=-1)
    sim.add_fault(kind="malformed", provider="google_gemini", role="builder", count=-1)
    sim.add_fault(kind="hang", hang_seconds=5, provider="glm", role="builder", count=-1)

    run = wait_finished(start_run(tag, phases=2))

    assert run.state == RunState.FAILED
    first, second = run.phases.order_by("position")
    assert (first.state, second.state) == (PhaseState.FAILED, PhaseState.SKIPPED)
    reason = first.failure_reason
    assert reason.startswith("builder call failed: ")
    for part in (
        # A 429 announcing its reset (Retry-After) is left for the fallback at once.
        "openai/gpt-6-luna rate_limited after 1 attempt:",
        f"anthropic/claude-haiku-5-5 server_error after {ATTEMPTS_PER_MODEL} attempts",
        f"google_gemini/gemini-3.8-flash malformed after {ATTEMPTS_PER_MODEL} attempts",
        f"glm/glm-5.3-flash timeout after {ATTEMPTS_PER_MODEL} attempts",
    ):
        assert part in reason, reason
    assert reason in run.state_reason
    assert [m for (m,) in first.routing_decisions.order_by("id").values_list("model")] == [
        "gpt-6-luna",
        "claude-haiku-5-5",
        "gemini-3.8-flash",
        "glm-5.3-flash",
    ]
    assert first.attempts.get().outcome == PhaseAttempt.Outcome.FAILED
    calls = calls_of(sim, tag)
    assert len(calls) == 1 + 3 * ATTEMPTS_PER_MODEL and not calls_of(sim, tag, role="auditor")
    assert not UsageEvent.objects.filter(run_id=run.pk).exists()
    assert run_usage_totals(run_id=run.pk)["calls"] == 0


@pytest.mark.django_db
@pytest.mark.parametrize("fault", ["cut_stream", "malformed"])
@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("openai", "gpt-5-mini"),
        ("anthropic", "claude-haiku-4-5"),
        ("google_gemini", "gemini-2.5-flash"),
        ("glm", "glm-4.6"),
    ],
)
def test_a_stream_cut_or_garbled_in_the_middle_is_retried_and_metered_once(
    sim: Any, settings: Any, fault: str, provider: str, model: str
) -> None:
    settings.AUTOPACK_PROVIDER_BACKOFF_SECONDS = 0.01
    assert django_settings.AUTOPACK_PROVIDER_MAX_RETRIES >= 1
    sim.add_fault(kind=fault, provider=provider)
    decision = RoutingDecision(
        key=RouteKey("builder", "core_backend", "low"),
        model=model,
        provider=provider,
        scope=DecisionScope.BASELINE,
        reason="test",
        candidates=(model,),
    )
    prompt = "Autopack-Role: builder\nAttempt: 1\nPhase 1: streamed step 1\n"
    result = model_invoke(
        decision=decision, system="", prompt=prompt, call_key="stream-test", stream=True
    )

    first, second = sim.requests()
    assert (first["outcome"], first["usage"]) == (fault, None)
    assert second["outcome"] == "ok"
    # The failed stream had started: the provider billed it, so it is metered once as an
    # estimate (what it reported before the cut, else the prompt estimate), the retry once.
    partial = UsageEvent.objects.get(estimated=True)
    assert partial.call_id == "stream-test:partial:1" and partial.prompt_tokens > 0
    event = UsageEvent.objects.get(estimated=False)
    assert event.pk == result.usage_event_id
    assert event.provider_request_id == second["request_id"]
    assert (event.prompt_tokens, event.completion_tokens) == reported_tokens(second)


@pytest.mark.django_db(transaction=True)
@pytest.mark.needs_broker
def test_a_429_announcing_its_reset_moves_the_phase_and_the_next_ones_to_the_fallback_at_once(
    celery_worker: WorkerProcess, sim: Any
) -> None:
    tag = "spent"
    sim.configure(revise_rate=0)
    # medium builder: claude-sonnet-5-5, whose first fallback (models.yaml) is gpt-6.1-sol
    sim.control("POST", "/_sim/exhaust", {"provider": "anthropic", "seconds": 600})

    run = wait_finished(start_run(tag, phases=3, complexity="medium"))

    assert_completed(run)
    assert_usage_equals_reported(run, sim, tag)
    # The exhausted provider was asked once: not retried, and not asked by the later phases.
    anthropic = [c for c in calls_of(sim, tag) if c["provider"] == "anthropic"]
    assert [c["outcome"] for c in anthropic] == ["exhausted"]
    first, *later = run.phases.order_by("id")
    assert list(
        first.routing_decisions.filter(role="builder").order_by("id").values_list("model", "reason")
    ) == [
        ("claude-sonnet-5-5", "baseline"),
        ("gpt-6.1-sol", "error fallback: anthropic rate_limited; claude-sonnet-5-5 → gpt-6.1-sol"),
    ]
    for phase in later:
        decisions = list(
            phase.routing_decisions.filter(role="builder").values_list("model", "reason")
        )
        assert len(decisions) == 1 and decisions[0][0] == "gpt-6.1-sol", decisions
        assert "anthropic cooled down until" in decisions[0][1]
        assert "(429 from anthropic)" in decisions[0][1]
    assert not UsageEvent.objects.filter(run_id=run.pk, provider="anthropic").exists()
    (event,) = PhaseEvent.objects.filter(
        phase__run=run, kind=PhaseEvent.Kind.PROVIDER_ERROR
    ).values_list("message", flat=True)
    assert "rate_limited" in event and "(will retry)" not in event
