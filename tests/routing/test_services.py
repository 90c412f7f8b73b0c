"""model_invoke against the simulated provider over real HTTP: every call is in flight from just
before it is sent until its answer or its error closes it, so only a call whose worker died
waiting is ever metered as lost."""

from __future__ import annotations

from typing import Any

import pytest

from routing.clients import ProviderCallError
from routing.router import RoutingDecision
from routing.services import model_invoke
from usage.models import InFlightCall, UsageEvent
from usage.services import in_flight_calls_lose

pytestmark = pytest.mark.django_db

DECISION = RoutingDecision(
    role="builder",
    category="core_backend",
    complexity="low",
    model="claude-haiku-4-5",
    provider="anthropic",
    reason="test",
    candidates=("claude-haiku-4-5",),
)
PROMPT = "Autopack-Role: builder\nAttempt: 1\nPhase 1: in flight step 1\n"


def in_flight() -> bool:
    return InFlightCall.objects.filter(call_key="tok:1:builder", phase_id=70).exists()


def invoke(**kwargs: Any) -> Any:
    return model_invoke(
        decision=DECISION,
        system="",
        prompt=PROMPT,
        run_id=7,
        phase_id=70,
        attempt=1,
        call_key="tok:1:builder",
        **kwargs,
    )


def test_a_call_retried_after_a_transient_error_is_metered_once_and_leaves_nothing_in_flight(
    sim: Any, settings: Any
) -> None:
    settings.AUTOPACK_PROVIDER_BACKOFF_SECONDS = 0.01
    sim.add_fault(kind="500", provider="anthropic")
    failures: list[tuple[str, bool]] = []

    result = invoke(on_failure=lambda error, attempt: failures.append((error.kind, in_flight())))

    assert failures == [("server_error", True)]  # in flight from before the first request
    assert [r["outcome"] for r in sim.requests()] == ["500", "ok"]
    assert not InFlightCall.objects.exists()
    event = UsageEvent.objects.get()
    assert (event.pk, event.estimated) == (result.usage_event_id, False)
    # The phase handed on afterwards has no lost call: the retried call was answered.
    assert in_flight_calls_lose(phase_id=70) == []
    assert UsageEvent.objects.count() == 1


@pytest.mark.parametrize("fault", ["bad_request", "auth", "insufficient_quota"])
def test_a_call_refused_by_the_provider_is_closed_without_usage_or_a_lost_call(
    sim: Any, fault: str
) -> None:
    sim.add_fault(kind=fault, provider="anthropic")

    seen: list[bool] = []

    with pytest.raises(ProviderCallError) as raised:
        invoke(on_failure=lambda error, attempt: seen.append(in_flight()))

    assert seen == [True]
    assert raised.value.status_code is not None and 400 <= raised.value.status_code < 500
    assert len(sim.requests()) == 1  # not retried
    assert not InFlightCall.objects.exists()
    assert in_flight_calls_lose(phase_id=70) == []
    assert not UsageEvent.objects.exists()
