"""The OpenAI wire protocol (OpenAI, GLM's `zai` dialect, any compatible server): response shapes
exactly as the real APIs send them, checked against the `openai` SDK's own types, read through
the real SDK over HTTP."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from routing.calls import call_model
from routing.providers import ProviderCallError, make_endpoint
from routing.providers.openai import openai_usage
from tests.sim_fixtures import SimulatedProvider
from usage.types import TokenUsage

from .canned import Canned, CannedServer, sse, strict

# OpenAI's documented usage of a reasoning call that used Predicted Outputs and hit the cache.
GPT5_USAGE = {
    "prompt_tokens": 2006,
    "completion_tokens": 300,
    "total_tokens": 2306,
    "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 192,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 40,
        "rejected_prediction_tokens": 12,
    },
}
# GLM (Z.ai) reports its context-cache hits the OpenAI way.
GLM_USAGE = {
    "prompt_tokens": 1500,
    "completion_tokens": 220,
    "total_tokens": 1720,
    "prompt_tokens_details": {"cached_tokens": 1024},
}


def completion(model: str, usage: dict[str, Any], text: str = "Done.") -> dict[str, Any]:
    return strict(
        ChatCompletion,
        {
            "id": "chatcmpl-fixture1",
            "object": "chat.completion",
            "created": 1759000000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": None,
        },
    ).model_dump(mode="json", exclude_unset=True)


def chunk(
    model: str,
    content: str | None,
    *,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    empty_choices: bool = False,
) -> dict[str, Any]:
    choices: list[dict[str, Any]] = []
    if not empty_choices:
        delta = {"content": content} if content is not None else {}
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    return strict(
        ChatCompletionChunk,
        {
            "id": "chatcmpl-fixture2",
            "object": "chat.completion.chunk",
            "created": 1759000000,
            "model": model,
            "choices": choices,
            "usage": usage,
        },
    ).model_dump(mode="json", exclude_unset=True)


def stream_body(*chunks: dict[str, Any], done: bool = True) -> list[bytes]:
    return [sse(c) for c in chunks] + ([sse("[DONE]")] if done else [])


def openai_stream(model: str = "gpt-5-2025-08-07") -> list[dict[str, Any]]:
    """OpenAI with stream_options.include_usage: content chunks carry `usage: null`; the usage
    comes alone on a last chunk whose `choices` is empty."""
    return [
        chunk(model, "Do"),
        chunk(model, "ne."),
        chunk(model, None, finish="stop"),
        chunk(model, None, usage=GPT5_USAGE, empty_choices=True),
    ]


def call(canned: CannedServer, protocol: str, *, stream: bool, model: str = "gpt-5") -> Any:
    return call_model(
        endpoint=canned.endpoint(protocol, "/v1"),
        model=model,
        system="You are the builder.",
        prompt="Phase 1",
        stream=stream,
        timeout=10,
    )


def test_the_usage_fields_are_the_sdks_own() -> None:
    usage = strict(CompletionUsage, GPT5_USAGE)
    assert usage.completion_tokens_details.rejected_prediction_tokens == 12
    with pytest.raises(AssertionError, match="cache_tokens"):
        strict(CompletionUsage, {**GPT5_USAGE, "prompt_tokens_details": {"cache_tokens": 5}})


def test_reasoning_cached_and_prediction_tokens_are_billed_as_openai_counts_them() -> None:
    usage = openai_usage(strict(CompletionUsage, GPT5_USAGE))
    # completion_tokens already holds the reasoning and both prediction counts (OpenAI bills
    # rejected prediction tokens as output too), so nothing is added to it.
    assert usage == TokenUsage(
        prompt_tokens=2006, completion_tokens=300, cached_input_tokens=1920, reasoning_tokens=192
    )


def test_a_plain_openai_call_records_its_usage_and_the_reported_snapshot(
    canned: CannedServer,
) -> None:
    canned.answer(Canned([json.dumps(completion("gpt-5-2025-08-07", GPT5_USAGE)).encode()]))
    response = call(canned, "openai", stream=False)
    assert response.usage == openai_usage(strict(CompletionUsage, GPT5_USAGE))
    assert (response.model, response.reported_model) == ("gpt-5", "gpt-5-2025-08-07")
    assert response.text == "Done." and response.provider_request_id == "chatcmpl-fixture1"
    sent = canned.requests[-1]["body"]
    # OpenAI's reasoning models refuse max_tokens.
    assert sent["max_completion_tokens"] == 2048 and "max_tokens" not in sent


def test_an_openai_stream_reads_the_usage_from_the_last_chunk_with_empty_choices(
    canned: CannedServer,
) -> None:
    canned.answer(Canned(stream_body(*openai_stream()), content_type="text/event-stream"))
    response = call(canned, "openai", stream=True)
    assert response.text == "Done."
    assert response.usage == openai_usage(strict(CompletionUsage, GPT5_USAGE))
    assert response.reported_model == "gpt-5-2025-08-07"
    assert canned.requests[-1]["body"]["stream_options"] == {"include_usage": True}


def test_a_glm_stream_reads_the_usage_and_cached_tokens_from_the_finish_chunk(
    canned: CannedServer,
) -> None:
    canned.answer(
        Canned(
            stream_body(
                chunk("glm-4.6", "Do"),
                chunk("glm-4.6", "ne.", finish="stop", usage=GLM_USAGE),
            ),
            content_type="text/event-stream",
        )
    )
    response = call(canned, "zai", stream=True, model="glm-4.6")
    assert response.usage == TokenUsage(
        prompt_tokens=1500, completion_tokens=220, cached_input_tokens=1024
    )
    assert (response.text, response.reported_model) == ("Done.", "glm-4.6")
    sent = canned.requests[-1]["body"]
    # Z.ai: max_tokens, and no stream_options (usage always comes on the finish chunk).
    assert sent["max_tokens"] == 2048 and "stream_options" not in sent
    assert "max_completion_tokens" not in sent


def test_a_plain_glm_call_counts_its_cached_tokens(canned: CannedServer) -> None:
    canned.answer(Canned([json.dumps(completion("glm-4.6", GLM_USAGE)).encode()]))
    response = call(canned, "zai", stream=False, model="glm-4.6")
    assert response.usage.cached_input_tokens == 1024 and response.usage.prompt_tokens == 1500


def test_a_compatible_server_gets_max_tokens_and_is_asked_for_stream_usage(
    canned: CannedServer,
) -> None:
    canned.answer(
        Canned(stream_body(*openai_stream("qwen3-coder")), content_type="text/event-stream")
    )
    response = call(canned, "openai_compatible", stream=True, model="qwen3-coder")
    assert response.reported_model == "qwen3-coder"
    sent = canned.requests[-1]["body"]
    assert sent["max_tokens"] == 2048 and sent["stream_options"] == {"include_usage": True}


def test_a_stream_that_ends_before_its_usage_is_a_cut_with_nothing_reported(
    canned: CannedServer,
) -> None:
    # The body ends cleanly after two content chunks: no usage chunk, no [DONE].
    canned.answer(
        Canned(stream_body(*openai_stream()[:2], done=False), content_type="text/event-stream")
    )
    with pytest.raises(ProviderCallError) as caught:
        call(canned, "openai", stream=True)
    error = caught.value
    assert (error.kind, error.retryable, error.stream_cut) == ("malformed", True, True)
    assert error.partial_usage is None  # OpenAI reports usage only at the end
    assert error.reported_model == "gpt-5-2025-08-07"


def test_a_connection_reset_mid_stream_is_a_cut_with_nothing_reported(
    canned: CannedServer,
) -> None:
    canned.answer(
        Canned(
            stream_body(*openai_stream()[:2], done=False),
            content_type="text/event-stream",
            complete=False,
        )
    )
    with pytest.raises(ProviderCallError) as caught:
        call(canned, "openai", stream=True)
    error = caught.value
    assert error.kind == "connection" and error.retryable and error.stream_cut
    assert error.partial_usage is None and error.reported_model == "gpt-5-2025-08-07"


def test_a_reset_after_the_usage_chunk_keeps_the_usage(canned: CannedServer) -> None:
    canned.answer(
        Canned(
            stream_body(*openai_stream(), done=False),
            content_type="text/event-stream",
            complete=False,
        )
    )
    with pytest.raises(ProviderCallError) as caught:
        call(canned, "openai", stream=True)
    assert caught.value.stream_cut
    assert caught.value.partial_usage == openai_usage(strict(CompletionUsage, GPT5_USAGE))


def test_a_refused_request_is_no_cut(canned: CannedServer) -> None:
    body = {"error": {"message": "Rate limit", "type": "requests", "code": "rate_limit_exceeded"}}
    canned.answer(Canned([json.dumps(body).encode()], status=429))
    with pytest.raises(ProviderCallError) as caught:
        call(canned, "openai", stream=True)
    assert caught.value.kind == "rate_limited"
    assert not caught.value.stream_cut and caught.value.partial_usage is None


@pytest.mark.parametrize(
    ("protocol", "code", "kind"),
    [("zai", "1113", "insufficient_quota"), ("openai_compatible", "1113", "rate_limited")],
)
def test_zais_balance_codes_mean_a_spent_balance_only_on_zai(
    canned: CannedServer, protocol: str, code: str, kind: str
) -> None:
    body = {"error": {"code": code, "message": "Insufficient balance or no resource package."}}
    canned.answer(Canned([json.dumps(body).encode()], status=429))
    with pytest.raises(ProviderCallError) as caught:
        call(canned, protocol, stream=False, model="glm-4.6")
    assert caught.value.kind == kind


def test_any_other_provider_name_is_called_as_openai_compatible(sim: SimulatedProvider) -> None:
    endpoint = make_endpoint(
        name="local_vllm", api_key_env="GLM_API_KEY", base_url=f"{sim.url}/local/v1"
    )
    assert endpoint.protocol == "openai_compatible"
    response = call_model(
        endpoint=endpoint, model="qwen3-coder", system="", prompt="Phase 1", stream=True, timeout=10
    )
    entry = sim.requests()[-1]
    assert entry["path"] == "/local/v1/chat/completions" and entry["model"] == "qwen3-coder"
    raw = entry["usage"]
    assert response.usage == TokenUsage(
        prompt_tokens=raw["prompt_tokens"],
        completion_tokens=raw["completion_tokens"],
        cached_input_tokens=raw["prompt_tokens_details"]["cached_tokens"],
        reasoning_tokens=raw.get("completion_tokens_details", {}).get("reasoning_tokens", 0),
    )
