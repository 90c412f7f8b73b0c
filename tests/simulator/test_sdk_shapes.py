"""The simulator's replies as the real SDKs parse them: the reported model, every usage field
the providers bill by, and streams cut part-way (issue 14, "usage that matches the bill").

Field names are checked against the SDKs' own types: OpenAI's and Anthropic's models keep an
unknown field in `model_extra`, so a misspelt one shows there; Gemini's types forbid extras.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from google import genai
from google.genai import types as gtypes

from tests.sim_fixtures import SimulatedProvider
from tests.simulator.test_wire import BUILDER, LONG, raw_call, sse_data

SYSTEM = "You are the builder."


def openai_client(sim: SimulatedProvider, name: str = "openai") -> openai.OpenAI:
    return openai.OpenAI(api_key="sim-key-1", base_url=sim.base_url(name), max_retries=0)


def anthropic_client(sim: SimulatedProvider) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="sim-key-1", base_url=sim.base_url("anthropic"), max_retries=0
    )


@pytest.fixture
def gemini(sim: SimulatedProvider) -> Iterator[genai.Client]:
    # Held for the test: the client closes its HTTP client when it is garbage-collected.
    client = genai.Client(
        api_key="sim-key-1",
        http_options=gtypes.HttpOptions(base_url=sim.base_url("google_gemini"), timeout=10_000),
    )
    yield client
    client.close()


def no_extras(*models: Any) -> None:
    """No field the SDK's type does not know (a misspelt name would land here)."""
    for model in models:
        assert not model.model_extra, f"{type(model).__name__}: {model.model_extra}"


def last_entry(sim: SimulatedProvider) -> dict[str, Any]:
    return sim.requests()[-1]


# --- OpenAI ------------------------------------------------------------------------------------


def test_openai_reports_the_dated_snapshot_with_reasoning_cached_and_prediction_tokens(
    sim: SimulatedProvider,
) -> None:
    prompt = LONG + BUILDER
    reply = openai_client(sim).chat.completions.create(
        model="gpt-5",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
        prediction={"type": "content", "content": "Files touched:\nSomething else entirely\n"},
    )
    usage = reply.usage
    assert usage is not None
    assert usage.completion_tokens_details is not None and usage.prompt_tokens_details is not None
    no_extras(reply, usage, usage.completion_tokens_details, usage.prompt_tokens_details)
    assert reply.model == "gpt-5-2025-08-07"
    details = usage.completion_tokens_details
    assert details.reasoning_tokens and details.reasoning_tokens > 0
    assert details.accepted_prediction_tokens and details.accepted_prediction_tokens > 0
    assert details.rejected_prediction_tokens and details.rejected_prediction_tokens > 0
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached and 0 < cached < usage.prompt_tokens
    # Rejected prediction tokens are billed as output on top of the visible reply.
    visible = (
        usage.completion_tokens - details.reasoning_tokens - details.rejected_prediction_tokens
    )
    assert visible >= details.accepted_prediction_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    entry = last_entry(sim)
    assert (entry["model"], entry["reported_model"]) == ("gpt-5", "gpt-5-2025-08-07")
    assert entry["usage"] == usage.model_dump(exclude_none=True)


def test_openai_without_a_prediction_reports_zero_prediction_tokens(sim: SimulatedProvider) -> None:
    reply = openai_client(sim).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": BUILDER}]
    )
    assert reply.model == "gpt-4o-mini-2024-07-18"
    assert reply.usage is not None and reply.usage.completion_tokens_details is not None
    details = reply.usage.completion_tokens_details
    assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (0, 0)
    assert details.reasoning_tokens == 0


def test_openai_stream_puts_usage_on_a_last_chunk_with_empty_choices(
    sim: SimulatedProvider,
) -> None:
    chunks = list(
        openai_client(sim).chat.completions.create(
            model="gpt-5-mini",
            messages=[{"role": "user", "content": BUILDER}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for chunk in chunks:
        no_extras(chunk, *chunk.choices)
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert body[-1].choices[0].finish_reason == "stop"
    assert {c.model for c in chunks} == {"gpt-5-mini-2025-08-07"}
    details = last.usage.completion_tokens_details
    assert details is not None and details.reasoning_tokens and details.reasoning_tokens > 0
    assert last.usage.model_dump(exclude_none=True) == last_entry(sim)["usage"]


def test_openai_stream_without_include_usage_carries_no_usage(sim: SimulatedProvider) -> None:
    chunks = list(
        openai_client(sim).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": BUILDER}], stream=True
        )
    )
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "stop"


def test_glm_echoes_the_model_and_puts_usage_on_its_finish_chunk(sim: SimulatedProvider) -> None:
    client = openai_client(sim, "glm")
    chunks = list(
        client.chat.completions.create(
            model="glm-4.6", messages=[{"role": "user", "content": LONG + BUILDER}], stream=True
        )
    )
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0] is chunks[-1]
    usage = finish[0].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens
    assert usage.completion_tokens_details is None  # GLM does not send OpenAI's details
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.model for c in chunks} == {"glm-4.6"}
    reply = client.chat.completions.create(
        model="glm-4.6", messages=[{"role": "user", "content": LONG + BUILDER}]
    )
    assert reply.model == "glm-4.6" and reply.usage is not None
    no_extras(reply.usage, reply.usage.prompt_tokens_details)
    assert reply.usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details is not None
    assert (
        reply.usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens_details.cached_tokens
    )


def test_openai_cut_stream_ends_mid_content_before_any_usage(sim: SimulatedProvider) -> None:
    sim.add_fault(kind="cut_stream", provider="openai", after=2)
    seen = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in openai_client(sim).chat.completions.create(
            model="gpt-5",
            messages=[{"role": "user", "content": BUILDER}],
            stream=True,
            stream_options={"include_usage": True},
        ):
            seen.append(chunk)
    # The role chunk and two content chunks; no finish reason, no usage.
    assert len(seen) == 3 and all(c.usage is None for c in seen)
    assert [c.choices[0].finish_reason for c in seen] == [None, None, None]
    entry = last_entry(sim)
    assert entry["outcome"] == "cut_stream" and entry["partial_usage"] is None


# --- Anthropic ---------------------------------------------------------------------------------


def anthropic_create(sim: SimulatedProvider, system: Any = SYSTEM, **kwargs: Any) -> Any:
    return anthropic_client(sim).messages.create(
        model=kwargs.pop("model", "claude-sonnet-4-5"),
        max_tokens=2048,
        system=system,
        messages=[{"role": "user", "content": kwargs.pop("prompt", LONG + BUILDER)}],
        **kwargs,
    )


def test_anthropic_reports_the_snapshot_and_5_minute_cache_writes_by_default(
    sim: SimulatedProvider,
) -> None:
    message = anthropic_create(sim)
    usage = message.usage
    assert usage.cache_creation is not None
    no_extras(message, usage, usage.cache_creation)
    assert message.model == "claude-sonnet-4-5-20250929"
    writes = usage.cache_creation_input_tokens
    assert writes and usage.cache_read_input_tokens
    assert usage.cache_creation.ephemeral_5m_input_tokens == writes
    assert usage.cache_creation.ephemeral_1h_input_tokens == 0
    assert last_entry(sim)["reported_model"] == "claude-sonnet-4-5-20250929"


def cached_system(*ttls: str | None) -> list[dict[str, Any]]:
    """A system prompt in blocks, each a cache breakpoint with that TTL (None: the default)."""
    blocks = []
    for n, ttl in enumerate(ttls):
        control: dict[str, Any] = {"type": "ephemeral"}
        if ttl:
            control["ttl"] = ttl
        blocks.append({"type": "text", "text": f"{SYSTEM} part {n}", "cache_control": control})
    return blocks


def test_anthropic_writes_to_the_1_hour_cache_when_the_request_asks_for_it(
    sim: SimulatedProvider,
) -> None:
    usage = anthropic_create(sim, system=cached_system("1h")).usage
    assert usage.cache_creation is not None and usage.cache_creation_input_tokens
    assert usage.cache_creation.ephemeral_1h_input_tokens == usage.cache_creation_input_tokens
    assert usage.cache_creation.ephemeral_5m_input_tokens == 0


def test_anthropic_splits_writes_between_both_ttls_and_they_add_up(sim: SimulatedProvider) -> None:
    usage = anthropic_create(sim, system=cached_system("1h", None)).usage
    cache = usage.cache_creation
    assert cache is not None and cache.ephemeral_1h_input_tokens and cache.ephemeral_5m_input_tokens
    total = cache.ephemeral_1h_input_tokens + cache.ephemeral_5m_input_tokens
    assert total == usage.cache_creation_input_tokens


def test_a_script_rule_puts_a_calls_cache_writes_in_the_1_hour_cache(
    sim: SimulatedProvider,
) -> None:
    sim.add_script(provider="anthropic", cache_ttl="1h")
    first = anthropic_create(sim).usage
    second = anthropic_create(sim).usage  # the rule is used up
    assert first.cache_creation is not None and second.cache_creation is not None
    assert first.cache_creation.ephemeral_1h_input_tokens == first.cache_creation_input_tokens
    assert second.cache_creation.ephemeral_1h_input_tokens == 0
    # The same request, the same reply text: only where the writes went differs.
    assert first.cache_creation_input_tokens == second.cache_creation_input_tokens


def test_anthropic_thinking_is_counted_in_output_tokens(sim: SimulatedProvider) -> None:
    message = anthropic_create(
        sim, model="claude-opus-4-1", thinking={"type": "enabled", "budget_tokens": 1024}
    )
    usage = message.usage
    assert message.model == "claude-opus-4-1-20250805"
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert usage.output_tokens_details is not None
    no_extras(usage.output_tokens_details)
    assert 0 < usage.output_tokens_details.thinking_tokens < usage.output_tokens


def test_anthropic_stream_sends_input_usage_first_and_cumulative_output_last(
    sim: SimulatedProvider,
) -> None:
    events = list(anthropic_create(sim, system=cached_system("1h"), stream=True))
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and delta.type == "message_delta"
    assert start.message.model == "claude-sonnet-4-5-20250929"
    first = start.message.usage
    assert first.cache_creation is not None
    assert first.cache_creation.ephemeral_1h_input_tokens == first.cache_creation_input_tokens
    assert first.output_tokens == 1 and first.cache_read_input_tokens
    no_extras(delta.usage)
    final = last_entry(sim)["usage"]
    assert delta.usage.output_tokens == final["output_tokens"]
    assert delta.usage.input_tokens == first.input_tokens == final["input_tokens"]


def test_anthropic_cut_stream_ends_after_message_start_without_a_message_delta(
    sim: SimulatedProvider,
) -> None:
    sim.add_fault(kind="cut_stream", provider="anthropic", after=1)
    seen = []
    with pytest.raises(anthropic.APIConnectionError):
        for event in anthropic_create(sim, stream=True):
            seen.append(event)
    types = [e.type for e in seen]
    assert types[0] == "message_start" and "message_delta" not in types
    assert types.count("content_block_delta") == 1
    start_usage = seen[0].message.usage
    assert start_usage.input_tokens and start_usage.cache_read_input_tokens
    entry = last_entry(sim)
    assert entry["outcome"] == "cut_stream" and entry["usage"] is None
    assert entry["partial_usage"] == start_usage.model_dump(exclude_none=True)


# --- Gemini ------------------------------------------------------------------------------------


def gemini_config(**kwargs: Any) -> gtypes.GenerateContentConfig:
    return gtypes.GenerateContentConfig(system_instruction=SYSTEM, **kwargs)


def test_gemini_reports_cached_thoughts_and_tool_use_prompt_tokens(
    sim: SimulatedProvider, gemini: genai.Client
) -> None:
    tool = gtypes.Tool(google_search=gtypes.GoogleSearch())
    reply = gemini.models.generate_content(
        model="gemini-2.5-flash", contents=LONG + BUILDER, config=gemini_config(tools=[tool])
    )
    meta = reply.usage_metadata
    assert meta is not None and reply.model_version == "gemini-2.5-flash"
    assert meta.cached_content_token_count and meta.thoughts_token_count
    assert meta.tool_use_prompt_token_count and meta.prompt_token_count
    assert meta.candidates_token_count
    assert meta.total_token_count == (
        meta.prompt_token_count
        + meta.tool_use_prompt_token_count
        + meta.candidates_token_count
        + meta.thoughts_token_count
    )
    # The whole body as sent is a valid GenerateContentResponse (its types forbid extras).
    assert last_entry(sim)["usage"] == meta.model_dump(
        by_alias=True, exclude_none=True, mode="json"
    )


def test_gemini_without_tools_reports_no_tool_use_prompt(
    sim: SimulatedProvider, gemini: genai.Client
) -> None:
    reply = gemini.models.generate_content(
        model="gemini-2.5-pro", contents=BUILDER, config=gemini_config()
    )
    assert reply.usage_metadata is not None
    assert reply.usage_metadata.tool_use_prompt_token_count is None


def test_gemini_names_the_version_behind_an_alias(
    sim: SimulatedProvider, gemini: genai.Client
) -> None:
    reply = gemini.models.generate_content(
        model="gemini-flash-latest", contents=BUILDER, config=gemini_config()
    )
    assert reply.model_version == "gemini-2.5-flash-preview-09-2025"
    entry = last_entry(sim)
    assert (entry["model"], entry["reported_model"]) == (
        "gemini-flash-latest",
        "gemini-2.5-flash-preview-09-2025",
    )


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_bodies_validate_against_the_sdk_types(sim: SimulatedProvider, stream: bool) -> None:
    _status, _headers, body = raw_call(sim, "google_gemini", LONG + BUILDER, stream=stream)
    payloads = [json.loads(d) for d in sse_data(body)] if stream else [json.loads(body)]
    for payload in payloads:
        gtypes.GenerateContentResponse.model_validate(payload)


def gemini_stream(gemini: genai.Client, model: str = "gemini-2.5-flash") -> Iterator[Any]:
    return gemini.models.generate_content_stream(
        model=model, contents=LONG + BUILDER, config=gemini_config()
    )


def test_gemini_stream_chunks_each_carry_cumulative_usage_and_the_model_version(
    sim: SimulatedProvider,
    gemini: genai.Client,
) -> None:
    chunks = list(gemini_stream(gemini))
    assert len(chunks) > 2
    metas = [c.usage_metadata for c in chunks]
    assert all(m is not None for m in metas)
    outputs = [m.candidates_token_count for m in metas]
    assert outputs == sorted(outputs)
    assert {c.model_version for c in chunks} == {"gemini-2.5-flash"}
    assert all(m.thoughts_token_count and m.cached_content_token_count for m in metas)
    assert [c.candidates[0].finish_reason for c in chunks][-1] == gtypes.FinishReason.STOP
    assert all(c.candidates[0].finish_reason is None for c in chunks[:-1])
    last = metas[-1].model_dump(by_alias=True, exclude_none=True, mode="json")
    assert last == last_entry(sim)["usage"]


def test_gemini_cut_stream_ends_after_some_chunks_with_usage_before_the_final_one(
    sim: SimulatedProvider,
    gemini: genai.Client,
) -> None:
    sim.add_fault(kind="cut_stream", provider="google_gemini", after=2)
    seen = []
    with pytest.raises(Exception) as caught:  # the SDK lets its HTTP library's error through
        for chunk in gemini_stream(gemini):
            seen.append(chunk)
    assert type(caught.value).__name__ == "RemoteProtocolError"  # the body ended early
    assert len(seen) == 2 and all(c.usage_metadata is not None for c in seen)
    assert all(c.candidates[0].finish_reason is None for c in seen)
    entry = last_entry(sim)
    assert entry["outcome"] == "cut_stream" and entry["usage"] is None
    partial = seen[-1].usage_metadata.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert entry["partial_usage"] == partial


def test_a_cut_stream_rule_refuses_a_negative_after(sim: SimulatedProvider) -> None:
    from tests.sim_fixtures import SimulatorError

    with pytest.raises(SimulatorError, match="after"):
        sim.add_fault(kind="cut_stream", after=-1)
