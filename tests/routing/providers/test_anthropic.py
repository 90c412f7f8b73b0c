"""The Anthropic Messages protocol: response shapes exactly as the real API sends them, checked
against the `anthropic` SDK's own types, read through the real SDK over HTTP; and the same
rules against the simulated provider."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
from anthropic.types import (
    CacheCreation,
    Message,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    Usage,
)
from pydantic import BaseModel

from routing.calls import call_model
from routing.providers import ProviderCallError
from routing.providers.anthropic import anthropic_usage
from tests.sim_fixtures import SimulatedProvider
from usage.types import TokenUsage

from .canned import Canned, CannedServer, sse, strict

SNAPSHOT = "claude-opus-4-1-20250805"
# A call that read 8,000 cached tokens and wrote 3,000: 1,000 to the 5-minute cache and 2,000
# to the 1-hour cache, with extended thinking.
USAGE = {
    "input_tokens": 12,
    "cache_creation_input_tokens": 3000,
    "cache_read_input_tokens": 8000,
    "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
    "output_tokens": 640,
    "output_tokens_details": {"thinking_tokens": 512},
    "service_tier": "standard",
}
BILLED = TokenUsage(
    prompt_tokens=12 + 8000 + 3000,
    completion_tokens=640,
    cached_input_tokens=8000,
    cache_write_tokens=3000,
    reasoning_tokens=512,
    cache_write_1h_tokens=2000,
)


def message(usage: dict[str, Any]) -> bytes:
    body = {
        "id": "msg_01Fixture",
        "type": "message",
        "role": "assistant",
        "model": SNAPSHOT,
        "content": [
            {"type": "thinking", "thinking": "Plan the edit.", "signature": "c2ln"},
            {"type": "text", "text": "Done."},
        ],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
    strict(Message, body)
    return json.dumps(body).encode()


def start_event() -> bytes:
    data = {
        "type": "message_start",
        "message": {
            "id": "msg_01Stream",
            "type": "message",
            "role": "assistant",
            "model": SNAPSHOT,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # message_start: the input and cache counts are final, output is a first count.
            "usage": {**USAGE, "output_tokens": 1, "output_tokens_details": None},
        },
    }
    strict(RawMessageStartEvent, data)
    return sse(data, event="message_start")


def text_events(*parts: str) -> list[bytes]:
    events: list[tuple[type[BaseModel], dict[str, Any]]] = [
        (
            RawContentBlockStartEvent,
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
    ]
    events += [
        (
            RawContentBlockDeltaEvent,
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
        )
        for p in parts
    ]
    events.append((RawContentBlockStopEvent, {"type": "content_block_stop", "index": 0}))
    out = []
    for sdk_type, data in events:
        strict(sdk_type, data)
        out.append(sse(data, event=data["type"]))
    return out


def delta_event(usage: dict[str, Any]) -> bytes:
    data = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": usage,
    }
    strict(RawMessageDeltaEvent, data)
    return sse(data, event="message_delta")


def stop_event() -> bytes:
    strict(RawMessageStopEvent, {"type": "message_stop"})
    return sse({"type": "message_stop"}, event="message_stop")


def call(canned: CannedServer, *, stream: bool) -> Any:
    return call_model(
        endpoint=canned.endpoint("anthropic"),
        model="claude-opus-4-1",
        system="You are the builder.",
        prompt="Phase 1",
        stream=stream,
        timeout=10,
    )


def test_the_usage_fields_are_the_sdks_own() -> None:
    usage = strict(Usage, USAGE)
    assert usage.cache_creation == CacheCreation(
        ephemeral_5m_input_tokens=1000, ephemeral_1h_input_tokens=2000
    )
    with pytest.raises(AssertionError, match="cache_creation_tokens"):
        strict(Usage, {**USAGE, "cache_creation_tokens": 3})


def test_cache_reads_5m_and_1h_writes_and_thinking_are_billed_as_anthropic_counts_them() -> None:
    assert anthropic_usage(strict(Usage, USAGE)) == BILLED


def test_without_a_cache_creation_breakdown_every_write_is_a_5_minute_write() -> None:
    raw = {k: v for k, v in USAGE.items() if k != "cache_creation"}
    usage = anthropic_usage(strict(Usage, raw))
    assert (usage.cache_write_tokens, usage.cache_write_1h_tokens) == (3000, 0)


def test_a_plain_call_records_the_usage_and_the_reported_snapshot(canned: CannedServer) -> None:
    canned.answer(Canned([message(USAGE)]))
    response = call(canned, stream=False)
    assert response.usage == BILLED
    assert (response.model, response.reported_model) == ("claude-opus-4-1", SNAPSHOT)
    assert response.text == "Done."  # the thinking block is not the reply


def test_a_stream_adds_message_start_and_the_cumulative_message_deltas(
    canned: CannedServer,
) -> None:
    # Two deltas: their counts are cumulative, so the last one replaces the first (350, not
    # 450); the second also restates the input counts, as the current API does.
    body = [
        start_event(),
        *text_events("Do", "ne."),
        delta_event({"output_tokens": 100}),
        delta_event(
            {
                "input_tokens": 12,
                "cache_creation_input_tokens": 3000,
                "cache_read_input_tokens": 8000,
                "output_tokens": 640,
                "output_tokens_details": {"thinking_tokens": 512},
            }
        ),
        stop_event(),
    ]
    canned.answer(Canned(body, content_type="text/event-stream"))
    response = call(canned, stream=True)
    assert response.text == "Done." and response.reported_model == SNAPSHOT
    assert response.usage == BILLED


def test_a_stream_cut_after_message_start_keeps_the_billed_input(canned: CannedServer) -> None:
    canned.answer(Canned([start_event(), *text_events("Do")], content_type="text/event-stream"))
    with pytest.raises(ProviderCallError) as caught:
        call(canned, stream=True)
    error = caught.value
    assert (error.kind, error.retryable, error.stream_cut) == ("malformed", True, True)
    assert error.reported_model == SNAPSHOT
    assert error.partial_usage == TokenUsage(
        prompt_tokens=11012,
        completion_tokens=1,
        cached_input_tokens=8000,
        cache_write_tokens=3000,
        cache_write_1h_tokens=2000,
    )


def test_a_connection_reset_after_a_message_delta_keeps_what_was_reported(
    canned: CannedServer,
) -> None:
    body = [start_event(), *text_events("Do"), delta_event({"output_tokens": 100})]
    canned.answer(Canned(body, content_type="text/event-stream", complete=False))
    with pytest.raises(ProviderCallError) as caught:
        call(canned, stream=True)
    error = caught.value
    assert error.kind == "connection" and error.stream_cut
    assert error.partial_usage is not None
    assert (error.partial_usage.prompt_tokens, error.partial_usage.completion_tokens) == (
        11012,
        100,
    )


def test_a_stream_cut_before_message_start_reported_nothing(canned: CannedServer) -> None:
    canned.answer(Canned([b": ping\n\n"], content_type="text/event-stream", complete=False))
    with pytest.raises(ProviderCallError) as caught:
        call(canned, stream=True)
    assert caught.value.stream_cut and caught.value.partial_usage is None


# --- the same rules against the simulated provider ---------------------------------------------

LONG = "Stable context that a provider would cache between calls.\n" * 120
BUILDER = "Autopack-Role: builder\nAttempt: 1\nPhase 2: Add export\nCategory: backend\n"


def sim_call(sim: SimulatedProvider, *, stream: bool) -> Any:
    return call_model(
        endpoint=sim.provider_config("anthropic"),
        model="claude-sonnet-4-5",
        system="You are the builder.",
        prompt=LONG + BUILDER,
        stream=stream,
        timeout=10,
    )


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_anthropic_counts_cache_reads_and_writes_as_prompt_tokens(
    sim: SimulatedProvider, stream: bool
) -> None:
    usage = sim_call(sim, stream=stream).usage
    raw = sim.requests()[-1]["usage"]
    assert usage.cache_write_tokens == raw["cache_creation_input_tokens"] > 0
    assert usage.cached_input_tokens == raw["cache_read_input_tokens"] > 0
    assert usage.prompt_tokens == (
        raw["input_tokens"] + raw["cache_creation_input_tokens"] + raw["cache_read_input_tokens"]
    )
    assert usage.completion_tokens == raw["output_tokens"]


def test_anthropic_thinking_tokens_are_read_from_output_tokens_details(
    sim: SimulatedProvider,
) -> None:
    import anthropic

    sdk = anthropic.Anthropic(
        api_key="sim-anthropic-key", base_url=sim.base_url("anthropic"), max_retries=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reply = sdk.messages.create(
            model="claude-opus-4-1",
            max_tokens=4096,
            thinking={"type": "enabled", "budget_tokens": 2048},
            messages=[{"role": "user", "content": BUILDER}],
        )
    usage = anthropic_usage(reply.usage)
    assert 0 < usage.reasoning_tokens < usage.completion_tokens == reply.usage.output_tokens
