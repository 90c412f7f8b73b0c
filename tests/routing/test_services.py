"""model_invoke against the simulated provider over real HTTP: every call is in flight from just
before it is sent until its answer or its error closes it, so only a call whose worker died
waiting is ever metered as lost."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from routing.calls import ProviderCallError
from routing.router import RoutingDecision
from routing.services import model_invoke
from routing.types import DecisionScope, RouteKey
from tests.routing.providers.canned import Canned, CannedServer
from tests.routing.providers.test_anthropic import (
    SNAPSHOT,
    delta_event,
    start_event,
    stop_event,
    text_events,
)
from usage.models import InFlightCall, UsageEvent
from usage.services import estimate_prompt_tokens, in_flight_calls_lose

pytestmark = pytest.mark.django_db

DECISION = RoutingDecision(
    key=RouteKey("builder", "core_backend", "low"),
    model="claude-haiku-4-5",
    provider="anthropic",
    scope=DecisionScope.BASELINE,
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


# --- streams cut before their final usage (a provider answering with fixed bytes) --------------


@pytest.fixture
def canned(monkeypatch: pytest.MonkeyPatch, settings: Any) -> Iterator[CannedServer]:
    """The anthropic endpoint pointed at a server answering the queued bytes in order."""
    server = CannedServer()
    monkeypatch.setenv("AUTOPACK_ANTHROPIC_BASE_URL", server.url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "canned-anthropic-key")
    settings.AUTOPACK_PROVIDER_BACKOFF_SECONDS = 0.01
    yield server
    server.close()


def full_stream() -> Canned:
    return Canned(
        [
            start_event(),
            *text_events("Done."),
            delta_event({"output_tokens": 640}),
            stop_event(),
        ],
        content_type="text/event-stream",
    )


def test_a_stream_cut_after_message_start_is_metered_as_estimated_and_its_retry_once(
    canned: CannedServer,
) -> None:
    cut = Canned([start_event(), *text_events("Do")], content_type="text/event-stream")
    canned.answer(cut, full_stream())
    seen: list[tuple[str, bool]] = []

    result = invoke(
        stream=True, on_failure=lambda error, attempt: seen.append((error.kind, in_flight()))
    )

    assert seen == [("malformed", True)]  # the caller still hears of every failed attempt
    assert not InFlightCall.objects.exists()
    partial = UsageEvent.objects.get(call_id="tok:1:builder:partial:1")
    answered = UsageEvent.objects.get(pk=result.usage_event_id)
    assert UsageEvent.objects.count() == 2  # each attempt once
    # What message_start said before the cut: the input and cache tokens, one output token.
    assert (partial.estimated, partial.prompt_tokens, partial.completion_tokens) == (
        True,
        11012,
        1,
    )
    assert (partial.cache_write_tokens, partial.cached_input_tokens) == (3000, 8000)
    assert (partial.run_id, partial.phase_id, partial.role) == (7, 70, "builder")
    assert partial.model == "claude-haiku-4-5" and partial.reported_model == SNAPSHOT
    assert (answered.estimated, answered.completion_tokens) == (False, 640)
    assert answered.reported_model == SNAPSHOT

    # The same call replayed (a task retried after it recorded) counts nothing twice.
    canned.answer(cut, full_stream())
    invoke(stream=True)
    assert UsageEvent.objects.count() == 2


def test_a_cut_stream_that_reported_nothing_is_metered_with_the_prompt_estimate(
    canned: CannedServer, settings: Any
) -> None:
    settings.AUTOPACK_PROVIDER_MAX_RETRIES = 0
    canned.answer(Canned([b": ping\n\n"], content_type="text/event-stream", complete=False))

    with pytest.raises(ProviderCallError) as raised:
        invoke(stream=True)

    assert raised.value.kind == "connection" and raised.value.stream_cut
    assert not InFlightCall.objects.exists()
    event = UsageEvent.objects.get()
    assert (event.call_id, event.estimated) == ("tok:1:builder:partial:1", True)
    assert event.prompt_tokens == estimate_prompt_tokens(system="", prompt=PROMPT) > 0
    assert event.completion_tokens == 0


def test_a_refused_stream_is_not_metered(canned: CannedServer) -> None:
    body = b'{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}'
    canned.answer(Canned([body], status=400))
    with pytest.raises(ProviderCallError):
        invoke(stream=True)
    assert not UsageEvent.objects.exists() and not InFlightCall.objects.exists()
