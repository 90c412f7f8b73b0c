"""What the provider says about its limits: the rate-limit headers of every protocol read through
the real SDKs from the simulated provider over HTTP and kept per provider (ProviderLimits), and
the cooldowns they imply — a 429 that announces its reset moves this call and the next to the
fallback at once; a bare 429 is retried as before; too few tokens left cools a provider down.
Time is moved through `now`, never slept."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from routing.calls import ProviderCallError
from routing.models import ProviderLimits
from routing.providers.limits import (
    RATE_LIMIT_PREFIXES,
    Cooldown,
    RateLimits,
    parse_duration,
    parse_rate_limits,
)
from routing.router import COOLED, OK, RoutingDecision, router
from routing.services import fallback_after_error, model_invoke, provider_limits_record
from routing.types import DecisionScope, RouteKey
from usage.models import UsageEvent
from usage.services import estimate_prompt_tokens

pytestmark = [pytest.mark.django_db, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

MODELS = {
    "openai": "gpt-4o",
    "anthropic": "claude-sonnet-4-5",
    "google_gemini": "gemini-2.0-flash",
    "glm": "glm-4.6",
}
PROMPT = "Autopack-Role: builder\nAttempt: 1\nPhase 1: limits step 1\n"
# medium builder: claude-sonnet-5-5 (anthropic), first fallback gpt-6.1-sol (config/models.yaml)
KEY = RouteKey("builder", "core_backend", "medium")


@pytest.fixture(autouse=True)
def fresh_router(sim: Any) -> Iterator[None]:
    router.invalidate()
    yield
    router.invalidate()


def decision_for(provider: str, *, candidates: tuple[str, ...] = ()) -> RoutingDecision:
    model = MODELS[provider]
    return RoutingDecision(
        key=KEY,
        model=model,
        provider=provider,
        scope=DecisionScope.BASELINE,
        reason="test",
        candidates=candidates or (model,),
    )


def invoke(decision: RoutingDecision, *, call_key: str = "lim:1:builder", **kwargs: Any) -> Any:
    return model_invoke(
        decision=decision, system="", prompt=PROMPT, call_key=call_key, attempt=1, **kwargs
    )


# --- parsing ---------------------------------------------------------------------------------


def test_openai_reset_durations_are_read_as_seconds() -> None:
    assert parse_duration("6m0s") == 360
    assert parse_duration("1s") == 1
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_duration("soon") is None


def test_retry_after_as_an_http_date_and_resets_of_both_formats_become_aware_instants() -> None:
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    openai = parse_rate_limits(
        {
            "X-RateLimit-Remaining-Tokens": "0",
            "x-ratelimit-reset-tokens": "6m0s",
            "retry-after": "Sun, 06 Dec 2026 12:07:00 GMT",
            "set-cookie": "session=secret",
        },
        now=now,
    )
    assert openai is not None
    assert openai.tokens_reset_at == now + timedelta(minutes=6)
    assert openai.retry_after_until == now + timedelta(minutes=7)
    assert openai.announced_reset == now + timedelta(minutes=7)  # Retry-After first
    assert dict(openai.headers) == {
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
        "retry-after": "Sun, 06 Dec 2026 12:07:00 GMT",
    }
    anthropic = parse_rate_limits(
        {
            "anthropic-ratelimit-input-tokens-remaining": "5",
            "anthropic-ratelimit-input-tokens-reset": "2026-12-06T12:05:00Z",
        },
        now=now,
    )
    assert anthropic is not None and anthropic.tokens_remaining == 5
    assert anthropic.tokens_reset_at == now + timedelta(minutes=5)
    assert parse_rate_limits({"x-request-id": "req_1"}, now=now) is None


# --- headers read and stored -------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("provider", ["openai", "anthropic", "glm"])
def test_each_protocols_rate_limit_headers_are_stored_as_the_simulator_counted_them(
    sim: Any, provider: str, stream: bool
) -> None:
    sim.configure(limits={provider: {"tokens": 100000, "requests": 50, "window_seconds": 300}})

    invoke(decision_for(provider), call_key="lim:1:a", stream=stream)
    with CaptureQueriesContext(connection) as queries:
        invoke(decision_for(provider), call_key="lim:1:b", stream=stream)

    # On the path of every call: one statement for the limits, whatever the rest costs.
    limits_sql = [q for q in queries.captured_queries if "routing_providerlimits" in q["sql"]]
    assert len(limits_sql) == 1, limits_sql

    calls = [r for r in sim.requests() if r["provider"] == provider]
    counted = calls[-1]["limits"]
    row = ProviderLimits.objects.get(provider=provider)
    assert (row.requests_limit, row.requests_remaining) == (50, 48)
    assert (row.tokens_limit, row.tokens_remaining) == (100000, counted["tokens_remaining"])
    assert counted["requests_remaining"] == 48
    # The simulator counts every token it billed: what was metered for these two calls.
    used = sum(e.prompt_tokens + e.completion_tokens for e in UsageEvent.objects.all())
    assert used > 0 and row.tokens_remaining == 100000 - used
    reset = datetime.fromtimestamp(counted["reset_at"], UTC)
    for at in (row.tokens_reset_at, row.requests_reset_at):
        assert at is not None and abs((at - reset).total_seconds()) <= 1.5
    assert row.cooled_until is None and row.reason == ""


def test_gemini_sends_no_rate_limit_headers_and_nothing_is_stored(sim: Any) -> None:
    invoke(decision_for("google_gemini"))
    assert not ProviderLimits.objects.filter(provider="google_gemini").exists()


@pytest.mark.parametrize("provider", ["openai", "anthropic", "glm"])
def test_nothing_but_rate_limit_headers_is_stored(sim: Any, provider: str, settings: Any) -> None:
    settings.AUTOPACK_PROVIDER_MAX_RETRIES = 0  # no fallback here: it would wait the reset out
    invoke(decision_for(provider))
    sim.control("POST", "/_sim/exhaust", {"provider": provider, "seconds": 30})
    with pytest.raises(ProviderCallError):
        invoke(decision_for(provider), call_key="lim:1:c")

    headers = ProviderLimits.objects.get(provider=provider).headers
    assert headers
    for name in headers:
        assert name.startswith(RATE_LIMIT_PREFIXES) or name in ("retry-after", "retry-after-ms")
    assert not {"x-request-id", "request-id", "x-log-id", "anthropic-organization-id"} & set(
        headers
    )


def test_the_limits_of_a_call_are_kept_with_one_statement() -> None:
    limits = RateLimits(tokens_limit=10, tokens_remaining=5, headers=(("x-ratelimit-a", "1"),))
    with CaptureQueriesContext(connection) as first:
        provider_limits_record(provider="openai", limits=limits, cooldown=None)
    with CaptureQueriesContext(connection) as again:
        provider_limits_record(
            provider="openai",
            limits=limits,
            cooldown=Cooldown(datetime.now(UTC) + timedelta(minutes=1), "429 from openai"),
        )
    assert len(first.captured_queries) == 1
    assert len(again.captured_queries) == 1
    assert "ON CONFLICT" in again.captured_queries[0]["sql"]
    assert ProviderLimits.objects.get().reason == "429 from openai"


# --- cooldowns -------------------------------------------------------------------------------


def test_a_429_announcing_its_reset_moves_this_call_and_the_next_to_the_fallback_at_once(
    sim: Any, settings: Any
) -> None:
    settings.AUTOPACK_PROVIDER_BACKOFF_SECONDS = 0.01
    decision = router.select(KEY)
    assert (decision.provider, decision.candidates[1]) == ("anthropic", "gpt-6.1-sol")
    sim.control("POST", "/_sim/exhaust", {"provider": "anthropic", "seconds": 600})

    with pytest.raises(ProviderCallError) as refused:
        invoke(decision)
    fallback = fallback_after_error(
        decision=decision, failed_providers={"anthropic"}, error=refused.value
    )
    assert fallback is not None and fallback.model == "gpt-6.1-sol"
    invoke(fallback, call_key="lim:1:builder:gpt-6.1-sol")

    # Not retried on the exhausted provider: one request to it, then the fallback's.
    assert [(r["provider"], r["outcome"]) for r in sim.requests()] == [
        ("anthropic", "exhausted"),
        ("openai", "ok"),
    ]
    row = ProviderLimits.objects.get(provider="anthropic")
    assert row.reason == "429 from anthropic" and row.cooled_until is not None
    assert row.cooled_until >= refused.value.seen_at + timedelta(seconds=599)

    # The next call goes to the fallback without asking the database or the provider.
    with CaptureQueriesContext(connection) as queries:
        nxt = router.select(KEY)
    assert len(queries.captured_queries) == 0
    assert nxt.model == "gpt-6.1-sol"
    assert "cooled down until" in nxt.reason and "(429 from anthropic)" in nxt.reason
    assert router.provider_status("anthropic") == COOLED

    # At the announced reset the provider is called again.
    later = row.cooled_until + timedelta(seconds=1)
    assert router.select(KEY, now=later).model == "claude-sonnet-5-5"
    assert router.provider_status("anthropic", now=later) == OK
    assert [r["provider"] for r in sim.requests()] == ["anthropic", "openai"]


def test_another_process_sees_a_cooldown_at_its_next_quota_refresh(sim: Any) -> None:
    until = datetime.now(UTC) + timedelta(minutes=5)
    ProviderLimits.objects.create(
        provider="anthropic",
        observed_at=datetime.now(UTC),
        cooled_until=until,
        reason="402 from anthropic",
    )
    router.invalidate()  # what AUTOPACK_QUOTA_REFRESH_SECONDS does in another process
    decision = router.select(KEY)
    assert decision.model == "gpt-6.1-sol" and "(402 from anthropic)" in decision.reason


def test_a_bare_429_without_reset_information_is_retried_on_the_same_provider(
    sim: Any, settings: Any
) -> None:
    settings.AUTOPACK_PROVIDER_BACKOFF_SECONDS = 0.01
    sim.add_fault(kind="429", provider="anthropic", retry_after=None)
    decision = router.select(KEY)

    invoke(decision)

    assert [(r["provider"], r["outcome"]) for r in sim.requests()] == [
        ("anthropic", "429"),
        ("anthropic", "ok"),
    ]
    assert ProviderLimits.objects.get(provider="anthropic").cooled_until is None
    assert router.select(KEY).model == "claude-sonnet-5-5"


def test_a_429_with_retry_after_and_no_fallback_is_still_retried(sim: Any, settings: Any) -> None:
    settings.AUTOPACK_PROVIDER_BACKOFF_SECONDS = 0.01
    sim.add_fault(kind="429", provider="anthropic", retry_after=0)

    invoke(decision_for("anthropic"))

    assert [r["outcome"] for r in sim.requests()] == ["429", "ok"]


def test_a_provider_with_too_few_tokens_left_for_the_next_call_is_cooled_down_until_its_reset(
    sim: Any,
) -> None:
    decision = router.select(KEY)
    needed = estimate_prompt_tokens(system="", prompt=PROMPT)
    # Room for this call, not for another of the same size.
    sim.configure(limits={"anthropic": {"tokens": needed + needed // 2, "window_seconds": 600}})

    invoke(decision)

    row = ProviderLimits.objects.get(provider="anthropic")
    assert row.tokens_remaining is not None and row.tokens_remaining < needed
    assert row.cooled_until == row.tokens_reset_at
    assert "tokens left at anthropic" in row.reason
    nxt = router.select(KEY)
    assert nxt.model == "gpt-6.1-sol" and "cooled down until" in nxt.reason
    assert router.select(KEY, now=row.cooled_until).model == "claude-sonnet-5-5"


def test_a_refusal_without_any_reset_is_cooled_down_for_the_default_time(
    sim: Any, settings: Any
) -> None:
    settings.AUTOPACK_COOLDOWN_DEFAULT_SECONDS = 90
    sim.add_fault(kind="insufficient_quota", provider="anthropic")
    decision = router.select(KEY)

    with pytest.raises(ProviderCallError) as refused:
        invoke(decision)

    row = ProviderLimits.objects.get(provider="anthropic")
    assert row.reason == "insufficient_quota from anthropic"
    assert row.cooled_until is not None
    waited = (row.cooled_until - refused.value.seen_at).total_seconds()
    assert 89 <= waited <= 100
