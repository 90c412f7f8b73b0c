"""Gemini generateContent / streamGenerateContent.

Path: `<prefix>/<version>/models/<model>:generateContent` (or `:streamGenerateContent?alt=sse`);
key: `x-goog-api-key` or `?key=` (never logged). Usage (`usageMetadata`) as the real API
reports it: `promptTokenCount` includes the cached part (`cachedContentTokenCount`);
`candidatesTokenCount` excludes thoughts (`thoughtsTokenCount`, billed as output); a request
that declares `tools` also reports `toolUsePromptTokenCount` (billed as input);
`totalTokenCount` is the sum of prompt, tool-use prompt, candidates and thoughts.

A stream is SSE chunks that each carry the cumulative `usageMetadata` so far and the
`modelVersion`; only the last has the `finishReason` and the final counts. `modelVersion` names
what answered: the same name for a stable model, the dated preview behind an alias
(`gemini-flash-latest` → `gemini-2.5-flash-preview-09-2025`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from email.message import Message
from typing import Any
from urllib.parse import unquote

from ..content import Plan, RequestInfo, rng_for
from . import ErrorReply, Frame, Ids, Part, RequestError, Route, Wire, rand, sse

_PATH = re.compile(r"/models/([^/]+):(generateContent|streamGenerateContent)$")

GEMINI_SNAPSHOTS = {
    "gemini-flash-latest": "gemini-2.5-flash-preview-09-2025",
    "gemini-flash-lite-latest": "gemini-2.5-flash-lite-preview-09-2025",
    "gemini-2.0-flash": "gemini-2.0-flash-001",
    "gemini-1.5-pro": "gemini-1.5-pro-002",
    "gemini-1.5-flash": "gemini-1.5-flash-002",
}

# kind: (status, status name, message)
_ERRORS: dict[str, tuple[int, str, str]] = {
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


def _text(content: Any) -> str:
    if not isinstance(content, dict):
        return ""
    return "\n".join(
        str(p.get("text", "")) for p in content.get("parts") or [] if isinstance(p, dict)
    )


def _finish(plan: Plan) -> str:
    return "MAX_TOKENS" if plan.finish == "length" else "STOP"


def _quota_details(kind: str, model: str, retry_after: float) -> list[dict[str, Any]]:
    # A per-minute quota clears by itself (RetryInfo says when); a per-day quota does not
    # clear within a run, which is how a client tells the two apart.
    per_day = kind == "insufficient_quota"
    quota_id = (
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
        if per_day
        else "GenerateContentInputTokensPerModelPerMinute"
    )
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                    "quotaId": quota_id,
                    "quotaDimensions": {"location": "global", "model": model},
                    "quotaValue": "250" if per_day else "1000000",
                }
            ],
        },
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [
                {
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }
            ],
        },
    ]
    if not per_day and retry_after >= 0:  # a bare 429 (retry_after < 0) has no RetryInfo
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": f"{max(retry_after, 0):g}s",
            }
        )
    return details


class GeminiWire(Wire):
    provider = "google_gemini"
    snapshots = GEMINI_SNAPSHOTS
    malformed_frame = b'data: {"candidates": [{"content": {"parts": [{"te\r\n\r\n'

    def route(self, path: str) -> Route | None:
        match = _PATH.search(path)
        if match is None:
            return None
        return Route(model=unquote(match.group(1)), stream=match.group(2) != "generateContent")

    def api_key(self, headers: Message, query: Mapping[str, list[str]]) -> str | None:
        keys = query.get("key") or []
        return headers.get("x-goog-api-key") or (keys[0] if keys else None)

    def parse(self, body: Any, route: Route) -> RequestInfo:
        if not isinstance(body, dict):
            raise RequestError("the request body is not a JSON object")
        contents = body.get("contents") or []
        if not isinstance(contents, list) or not contents:
            raise RequestError("contents is required")
        system = _text(body.get("systemInstruction") or body.get("system_instruction"))
        config = body.get("generationConfig") or {}
        return RequestInfo(
            self.provider,
            route.model,
            system,
            "\n".join(_text(c) for c in contents),
            int(config.get("maxOutputTokens") or 8192),
            route.stream,
            tools=bool(body.get("tools")),
        )

    def reasons(self, info: RequestInfo) -> bool:
        name = info.model.lower()
        return (
            "2.5" in name or name.startswith(("gemini-3", "gemini-4")) or name.endswith("-latest")
        )

    def plan(self, info: RequestInfo, plan: Plan) -> Plan:
        if not info.tools:
            return plan
        # The tool-use prompt (a search's or code run's results fed back to the model).
        tokens = rng_for("tool-use", info.model, info.full_text).randint(4, 40) * 16
        return replace(plan, tool_use_prompt_tokens=tokens)

    def new_ids(self) -> Ids:
        # responseId is the only request id Gemini gives.
        rid = rand(22)
        return Ids(request_id=rid, message_id=rid)

    def headers(self, ids: Ids, latency_ms: int) -> dict[str, str]:
        return {"server-timing": f"gfet4t7; dur={latency_ms}", "vary": "Origin, X-Origin, Referer"}

    def usage(self, plan: Plan, *, candidates: int | None = None) -> dict[str, Any]:
        out = plan.output_tokens if candidates is None else candidates
        tool_use = plan.tool_use_prompt_tokens
        usage: dict[str, Any] = {
            "promptTokenCount": plan.prompt_tokens,
            "candidatesTokenCount": out,
            "totalTokenCount": plan.prompt_tokens + tool_use + out + plan.reasoning_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": plan.prompt_tokens}],
        }
        if plan.cached_tokens:
            usage["cachedContentTokenCount"] = plan.cached_tokens
            usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": plan.cached_tokens}]
        if plan.reasoning_tokens:
            usage["thoughtsTokenCount"] = plan.reasoning_tokens
        if tool_use:
            usage["toolUsePromptTokenCount"] = tool_use
            usage["toolUsePromptTokensDetails"] = [{"modality": "TEXT", "tokenCount": tool_use}]
        return usage

    def body(self, plan: Plan, info: RequestInfo, ids: Ids) -> dict[str, Any]:
        return {
            "candidates": [
                {
                    "content": {"parts": [{"text": plan.text}], "role": "model"},
                    "finishReason": _finish(plan),
                    "index": 0,
                }
            ],
            "usageMetadata": self.usage(plan),
            "modelVersion": self.reported_model(info.model),
            "responseId": ids.message_id,
        }

    def stream(self, plan: Plan, pieces: list[str], info: RequestInfo, ids: Ids) -> list[Frame]:
        frames, so_far = [], 0
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            so_far = (
                plan.output_tokens if last else min(plan.output_tokens, so_far + len(piece) // 4)
            )
            candidate: dict[str, Any] = {"content": {"parts": [{"text": piece}], "role": "model"}}
            if last:
                candidate["finishReason"] = _finish(plan)
            candidate["index"] = 0
            usage = self.usage(plan, candidates=so_far)
            chunk = {
                "candidates": [candidate],
                "usageMetadata": usage,
                "modelVersion": self.reported_model(info.model),
                "responseId": ids.message_id,
            }
            frames.append(Frame(sse(chunk, crlf=True), Part.TAIL if last else Part.CONTENT, usage))
        return frames

    def malformed_body(self, ids: Ids) -> bytes:
        start = {"responseId": ids.message_id, "modelVersion": "sim"}
        return json.dumps(start)[:-1].encode() + b', "choices": [{"index": 0, "message": {"con'

    def error(
        self, kind: str, *, model: str, ids: Ids, retry_after: float, message: str | None
    ) -> ErrorReply:
        status, gstatus, wording = _ERRORS[kind]
        error: dict[str, Any] = {"code": status, "message": message or wording, "status": gstatus}
        if kind in ("auth", "missing_key"):
            error["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }
            ]
        elif kind in ("429", "insufficient_quota"):
            error["details"] = _quota_details(kind, model, retry_after)
        return ErrorReply(status, {"error": error}, {})


GEMINI = GeminiWire()
