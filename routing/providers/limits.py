"""What a provider says about its own limits, read from the headers of every response (and of
every error): one `RateLimits` shape for all protocols, and the cooldown it implies.

- OpenAI and GLM (Z.ai): `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`; a reset is a
  duration from now ("6m0s", "1s", "20ms", "1h2m3.5s").
- Anthropic: `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,
  remaining,reset}`; a reset is an RFC 3339 instant. `tokens-*` is the most restrictive of the
  token limits in force; without it, the input-token limit stands for the tokens.
- Every protocol: `retry-after` (seconds, or an HTTP date) and OpenAI's `retry-after-ms`.
- Gemini sends none of these on a reply; its 429 says `retryDelay` in the error's details
  (read by routing/providers/gemini.py into ProviderCallError.retry_after).

Only these headers are kept (`rate_limit_headers`): a response's other headers (cookies,
organisation ids, anything an auth layer adds) never leave the provider module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

# Lower-case header names (or prefixes) that carry limit information; nothing else is stored.
RATE_LIMIT_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
RETRY_AFTER_HEADERS = ("retry-after", "retry-after-ms")
MAX_HEADER_CHARS = 100

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The latest limit information one response carried; None = the provider did not say."""

    requests_limit: int | None = None
    requests_remaining: int | None = None
    requests_reset_at: datetime | None = None
    tokens_limit: int | None = None
    tokens_remaining: int | None = None
    tokens_reset_at: datetime | None = None
    retry_after_until: datetime | None = None
    # The rate-limit headers as sent (names lower-cased), for the provider panel.
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def empty(self) -> bool:
        return not self.headers

    @property
    def announced_reset(self) -> datetime | None:
        """When the provider says the exhausted limit comes back: Retry-After, else the reset
        of the limit that is spent (tokens before requests), else the later of the resets."""
        if self.retry_after_until is not None:
            return self.retry_after_until
        if self.tokens_remaining == 0 and self.tokens_reset_at is not None:
            return self.tokens_reset_at
        if self.requests_remaining == 0 and self.requests_reset_at is not None:
            return self.requests_reset_at
        resets = [r for r in (self.tokens_reset_at, self.requests_reset_at) if r is not None]
        return max(resets) if resets else None


def rate_limit_headers(headers: Any) -> dict[str, str]:
    """Only the rate-limit headers of a response (names lower-cased, values truncated)."""
    if headers is None:
        return {}
    items = headers.items() if hasattr(headers, "items") else []
    kept: dict[str, str] = {}
    for name, value in items:
        lower = str(name).lower()
        if lower.startswith(RATE_LIMIT_PREFIXES) or lower in RETRY_AFTER_HEADERS:
            kept[lower] = str(value)[:MAX_HEADER_CHARS]
    return kept


def parse_duration(value: str) -> float | None:
    """Seconds in an OpenAI reset duration ("6m0s", "1s", "20ms", "1h2m3.5s"); None if none."""
    text = value.strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))  # a bare number: seconds
    except ValueError:
        pass
    total, pos = 0.0, 0
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * unit[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos else None


def _instant(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _reset(value: str | None, now: datetime) -> datetime | None:
    """A reset header: a duration from now (OpenAI, GLM) or an RFC 3339 instant (Anthropic)."""
    if not value:
        return None
    seconds = parse_duration(value)
    if seconds is not None:
        return now + timedelta(seconds=seconds)
    return _instant(value)


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return max(0, int(float(value)))
    except ValueError:
        return None


def retry_after_until(headers: Mapping[str, str], now: datetime) -> datetime | None:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return now + timedelta(milliseconds=max(0.0, float(ms)))
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return now + timedelta(seconds=max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def parse_rate_limits(headers: Any, *, now: datetime | None = None) -> RateLimits | None:
    """The limits a response's headers announce (any protocol), or None when it sent none."""
    kept = rate_limit_headers(headers)
    if not kept:
        return None
    now = now or datetime.now(UTC)
    get = kept.get
    if any(name.startswith("anthropic-ratelimit-") for name in kept):
        tokens = "tokens" if "anthropic-ratelimit-tokens-limit" in kept else "input-tokens"
        a = "anthropic-ratelimit-"
        return RateLimits(
            requests_limit=_int(get(f"{a}requests-limit")),
            requests_remaining=_int(get(f"{a}requests-remaining")),
            requests_reset_at=_reset(get(f"{a}requests-reset"), now),
            tokens_limit=_int(get(f"{a}{tokens}-limit")),
            tokens_remaining=_int(get(f"{a}{tokens}-remaining")),
            tokens_reset_at=_reset(get(f"{a}{tokens}-reset"), now),
            retry_after_until=retry_after_until(kept, now),
            headers=tuple(sorted(kept.items())),
        )
    x = "x-ratelimit-"
    return RateLimits(
        requests_limit=_int(get(f"{x}limit-requests")),
        requests_remaining=_int(get(f"{x}remaining-requests")),
        requests_reset_at=_reset(get(f"{x}reset-requests"), now),
        tokens_limit=_int(get(f"{x}limit-tokens")),
        tokens_remaining=_int(get(f"{x}remaining-tokens")),
        tokens_reset_at=_reset(get(f"{x}reset-tokens"), now),
        retry_after_until=retry_after_until(kept, now),
        headers=tuple(sorted(kept.items())),
    )


@dataclass(frozen=True, slots=True)
class Cooldown:
    """A provider not to be called before `until`; `reason` says what it answered."""

    until: datetime
    reason: str

    def active(self, now: datetime) -> bool:
        return self.until > now


def cooldown_after_reply(
    provider: str,
    limits: RateLimits | None,
    *,
    needed_tokens: int,
    default_seconds: float,
    now: datetime | None = None,
) -> Cooldown | None:
    """The cooldown a successful reply's limits imply: its remaining tokens cannot serve a call
    of `needed_tokens` (or no request is left) before the announced reset. None: go on."""
    if limits is None:
        return None
    now = now or datetime.now(UTC)
    default = now + timedelta(seconds=default_seconds)
    if limits.tokens_remaining is not None and limits.tokens_remaining < needed_tokens:
        until = limits.tokens_reset_at or limits.retry_after_until or default
        reason = (
            f"{limits.tokens_remaining:,} tokens left at {provider}, about {needed_tokens:,} needed"
        )
        return Cooldown(until, reason) if until > now else None
    if limits.requests_remaining == 0:
        until = limits.requests_reset_at or limits.retry_after_until or default
        return Cooldown(until, f"no requests left at {provider}") if until > now else None
    return None
