"""Provider clients: one model call through the provider's official SDK (DESIGN.md step 3).

`call_model` makes exactly one HTTP attempt and turns every SDK outcome into either a
`ModelResponse` (text + normalised `TokenUsage`) or a `ProviderCallError` with a stable `kind`.
`call_with_retries` owns the retry policy; the SDKs' own retries are switched off so that
every failed attempt is seen (and reported through `on_failure`) here.

Keys are read from the environment at call time and live only inside the SDK client objects;
they never appear in messages, logs or cache keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from usage.types import TokenUsage

from .text import storable

try:  # the transport under all three SDKs; imported only to classify its errors
    import httpx2 as _httpx2
except ImportError:  # pragma: no cover - older SDK releases ride on httpx
    _httpx2 = None  # type: ignore[assignment]

ERROR_KINDS = (
    "rate_limited",
    "server_error",
    "timeout",
    "connection",
    "auth",
    "insufficient_quota",
    "bad_request",
    "malformed",
)
RETRYABLE_KINDS = frozenset({"rate_limited", "server_error", "timeout", "connection", "malformed"})
# A provider asking for a longer pause than this is better treated as "try another model":
# a phase must not sit in a worker for minutes on one Retry-After.
MAX_RETRY_AFTER_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 30.0
MAX_MESSAGE_CHARS = 500
# GLM's business codes for an exhausted balance / resource package (not a rate limit).
GLM_QUOTA_CODES = frozenset({"1113", "1304", "1308", "1309", "1310"})


@dataclass(frozen=True)
class ProviderConfig:
    """The effective config of one provider."""

    name: str  # openai | anthropic | google_gemini | glm | any other name (OpenAI-compatible)
    api_key_env: str  # env var holding the key
    base_url: str  # effective base URL (AUTOPACK_<NAME>_BASE_URL already applied)


@dataclass(frozen=True)
class ModelResponse:
    text: str
    usage: TokenUsage
    provider_request_id: str
    model: str
    latency_ms: int


class ProviderCallError(Exception):
    """One failed provider call, classified. `message` is the provider's own wording with any
    key scrubbed; it is safe to store and show."""

    def __init__(
        self,
        *,
        provider: str,
        kind: str,
        message: str,
        status_code: int | None = None,
        retry_after: float | None = None,
        retryable: bool | None = None,
    ) -> None:
        self.provider = provider
        self.kind = kind
        # The provider's own words end up in phase events and failure reasons (PostgreSQL).
        message = storable(message)
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after
        self.retryable = kind in RETRYABLE_KINDS if retryable is None else retryable
        status = f" {status_code}" if status_code is not None else ""
        super().__init__(f"{provider}: {kind}{status}: {message}")


class ProviderNotConfigured(ProviderCallError):
    """The provider's key env var is unset or empty: no call was made."""

    def __init__(self, *, provider: str, api_key_env: str) -> None:
        super().__init__(
            provider=provider,
            kind="auth",
            message=f"no API key: environment variable {api_key_env} is not set",
            retryable=False,
        )


# --- SDK clients ----------------------------------------------------------------------------

_clients: dict[tuple[str, ...], Any] = {}
_clients_lock = threading.Lock()
_MAX_CACHED_CLIENTS = 64


def _fingerprint(key: str) -> str:
    # The cache is keyed by a digest so that a rotated key gets a fresh client while the key
    # itself is never a dict key anyone could print.
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _cached_client(cache_key: tuple[str, ...], build: Callable[[], Any]) -> Any:
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            if len(_clients) >= _MAX_CACHED_CLIENTS:
                _clients.clear()
            client = _clients[cache_key] = build()
        return client


def _openai_client(provider: ProviderConfig, key: str) -> Any:
    import openai

    return _cached_client(
        ("openai", provider.name, provider.base_url, _fingerprint(key)),
        lambda: openai.OpenAI(api_key=key, base_url=provider.base_url or None, max_retries=0),
    )


def _anthropic_client(provider: ProviderConfig, key: str) -> Any:
    import anthropic

    return _cached_client(
        ("anthropic", provider.name, provider.base_url, _fingerprint(key)),
        lambda: anthropic.Anthropic(api_key=key, base_url=provider.base_url or None, max_retries=0),
    )


def _gemini_client(provider: ProviderConfig, key: str, timeout: float) -> Any:
    from google import genai
    from google.genai import types

    # google-genai takes its timeout (in ms) per client, so the timeout is part of the key.
    timeout_ms = max(1, int(timeout * 1000))

    def build() -> Any:
        return genai.Client(
            api_key=key,
            http_options=types.HttpOptions(
                base_url=provider.base_url or None,
                timeout=timeout_ms,
                retry_options=types.HttpRetryOptions(attempts=1),
            ),
        )

    return _cached_client(
        ("google_gemini", provider.name, provider.base_url, _fingerprint(key), str(timeout_ms)),
        build,
    )


def clear_client_cache() -> None:
    with _clients_lock:
        _clients.clear()


# --- usage normalisation (usage/types.py: prompt includes cache reads AND writes) -----------


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def openai_usage(usage: Any) -> TokenUsage:
    """OpenAI / GLM / OpenAI-compatible: prompt_tokens already includes cached tokens and
    completion_tokens already includes reasoning tokens."""
    prompt_details = getattr(usage, "prompt_tokens_details", None)
    completion_details = getattr(usage, "completion_tokens_details", None)
    return TokenUsage(
        prompt_tokens=_int(usage.prompt_tokens),
        completion_tokens=_int(usage.completion_tokens),
        cached_input_tokens=_int(getattr(prompt_details, "cached_tokens", 0)),
        cache_write_tokens=_int(getattr(prompt_details, "cache_write_tokens", 0)),
        reasoning_tokens=_int(getattr(completion_details, "reasoning_tokens", 0)),
    )


def anthropic_usage(usage: Any) -> TokenUsage:
    """Anthropic: input_tokens excludes cache reads and writes, so they are added back;
    output_tokens already includes thinking."""
    reads = _int(getattr(usage, "cache_read_input_tokens", 0))
    writes = _int(getattr(usage, "cache_creation_input_tokens", 0))
    details = getattr(usage, "output_tokens_details", None)
    return TokenUsage(
        prompt_tokens=_int(usage.input_tokens) + reads + writes,
        completion_tokens=_int(usage.output_tokens),
        cached_input_tokens=reads,
        cache_write_tokens=writes,
        reasoning_tokens=_int(getattr(details, "thinking_tokens", 0)),
    )


def gemini_usage(meta: Any) -> TokenUsage:
    """Gemini: promptTokenCount includes cached content, but candidatesTokenCount EXCLUDES
    thoughts, which are billed as output and so added here."""
    thoughts = _int(meta.thoughts_token_count)
    return TokenUsage(
        prompt_tokens=_int(meta.prompt_token_count) + _int(meta.tool_use_prompt_token_count),
        completion_tokens=_int(meta.candidates_token_count) + thoughts,
        cached_input_tokens=_int(meta.cached_content_token_count),
        reasoning_tokens=thoughts,
    )


# --- error classification ---------------------------------------------------------------------


def _scrub(message: Any, key: str | None) -> str:
    text = str(message or "").strip() or "no message"
    if key and len(key) >= 8:  # shorter "keys" are test stubs and would mangle the words
        text = text.replace(key, "[redacted]")
    return text[:MAX_MESSAGE_CHARS]


def _retry_after(headers: Any) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _kind_for_status(status: int) -> str:
    if status in (401, 403):
        return "auth"
    if status == 402:
        return "insufficient_quota"
    if status == 408:
        return "timeout"
    if status == 429:
        return "rate_limited"
    if status == 409 or status >= 500:
        return "server_error"
    return "bad_request"


def _transport_error(provider: str, exc: BaseException) -> ProviderCallError | None:
    """Errors the transport raises outside the SDKs' own wrappers (google-genai, streams)."""
    if _httpx2 is not None:
        if isinstance(exc, _httpx2.TimeoutException):
            return ProviderCallError(provider=provider, kind="timeout", message="request timed out")
        if isinstance(exc, _httpx2.TransportError):
            return ProviderCallError(
                provider=provider, kind="connection", message=f"{type(exc).__name__}: {exc}"
            )
    if isinstance(exc, TimeoutError):
        return ProviderCallError(provider=provider, kind="timeout", message="request timed out")
    if isinstance(exc, ConnectionError):
        return ProviderCallError(provider=provider, kind="connection", message=str(exc))
    return None


def _malformed(provider: str, detail: str) -> ProviderCallError:
    return ProviderCallError(provider=provider, kind="malformed", message=detail)


def _openai_error(provider: ProviderConfig, exc: Exception, key: str) -> ProviderCallError:
    import openai

    name = provider.name
    if isinstance(exc, openai.APITimeoutError):
        return ProviderCallError(provider=name, kind="timeout", message="request timed out")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return ProviderCallError(
            provider=name, kind="connection", message=_scrub(f"{exc.message} ({cause!r})", key)
        )
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        message = _scrub(body.get("message") or exc.message, key)
        kind = _kind_for_status(exc.status_code)
        code = str(exc.code or "")
        if (
            code == "insufficient_quota"
            or exc.type == "insufficient_quota"
            or (name == "glm" and code in GLM_QUOTA_CODES)
        ):
            kind = "insufficient_quota"
        return ProviderCallError(
            provider=name,
            kind=kind,
            message=message,
            status_code=exc.status_code,
            retry_after=_retry_after(exc.response.headers) if kind == "rate_limited" else None,
        )
    if isinstance(exc, openai.APIResponseValidationError | json.JSONDecodeError):
        return _malformed(name, _scrub(f"unreadable response: {exc}", key))
    return _transport_error(name, exc) or _malformed(
        name, _scrub(f"{type(exc).__name__}: {exc}", key)
    )


def _anthropic_error(provider: ProviderConfig, exc: Exception, key: str) -> ProviderCallError:
    import anthropic

    name = provider.name
    if isinstance(exc, anthropic.APITimeoutError):
        return ProviderCallError(provider=name, kind="timeout", message="request timed out")
    if isinstance(exc, anthropic.APIConnectionError):
        cause = exc.__cause__ or exc
        return ProviderCallError(
            provider=name, kind="connection", message=_scrub(f"{exc.message} ({cause!r})", key)
        )
    if isinstance(exc, anthropic.APIStatusError):
        message = _scrub(exc.api_message or exc.message, key)
        kind = _kind_for_status(exc.status_code)
        if exc.type == "billing_error" or (
            exc.status_code == 400 and "credit balance" in message.lower()
        ):
            # Anthropic reports a spent balance as a 400; retrying cannot help.
            kind = "insufficient_quota"
        elif exc.type == "overloaded_error":
            kind = "server_error"
        return ProviderCallError(
            provider=name,
            kind=kind,
            message=message,
            status_code=exc.status_code,
            retry_after=_retry_after(exc.response.headers) if kind == "rate_limited" else None,
        )
    if isinstance(exc, anthropic.APIResponseValidationError | json.JSONDecodeError):
        return _malformed(name, _scrub(f"unreadable response: {exc}", key))
    return _transport_error(name, exc) or _malformed(
        name, _scrub(f"{type(exc).__name__}: {exc}", key)
    )


def _gemini_details(details: Any) -> list[dict[str, Any]]:
    error = details.get("error", details) if isinstance(details, dict) else {}
    items = error.get("details") if isinstance(error, dict) else None
    return [d for d in items or [] if isinstance(d, dict)]


def _gemini_error(provider: ProviderConfig, exc: Exception, key: str) -> ProviderCallError:
    from google.genai import errors

    name = provider.name
    if isinstance(exc, errors.APIError):
        status = int(exc.code or 0)
        message = _scrub(exc.message or exc.status, key)
        details = _gemini_details(exc.details)
        kind = _kind_for_status(status) if status else "server_error"
        retry_after = None
        if any(d.get("reason") == "API_KEY_INVALID" for d in details):
            kind = "auth"  # Gemini answers a bad key with 400 INVALID_ARGUMENT
        elif status == 429:
            quota_ids = [
                str(v.get("quotaId", ""))
                for d in details
                for v in d.get("violations") or []
                if isinstance(v, dict)
            ]
            # A per-day quota will not come back within this run; a per-minute one will.
            if any("PerDay" in q for q in quota_ids):
                kind = "insufficient_quota"
            else:
                for d in details:
                    delay = str(d.get("retryDelay", ""))
                    if delay.endswith("s"):
                        with contextlib.suppress(ValueError):
                            retry_after = float(delay[:-1])
                headers = getattr(getattr(exc, "response", None), "headers", None)
                if retry_after is None:
                    retry_after = _retry_after(headers)
        return ProviderCallError(
            provider=name,
            kind=kind,
            message=message,
            status_code=status or None,
            retry_after=retry_after,
        )
    transport = _transport_error(name, exc)
    if transport is not None:
        return transport
    return _malformed(name, _scrub(f"unreadable response: {type(exc).__name__}: {exc}", key))


# --- one call -----------------------------------------------------------------------------------


def _call_openai(
    provider: ProviderConfig,
    key: str,
    *,
    model: str,
    system: str,
    prompt: str,
    max_tokens: int,
    stream: bool,
    timeout: float,
) -> tuple[str, TokenUsage, str]:
    client = _openai_client(provider, key)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    kwargs: dict[str, Any] = {"model": model, "messages": messages, "timeout": timeout}
    # OpenAI's reasoning models refuse max_tokens; compatible servers (GLM, vLLM, llama.cpp)
    # all understand it, while max_completion_tokens is not universal.
    if provider.name == "openai":
        kwargs["max_completion_tokens"] = max_tokens
    else:
        kwargs["max_tokens"] = max_tokens
    if not stream:
        completion = client.chat.completions.create(**kwargs)
        if not hasattr(completion, "choices") or completion.usage is None:
            raise _malformed(provider.name, "the response carries no usage")
        text = "".join(c.message.content or "" for c in completion.choices[:1])
        request_id = getattr(completion, "_request_id", None) or completion.id or ""
        return text, openai_usage(completion.usage), request_id
    if provider.name != "glm":
        # Without include_usage OpenAI sends no usage at all on a stream. GLM always sends it
        # on its finish chunk and is not documented to accept stream_options.
        kwargs["stream_options"] = {"include_usage": True}
    parts: list[str] = []
    usage = None
    with client.chat.completions.create(stream=True, **kwargs) as chunks:
        request_id = chunks.response.headers.get("x-request-id") or ""
        for chunk in chunks:
            request_id = request_id or chunk.id or ""
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices[:1]:
                if choice.delta and choice.delta.content:
                    parts.append(choice.delta.content)
    if usage is None:
        raise _malformed(provider.name, "the stream ended without its usage")
    return "".join(parts), openai_usage(usage), request_id


def _call_anthropic(
    provider: ProviderConfig,
    key: str,
    *,
    model: str,
    system: str,
    prompt: str,
    max_tokens: int,
    stream: bool,
    timeout: float,
) -> tuple[str, TokenUsage, str]:
    client = _anthropic_client(provider, key)
    kwargs: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
        "timeout": timeout,
    }
    if system:
        kwargs["system"] = system
    if not stream:
        message = client.messages.create(**kwargs)
        if getattr(message, "usage", None) is None:
            raise _malformed(provider.name, "the response carries no usage")
        text = "".join(b.text for b in message.content if getattr(b, "type", "") == "text")
        request_id = getattr(message, "_request_id", None) or message.id or ""
        return text, anthropic_usage(message.usage), request_id
    parts: list[str] = []
    usage: dict[str, Any] = {}
    seen_delta = stopped = False
    events = client.messages.create(stream=True, **kwargs)
    with events:
        request_id = events.response.headers.get("request-id") or ""
        for event in events:
            if event.type == "message_start":
                request_id = request_id or event.message.id
                usage = event.message.usage.model_dump()
            elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                parts.append(event.delta.text)
            elif event.type == "message_delta":
                # message_delta carries cumulative counts; any field it fills wins.
                seen_delta = True
                usage.update({k: v for k, v in event.usage.model_dump().items() if v is not None})
            elif event.type == "message_stop":
                stopped = True
    if not (usage and seen_delta and stopped):
        raise _malformed(provider.name, "the stream ended before message_delta/message_stop")
    import anthropic.types

    final = anthropic.types.Usage.model_validate(usage)
    return "".join(parts), anthropic_usage(final), request_id


def _gemini_text(response: Any) -> str:
    candidates = response.candidates or []
    if not candidates or candidates[0].content is None:
        return ""
    return "".join(
        p.text
        for p in candidates[0].content.parts or []
        if p.text and not getattr(p, "thought", False)
    )


def _call_gemini(
    provider: ProviderConfig,
    key: str,
    *,
    model: str,
    system: str,
    prompt: str,
    max_tokens: int,
    stream: bool,
    timeout: float,
) -> tuple[str, TokenUsage, str]:
    from google.genai import types

    client = _gemini_client(provider, key, timeout)
    config = types.GenerateContentConfig(
        system_instruction=system or None, max_output_tokens=max_tokens
    )
    if not stream:
        response = client.models.generate_content(model=model, contents=prompt, config=config)
        if response.usage_metadata is None:
            raise _malformed(provider.name, "the response carries no usageMetadata")
        return (
            _gemini_text(response),
            gemini_usage(response.usage_metadata),
            response.response_id or "",
        )
    parts: list[str] = []
    meta = None
    finished = False
    request_id = ""
    for chunk in client.models.generate_content_stream(model=model, contents=prompt, config=config):
        request_id = request_id or chunk.response_id or ""
        parts.append(_gemini_text(chunk))
        if chunk.usage_metadata is not None:
            meta = chunk.usage_metadata
        if any(c.finish_reason for c in chunk.candidates or []):
            finished = True
    # Every chunk carries usageMetadata, but only the one with the finishReason is final.
    if meta is None or not finished:
        raise _malformed(provider.name, "the stream ended before its final chunk")
    return "".join(parts), gemini_usage(meta), request_id


def call_model(
    *,
    provider: ProviderConfig,
    model: str,
    system: str,
    prompt: str,
    max_tokens: int = 2048,
    stream: bool = False,
    timeout: float,
) -> ModelResponse:
    """One attempt, no retries. Raises ProviderCallError (ProviderNotConfigured without a key)."""
    key = os.environ.get(provider.api_key_env, "").strip()
    if not key:
        raise ProviderNotConfigured(provider=provider.name, api_key_env=provider.api_key_env)
    if provider.name == "anthropic":
        call, classify = _call_anthropic, _anthropic_error
    elif provider.name == "google_gemini":
        call, classify = _call_gemini, _gemini_error
    else:
        call, classify = _call_openai, _openai_error
    started = time.monotonic()
    try:
        text, usage, request_id = call(
            provider,
            key,
            model=model,
            system=system,
            prompt=prompt,
            max_tokens=max_tokens,
            stream=stream,
            timeout=timeout,
        )
    except ProviderCallError:
        raise
    except Exception as exc:
        # `from None`: the SDK exception (and its request object) stays out of tracebacks
        # that get logged, so nothing the SDK attached to it can leak.
        raise classify(provider, exc, key) from None
    # The edge where a provider's text enters: a reply can carry a NUL or a lone surrogate
    # (a JSON escape), which PostgreSQL cannot store; keep the rest of the reply.
    return ModelResponse(
        text=storable(text),
        usage=usage,
        provider_request_id=storable(request_id),
        model=model,
        latency_ms=int((time.monotonic() - started) * 1000),
    )


def retry_delay(error: ProviderCallError, attempt: int, backoff_seconds: float) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): exponential backoff, or the
    provider's Retry-After when it asks for longer (capped)."""
    delay = min(MAX_BACKOFF_SECONDS, backoff_seconds * 2 ** (attempt - 1))
    if error.kind == "rate_limited" and error.retry_after is not None:
        delay = max(delay, min(error.retry_after, MAX_RETRY_AFTER_SECONDS))
    return delay if math.isfinite(delay) else MAX_BACKOFF_SECONDS


def call_with_retries(
    *,
    provider: ProviderConfig,
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
) -> ModelResponse:
    """call_model, retrying transient failures (429, 5xx, timeout, connection, malformed) up
    to max_retries times; auth, insufficient_quota and bad_request are raised at once.

    on_failure(error, attempt) is called for every failed attempt, the last one included.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return call_model(
                provider=provider,
                model=model,
                system=system,
                prompt=prompt,
                max_tokens=max_tokens,
                stream=stream,
                timeout=timeout,
            )
        except ProviderCallError as error:
            if on_failure is not None:
                on_failure(error, attempt)
            if not error.retryable or attempt > max_retries:
                raise
            sleep(retry_delay(error, attempt, backoff_seconds))
