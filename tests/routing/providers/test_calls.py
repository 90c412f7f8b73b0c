"""The generic call and retry (routing.calls) through every provider module and its real SDK,
over HTTP, against the simulated provider; and the registry (routing.providers).

Every usage assertion compares the client's TokenUsage with the usage block the simulator
actually sent (it logs it verbatim), normalised here by the rule in usage/types.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from routing import providers
from routing.calls import (
    MAX_RETRY_AFTER_SECONDS,
    ModelResponse,
    ProviderCallError,
    ProviderNotConfigured,
    call_model,
    call_with_retries,
)
from routing.config import ModelsConfigError, parse_models_config
from routing.providers import base, make_endpoint, provider_for
from tests.sim_fixtures import SimulatedProvider
from usage.types import TokenUsage

BUILDER = "Autopack-Role: builder\nAttempt: 1\nPhase 2: Add export\nCategory: backend\n"
AUDITOR = "Autopack-Role: auditor\nAttempt: 2\nPhase 2: Add export\n"
LONG = "Stable context that a provider would cache between calls.\n" * 120
PROVIDERS = ["openai", "anthropic", "google_gemini", "glm"]
PLAIN_MODELS = {
    "openai": "gpt-4o",
    "anthropic": "claude-sonnet-4-5",
    "google_gemini": "gemini-2.0-flash",
    "glm": "glm-4.6",
}
REASONING_MODELS = {"openai": "gpt-5", "google_gemini": "gemini-2.5-pro"}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def expected_usage(provider: str, raw: dict[str, Any]) -> TokenUsage:
    """The counting rule of usage/types.py applied by hand to a provider's raw usage."""
    if provider == "anthropic":
        reads, writes = raw["cache_read_input_tokens"], raw["cache_creation_input_tokens"]
        return TokenUsage(
            prompt_tokens=raw["input_tokens"] + reads + writes,
            completion_tokens=raw["output_tokens"],
            cached_input_tokens=reads,
            cache_write_tokens=writes,
            reasoning_tokens=(raw.get("output_tokens_details") or {}).get("thinking_tokens", 0),
            cache_write_1h_tokens=(raw.get("cache_creation") or {}).get(
                "ephemeral_1h_input_tokens", 0
            ),
        )
    if provider == "google_gemini":
        thoughts = raw.get("thoughtsTokenCount", 0)
        return TokenUsage(
            prompt_tokens=raw["promptTokenCount"] + raw.get("toolUsePromptTokenCount", 0),
            completion_tokens=raw["candidatesTokenCount"] + thoughts,
            cached_input_tokens=raw.get("cachedContentTokenCount", 0),
            reasoning_tokens=thoughts,
        )
    return TokenUsage(
        prompt_tokens=raw["prompt_tokens"],
        completion_tokens=raw["completion_tokens"],
        cached_input_tokens=raw["prompt_tokens_details"]["cached_tokens"],
        reasoning_tokens=(raw.get("completion_tokens_details") or {}).get("reasoning_tokens", 0),
    )


def call(
    sim: SimulatedProvider,
    provider: str,
    prompt: str = BUILDER,
    *,
    model: str | None = None,
    stream: bool = False,
    timeout: float = 10,
) -> ModelResponse:
    return call_model(
        endpoint=sim.provider_config(provider),
        model=model or PLAIN_MODELS[provider],
        system="You are the builder.",
        prompt=prompt,
        stream=stream,
        timeout=timeout,
    )


def retry(
    sim: SimulatedProvider,
    provider: str,
    *,
    max_retries: int = 2,
    backoff: float = 0.01,
    sleeps: list[float] | None = None,
    failures: list[tuple[str, int]] | None = None,
    stream: bool = False,
    timeout: float = 10,
) -> ModelResponse:
    return call_with_retries(
        endpoint=sim.provider_config(provider),
        model=PLAIN_MODELS[provider],
        system="You are the builder.",
        prompt=BUILDER,
        stream=stream,
        timeout=timeout,
        max_retries=max_retries,
        backoff_seconds=backoff,
        on_failure=(lambda e, n: failures.append((e.kind, n))) if failures is not None else None,
        sleep=sleeps.append if sleeps is not None else (lambda s: None),
    )


def logged(sim: SimulatedProvider) -> dict[str, Any]:
    entries = sim.requests()
    assert entries, "the simulator logged no request"
    return entries[-1]


# --- usage, every field, every provider -------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_usage_matches_what_the_provider_sent(
    sim: SimulatedProvider, provider: str, stream: bool
) -> None:
    response = call(sim, provider, stream=stream)
    entry = logged(sim)
    assert entry["stream"] is stream
    assert response.usage == expected_usage(provider, entry["usage"])
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0
    assert response.usage.cached_input_tokens == 0 and response.usage.cache_write_tokens == 0
    assert response.provider_request_id == entry["request_id"]
    assert response.model == PLAIN_MODELS[provider] and response.latency_ms >= 0
    assert "Files touched:" in response.text


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_stream_gives_the_same_text_and_usage_as_a_plain_call(
    sim: SimulatedProvider, provider: str
) -> None:
    plain = call(sim, provider, LONG + BUILDER)
    streamed = call(sim, provider, LONG + BUILDER, stream=True)
    assert streamed.text == plain.text
    assert streamed.usage == plain.usage


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_cache_reads_are_counted_inside_prompt_tokens(
    sim: SimulatedProvider, provider: str, stream: bool
) -> None:
    usage = call(sim, provider, LONG + BUILDER, stream=stream).usage
    assert usage == expected_usage(provider, logged(sim)["usage"])
    assert 0 < usage.cached_input_tokens < usage.prompt_tokens
    assert usage.prompt_tokens >= len(LONG) // 4


@pytest.mark.parametrize("provider", ["openai", "google_gemini"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_reasoning_tokens_are_counted_inside_completion_tokens(
    sim: SimulatedProvider, provider: str, stream: bool
) -> None:
    response = call(sim, provider, model=REASONING_MODELS[provider], stream=stream)
    raw = logged(sim)["usage"]
    usage = response.usage
    assert usage == expected_usage(provider, raw)
    assert 0 < usage.reasoning_tokens < usage.completion_tokens
    visible = raw["candidatesTokenCount"] if provider == "google_gemini" else None
    if visible is not None:  # Gemini reports the visible part alone
        assert usage.completion_tokens == visible + usage.reasoning_tokens


def test_the_auditor_reply_is_the_json_verdict(sim: SimulatedProvider) -> None:
    verdict = json.loads(call(sim, "google_gemini", AUDITOR).text)
    assert verdict["verdict"] == "approve" and isinstance(verdict["issues"], list)


def test_builder_text_injected_by_a_script_reaches_the_caller_unchanged(
    sim: SimulatedProvider,
) -> None:
    html = '<img src=x onerror="alert(1)">'
    sim.add_script(role="builder", text=html)
    assert call(sim, "anthropic", stream=True).text == html


# --- keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("value", [None, "", "   "], ids=["unset", "empty", "blank"])
def test_a_missing_key_raises_provider_not_configured_without_calling(
    sim: SimulatedProvider, monkeypatch: pytest.MonkeyPatch, provider: str, value: str | None
) -> None:
    config = sim.provider_config(provider)
    if value is None:
        monkeypatch.delenv(config.api_key_env)
    else:
        monkeypatch.setenv(config.api_key_env, value)
    failures: list[tuple[str, int]] = []
    with pytest.raises(ProviderNotConfigured) as caught:
        retry(sim, provider, failures=failures)
    assert caught.value.retryable is False and caught.value.provider == provider
    assert config.api_key_env in caught.value.message
    assert failures == [("auth", 1)] and sim.requests() == []


@pytest.mark.parametrize("provider", PROVIDERS)
def test_an_invalid_key_is_an_auth_error_that_is_not_retried_and_not_revealed(
    sim: SimulatedProvider, monkeypatch: pytest.MonkeyPatch, provider: str
) -> None:
    key = "invalid-key-that-must-stay-secret"
    monkeypatch.setenv(sim.provider_config(provider).api_key_env, key)
    failures: list[tuple[str, int]] = []
    with pytest.raises(ProviderCallError) as caught:
        retry(sim, provider, failures=failures)
    error = caught.value
    assert (error.kind, error.retryable, error.status_code) == ("auth", False, 401)
    assert failures == [("auth", 1)] and len(sim.requests()) == 1
    assert key not in f"{error} {error.message} {error!r}"
    assert key not in repr(base.cached_client_keys())


def test_the_key_is_read_at_call_time(
    sim: SimulatedProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    call(sim, "openai")
    monkeypatch.setenv("OPENAI_API_KEY", "invalid-rotated-key")
    with pytest.raises(ProviderCallError, match="auth"):
        call(sim, "openai")


def test_sdk_clients_are_reused_per_provider_base_url_and_key(sim: SimulatedProvider) -> None:
    base.clear_client_cache()
    call(sim, "openai")
    call(sim, "openai", stream=True)
    call(sim, "glm")
    assert len(base.cached_client_keys()) == 2


# --- errors and retries ------------------------------------------------------------------------

RETRYABLE = [
    ("429", "rate_limited"),
    ("500", "server_error"),
    ("malformed", "malformed"),
    ("cut_stream", None),  # malformed or connection, depending on where the cut falls
]
FATAL = [
    ("auth", "auth"),
    ("insufficient_quota", "insufficient_quota"),
    ("bad_request", "bad_request"),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("fault", "kind"), RETRYABLE)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_transient_errors_are_retried_until_a_call_succeeds(
    sim: SimulatedProvider, provider: str, fault: str, kind: str | None, stream: bool
) -> None:
    sim.add_fault(kind=fault, provider=provider, count=2, retry_after=0)
    failures: list[tuple[str, int]] = []
    response = retry(sim, provider, max_retries=2, failures=failures, stream=stream)
    outcomes = [r["outcome"] for r in sim.requests()]
    assert outcomes == [fault, fault, "ok"]
    assert [n for _k, n in failures] == [1, 2]
    assert all(k == kind if kind else k in ("malformed", "connection") for k, _n in failures)
    assert response.usage == expected_usage(provider, sim.requests()[-1]["usage"])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("fault", "kind"), RETRYABLE)
def test_transient_errors_are_raised_after_max_retries(
    sim: SimulatedProvider, provider: str, fault: str, kind: str | None
) -> None:
    sim.add_fault(kind=fault, provider=provider, count=-1, retry_after=0)
    failures: list[tuple[str, int]] = []
    with pytest.raises(ProviderCallError) as caught:
        retry(sim, provider, max_retries=3, failures=failures, stream=True)
    assert caught.value.retryable is True
    assert len(sim.requests()) == 4 and [n for _k, n in failures] == [1, 2, 3, 4]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("fault", "kind"), FATAL)
def test_fatal_errors_are_raised_at_once(
    sim: SimulatedProvider, provider: str, fault: str, kind: str
) -> None:
    sim.add_fault(kind=fault, provider=provider, count=-1)
    failures: list[tuple[str, int]] = []
    sleeps: list[float] = []
    with pytest.raises(ProviderCallError) as caught:
        retry(sim, provider, max_retries=3, failures=failures, sleeps=sleeps)
    error = caught.value
    assert (error.kind, error.retryable, error.provider) == (kind, False, provider)
    assert error.status_code in (400, 401, 429) and error.message
    assert failures == [(kind, 1)] and sleeps == [] and len(sim.requests()) == 1


@pytest.mark.parametrize("provider", ["openai", "anthropic", "glm", "google_gemini"])
def test_a_429_waits_as_long_as_retry_after_asks(sim: SimulatedProvider, provider: str) -> None:
    sim.add_fault(kind="429", provider=provider, retry_after=7)
    failures: list[tuple[str, int]] = []
    sleeps: list[float] = []
    retry(sim, provider, backoff=0.01, sleeps=sleeps, failures=failures)
    assert sleeps == [7.0] and failures == [("rate_limited", 1)]


def test_a_huge_retry_after_is_capped(sim: SimulatedProvider) -> None:
    sim.add_fault(kind="429", retry_after=3600)
    sleeps: list[float] = []
    retry(sim, "openai", sleeps=sleeps)
    assert sleeps == [MAX_RETRY_AFTER_SECONDS]


def test_server_errors_back_off_exponentially(sim: SimulatedProvider) -> None:
    sim.add_fault(kind="500", count=3)
    sleeps: list[float] = []
    retry(sim, "anthropic", max_retries=3, backoff=0.5, sleeps=sleeps)
    assert sleeps == [0.5, 1.0, 2.0]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_hanging_provider_times_out_and_is_retried(
    sim: SimulatedProvider, provider: str, stream: bool
) -> None:
    sim.add_fault(kind="hang", provider=provider, hang_seconds=5)
    failures: list[tuple[str, int]] = []
    response = retry(sim, provider, timeout=0.3, failures=failures, stream=stream)
    assert failures == [("timeout", 1)] and response.usage.completion_tokens > 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_cut_stream_is_a_retryable_error_marked_as_cut(
    sim: SimulatedProvider, provider: str
) -> None:
    sim.add_fault(kind="cut_stream", provider=provider)
    with pytest.raises(ProviderCallError) as caught:
        call(sim, provider, stream=True)
    assert caught.value.kind in ("malformed", "connection") and caught.value.retryable
    # What the provider had reported by the cut is carried (the provider tests check each).
    assert caught.value.stream_cut


def test_an_unreachable_provider_is_a_retryable_connection_error(
    sim: SimulatedProvider,
) -> None:
    endpoint = make_endpoint(
        name="unreachable", api_key_env="OPENAI_API_KEY", base_url="http://127.0.0.1:9/openai/v1"
    )
    with pytest.raises(ProviderCallError) as caught:
        call_model(endpoint=endpoint, model="gpt-4o", system="", prompt="hi", timeout=2)
    assert caught.value.kind == "connection" and caught.value.retryable


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_headers_are_parsed(headers: dict[str, str], expected: float | None) -> None:
    assert base.retry_after_seconds(headers) == expected


# --- the registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "protocol", "prices_id"),
    [
        ("openai", "openai", "openai"),
        ("anthropic", "anthropic", "anthropic"),
        ("google_gemini", "gemini", "google"),
        ("glm", "zai", "zai"),
        ("local_vllm", "openai_compatible", "local_vllm"),
    ],
)
def test_an_endpoint_without_protocol_or_prices_id_gets_the_defaults(
    name: str, protocol: str, prices_id: str
) -> None:
    endpoint = make_endpoint(name=name, api_key_env="K", base_url="https://example.com")
    assert (endpoint.protocol, endpoint.prices_id) == (protocol, prices_id)
    assert provider_for(endpoint).protocol == protocol


def test_a_configured_protocol_and_prices_id_win_over_the_defaults() -> None:
    endpoint = make_endpoint(
        name="router",
        api_key_env="K",
        base_url="https://openrouter.ai/api/v1",
        protocol="openai_compatible",
        prices_id="openrouter",
    )
    assert (endpoint.protocol, endpoint.prices_id) == ("openai_compatible", "openrouter")


def test_every_protocol_preloads_its_sdk() -> None:
    providers.preload_all()
    assert set(providers.PROTOCOLS) == {"openai", "openai_compatible", "zai", "anthropic", "gemini"}


def models_yaml(**provider: Any) -> dict[str, Any]:
    entry = {"api_key_env": "X_KEY", "base_url": "https://x.example/v1", **provider}
    return {
        "providers": {"x": entry},
        "models": {"m": "x"},
        "roles": {
            role: {"complexity_models": {c: "m" for c in ("low", "medium", "high")}}
            for role in ("builder", "auditor")
        },
    }


@pytest.mark.parametrize(
    ("field", "value"), [("protocol", "grpc"), ("protocol", ""), ("prices_id", 5)]
)
def test_a_bad_protocol_or_prices_id_is_refused_naming_the_key(field: str, value: Any) -> None:
    with pytest.raises(ModelsConfigError, match=rf"providers\.x\.{field}"):
        parse_models_config(models_yaml(**{field: value}))


def test_models_yaml_protocol_and_prices_id_reach_the_endpoint() -> None:
    config = parse_models_config(models_yaml(protocol="zai", prices_id="zai"))
    endpoint = config.providers["x"].endpoint
    assert (endpoint.name, endpoint.protocol, endpoint.prices_id) == ("x", "zai", "zai")


def test_a_stored_protocol_no_module_serves_fails_the_call_not_the_router(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "some-key")
    endpoint = base.Endpoint(
        name="old",
        protocol="retired",
        api_key_env="OPENAI_API_KEY",
        base_url="http://x",
        prices_id="old",
    )
    with pytest.raises(ProviderCallError) as caught:
        call_model(endpoint=endpoint, model="m", system="", prompt="hi", timeout=1)
    assert (caught.value.kind, caught.value.retryable) == ("bad_request", False)
    assert "retired" in caught.value.message
