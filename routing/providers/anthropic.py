"""The Anthropic Messages wire protocol, through the `anthropic` SDK."""

from __future__ import annotations

import json
from typing import Any

from usage.types import TokenUsage

from .base import (
    Endpoint,
    Provider,
    ProviderCallError,
    ProviderReply,
    StreamProgress,
    as_int,
    cached_client,
    key_fingerprint,
    kind_for_status,
    malformed,
    retry_after_seconds,
    scrub,
    transport_error,
)
from .limits import parse_rate_limits


def anthropic_usage(usage: Any) -> TokenUsage:
    """Anthropic `Usage` → TokenUsage.

    - `input_tokens` EXCLUDES cache reads and cache writes, so both are added back:
      prompt_tokens = input_tokens + cache_read_input_tokens + cache_creation_input_tokens;
      cached_input_tokens = cache_read_input_tokens.
    - Cache writes: cache_write_tokens = every write (`cache_creation_input_tokens`, the sum of
      `cache_creation.ephemeral_5m_input_tokens` and `ephemeral_1h_input_tokens`);
      cache_write_1h_tokens = `ephemeral_1h_input_tokens`, priced at the 1-hour rate. Without a
      `cache_creation` breakdown (older API versions) every write is a 5-minute write.
    - `output_tokens` already includes extended thinking → completion_tokens as is;
      reasoning_tokens = `output_tokens_details.thinking_tokens` (0 when not reported).
    """
    reads = as_int(getattr(usage, "cache_read_input_tokens", 0))
    writes = as_int(getattr(usage, "cache_creation_input_tokens", 0))
    creation = getattr(usage, "cache_creation", None)
    writes_1h = 0
    if creation is not None:
        writes_1h = as_int(getattr(creation, "ephemeral_1h_input_tokens", 0))
        # The breakdown and the total agree on the real API; if a server reports only the
        # breakdown, the breakdown is what was written.
        writes = max(writes, writes_1h + as_int(getattr(creation, "ephemeral_5m_input_tokens", 0)))
    details = getattr(usage, "output_tokens_details", None)
    return TokenUsage(
        prompt_tokens=as_int(usage.input_tokens) + reads + writes,
        completion_tokens=as_int(usage.output_tokens),
        cached_input_tokens=reads,
        cache_write_tokens=writes,
        reasoning_tokens=as_int(getattr(details, "thinking_tokens", 0)),
        cache_write_1h_tokens=writes_1h,
    )


def anthropic_stream_usage(message_start_usage: dict[str, Any], *deltas: dict[str, Any]) -> Any:
    """The `Usage` of a stream so far: `message_start`'s usage (input and cache tokens, a first
    output count) updated by each `message_delta`'s usage, whose counts are CUMULATIVE (any
    field a delta fills replaces the earlier value; it never adds to it)."""
    import anthropic.types

    merged = dict(message_start_usage)
    for delta in deltas:
        merged.update({k: v for k, v in delta.items() if v is not None})
    return anthropic.types.Usage.model_validate(merged)


class AnthropicProvider(Provider):
    protocol = "anthropic"
    default_prices_id = "anthropic"

    def client(self, endpoint: Endpoint, key: str, timeout: float) -> Any:
        import anthropic

        base_url = endpoint.effective_base_url
        return cached_client(
            ("anthropic", endpoint.name, base_url, key_fingerprint(key)),
            lambda: anthropic.Anthropic(api_key=key, base_url=base_url or None, max_retries=0),
        )

    def call(
        self,
        endpoint: Endpoint,
        key: str,
        *,
        model: str,
        system: str,
        prompt: str,
        max_tokens: int,
        stream: bool,
        timeout: float,
        progress: StreamProgress,
    ) -> ProviderReply:
        client = self.client(endpoint, key, timeout)
        kwargs: dict[str, Any] = {
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}],
            "timeout": timeout,
        }
        if system:
            kwargs["system"] = system
        if not stream:
            # with_raw_response: the SDK's public way to the headers (the rate limits).
            raw = client.messages.with_raw_response.create(**kwargs)
            limits = parse_rate_limits(raw.headers)
            message = raw.parse()
            if getattr(message, "usage", None) is None:
                raise malformed(endpoint.name, "the response carries no usage")
            text = "".join(b.text for b in message.content if getattr(b, "type", "") == "text")
            request_id = raw.headers.get("request-id") or message.id or ""
            return ProviderReply(
                text, anthropic_usage(message.usage), request_id, message.model or "", limits
            )
        parts: list[str] = []
        start_usage: dict[str, Any] = {}
        deltas: list[dict[str, Any]] = []
        stopped = False
        events = client.messages.create(stream=True, **kwargs)
        with events:
            progress.started = True
            request_id = events.response.headers.get("request-id") or ""
            limits = parse_rate_limits(events.response.headers)
            for event in events:
                if event.type == "message_start":
                    request_id = request_id or event.message.id
                    progress.reported_model = event.message.model or ""
                    start_usage = event.message.usage.model_dump()
                    # Billed from here on: the input (and cache) tokens are known.
                    progress.usage = anthropic_usage(anthropic_stream_usage(start_usage))
                elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                    parts.append(event.delta.text)
                elif event.type == "message_delta":
                    deltas.append(event.usage.model_dump())
                    if start_usage:
                        progress.usage = anthropic_usage(
                            anthropic_stream_usage(start_usage, *deltas)
                        )
                elif event.type == "message_stop":
                    stopped = True
        if not (start_usage and deltas and stopped):
            raise malformed(endpoint.name, "the stream ended before message_delta/message_stop")
        final = anthropic_stream_usage(start_usage, *deltas)
        return ProviderReply(
            "".join(parts), anthropic_usage(final), request_id, progress.reported_model, limits
        )

    def classify(self, endpoint: Endpoint, exc: BaseException, key: str) -> ProviderCallError:
        import anthropic

        name = endpoint.name
        if isinstance(exc, anthropic.APITimeoutError):
            return ProviderCallError(provider=name, kind="timeout", message="request timed out")
        if isinstance(exc, anthropic.APIConnectionError):
            cause = exc.__cause__ or exc
            return ProviderCallError(
                provider=name, kind="connection", message=scrub(f"{exc.message} ({cause!r})", key)
            )
        if isinstance(exc, anthropic.APIStatusError):
            message = scrub(exc.api_message or exc.message, key)
            kind = kind_for_status(exc.status_code)
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
                retry_after=(
                    retry_after_seconds(exc.response.headers) if kind == "rate_limited" else None
                ),
                limits=parse_rate_limits(exc.response.headers),
            )
        if isinstance(exc, anthropic.APIResponseValidationError | json.JSONDecodeError):
            return malformed(name, scrub(f"unreadable response: {exc}", key))
        return transport_error(name, exc) or malformed(
            name, scrub(f"{type(exc).__name__}: {exc}", key)
        )

    def preload(self) -> None:
        import anthropic  # noqa: F401
