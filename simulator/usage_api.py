"""The providers' own usage APIs (admin keys), in step with what the simulator answered.

Two routes, each under its provider's URL prefix (server.ROUTES), so the base URL that points a
provider's model calls at the simulator points its usage reader here too:

- OpenAI's organization usage API, `GET <openai prefix>/v1/organization/usage/completions`:
  query `start_time`, `end_time` (Unix seconds; start inclusive, end exclusive),
  `bucket_width` 1m | 1h | 1d (default 1d), `group_by` (model; others answer null), `limit`
  (buckets per page; defaults 60 | 24 | 7, most 1440 | 168 | 31) and `page` (the `next_page`
  of the previous answer). Key: `Authorization: Bearer sk-admin-…`. Answer: `{"object": "page",
  "data": [{"object": "bucket", "start_time", "end_time", "results": [{"object":
  "organization.usage.completions.result", "input_tokens" (every input token, cache reads and
  writes included), "input_cached_tokens", "input_cache_write_tokens", "input_uncached_tokens",
  "input_audio_tokens", "output_tokens", "output_audio_tokens", "num_model_requests", "model",
  "project_id", "user_id", "api_key_id", "batch", "service_tier"}]}], "has_more",
  "next_page"}`. Every bucket of the range is listed, those without usage with no results.
- Anthropic's Usage & Cost admin API, `GET <anthropic prefix>/v1/organizations/usage_report/
  messages`: query `starting_at`, `ending_at` (RFC 3339), `bucket_width`, `group_by[]` (model),
  `limit`, `page`. Key: `x-api-key: sk-ant-admin…` and an `anthropic-version` header. Answer:
  `{"data": [{"starting_at", "ending_at", "results": [{"uncached_input_tokens",
  "cache_read_input_tokens", "cache_creation": {"ephemeral_1h_input_tokens",
  "ephemeral_5m_input_tokens"}, "output_tokens", "server_tool_use", "model", "api_key_id",
  "workspace_id", "service_tier", "context_window"}]}], "has_more", "next_page"}`.

The numbers are the simulator's own counters (UsageCounters): per provider, UTC minute and the
model the reply named (the dated snapshot, as the real reports name it), the usage of every call
it answered with a 200 (a stream it then cut or a body it broke included: the provider did the
work), plus what POST /_sim/other_usage added ("other tools": usage the provider saw that was
never answered to Autopack). A key that is missing, starts with `invalid` or is not an admin key
is refused with the provider's 401; a fault rule with `role: "usage_api"` (kinds 500, 429, auth,
hang) hits these routes only, and no other rule does.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from typing import Any

from .state import RuleError

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}  # (default, most) buckets per page
USAGE_API_ROLE = "usage_api"  # the `role` of a fault rule that hits these routes
OPENAI_PATH = "/v1/organization/usage/completions"
ANTHROPIC_PATH = "/v1/organizations/usage_report/messages"
# provider → (URL prefix, path after it): where each provider's usage API is served.
USAGE_ROUTES = {
    "openai": ("/openai", OPENAI_PATH),
    "anthropic": ("/anthropic", ANTHROPIC_PATH),
}
_FIELDS = ("input", "cached", "cache_write_5m", "cache_write_1h", "output", "requests")


@dataclass
class Counts:
    input: int = 0  # every input token, cache reads and writes included
    cached: int = 0  # cache reads
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    output: int = 0  # reasoning/thinking included
    requests: int = 0

    def add(self, other: Counts) -> None:
        for name in _FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def cache_write(self) -> int:
        return self.cache_write_5m + self.cache_write_1h


def counts_from_usage(provider: str, usage: Mapping[str, Any]) -> Counts | None:
    """The counters of one answered call from its usage block exactly as it was sent, for the
    providers with a usage API (None for the others)."""
    if provider == "openai":
        details = usage.get("prompt_tokens_details") or {}
        return Counts(
            input=int(usage.get("prompt_tokens") or 0),
            cached=int(details.get("cached_tokens") or 0),
            output=int(usage.get("completion_tokens") or 0),
            requests=1,
        )
    if provider == "anthropic":
        creation = usage.get("cache_creation") or {}
        write_1h = int(creation.get("ephemeral_1h_input_tokens") or 0)
        write = int(usage.get("cache_creation_input_tokens") or 0)
        read = int(usage.get("cache_read_input_tokens") or 0)
        return Counts(
            input=int(usage.get("input_tokens") or 0) + read + write,
            cached=read,
            cache_write_5m=write - write_1h,
            cache_write_1h=write_1h,
            output=int(usage.get("output_tokens") or 0),
            requests=1,
        )
    return None


@dataclass
class UsageCounters:
    """provider → (minute start, model) → Counts. Its own lock: the model-call path adds to it
    beside SimState's."""

    minutes: dict[str, dict[tuple[int, str], Counts]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, provider: str, model: str, counts: Counts, *, at: float | None = None) -> None:
        at = time.time() if at is None else at
        minute = int(at // 60 * 60)
        with self.lock:
            per = self.minutes.setdefault(provider, {})
            per.setdefault((minute, model), Counts()).add(counts)

    def buckets(
        self, provider: str, start: int, end: int, width: int, *, by_model: bool
    ) -> dict[int, dict[str | None, Counts]]:
        """Bucket start → model (None when not grouped) → Counts, for usage in [start, end)
        whose bucket starts in it."""
        out: dict[int, dict[str | None, Counts]] = {}
        with self.lock:
            rows = list(self.minutes.get(provider, {}).items())
        for (minute, model), counts in rows:
            if not start <= minute < end:
                continue
            bucket = minute // width * width
            key = model if by_model else None
            out.setdefault(bucket, {}).setdefault(key, Counts()).add(counts)
        return out

    def reset(self) -> None:
        with self.lock:
            self.minutes.clear()


def parse_other_usage(data: dict[str, Any]) -> tuple[str, str, Counts, float]:
    """POST /_sim/other_usage {provider, model, input_tokens, output_tokens,
    cached_tokens=0, cache_write_tokens=0, cache_write_1h_tokens=0, requests=1, at}: `at` Unix
    seconds or RFC 3339 (default now). input_tokens counts every input token (cache parts
    included, as the usage APIs' totals do)."""
    provider = data.get("provider")
    if provider not in USAGE_ROUTES:
        raise RuleError(f"provider: one of {', '.join(USAGE_ROUTES)}, got {provider!r}")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise RuleError("model: expected a model name")
    values: dict[str, int] = {}
    for key, default in (
        ("input_tokens", None),
        ("output_tokens", None),
        ("cached_tokens", 0),
        ("cache_write_tokens", 0),
        ("cache_write_1h_tokens", 0),
        ("requests", 1),
    ):
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RuleError(f"{key}: expected a whole number >= 0, got {value!r}")
        values[key] = value
    if values["cached_tokens"] + values["cache_write_tokens"] > values["input_tokens"]:
        raise RuleError("cached_tokens + cache_write_tokens: at most input_tokens")
    if values["cache_write_1h_tokens"] > values["cache_write_tokens"]:
        raise RuleError("cache_write_1h_tokens: at most cache_write_tokens")
    at = data.get("at")
    if at is None:
        when = time.time()
    elif isinstance(at, int | float) and not isinstance(at, bool):
        when = float(at)
    elif isinstance(at, str):
        when = _parse_instant(at, "at")
    else:
        raise RuleError(f"at: expected Unix seconds or an RFC 3339 time, got {at!r}")
    counts = Counts(
        input=values["input_tokens"],
        cached=values["cached_tokens"],
        cache_write_5m=values["cache_write_tokens"] - values["cache_write_1h_tokens"],
        cache_write_1h=values["cache_write_1h_tokens"],
        output=values["output_tokens"],
        requests=values["requests"],
    )
    return provider, model, counts, when


def _parse_instant(text: str, name: str) -> float:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RuleError(f"{name}: expected an RFC 3339 time, got {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _rfc3339(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class UsageApiError(Exception):
    """An answer other than 200: the provider's status and error body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def usage_route(path: str) -> str | None:
    """The provider whose usage API `path` is, or None."""
    for provider, (prefix, tail) in USAGE_ROUTES.items():
        if path == prefix + tail:
            return provider
    return None


def _openai_error(status: int, message: str, etype: str = "invalid_request_error") -> UsageApiError:
    return UsageApiError(
        status, {"error": {"message": message, "type": etype, "param": None, "code": None}}
    )


def _anthropic_error(status: int, message: str, etype: str) -> UsageApiError:
    return UsageApiError(status, {"type": "error", "error": {"type": etype, "message": message}})


def check_key(provider: str, headers: Message) -> None:
    """Raise the provider's 401 (400 for Anthropic's missing version) unless an admin key."""
    if provider == "openai":
        auth = headers.get("Authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not key:
            raise _openai_error(401, "You didn't provide an API key.")
        if key.startswith("invalid") or not key.startswith("sk-admin-"):
            raise _openai_error(
                401,
                "Incorrect API key provided. This endpoint needs an admin key "
                "(https://platform.openai.com/settings/organization/admin-keys).",
            )
        return
    key = headers.get("x-api-key") or ""
    if not key:
        raise _anthropic_error(401, "x-api-key header is required", "authentication_error")
    if key.startswith("invalid") or not key.startswith("sk-ant-admin"):
        raise _anthropic_error(401, "invalid x-api-key", "authentication_error")
    if not headers.get("anthropic-version"):
        raise _anthropic_error(400, "anthropic-version header is required", "invalid_request_error")


def fault_error(provider: str, kind: str, retry_after: float) -> UsageApiError:
    """The error a usage_api fault rule answers with."""
    if kind == "auth":
        if provider == "openai":
            return _openai_error(401, "Incorrect API key provided.")
        return _anthropic_error(401, "invalid x-api-key", "authentication_error")
    if kind == "429":
        if provider == "openai":
            return _openai_error(429, "Rate limit reached for organization usage.", "rate_limit")
        return _anthropic_error(429, "Rate limited.", "rate_limit_error")
    if provider == "openai":
        return _openai_error(
            500, "The server had an error processing your request.", "server_error"
        )
    return _anthropic_error(500, "Internal server error", "api_error")


def _one(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _width_and_limit(query: Mapping[str, list[str]], error: Any) -> tuple[str, int, int]:
    width = _one(query, "bucket_width") or "1d"
    if width not in WIDTHS:
        raise error(400, f"bucket_width: one of 1m, 1h, 1d, got {width!r}")
    default, most = LIMITS[width]
    raw = _one(query, "limit")
    try:
        limit = int(raw) if raw is not None else default
    except ValueError:
        raise error(400, f"limit: expected a whole number, got {raw!r}") from None
    if not 1 <= limit <= most:
        raise error(400, f"limit: between 1 and {most} for bucket_width={width}")
    return width, WIDTHS[width], limit


def _page(token: str | None, error: Any) -> int | None:
    """The bucket start a page token stands for (opaque to clients, as the real ones)."""
    if token is None:
        return None
    try:
        return int(base64.urlsafe_b64decode(token.removeprefix("page_").encode()).decode())
    except (ValueError, UnicodeDecodeError):
        raise error(400, f"page: not a page token: {token!r}") from None


def _token(start: int) -> str:
    return "page_" + base64.urlsafe_b64encode(str(start).encode()).decode()


def _bucket_starts(
    start: int, end: int, step: int, limit: int, page: int | None
) -> tuple[list[int], int | None]:
    first = start // step * step
    if page is not None:
        first = max(first, page // step * step)
    starts: list[int] = []
    at = first
    while at < end and len(starts) < limit:
        starts.append(at)
        at += step
    return starts, (at if at < end else None)


def openai_usage(
    counters: UsageCounters, query: Mapping[str, list[str]], *, now: float | None = None
) -> dict[str, Any]:
    def error(status: int, message: str) -> UsageApiError:
        return _openai_error(status, message)

    raw_start = _one(query, "start_time")
    try:
        start = int(raw_start) if raw_start is not None else None
        raw_end = _one(query, "end_time")
        end = int(raw_end) if raw_end is not None else None
    except ValueError:
        raise error(400, "start_time and end_time: Unix seconds") from None
    if start is None:
        raise error(400, "start_time is required")
    _width, step, limit = _width_and_limit(query, error)
    if end is None:
        end = int(time.time() if now is None else now)
    by_model = "model" in query.get("group_by", []) + query.get("group_by[]", [])
    starts, more = _bucket_starts(start, end, step, limit, _page(_one(query, "page"), error))
    found = counters.buckets("openai", starts[0] if starts else start, end, step, by_model=by_model)
    data = []
    for bucket in starts:
        results = []
        for model, c in sorted(found.get(bucket, {}).items(), key=lambda kv: kv[0] or ""):
            results.append(
                {
                    "object": "organization.usage.completions.result",
                    "input_tokens": c.input,
                    "output_tokens": c.output,
                    "input_cached_tokens": c.cached,
                    "input_cache_write_tokens": c.cache_write,
                    "input_uncached_tokens": c.input - c.cached - c.cache_write,
                    "input_audio_tokens": 0,
                    "output_audio_tokens": 0,
                    "num_model_requests": c.requests,
                    "project_id": None,
                    "user_id": None,
                    "api_key_id": None,
                    "model": model,
                    "batch": None,
                    "service_tier": None,
                }
            )
        data.append(
            {
                "object": "bucket",
                "start_time": bucket,
                "end_time": bucket + step,
                "results": results,
            }
        )
    return {
        "object": "page",
        "data": data,
        "has_more": more is not None,
        "next_page": _token(more) if more is not None else None,
    }


def anthropic_usage(
    counters: UsageCounters, query: Mapping[str, list[str]], *, now: float | None = None
) -> dict[str, Any]:
    def error(status: int, message: str) -> UsageApiError:
        return _anthropic_error(status, message, "invalid_request_error")

    raw_start = _one(query, "starting_at")
    if raw_start is None:
        raise error(400, "starting_at: Field required")
    try:
        start = int(_parse_instant(raw_start, "starting_at"))
        raw_end = _one(query, "ending_at")
        end = int(_parse_instant(raw_end, "ending_at")) if raw_end else None
    except RuleError as exc:
        raise error(400, str(exc)) from None
    _width, step, limit = _width_and_limit(query, error)
    if end is None:
        end = int(time.time() if now is None else now)
    by_model = "model" in query.get("group_by[]", []) + query.get("group_by", [])
    starts, more = _bucket_starts(start, end, step, limit, _page(_one(query, "page"), error))
    found = counters.buckets(
        "anthropic", starts[0] if starts else start, end, step, by_model=by_model
    )
    data = []
    for bucket in starts:
        results = []
        for model, c in sorted(found.get(bucket, {}).items(), key=lambda kv: kv[0] or ""):
            results.append(
                {
                    "uncached_input_tokens": c.input - c.cached - c.cache_write,
                    "cache_read_input_tokens": c.cached,
                    "cache_creation": {
                        "ephemeral_1h_input_tokens": c.cache_write_1h,
                        "ephemeral_5m_input_tokens": c.cache_write_5m,
                    },
                    "output_tokens": c.output,
                    "server_tool_use": {"web_search_requests": 0},
                    "api_key_id": None,
                    "workspace_id": None,
                    "model": model,
                    "service_tier": None,
                    "context_window": None,
                }
            )
        data.append(
            {
                "starting_at": _rfc3339(bucket),
                "ending_at": _rfc3339(bucket + step),
                "results": results,
            }
        )
    return {
        "data": data,
        "has_more": more is not None,
        "next_page": _token(more) if more is not None else None,
    }


def usage_report(
    provider: str, counters: UsageCounters, query: Mapping[str, list[str]]
) -> dict[str, Any]:
    if provider == "openai":
        return openai_usage(counters, query)
    return anthropic_usage(counters, query)
