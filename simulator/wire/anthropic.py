"""Anthropic Messages.

Path: `<prefix>/v1/messages`; key: `x-api-key` (or Bearer). Usage as the real API reports it:
`input_tokens` is only the uncached rest of the prompt; `cache_read_input_tokens` the cached
prefix read; `cache_creation_input_tokens` the part written to the cache, split by TTL in
`cache_creation.{ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}` (their sum);
`output_tokens` counts thinking too (`output_tokens_details.thinking_tokens` says how much).

Cache writes go to the 5-minute cache unless the request's `cache_control` blocks ask for
`"ttl": "1h"` (all of them: every write is a 1-hour one; some of them: the writes are split
half and half), or a script rule says `cache_ttl: "1h"`.

A stream is `message_start` (the input and cache usage, `output_tokens: 1`), the content
blocks, then `message_delta` with the cumulative usage and `message_stop`. The reply names the
dated snapshot (`claude-sonnet-4-5` → `claude-sonnet-4-5-20250929`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from email.message import Message
from typing import Any

from ..content import Plan, RequestInfo
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
    rfc3339,
    sse,
    text_of,
)

ANTHROPIC_SNAPSHOTS = {
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-opus-4-5": "claude-opus-4-5-20251101",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet-20250219",
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
}

# kind: (status, type, message)
_ERRORS: dict[str, tuple[int, str, str]] = {
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

_THINKING = "Let me check the acceptance criteria against the change before answering."


def _cache_ttls(body: dict[str, Any]) -> tuple[str, ...]:
    """The TTL of every cache_control breakpoint in system, messages and tools ("5m" when a
    breakpoint names none, as the API defaults)."""
    ttls: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            control = node.get("cache_control")
            if isinstance(control, dict) and control.get("type") == "ephemeral":
                ttls.append(str(control.get("ttl") or "5m"))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit([body.get("system"), body.get("messages"), body.get("tools")])
    return tuple(ttls)


def _stop(plan: Plan) -> str:
    return "max_tokens" if plan.finish == "length" else "end_turn"


class AnthropicWire(Wire):
    provider = "anthropic"
    snapshots = ANTHROPIC_SNAPSHOTS
    cache_writes = True
    malformed_frame = b'event: content_block_delta\ndata: {"type": "content_block_delta", "ind\n\n'

    def route(self, path: str) -> Route | None:
        return Route() if path.endswith("/v1/messages") else None

    def api_key(self, headers: Message, query: Mapping[str, list[str]]) -> str | None:
        auth = headers.get("Authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        return headers.get("x-api-key") or bearer

    def parse(self, body: Any, route: Route) -> RequestInfo:
        if not isinstance(body, dict):
            raise RequestError("the request body is not a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages is required")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError("model is required")
        if not isinstance(body.get("max_tokens"), int):
            raise RequestError("max_tokens is required")
        prompt = "\n".join(text_of(m.get("content")) for m in messages if isinstance(m, dict))
        return RequestInfo(
            self.provider,
            model,
            text_of(body.get("system")),
            prompt,
            body["max_tokens"],
            body.get("stream") is True,
            thinking=(body.get("thinking") or {}).get("type") in ("enabled", "adaptive"),
            cache_ttls=_cache_ttls(body),
        )

    def plan(self, info: RequestInfo, plan: Plan) -> Plan:
        ttls = set(info.cache_ttls)
        if "1h" not in ttls:
            return plan
        # A prompt with both TTLs writes its earlier (1-hour) breakpoints and its later
        # (5-minute) ones; half and half stands in for where they fall.
        share = plan.cache_write_tokens if ttls == {"1h"} else plan.cache_write_tokens // 2
        return replace(plan, cache_write_1h_tokens=share)

    def new_ids(self) -> Ids:
        return Ids(request_id=f"req_011C{rand(20)}", message_id=f"msg_01{rand(22)}")

    def headers(self, ids: Ids, latency_ms: int) -> dict[str, str]:
        return {
            "request-id": ids.request_id,
            "anthropic-organization-id": "00000000-0000-4000-8000-00000000cafe",
        }

    def limit_headers(self, view: LimitView, now: float) -> dict[str, str]:
        # anthropic-ratelimit-*: the resets are RFC 3339 instants; `tokens-*` is the most
        # restrictive token limit, and the simulator counts input and output together.
        reset = rfc3339(view.reset_at)
        headers = {
            "anthropic-ratelimit-requests-limit": str(view.requests_limit),
            "anthropic-ratelimit-requests-remaining": str(view.requests_remaining),
            "anthropic-ratelimit-requests-reset": reset,
        }
        for name in ("tokens", "input-tokens", "output-tokens"):
            headers[f"anthropic-ratelimit-{name}-limit"] = str(view.tokens_limit)
            headers[f"anthropic-ratelimit-{name}-remaining"] = str(view.tokens_remaining)
            headers[f"anthropic-ratelimit-{name}-reset"] = reset
        return headers

    def usage(self, plan: Plan, *, output_tokens: int | None = None) -> dict[str, Any]:
        usage: dict[str, Any] = {
            # input_tokens excludes cache reads and writes, as in the real API.
            "input_tokens": plan.uncached_input_tokens,
            "cache_creation_input_tokens": plan.cache_write_tokens,
            "cache_read_input_tokens": plan.cached_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": plan.cache_write_tokens - plan.cache_write_1h_tokens,
                "ephemeral_1h_input_tokens": plan.cache_write_1h_tokens,
            },
            "output_tokens": plan.completion_tokens if output_tokens is None else output_tokens,
            "service_tier": "standard",
        }
        if plan.reasoning_tokens and output_tokens is None:
            usage["output_tokens_details"] = {"thinking_tokens": plan.reasoning_tokens}
        return usage

    def body(self, plan: Plan, info: RequestInfo, ids: Ids) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if plan.reasoning_tokens:
            content.append({"type": "thinking", "thinking": _THINKING, "signature": rand(64)})
        content.append({"type": "text", "text": plan.text})
        return {
            "id": ids.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.reported_model(info.model),
            "content": content,
            "stop_reason": _stop(plan),
            "stop_sequence": None,
            "usage": self.usage(plan),
        }

    def stream(self, plan: Plan, pieces: list[str], info: RequestInfo, ids: Ids) -> list[Frame]:
        start = self.body(plan, info, ids)
        start_usage = self.usage(plan, output_tokens=1)
        start.update(content=[], stop_reason=None, usage=start_usage)

        def event(data: dict[str, Any], part: Part, usage: dict[str, Any] | None = None) -> Frame:
            return Frame(sse(data, event=data["type"]), part, usage)

        frames = [event({"type": "message_start", "message": start}, Part.HEAD, start_usage)]
        index = 0
        if plan.reasoning_tokens:
            frames += [
                event(
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
                    },
                    Part.HEAD,
                ),
                event(
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "thinking_delta", "thinking": _THINKING},
                    },
                    Part.HEAD,
                ),
                event(
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "signature_delta", "signature": rand(64)},
                    },
                    Part.HEAD,
                ),
                event({"type": "content_block_stop", "index": 0}, Part.HEAD),
            ]
            index = 1
        frames.append(
            event(
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
                Part.HEAD,
            )
        )
        frames.append(event({"type": "ping"}, Part.HEAD))
        frames += [
            event(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": piece},
                },
                Part.CONTENT,
            )
            for piece in pieces
        ]
        frames.append(event({"type": "content_block_stop", "index": index}, Part.TAIL))
        # message_delta's usage is cumulative: the input and cache counts again, the output
        # in full (what the SDK's MessageDeltaUsage carries).
        final = self.usage(plan)
        final.pop("cache_creation")
        final.pop("service_tier")
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": _stop(plan), "stop_sequence": None},
            "usage": final,
        }
        frames.append(event(delta, Part.TAIL, final))
        frames.append(event({"type": "message_stop"}, Part.TAIL))
        return frames

    def malformed_body(self, ids: Ids) -> bytes:
        start = {"id": ids.message_id, "type": "message", "role": "assistant"}
        return json.dumps(start)[:-1].encode() + b', "choices": [{"index": 0, "message": {"con'

    def error(
        self, kind: str, *, model: str, ids: Ids, retry_after: float, message: str | None
    ) -> ErrorReply:
        status, etype, wording = _ERRORS[kind]
        body = {
            "type": "error",
            "error": {"type": etype, "message": message or wording},
            "request_id": ids.request_id,
        }
        headers = {"request-id": ids.request_id, "x-should-retry": str(status >= 429).lower()}
        if kind == "429" and retry_after >= 0:
            headers["retry-after"] = f"{retry_after:g}"
        return ErrorReply(status, body, headers)


ANTHROPIC = AnthropicWire()
