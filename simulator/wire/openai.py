"""OpenAI Chat Completions, and the OpenAI-compatible servers that speak it (GLM, local ones).

Path: `<prefix>/chat/completions`; key: `Authorization: Bearer`. The dialects differ only in
what `Dialect` lists:

- OpenAI: usage with `prompt_tokens_details.cached_tokens` and
  `completion_tokens_details.{reasoning_tokens, accepted_prediction_tokens,
  rejected_prediction_tokens}`; `completion_tokens` counts visible output, reasoning and
  rejected prediction tokens (all billed as output); a stream carries usage only when
  `stream_options.include_usage` is set, then as `"usage": null` on every chunk and the usage on
  one extra chunk after the finish chunk, with empty `choices`. The reply names the dated
  snapshot (`gpt-5` → `gpt-5-2025-08-07`).
- GLM (Z.ai): usage with `prompt_tokens_details.cached_tokens` only; no stream_options (its
  streams always end with the usage on the finish chunk); its own error codes (1000, 1113,
  1302…) and ids; the reply echoes the model name.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from email.message import Message
from typing import Any

from ..content import Plan, RequestInfo, count_tokens
from ..state import LimitView
from . import (
    ErrorReply,
    Frame,
    Ids,
    Part,
    RequestError,
    Route,
    Wire,
    rand,
    reset_duration,
    sse,
    text_of,
)

_PATH = re.compile(r"/chat/completions$")
_REASONING_PREFIXES = ("gpt-6", "gpt-5", "o1", "o3", "o4")

OPENAI_SNAPSHOTS = {
    "gpt-5": "gpt-5-2025-08-07",
    "gpt-5-mini": "gpt-5-mini-2025-08-07",
    "gpt-5-nano": "gpt-5-nano-2025-08-07",
    "gpt-5.1": "gpt-5.1-2025-11-13",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "o3": "o3-2025-04-16",
    "o4-mini": "o4-mini-2025-04-16",
}

# kind: (status, type, code, message)
_OPENAI_ERRORS: dict[str, tuple[int, str, str | None, str]] = {
    "auth": (
        401,
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    "missing_key": (
        401,
        "invalid_request_error",
        None,
        "You didn't provide an API key. You need to provide your API key in an "
        "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
    ),
    "429": (
        429,
        "tokens",
        "rate_limit_exceeded",
        "Rate limit reached for {model} in organization org-simulated on tokens per min "
        "(TPM): Limit 30000, Used 30000, Requested 1200. Please try again in {retry}s.",
    ),
    "insufficient_quota": (
        429,
        "insufficient_quota",
        "insufficient_quota",
        "You exceeded your current quota, please check your plan and billing details. For "
        "more information on this error, read the docs: "
        "https://platform.openai.com/docs/guides/error-codes/api-errors.",
    ),
    "500": (
        500,
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    "bad_request": (
        400,
        "invalid_request_error",
        "invalid_value",
        "Invalid 'max_tokens': integer below minimum value.",
    ),
}
# kind: (status, code, message)
_GLM_ERRORS: dict[str, tuple[int, str, str]] = {
    "auth": (401, "1000", "Authentication failed: the API key is invalid."),
    "missing_key": (401, "1001", "The Authentication header was not received."),
    "429": (429, "1302", "High concurrency usage of this API, please reduce concurrency."),
    "insufficient_quota": (
        429,
        "1113",
        "Insufficient balance or no resource package. Please recharge.",
    ),
    "500": (500, "500", "Internal error, please try again later."),
    "bad_request": (400, "1210", "Incorrect API call parameters, please check the documentation."),
}


def _openai_ids() -> Ids:
    return Ids(request_id=f"req_{secrets.token_hex(16)}", message_id=f"chatcmpl-{rand(29)}")


def _glm_ids() -> Ids:
    # GLM's id (and request_id) is the only request id it gives.
    rid = f"{time.strftime('%Y%m%d%H%M%S')}{rand(18)}"
    return Ids(request_id=rid, message_id=rid)


def _openai_headers(ids: Ids, latency_ms: int) -> dict[str, str]:
    return {
        "x-request-id": ids.request_id,
        "openai-organization": "org-simulated",
        "openai-processing-ms": str(latency_ms),
        "openai-version": "2020-10-01",
    }


def _glm_headers(ids: Ids, latency_ms: int) -> dict[str, str]:
    return {"x-log-id": ids.request_id}


def _openai_error(
    kind: str, *, model: str, ids: Ids, retry_after: float, message: str | None
) -> ErrorReply:
    status, etype, code, wording = _OPENAI_ERRORS[kind]
    retry = f"{retry_after:g}"
    error = {
        "message": message or wording.format(model=model, retry=retry),
        "type": etype,
        "param": "max_tokens" if kind == "bad_request" else None,
        "code": code,
    }
    headers = {"x-request-id": ids.request_id}
    if kind == "429":
        # A bare 429 (retry_after < 0: the fault's `retry_after: null`) says nothing of its
        # reset; any other one says Retry-After.
        if retry_after >= 0:
            headers["retry-after"] = retry
        headers["x-ratelimit-remaining-tokens"] = "0"
    return ErrorReply(status, {"error": error}, headers)


def _glm_error(
    kind: str, *, model: str, ids: Ids, retry_after: float, message: str | None
) -> ErrorReply:
    status, code, wording = _GLM_ERRORS[kind]
    headers = {"x-log-id": ids.request_id}
    if kind == "429" and retry_after >= 0:
        headers["retry-after"] = f"{retry_after:g}"
    return ErrorReply(status, {"error": {"code": code, "message": message or wording}}, headers)


@dataclass(frozen=True)
class Dialect:
    """What one OpenAI-compatible server does its own way."""

    provider: str
    new_ids: Callable[[], Ids]
    headers: Callable[[Ids, int], dict[str, str]]
    error: Callable[..., ErrorReply]
    snapshots: Mapping[str, str]
    reasoning_prefixes: tuple[str, ...]
    # OpenAI's own fields: completion_tokens_details, audio tokens, refusal, logprobs,
    # object, service_tier, system_fingerprint.
    full_fields: bool
    # Usage on the finish chunk of every stream (GLM) instead of on an extra chunk with
    # empty choices, sent only when stream_options.include_usage asks for it (OpenAI).
    usage_on_finish_chunk: bool


OPENAI_DIALECT = Dialect(
    provider="openai",
    new_ids=_openai_ids,
    headers=_openai_headers,
    error=_openai_error,
    snapshots=OPENAI_SNAPSHOTS,
    reasoning_prefixes=_REASONING_PREFIXES,
    full_fields=True,
    usage_on_finish_chunk=False,
)
GLM_DIALECT = Dialect(
    provider="glm",
    new_ids=_glm_ids,
    headers=_glm_headers,
    error=_glm_error,
    snapshots={},
    reasoning_prefixes=(),
    full_fields=False,
    usage_on_finish_chunk=True,
)


def _finish(plan: Plan) -> str:
    return "length" if plan.finish == "length" else "stop"


def prediction_split(prediction: str, text: str) -> tuple[int, int]:
    """(accepted, rejected) prediction tokens: the predicted lines found in the reply are
    accepted, the others rejected (the real API diffs tokens; lines are close enough)."""
    reply_lines = set(text.splitlines())
    accepted = sum(count_tokens(line) for line in prediction.splitlines() if line in reply_lines)
    total = count_tokens(prediction)
    accepted = min(accepted, total)
    return accepted, total - accepted


class OpenAIWire(Wire):
    malformed_frame = b'data: {"id": "x", "choices": [{"delta": {"cont\n\n'

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.provider = dialect.provider
        self.snapshots = dialect.snapshots

    def route(self, path: str) -> Route | None:
        return Route() if _PATH.search(path) else None

    def api_key(self, headers: Message, query: Mapping[str, list[str]]) -> str | None:
        auth = headers.get("Authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def parse(self, body: Any, route: Route) -> RequestInfo:
        if not isinstance(body, dict):
            raise RequestError("the request body is not a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages is required")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError("model is required")
        system_parts: list[str] = []
        prompt_parts: list[str] = []
        for m in messages:
            if isinstance(m, dict):
                target = system_parts if m.get("role") in ("system", "developer") else prompt_parts
                target.append(text_of(m.get("content")))
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 4096
        options = body.get("stream_options") or {}
        prediction = body.get("prediction") or {}
        predicted = text_of(prediction.get("content")) if isinstance(prediction, dict) else ""
        return RequestInfo(
            self.provider,
            model,
            "\n".join(system_parts),
            "\n".join(prompt_parts),
            int(max_tokens),
            body.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            prediction=predicted or None,
        )

    def reasons(self, info: RequestInfo) -> bool:
        return info.model.lower().startswith(self.dialect.reasoning_prefixes) or info.thinking

    def plan(self, info: RequestInfo, plan: Plan) -> Plan:
        if not info.prediction or not self.dialect.full_fields:
            return plan
        accepted, rejected = prediction_split(info.prediction, plan.text)
        return replace(
            plan,
            accepted_prediction_tokens=min(accepted, plan.output_tokens),
            rejected_prediction_tokens=rejected,
        )

    def new_ids(self) -> Ids:
        return self.dialect.new_ids()

    def headers(self, ids: Ids, latency_ms: int) -> dict[str, str]:
        return self.dialect.headers(ids, latency_ms)

    def limit_headers(self, view: LimitView, now: float) -> dict[str, str]:
        # OpenAI and Z.ai alike: x-ratelimit-*, the resets as durations from now.
        reset = reset_duration(max(0.0, view.reset_at - now))
        return {
            "x-ratelimit-limit-requests": str(view.requests_limit),
            "x-ratelimit-remaining-requests": str(view.requests_remaining),
            "x-ratelimit-reset-requests": reset,
            "x-ratelimit-limit-tokens": str(view.tokens_limit),
            "x-ratelimit-remaining-tokens": str(view.tokens_remaining),
            "x-ratelimit-reset-tokens": reset,
        }

    def usage(self, plan: Plan) -> dict[str, Any]:
        # Rejected prediction tokens are billed as output although they are not in the reply.
        completion = plan.completion_tokens + plan.rejected_prediction_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": plan.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": plan.cached_tokens},
        }
        if self.dialect.full_fields:
            usage["prompt_tokens_details"]["audio_tokens"] = 0
            usage["completion_tokens_details"] = {
                "reasoning_tokens": plan.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": plan.accepted_prediction_tokens,
                "rejected_prediction_tokens": plan.rejected_prediction_tokens,
            }
        return usage

    def body(self, plan: Plan, info: RequestInfo, ids: Ids) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": plan.text}
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": _finish(plan)}
        body: dict[str, Any] = {
            "id": ids.message_id,
            "object": "chat.completion",
            "created": ids.created,
            "model": self.reported_model(info.model),
            "choices": [choice],
            "usage": self.usage(plan),
        }
        if self.dialect.full_fields:
            message.update(refusal=None, annotations=[])
            choice["logprobs"] = None
            body.update(service_tier="default", system_fingerprint="fp_sim0001")
        else:
            body["request_id"] = ids.request_id
        return body

    def stream(self, plan: Plan, pieces: list[str], info: RequestInfo, ids: Ids) -> list[Frame]:
        full = self.dialect.full_fields
        base: dict[str, Any] = {
            "id": ids.message_id,
            "created": ids.created,
            "model": self.reported_model(info.model),
        }
        if full:
            base.update(object="chat.completion.chunk", system_fingerprint="fp_sim0001")
        extra_usage_chunk = info.include_usage and not self.dialect.usage_on_finish_chunk
        if extra_usage_chunk:
            base["usage"] = None

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            if full:
                choice["logprobs"] = None
            return {**base, "choices": [choice]}

        first = {"role": "assistant", "content": "", **({"refusal": None} if full else {})}
        frames = [Frame(sse(chunk(first)), Part.HEAD)]
        frames += [Frame(sse(chunk({"content": piece})), Part.CONTENT) for piece in pieces]
        usage = self.usage(plan)
        if self.dialect.usage_on_finish_chunk:
            final = chunk({"role": "assistant", "content": ""}, _finish(plan))
            final["usage"] = usage
            frames.append(Frame(sse(final), Part.TAIL, usage))
        else:
            frames.append(Frame(sse(chunk({}, _finish(plan))), Part.TAIL))
            if extra_usage_chunk:
                frames.append(Frame(sse({**base, "choices": [], "usage": usage}), Part.TAIL, usage))
        frames.append(Frame(sse("[DONE]"), Part.TAIL))
        return frames

    def malformed_body(self, ids: Ids) -> bytes:
        start = {"id": ids.message_id, "object": "chat.completion"}
        return json.dumps(start)[:-1].encode() + b', "choices": [{"index": 0, "message": {"con'

    def error(
        self, kind: str, *, model: str, ids: Ids, retry_after: float, message: str | None
    ) -> ErrorReply:
        return self.dialect.error(
            kind, model=model, ids=ids, retry_after=retry_after, message=message
        )


OPENAI = OpenAIWire(OPENAI_DIALECT)
GLM = OpenAIWire(GLM_DIALECT)
