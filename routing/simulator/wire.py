"""The four providers' wire formats: success bodies, stream events and error bodies.

Shapes follow the real APIs closely enough that the official SDKs parse them unchanged; the
usage blocks carry exactly the fields each provider fills (see DESIGN.md and usage/types.py
for how the clients normalise them).
"""

from __future__ import annotations

import json
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any

from .content import Plan

_ALNUM = string.ascii_letters + string.digits


def _rand(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


@dataclass(frozen=True)
class Ids:
    """Identifiers of one response; random, as real request ids are never reused."""

    request_id: str
    message_id: str
    created: int = field(default_factory=lambda: int(time.time()))


def new_ids(provider: str) -> Ids:
    if provider == "anthropic":
        return Ids(request_id=f"req_011C{_rand(20)}", message_id=f"msg_01{_rand(22)}")
    # Gemini's responseId and GLM's id/request_id are the only request ids those APIs give.
    if provider == "google_gemini":
        rid = _rand(22)
        return Ids(request_id=rid, message_id=rid)
    if provider == "glm":
        rid = f"{time.strftime('%Y%m%d%H%M%S')}{_rand(18)}"
        return Ids(request_id=rid, message_id=rid)
    return Ids(request_id=f"req_{secrets.token_hex(16)}", message_id=f"chatcmpl-{_rand(29)}")


def success_headers(provider: str, ids: Ids, latency_ms: int) -> dict[str, str]:
    if provider == "openai":
        return {
            "x-request-id": ids.request_id,
            "openai-organization": "org-simulated",
            "openai-processing-ms": str(latency_ms),
            "openai-version": "2020-10-01",
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-limit-tokens": "30000000",
            "x-ratelimit-remaining-tokens": "29990000",
            "x-ratelimit-reset-requests": "6ms",
            "x-ratelimit-reset-tokens": "0s",
        }
    if provider == "anthropic":
        return {
            "request-id": ids.request_id,
            "anthropic-organization-id": "00000000-0000-4000-8000-00000000cafe",
            "anthropic-ratelimit-requests-limit": "4000",
            "anthropic-ratelimit-requests-remaining": "3999",
            "anthropic-ratelimit-input-tokens-limit": "2000000",
            "anthropic-ratelimit-output-tokens-limit": "400000",
        }
    if provider == "glm":
        return {"x-log-id": ids.request_id}
    return {"server-timing": f"gfet4t7; dur={latency_ms}", "vary": "Origin, X-Origin, Referer"}


# --- OpenAI and GLM (OpenAI-compatible) ---------------------------------------------------


def openai_usage(plan: Plan, *, glm: bool) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.completion_tokens,
        "total_tokens": plan.prompt_tokens + plan.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": plan.cached_tokens},
    }
    if not glm:
        usage["prompt_tokens_details"]["audio_tokens"] = 0
        usage["completion_tokens_details"] = {
            "reasoning_tokens": plan.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
    return usage


def _openai_finish(plan: Plan) -> str:
    return "length" if plan.finish == "length" else "stop"


def openai_completion(plan: Plan, *, model: str, ids: Ids, glm: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": plan.text}
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": _openai_finish(plan)}
    body: dict[str, Any] = {
        "id": ids.message_id,
        "object": "chat.completion",
        "created": ids.created,
        "model": model,
        "choices": [choice],
        "usage": openai_usage(plan, glm=glm),
    }
    if glm:
        body["request_id"] = ids.request_id
    else:
        message.update(refusal=None, annotations=[])
        choice["logprobs"] = None
        body.update(service_tier="default", system_fingerprint="fp_sim0001")
    return body


def openai_stream(
    plan: Plan, pieces: list[str], *, model: str, ids: Ids, glm: bool, include_usage: bool
) -> list[dict[str, Any]]:
    """Chunk payloads in order; the caller frames each as `data: ...` and ends with [DONE].

    OpenAI sends usage only when stream_options.include_usage is set, in an extra chunk with
    no choices after the finish chunk. GLM always puts usage on its finish chunk.
    """
    base: dict[str, Any] = {"id": ids.message_id, "created": ids.created, "model": model}
    if not glm:
        base.update(object="chat.completion.chunk", system_fingerprint="fp_sim0001")
    if include_usage and not glm:
        base["usage"] = None

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if not glm:
            choice["logprobs"] = None
        return {**base, "choices": [choice]}

    chunks = [chunk({"role": "assistant", "content": "", **({} if glm else {"refusal": None})})]
    chunks += [chunk({"content": piece}) for piece in pieces]
    if glm:
        final = chunk({"role": "assistant", "content": ""}, _openai_finish(plan))
        final["usage"] = openai_usage(plan, glm=True)
        chunks.append(final)
    else:
        chunks.append(chunk({}, _openai_finish(plan)))
        if include_usage:
            chunks.append({**base, "choices": [], "usage": openai_usage(plan, glm=False)})
    return chunks


# --- Anthropic Messages -------------------------------------------------------------------


def anthropic_usage(plan: Plan, *, output_tokens: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        # input_tokens excludes cache reads and writes, as in the real API.
        "input_tokens": plan.uncached_input_tokens,
        "cache_creation_input_tokens": plan.cache_write_tokens,
        "cache_read_input_tokens": plan.cached_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": plan.cache_write_tokens,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": plan.completion_tokens if output_tokens is None else output_tokens,
        "service_tier": "standard",
    }
    if plan.reasoning_tokens and output_tokens is None:
        usage["output_tokens_details"] = {"thinking_tokens": plan.reasoning_tokens}
    return usage


def _anthropic_stop(plan: Plan) -> str:
    return "max_tokens" if plan.finish == "length" else "end_turn"


_THINKING = "Let me check the acceptance criteria against the change before answering."


def anthropic_message(plan: Plan, *, model: str, ids: Ids) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if plan.reasoning_tokens:
        content.append({"type": "thinking", "thinking": _THINKING, "signature": _rand(64)})
    content.append({"type": "text", "text": plan.text})
    return {
        "id": ids.message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _anthropic_stop(plan),
        "stop_sequence": None,
        "usage": anthropic_usage(plan),
    }


def anthropic_stream(
    plan: Plan, pieces: list[str], *, model: str, ids: Ids
) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs in the real order; message_start carries the input usage and
    message_delta the cumulative output_tokens."""
    start = anthropic_message(plan, model=model, ids=ids)
    start.update(content=[], stop_reason=None, usage=anthropic_usage(plan, output_tokens=1))
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
    ]
    index = 0
    if plan.reasoning_tokens:
        events += [
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "thinking", "thinking": "", "signature": ""},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "thinking_delta", "thinking": _THINKING},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "signature_delta", "signature": _rand(64)},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ]
        index = 1
    events.append(
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "text", "text": ""},
            },
        )
    )
    events.append(("ping", {"type": "ping"}))
    events += [
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "text_delta", "text": piece},
            },
        )
        for piece in pieces
    ]
    events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    final_usage = anthropic_usage(plan)
    final_usage.pop("cache_creation")
    final_usage.pop("service_tier")
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": _anthropic_stop(plan), "stop_sequence": None},
                "usage": final_usage,
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


# --- Gemini generateContent ---------------------------------------------------------------


def gemini_usage(plan: Plan, *, candidates: int | None = None) -> dict[str, Any]:
    out = plan.output_tokens if candidates is None else candidates
    usage: dict[str, Any] = {
        # promptTokenCount includes the cached part; candidatesTokenCount excludes thoughts.
        "promptTokenCount": plan.prompt_tokens,
        "candidatesTokenCount": out,
        "totalTokenCount": plan.prompt_tokens + out + plan.reasoning_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": plan.prompt_tokens}],
    }
    if plan.cached_tokens:
        usage["cachedContentTokenCount"] = plan.cached_tokens
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": plan.cached_tokens}]
    if plan.reasoning_tokens:
        usage["thoughtsTokenCount"] = plan.reasoning_tokens
    return usage


def _gemini_finish(plan: Plan) -> str:
    return "MAX_TOKENS" if plan.finish == "length" else "STOP"


def gemini_response(plan: Plan, *, model: str, ids: Ids) -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {"parts": [{"text": plan.text}], "role": "model"},
                "finishReason": _gemini_finish(plan),
                "index": 0,
            }
        ],
        "usageMetadata": gemini_usage(plan),
        "modelVersion": model,
        "responseId": ids.message_id,
    }


def gemini_stream(plan: Plan, pieces: list[str], *, model: str, ids: Ids) -> list[dict[str, Any]]:
    """Every chunk carries usageMetadata with the output so far; only the last has the
    finishReason and the final counts."""
    chunks, so_far = [], 0
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        so_far = plan.output_tokens if last else min(plan.output_tokens, so_far + len(piece) // 4)
        candidate: dict[str, Any] = {"content": {"parts": [{"text": piece}], "role": "model"}}
        if last:
            candidate["finishReason"] = _gemini_finish(plan)
        candidate["index"] = 0
        chunks.append(
            {
                "candidates": [candidate],
                "usageMetadata": gemini_usage(plan, candidates=so_far),
                "modelVersion": model,
                "responseId": ids.message_id,
            }
        )
    return chunks


# --- errors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorReply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


_OPENAI_ERRORS: dict[str, tuple[int, str, str | None, str | None]] = {
    # kind: (status, type, code, message)
    "auth": (401, "invalid_request_error", "invalid_api_key", None),
    "missing_key": (401, "invalid_request_error", None, None),
    "429": (429, "tokens", "rate_limit_exceeded", None),
    "insufficient_quota": (429, "insufficient_quota", "insufficient_quota", None),
    "500": (500, "server_error", None, None),
    "bad_request": (400, "invalid_request_error", "invalid_value", None),
}
_OPENAI_MESSAGES = {
    "auth": "Incorrect API key provided. You can find your API key at "
    "https://platform.openai.com/account/api-keys.",
    "missing_key": "You didn't provide an API key. You need to provide your API key in an "
    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
    "429": "Rate limit reached for {model} in organization org-simulated on tokens per min "
    "(TPM): Limit 30000, Used 30000, Requested 1200. Please try again in {retry}s.",
    "insufficient_quota": "You exceeded your current quota, please check your plan and "
    "billing details. For more information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors.",
    "500": "The server had an error while processing your request. Sorry about that!",
    "bad_request": "Invalid 'max_tokens': integer below minimum value.",
}
_GLM_ERRORS = {
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
_ANTHROPIC_ERRORS = {
    "auth": (401, "authentication_error", "invalid x-api-key"),
    "missing_key": (401, "authentication_error", "x-api-key header is required"),
    "429": (
        429,
        "rate_limit_error",
        "This request would exceed the rate limit for your organization of 400,000 output "
        "tokens per minute.",
    ),
    # The real API answers a spent credit balance with a 400 invalid_request_error.
    "insufficient_quota": (
        400,
        "invalid_request_error",
        "Your credit balance is too low to access the Anthropic API. Please go to Plans & "
        "Billing to upgrade or purchase credits.",
    ),
    "500": (500, "api_error", "Internal server error"),
    "bad_request": (400, "invalid_request_error", "max_tokens: Field required"),
}
_GEMINI_ERRORS = {
    "auth": (401, "UNAUTHENTICATED", "API key not valid. Please pass a valid API key."),
    "missing_key": (
        401,
        "UNAUTHENTICATED",
        "Method doesn't allow unregistered callers (callers without established identity). "
        "Please use API Key or other form of API consumer identity to call this API.",
    ),
    "429": (
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    "insufficient_quota": (
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    "500": (
        500,
        "INTERNAL",
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    ),
    "bad_request": (400, "INVALID_ARGUMENT", "Request contains an invalid argument."),
}
_GEMINI_CODES = {401: "UNAUTHENTICATED", 429: "RESOURCE_EXHAUSTED"}


def error_reply(
    provider: str,
    kind: str,
    *,
    model: str,
    ids: Ids,
    retry_after: float = 1.0,
    message: str | None = None,
) -> ErrorReply:
    """kind: auth | missing_key | 429 | insufficient_quota | 500 | bad_request. `message`
    replaces the provider's usual wording."""
    wording = message
    retry_text = f"{retry_after:g}"
    if provider == "anthropic":
        status, etype, message = _ANTHROPIC_ERRORS[kind]
        message = wording or message
        body = {
            "type": "error",
            "error": {"type": etype, "message": message},
            "request_id": ids.request_id,
        }
        headers = {"request-id": ids.request_id, "x-should-retry": str(status >= 429).lower()}
        if kind == "429":
            headers["retry-after"] = retry_text
        return ErrorReply(status, body, headers)
    if provider == "google_gemini":
        status, gstatus, message = _GEMINI_ERRORS[kind]
        message = wording or message
        details: list[dict[str, Any]] = []
        if kind in ("auth", "missing_key"):
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }
            )
        elif kind in ("429", "insufficient_quota"):
            # A per-minute quota clears by itself (RetryInfo says when); a per-day quota does
            # not clear within a run, which is how a client tells the two apart.
            per_day = kind == "insufficient_quota"
            quota_id = (
                "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
                if per_day
                else "GenerateContentInputTokensPerModelPerMinute"
            )
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": "generativelanguage.googleapis.com/"
                            "generate_content_requests",
                            "quotaId": quota_id,
                            "quotaDimensions": {"location": "global", "model": model},
                            "quotaValue": "250" if per_day else "1000000",
                        }
                    ],
                }
            )
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [
                        {
                            "description": "Learn more about Gemini API quotas",
                            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                        }
                    ],
                }
            )
            if not per_day:
                details.append(
                    {
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{max(retry_after, 0):g}s",
                    }
                )
        error: dict[str, Any] = {"code": status, "message": message, "status": gstatus}
        if details:
            error["details"] = details
        return ErrorReply(status, {"error": error}, {})
    if provider == "glm":
        status, code, message = _GLM_ERRORS[kind]
        message = wording or message
        headers = {"x-log-id": ids.request_id}
        if kind == "429":
            headers["retry-after"] = retry_text
        return ErrorReply(status, {"error": {"code": code, "message": message}}, headers)
    status, etype, code, _ = _OPENAI_ERRORS[kind]
    message = wording or _OPENAI_MESSAGES[kind].format(model=model, retry=retry_text)
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    if kind == "bad_request":
        body["error"]["param"] = "max_tokens"
    headers = {"x-request-id": ids.request_id}
    if kind == "429":
        headers["retry-after"] = retry_text
        headers["x-ratelimit-remaining-tokens"] = "0"
    return ErrorReply(status, body, headers)


def malformed_body(provider: str, ids: Ids) -> bytes:
    """A 200 body cut off mid-object: valid start, not valid JSON."""
    if provider == "anthropic":
        start = {"id": ids.message_id, "type": "message", "role": "assistant"}
    elif provider == "google_gemini":
        start = {"responseId": ids.message_id, "modelVersion": "sim"}
    else:
        start = {"id": ids.message_id, "object": "chat.completion"}
    return json.dumps(start)[:-1].encode() + b', "choices": [{"index": 0, "message": {"con'
