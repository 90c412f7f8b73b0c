"""The Gemini generateContent protocol: response shapes exactly as the real API sends them,
checked against google-genai's own types, read through the real SDK over HTTP."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.genai.types import GenerateContentResponse, GenerateContentResponseUsageMetadata

from routing.calls import call_model
from routing.providers import ProviderCallError
from routing.providers.gemini import gemini_usage
from usage.types import TokenUsage

from .canned import Canned, CannedServer, sse, strict

VERSION = "gemini-2.5-pro"
# A call that hit an explicit cache, thought, and fed a tool's result back in.
USAGE = {
    "promptTokenCount": 4200,
    "candidatesTokenCount": 80,
    "cachedContentTokenCount": 4096,
    "thoughtsTokenCount": 600,
    "toolUsePromptTokenCount": 220,
    "totalTokenCount": 5100,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 4200}],
    "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 4096}],
}
BILLED = TokenUsage(
    prompt_tokens=4200 + 220,
    completion_tokens=80 + 600,
    cached_input_tokens=4096,
    reasoning_tokens=600,
)


def response(
    parts: list[dict[str, Any]], usage: dict[str, Any] | None, *, finish: str | None = None
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    body: dict[str, Any] = {
        "candidates": [candidate],
        "modelVersion": VERSION,
        "responseId": "resp-fixture",
    }
    if usage is not None:
        body["usageMetadata"] = usage
    strict(GenerateContentResponse, body)
    return body


def stream_chunks() -> list[dict[str, Any]]:
    """Every chunk carries the usage so far (cumulative); only the last has a finishReason."""
    first = {"promptTokenCount": 4200, "cachedContentTokenCount": 4096, "totalTokenCount": 4800}
    return [
        response([{"text": "Do"}], {**first, "thoughtsTokenCount": 600}),
        response(
            [{"text": "ne."}],
            {**first, "thoughtsTokenCount": 600, "candidatesTokenCount": 40},
        ),
        response([{"text": ""}], USAGE, finish="STOP"),
    ]


def call(canned: CannedServer, *, stream: bool) -> Any:
    return call_model(
        endpoint=canned.endpoint("gemini"),
        model="gemini-2.5-pro",
        system="You are the builder.",
        prompt="Phase 1",
        stream=stream,
        timeout=10,
    )


def test_the_usage_fields_are_the_sdks_own() -> None:
    meta = strict(GenerateContentResponseUsageMetadata, USAGE)
    assert meta.tool_use_prompt_token_count == 220
    with pytest.raises(ValueError, match="thoughtTokenCount"):
        strict(GenerateContentResponseUsageMetadata, {**USAGE, "thoughtTokenCount": 1})


def test_cached_thoughts_and_tool_use_tokens_are_billed_as_gemini_counts_them() -> None:
    assert gemini_usage(strict(GenerateContentResponseUsageMetadata, USAGE)) == BILLED


def test_a_plain_call_records_the_usage_and_the_model_version(canned: CannedServer) -> None:
    body = response([{"text": "Let me think.", "thought": True}, {"text": "Done."}], USAGE)
    body["candidates"][0]["finishReason"] = "STOP"
    canned.answer(Canned([json.dumps(body).encode()]))
    reply = call(canned, stream=False)
    assert reply.usage == BILLED and reply.text == "Done."  # thoughts are not the reply
    assert (reply.model, reply.reported_model) == ("gemini-2.5-pro", VERSION)
    assert reply.provider_request_id == "resp-fixture"


def test_an_sse_stream_counts_the_last_cumulative_usage_once(canned: CannedServer) -> None:
    chunks = [sse(c, crlf=True) for c in stream_chunks()]
    canned.answer(Canned(chunks, content_type="text/event-stream"))
    reply = call(canned, stream=True)
    assert reply.text == "Done." and reply.reported_model == VERSION
    assert reply.usage == BILLED
    assert canned.requests[-1]["path"].endswith(":streamGenerateContent?alt=sse")


@pytest.mark.parametrize("complete", [True, False], ids=["ended", "reset"])
def test_a_cut_stream_keeps_the_last_usage_it_reported(
    canned: CannedServer, complete: bool
) -> None:
    chunks = [sse(c, crlf=True) for c in stream_chunks()[:2]]
    canned.answer(Canned(chunks, content_type="text/event-stream", complete=complete))
    with pytest.raises(ProviderCallError) as caught:
        call(canned, stream=True)
    error = caught.value
    assert error.kind == ("malformed" if complete else "connection") and error.retryable
    assert error.stream_cut and error.reported_model == VERSION
    assert error.partial_usage == TokenUsage(
        prompt_tokens=4200, completion_tokens=640, cached_input_tokens=4096, reasoning_tokens=600
    )
