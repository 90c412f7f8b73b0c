"""The Gemini generateContent wire protocol, through the `google-genai` SDK."""

from __future__ import annotations

import contextlib
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


def gemini_usage(meta: Any) -> TokenUsage:
    """Gemini `usageMetadata` (GenerateContentResponseUsageMetadata) → TokenUsage.

    - `promptTokenCount` already includes `cachedContentTokenCount` (billed at the cache rate);
      `toolUsePromptTokenCount` (the results of tool calls fed back in) is billed as input but
      NOT included in promptTokenCount → prompt_tokens = promptTokenCount +
      toolUsePromptTokenCount; cached_input_tokens = cachedContentTokenCount.
    - `candidatesTokenCount` EXCLUDES `thoughtsTokenCount`, which is billed as output →
      completion_tokens = candidatesTokenCount + thoughtsTokenCount; reasoning_tokens =
      thoughtsTokenCount.
    - Gemini reports no cache writes (explicit caches are billed as storage, not per call).
    In a stream every chunk carries the usage so far (cumulative), so the last one counts.
    """
    thoughts = as_int(meta.thoughts_token_count)
    return TokenUsage(
        prompt_tokens=as_int(meta.prompt_token_count) + as_int(meta.tool_use_prompt_token_count),
        completion_tokens=as_int(meta.candidates_token_count) + thoughts,
        cached_input_tokens=as_int(meta.cached_content_token_count),
        reasoning_tokens=thoughts,
    )


def _text(response: Any) -> str:
    candidates = response.candidates or []
    if not candidates or candidates[0].content is None:
        return ""
    return "".join(
        p.text
        for p in candidates[0].content.parts or []
        if p.text and not getattr(p, "thought", False)
    )


def _limits(response: Any) -> Any:
    """The rate-limit headers of a response, through the SDK's public `sdk_http_response`
    (the Gemini API sends none today; a proxy in front of it may)."""
    http = getattr(response, "sdk_http_response", None)
    return parse_rate_limits(getattr(http, "headers", None))


def _error_details(details: Any) -> list[dict[str, Any]]:
    error = details.get("error", details) if isinstance(details, dict) else {}
    items = error.get("details") if isinstance(error, dict) else None
    return [d for d in items or [] if isinstance(d, dict)]


class GeminiProvider(Provider):
    protocol = "gemini"
    default_prices_id = "google"

    def client(self, endpoint: Endpoint, key: str, timeout: float) -> Any:
        from google import genai
        from google.genai import types

        base_url = endpoint.effective_base_url
        # google-genai takes its timeout (in ms) per client, so the timeout is part of the key.
        timeout_ms = max(1, int(timeout * 1000))

        def build() -> Any:
            return genai.Client(
                api_key=key,
                http_options=types.HttpOptions(
                    base_url=base_url or None,
                    timeout=timeout_ms,
                    retry_options=types.HttpRetryOptions(attempts=1),
                ),
            )

        return cached_client(
            ("gemini", endpoint.name, base_url, key_fingerprint(key), str(timeout_ms)), build
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
        from google.genai import types

        client = self.client(endpoint, key, timeout)
        config = types.GenerateContentConfig(
            system_instruction=system or None, max_output_tokens=max_tokens
        )
        if not stream:
            response = client.models.generate_content(model=model, contents=prompt, config=config)
            if response.usage_metadata is None:
                raise malformed(endpoint.name, "the response carries no usageMetadata")
            return ProviderReply(
                _text(response),
                gemini_usage(response.usage_metadata),
                response.response_id or "",
                response.model_version or "",
                _limits(response),
            )
        parts: list[str] = []
        meta = None
        finished = False
        request_id = ""
        limits = None
        for chunk in client.models.generate_content_stream(
            model=model, contents=prompt, config=config
        ):
            # The SDK opens the stream on the first iteration: a chunk means HTTP 200.
            progress.started = True
            limits = limits or _limits(chunk)
            request_id = request_id or chunk.response_id or ""
            progress.reported_model = chunk.model_version or progress.reported_model
            parts.append(_text(chunk))
            if chunk.usage_metadata is not None:
                meta = chunk.usage_metadata
                progress.usage = gemini_usage(meta)
            if any(c.finish_reason for c in chunk.candidates or []):
                finished = True
        # Every chunk carries usageMetadata, but only the one with the finishReason is final.
        if meta is None or not finished:
            raise malformed(endpoint.name, "the stream ended before its final chunk")
        return ProviderReply(
            "".join(parts), gemini_usage(meta), request_id, progress.reported_model, limits
        )

    def classify(self, endpoint: Endpoint, exc: BaseException, key: str) -> ProviderCallError:
        from google.genai import errors

        name = endpoint.name
        if isinstance(exc, errors.APIError):
            status = int(exc.code or 0)
            message = scrub(exc.message or exc.status, key)
            details = _error_details(exc.details)
            kind = kind_for_status(status) if status else "server_error"
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
                        retry_after = retry_after_seconds(headers)
            headers = getattr(getattr(exc, "response", None), "headers", None)
            return ProviderCallError(
                provider=name,
                kind=kind,
                message=message,
                status_code=status or None,
                retry_after=retry_after,
                limits=parse_rate_limits(headers),
            )
        transport = transport_error(name, exc)
        if transport is not None:
            return transport
        return malformed(name, scrub(f"unreadable response: {type(exc).__name__}: {exc}", key))

    def preload(self) -> None:
        from google import genai  # noqa: F401
