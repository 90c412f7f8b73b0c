"""Metering an SDK response an agent got itself, with the workers' exact normalisation.

A Python agent that calls a provider through its own SDK client hands the response object
over; its usage is read by the same function the workers use for that wire format
(routing.providers: openai_usage, anthropic_usage, gemini_usage), so an agent's call and a
worker's call of the same shape count the same tokens. The model the provider says answered
is kept as the reported model.

Two ways in:

- In the Django process (a management command, a shell, an in-process agent):
  `meter_response(response, role="agent:planner")` checks the event exactly as
  POST /usage/events does (runs.usage_ingest.usage_events_check) and records it.
- A script outside it: `event_from_response(response, role="agent:planner")` is the event as
  POST /usage/events takes it, a plain JSON-ready dict. This module imports no Django model at
  load time, so a script may import it without Django's settings (it needs the project's
  package and the SDK it uses, nothing else); README "Recording usage from outside".

The response's own id (`chatcmpl-…`, `msg_…`, Gemini's responseId) makes the default call_id,
prefixed by the provider: metering the same response twice counts it once.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from routing.providers.anthropic import anthropic_usage
from routing.providers.gemini import gemini_usage
from routing.providers.openai import openai_usage
from usage.types import TokenUsage

# Which provider a response came from when the caller does not say: the provider names of
# DESIGN.md whose wire format the response has. GLM and any OpenAI-compatible server answer
# in OpenAI's format, so their callers pass provider="glm" (or their provider's name).
DEFAULT_PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "gemini": "google_gemini"}


class UnknownResponse(TypeError):
    """Not a response this module can read the usage of (or one that carries none)."""


def _kind(response: Any) -> str:
    """The wire format of an SDK response object: openai, anthropic or gemini.

    By the SDKs' own types where the SDK is installed (a script may have only one of them)."""
    try:
        from openai.types.chat import ChatCompletion, ChatCompletionChunk

        if isinstance(response, ChatCompletion | ChatCompletionChunk):
            return "openai"
    except ImportError:  # pragma: no cover - an agent without the openai SDK
        pass
    try:
        from anthropic.types import Message

        if isinstance(response, Message):
            return "anthropic"
    except ImportError:  # pragma: no cover
        pass
    try:
        from google.genai.types import GenerateContentResponse

        if isinstance(response, GenerateContentResponse):
            return "gemini"
    except ImportError:  # pragma: no cover
        pass
    raise UnknownResponse(
        f"cannot meter a {type(response).__name__}: pass an OpenAI ChatCompletion (or the "
        "stream's last chunk, with usage), an Anthropic Message (a stream's "
        "get_final_message()) or a google-genai GenerateContentResponse"
    )


def response_usage(response: Any) -> tuple[str, TokenUsage, str, str]:
    """(wire format, tokens, reported model, the response's id) of an SDK response, read as
    the workers read it."""
    kind = _kind(response)
    if kind == "openai":
        if response.usage is None:
            raise UnknownResponse(
                "the OpenAI response carries no usage (a stream's last chunk "
                "has it when stream_options.include_usage is set)"
            )
        return kind, openai_usage(response.usage), response.model or "", response.id or ""
    if kind == "anthropic":
        return kind, anthropic_usage(response.usage), response.model or "", response.id or ""
    if response.usage_metadata is None:
        raise UnknownResponse("the Gemini response carries no usage_metadata")
    return (
        kind,
        gemini_usage(response.usage_metadata),
        response.model_version or "",
        response.response_id or "",
    )


def event_from_response(
    response: Any,
    *,
    role: str,
    provider: str | None = None,
    model: str | None = None,
    run: int | None = None,
    phase: int | None = None,
    call_id: str | None = None,
    time: datetime | None = None,
) -> dict[str, Any]:
    """The event POST /usage/events takes for this response (a JSON-ready dict).

    `provider` defaults from the response's wire format (DEFAULT_PROVIDERS; pass it for GLM
    or a compatible server); `model` is the model asked for, by default the one that answered;
    `call_id` defaults to "<provider>:<the response's id>" (a fresh one if it has none); `time`
    (aware) defaults to the server's now."""
    kind, usage, reported, response_id = response_usage(response)
    provider = provider or DEFAULT_PROVIDERS[kind]
    if call_id is None:
        call_id = f"{provider}:{response_id}" if response_id else f"{provider}:{uuid.uuid4().hex}"
    event: dict[str, Any] = {
        "provider": provider,
        "model": model or reported,
        "reported_model": reported,
        "role": role,
        "call_id": call_id,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "provider_request_id": response_id,
    }
    if run is not None:
        event["run"] = run
    if phase is not None:
        event["phase"] = phase
    if time is not None:
        event["time"] = time.isoformat()
    return event


def meter_response(
    response: Any,
    *,
    role: str = "agent:planner",
    provider: str | None = None,
    model: str | None = None,
    run: int | None = None,
    phase: int | None = None,
    call_id: str | None = None,
    time: datetime | None = None,
) -> bool:
    """Record this response's usage in this process; True when it was new, False when its
    call_id had been recorded before. Checked exactly as POST /usage/events checks an event:
    a bad role, an unknown provider, run or phase raise rest_framework's ValidationError (its
    `detail` names the field) and nothing is stored."""
    # Here, not at the top: event_from_response must import without Django's settings.
    from .usage_ingest import usage_events_check, usage_events_store

    event = event_from_response(
        response,
        role=role,
        provider=provider,
        model=model,
        run=run,
        phase=phase,
        call_id=call_id,
        time=time,
    )
    records = usage_events_check([event], batch=False)
    return bool(usage_events_store(records)["new"])
