"""The OpenAI chat-completions wire protocol, through the `openai` SDK.

It serves OpenAI itself and every server that speaks the same format: Z.ai's GLM API and any
OpenAI-compatible server (vLLM, llama.cpp, LM Studio, OpenRouter…). The servers differ in three
small ways, each one field of a `Dialect` (one provider object per dialect, each registered under
its own protocol name; an endpoint picks one with `protocol:` in config/models.yaml):

- `openai`: OpenAI's reasoning models refuse `max_tokens`, so the limit is sent as
  `max_completion_tokens`; a stream carries usage only when asked (`stream_options`).
- `openai_compatible`: `max_completion_tokens` is not universal, `max_tokens` is; the usage of a
  stream is asked for the OpenAI way (vLLM, llama.cpp and OpenRouter accept it).
- `zai` (GLM): `max_tokens`; usage always comes on the stream's finish chunk and Z.ai does not
  document `stream_options`, so it is not sent; a spent balance is a business `code` (1113…)
  inside a 429 rather than OpenAI's `insufficient_quota`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Dialect:
    protocol: str
    default_prices_id: str  # "" = the endpoint's own name
    max_tokens_param: str  # "max_completion_tokens" | "max_tokens"
    ask_stream_usage: bool  # send stream_options.include_usage on a stream
    quota_codes: frozenset[str] = frozenset()  # error `code`s that mean a spent balance


OPENAI = Dialect("openai", "openai", "max_completion_tokens", ask_stream_usage=True)
OPENAI_COMPATIBLE = Dialect("openai_compatible", "", "max_tokens", ask_stream_usage=True)
# Z.ai's business codes for an exhausted balance / resource package (not a rate limit).
ZAI = Dialect(
    "zai",
    "zai",
    "max_tokens",
    ask_stream_usage=False,
    quota_codes=frozenset({"1113", "1304", "1308", "1309", "1310"}),
)


def openai_usage(usage: Any) -> TokenUsage:
    """OpenAI `CompletionUsage` (also GLM's and compatible servers' `usage`) → TokenUsage.

    - `prompt_tokens` already counts the cached part (`prompt_tokens_details.cached_tokens`,
      billed at the cache-read rate) → prompt_tokens as is, cached_input_tokens = cached_tokens;
      `prompt_tokens_details.cache_write_tokens` (where a server reports writes) →
      cache_write_tokens.
    - `completion_tokens` already counts `completion_tokens_details.reasoning_tokens` and both
      prediction counts: `accepted_prediction_tokens` (predicted tokens that appeared in the
      reply) and `rejected_prediction_tokens` (predicted tokens that did not, which OpenAI still
      bills as output, like reasoning) → completion_tokens as is (so both prediction counts are
      billed as output through it), reasoning_tokens = reasoning_tokens.
    GLM sends the same fields (its cached tokens in prompt_tokens_details.cached_tokens).
    """
    prompt_details = getattr(usage, "prompt_tokens_details", None)
    completion_details = getattr(usage, "completion_tokens_details", None)
    return TokenUsage(
        prompt_tokens=as_int(usage.prompt_tokens),
        completion_tokens=as_int(usage.completion_tokens),
        cached_input_tokens=as_int(getattr(prompt_details, "cached_tokens", 0)),
        cache_write_tokens=as_int(getattr(prompt_details, "cache_write_tokens", 0)),
        reasoning_tokens=as_int(getattr(completion_details, "reasoning_tokens", 0)),
    )


class OpenAIProvider(Provider):
    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.protocol = dialect.protocol
        self.default_prices_id = dialect.default_prices_id

    def client(self, endpoint: Endpoint, key: str, timeout: float) -> Any:
        import openai

        base_url = endpoint.effective_base_url
        return cached_client(
            ("openai", endpoint.name, base_url, key_fingerprint(key)),
            lambda: openai.OpenAI(api_key=key, base_url=base_url or None, max_retries=0),
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
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        kwargs: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "timeout": timeout,
            self.dialect.max_tokens_param: max_tokens,
        }
        if not stream:
            # with_raw_response: the SDK's public way to the headers (the rate limits).
            raw = client.chat.completions.with_raw_response.create(**kwargs)
            limits = parse_rate_limits(raw.headers)
            completion = raw.parse()
            if not hasattr(completion, "choices") or completion.usage is None:
                raise malformed(endpoint.name, "the response carries no usage")
            text = "".join(c.message.content or "" for c in completion.choices[:1])
            request_id = raw.headers.get("x-request-id") or completion.id or ""
            return ProviderReply(
                text, openai_usage(completion.usage), request_id, completion.model or "", limits
            )
        if self.dialect.ask_stream_usage:
            # Without include_usage OpenAI sends no usage at all on a stream; with it, the usage
            # comes on one last chunk whose `choices` is empty.
            kwargs["stream_options"] = {"include_usage": True}
        parts: list[str] = []
        usage = None
        with client.chat.completions.create(stream=True, **kwargs) as chunks:
            progress.started = True
            request_id = chunks.response.headers.get("x-request-id") or ""
            limits = parse_rate_limits(chunks.response.headers)
            for chunk in chunks:
                request_id = request_id or chunk.id or ""
                progress.reported_model = progress.reported_model or chunk.model or ""
                if chunk.usage is not None:
                    usage = chunk.usage
                    progress.usage = openai_usage(usage)
                for choice in chunk.choices[:1]:
                    if choice.delta and choice.delta.content:
                        parts.append(choice.delta.content)
        if usage is None:
            raise malformed(endpoint.name, "the stream ended without its usage")
        return ProviderReply(
            "".join(parts), openai_usage(usage), request_id, progress.reported_model, limits
        )

    def classify(self, endpoint: Endpoint, exc: BaseException, key: str) -> ProviderCallError:
        import openai

        name = endpoint.name
        if isinstance(exc, openai.APITimeoutError):
            return ProviderCallError(provider=name, kind="timeout", message="request timed out")
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            return ProviderCallError(
                provider=name, kind="connection", message=scrub(f"{exc.message} ({cause!r})", key)
            )
        if isinstance(exc, openai.APIStatusError):
            body = exc.body if isinstance(exc.body, dict) else {}
            message = scrub(body.get("message") or exc.message, key)
            kind = kind_for_status(exc.status_code)
            code = str(exc.code or "")
            if (
                code == "insufficient_quota"
                or exc.type == "insufficient_quota"
                or code in self.dialect.quota_codes
            ):
                kind = "insufficient_quota"
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
        if isinstance(exc, openai.APIResponseValidationError | json.JSONDecodeError):
            return malformed(name, scrub(f"unreadable response: {exc}", key))
        return transport_error(name, exc) or malformed(
            name, scrub(f"{type(exc).__name__}: {exc}", key)
        )

    def preload(self) -> None:
        import openai  # noqa: F401
