"""One model call, and the retry policy around it (DESIGN.md step 3), for every provider.

`call_model` makes exactly one HTTP attempt through the endpoint's provider module
(routing/providers) and turns every outcome into either a `ModelResponse` (text + normalised
`TokenUsage` + the model the provider reports) or a `ProviderCallError` with a stable `kind`.
`call_with_retries` owns the retry policy; the SDKs' own retries are switched off so that
every failed attempt is seen (and reported through `on_failure`) here.

Keys are read from the environment at call time and live only inside the SDK client objects;
they never appear in messages, logs or cache keys.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

from .providers import (
    Endpoint,
    ModelResponse,
    ProviderCallError,
    ProviderNotConfigured,
    StreamProgress,
    UnknownProtocol,
    provider_for,
)
from .text import storable

# A provider asking for a longer pause than this is better treated as "try another model":
# a phase must not sit in a worker for minutes on one Retry-After.
MAX_RETRY_AFTER_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 30.0

__all__ = [
    "MAX_BACKOFF_SECONDS",
    "MAX_RETRY_AFTER_SECONDS",
    "ModelResponse",
    "ProviderCallError",
    "ProviderNotConfigured",
    "call_model",
    "call_with_retries",
    "exhausted",
    "retry_delay",
]


def call_model(
    *,
    endpoint: Endpoint,
    model: str,
    system: str,
    prompt: str,
    max_tokens: int = 2048,
    stream: bool = False,
    timeout: float,
) -> ModelResponse:
    """One attempt, no retries. Raises ProviderCallError (ProviderNotConfigured without a key).

    A stream that fails after it started carries what the provider had reported by then
    (ProviderCallError.partial_usage, .reported_model, .stream_cut)."""
    key = os.environ.get(endpoint.api_key_env, "").strip()
    if not key:
        raise ProviderNotConfigured(provider=endpoint.name, api_key_env=endpoint.api_key_env)
    try:
        provider = provider_for(endpoint)
    except UnknownProtocol as exc:
        raise ProviderCallError(
            provider=endpoint.name, kind="bad_request", message=str(exc), retryable=False
        ) from None
    progress = StreamProgress()
    started = time.monotonic()
    try:
        reply = provider.call(
            endpoint,
            key,
            model=model,
            system=system,
            prompt=prompt,
            max_tokens=max_tokens,
            stream=stream,
            timeout=timeout,
            progress=progress,
        )
    except ProviderCallError as error:
        progress.attach_to(error)
        raise
    except Exception as exc:
        # `from None`: the SDK exception (and its request object) stays out of tracebacks
        # that get logged, so nothing the SDK attached to it can leak.
        raise progress.attach_to(provider.classify(endpoint, exc, key)) from None
    # The edge where a provider's text enters: a reply can carry a NUL or a lone surrogate
    # (a JSON escape), which PostgreSQL cannot store; keep the rest of the reply.
    return ModelResponse(
        text=storable(reply.text),
        usage=reply.usage,
        provider_request_id=storable(reply.provider_request_id),
        model=model,
        latency_ms=int((time.monotonic() - started) * 1000),
        reported_model=storable(reply.reported_model),
        limits=reply.limits,
    )


def exhausted(error: ProviderCallError) -> bool:
    """A refusal for a spent limit that says when it comes back: retrying the same provider
    before then cannot succeed."""
    return error.spends_limit and error.announced_reset is not None


def retry_delay(error: ProviderCallError, attempt: int, backoff_seconds: float) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): exponential backoff, or the
    provider's Retry-After when it asks for longer (capped)."""
    delay = min(MAX_BACKOFF_SECONDS, backoff_seconds * 2 ** (attempt - 1))
    if error.kind == "rate_limited" and error.retry_after is not None:
        delay = max(delay, min(error.retry_after, MAX_RETRY_AFTER_SECONDS))
    return delay if math.isfinite(delay) else MAX_BACKOFF_SECONDS


def call_with_retries(
    *,
    endpoint: Endpoint,
    model: str,
    system: str,
    prompt: str,
    stream: bool = False,
    timeout: float,
    max_retries: int,
    backoff_seconds: float,
    max_tokens: int = 2048,
    on_failure: Callable[[ProviderCallError, int], None] | None = None,
    sleep: Callable[[float], Any] = time.sleep,
    fallback_available: bool = False,
) -> ModelResponse:
    """call_model, retrying transient failures (429, 5xx, timeout, connection, malformed) up
    to max_retries times; auth, insufficient_quota and bad_request are raised at once.

    A 429 that announces when the limit comes back (Retry-After, a reset header) says the
    provider is spent until then: with a fallback available it is raised at once, so the
    caller moves to the fallback instead of waiting on the exhausted provider. A bare 429
    (no reset information) is retried as any transient error.

    on_failure(error, attempt) is called for every failed attempt, the last one included.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return call_model(
                endpoint=endpoint,
                model=model,
                system=system,
                prompt=prompt,
                max_tokens=max_tokens,
                stream=stream,
                timeout=timeout,
            )
        except ProviderCallError as error:
            error.left_for_fallback = fallback_available and error.retryable and exhausted(error)
            if on_failure is not None:
                on_failure(error, attempt)
            if not error.retryable or attempt > max_retries or error.left_for_fallback:
                raise
            sleep(retry_delay(error, attempt, backoff_seconds))
