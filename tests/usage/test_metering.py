"""Metering an SDK response an agent got itself (runs.metering): real SDK response objects from
the simulated provider over HTTP, read as the workers read them (routing.providers' normalisers:
the expected numbers below are worked out from the raw SDK fields, as each normaliser's
docstring says the provider counts them)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import openai
import pytest
from google import genai
from google.genai import types as gtypes
from rest_framework.exceptions import ValidationError

from runs.metering import UnknownResponse, event_from_response, meter_response
from tests.sim_fixtures import SimulatedProvider
from tests.simulator.test_wire import BUILDER, LONG
from usage.models import UsageEvent

pytestmark = pytest.mark.django_db
PROMPT = LONG + BUILDER


def openai_client(sim: SimulatedProvider, name: str = "openai") -> openai.OpenAI:
    return openai.OpenAI(api_key="sim-key-1", base_url=sim.base_url(name), max_retries=0)


@pytest.fixture
def gemini(sim: SimulatedProvider) -> Iterator[genai.Client]:
    client = genai.Client(
        api_key="sim-key-1",
        http_options=gtypes.HttpOptions(base_url=sim.base_url("google_gemini"), timeout=10_000),
    )
    yield client
    client.close()


def tokens(event: UsageEvent) -> tuple[int, ...]:
    return (
        event.prompt_tokens,
        event.completion_tokens,
        event.cached_input_tokens,
        event.cache_write_tokens,
        event.cache_write_1h_tokens,
        event.reasoning_tokens,
    )


def test_an_openai_response_is_metered_once_with_its_snapshot_and_cached_and_reasoning_parts(
    sim: SimulatedProvider,
) -> None:
    reply = openai_client(sim).chat.completions.create(
        model="gpt-5", messages=[{"role": "user", "content": PROMPT}]
    )
    assert meter_response(reply, role="agent:planner", model="gpt-5") is True
    assert meter_response(reply, role="agent:planner", model="gpt-5") is False  # counted once
    event = UsageEvent.objects.get()
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens_details and usage.completion_tokens_details
    cached = usage.prompt_tokens_details.cached_tokens or 0
    reasoning = usage.completion_tokens_details.reasoning_tokens or 0
    assert cached and reasoning
    # prompt_tokens already includes the cached part, completion_tokens the reasoning.
    assert tokens(event) == (usage.prompt_tokens, usage.completion_tokens, cached, 0, 0, reasoning)
    assert (event.provider, event.model, event.reported_model) == ("openai", "gpt-5", reply.model)
    assert reply.model == "gpt-5-2025-08-07"
    assert (event.role, event.call_id) == ("agent:planner", f"openai:{reply.id}")
    assert event.source == "api"


def test_an_anthropic_message_adds_its_cache_reads_and_writes_back_into_the_input(
    sim: SimulatedProvider,
) -> None:
    system = [
        {"type": "text", "text": "part 0", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        {"type": "text", "text": "part 1", "cache_control": {"type": "ephemeral"}},
    ]
    message = anthropic.Anthropic(
        api_key="sim-key-1", base_url=sim.base_url("anthropic"), max_retries=0
    ).messages.create(
        model="claude-sonnet-4-5",
        max_tokens=1024,
        system=system,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": PROMPT}],
    )
    assert meter_response(message, role="agent:reviewer") is True
    event = UsageEvent.objects.get()
    usage = message.usage
    reads = usage.cache_read_input_tokens or 0
    writes = usage.cache_creation_input_tokens or 0
    assert usage.cache_creation is not None
    writes_1h = usage.cache_creation.ephemeral_1h_input_tokens
    assert reads and writes and 0 < writes_1h < writes
    # Anthropic's input_tokens excludes cache reads and writes.
    assert tokens(event) == (
        usage.input_tokens + reads + writes,
        usage.output_tokens,
        reads,
        writes,
        writes_1h,
        0,
    )
    assert (event.provider, event.model, event.reported_model) == (
        "anthropic",
        "claude-sonnet-4-5-20250929",
        "claude-sonnet-4-5-20250929",
    )


def test_a_gemini_response_adds_thoughts_to_the_output_and_tool_use_to_the_input(
    sim: SimulatedProvider, gemini: genai.Client
) -> None:
    tool = gtypes.Tool(google_search=gtypes.GoogleSearch())
    reply = gemini.models.generate_content(
        model="gemini-2.5-flash",
        contents=PROMPT,
        config=gtypes.GenerateContentConfig(tools=[tool]),
    )
    assert meter_response(reply, role="agent:search", model="gemini-2.5-flash") is True
    event = UsageEvent.objects.get()
    meta = reply.usage_metadata
    assert meta is not None
    prompt, tool_use = meta.prompt_token_count or 0, meta.tool_use_prompt_token_count or 0
    candidates, thoughts = meta.candidates_token_count or 0, meta.thoughts_token_count or 0
    cached = meta.cached_content_token_count or 0
    assert tool_use and thoughts and cached
    # candidatesTokenCount excludes the thoughts; promptTokenCount excludes tool-use input.
    assert tokens(event) == (prompt + tool_use, candidates + thoughts, cached, 0, 0, thoughts)
    assert (event.provider, event.reported_model) == ("google_gemini", reply.model_version)


def test_glm_through_the_openai_sdk_is_metered_under_the_provider_it_names(
    sim: SimulatedProvider,
) -> None:
    reply = openai_client(sim, "glm").chat.completions.create(
        model="glm-4.6", messages=[{"role": "user", "content": PROMPT}]
    )
    meter_response(reply, role="agent:planner", provider="glm")
    event = UsageEvent.objects.get()
    assert (event.provider, event.model, event.call_id) == ("glm", "glm-4.6", f"glm:{reply.id}")


def test_the_event_for_a_script_is_plain_json_with_the_posts_field_names(
    sim: SimulatedProvider,
) -> None:
    reply = openai_client(sim).chat.completions.create(
        model="gpt-5-mini", messages=[{"role": "user", "content": BUILDER}]
    )
    event = event_from_response(reply, role="agent:planner", run=7, call_id="mine-1")
    assert json.loads(json.dumps(event)) == event
    assert event["call_id"] == "mine-1" and event["run"] == 7
    assert event["prompt_tokens"] == (reply.usage.prompt_tokens if reply.usage else None)


def test_a_bad_role_or_an_unknown_run_is_refused_as_the_api_refuses_it_and_nothing_is_stored(
    sim: SimulatedProvider,
) -> None:
    reply = openai_client(sim).chat.completions.create(
        model="gpt-5-mini", messages=[{"role": "user", "content": BUILDER}]
    )
    with pytest.raises(ValidationError) as refused:
        meter_response(reply, role="planner")
    assert "role" in refused.value.detail
    with pytest.raises(ValidationError) as refused:
        meter_response(reply, role="agent:planner", run=10**12)
    assert "run" in refused.value.detail
    assert UsageEvent.objects.count() == 0


def test_anything_but_an_sdk_response_is_refused_by_name() -> None:
    with pytest.raises(UnknownResponse, match="cannot meter a dict"):
        event_from_response({"usage": {"prompt_tokens": 1}}, role="agent:planner")
