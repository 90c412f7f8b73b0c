"""The providers' own usage APIs, read with an admin key and stored per bucket and model.

Two providers have one (README "The providers' own usage APIs"):

- OpenAI's organization usage API, `GET /v1/organization/usage/completions`, read through the
  official SDK's admin client (`OpenAI(admin_api_key=…).admin.organization.usage.completions`).
  Key: OPENAI_ADMIN_KEY (an `sk-admin-…` key). Its `input_tokens` counts every input token,
  cached and cache-write ones included (`input_cached_tokens`, `input_cache_write_tokens` are
  parts of it); `output_tokens` every output token, reasoning included.
- Anthropic's Usage & Cost admin API, `GET /v1/organizations/usage_report/messages`, read over
  plain HTTP (httpx2, the SDKs' transport): the anthropic SDK has no client for it. Key:
  ANTHROPIC_ADMIN_KEY (an `sk-ant-admin…` key) in `x-api-key`, with `anthropic-version`. Its
  input is split: `uncached_input_tokens` + `cache_read_input_tokens` +
  `cache_creation.{ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}` is every input
  token; `output_tokens` counts thinking too. Requests are not reported (stored as None).

Both are normalised to ProviderReportedUsage's fields, which mean what TokenUsage's do:
input_tokens every input token with the cache parts repeated separately, output_tokens every
output token. Google's Gemini API and GLM (Z.ai) have no such API for API keys (README).

A fetch reads the last AUTOPACK_PROVIDER_USAGE_DAYS UTC days (today included) in hour and day
buckets, every page, then stores them in one transaction: each (provider, width, bucket,
model) row is upserted and the rows of the range the answer no longer holds are deleted, so
re-reading changes nothing and nothing is ever added twice. The HTTP reads happen before the
transaction. The admin key is read from the environment at fetch time, passed to the client
and nowhere else: never stored, never logged, scrubbed from any error text kept.

The base URL: AUTOPACK_<PROVIDER>_ADMIN_BASE_URL, else the provider endpoint's
AUTOPACK_<PROVIDER>_BASE_URL (what points the model calls at the simulated provider points the
usage reads there too), else the provider's public API.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .models import BucketWidth, ProviderReportedUsage, ProviderUsageFetch

logger = logging.getLogger(__name__)

ADMIN_KEY_ENVS = {"openai": "OPENAI_ADMIN_KEY", "anthropic": "ANTHROPIC_ADMIN_KEY"}
DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
}
LABELS = {"openai": "OpenAI", "anthropic": "Anthropic"}
ANTHROPIC_VERSION = "2023-06-01"
WIDTHS = (BucketWidth.HOUR, BucketWidth.DAY)
WIDTH_SECONDS = {BucketWidth.HOUR: 3600, BucketWidth.DAY: 86400}
# The most buckets one page may hold (both APIs): 168 hours, 31 days.
PAGE_LIMITS = {BucketWidth.HOUR: 168, BucketWidth.DAY: 31}
MAX_PAGES = 200  # an API that always says has_more must not keep a worker forever
TIMEOUT_SECONDS = 30.0
MAX_ERROR_CHARS = 300
_KEYLIKE = re.compile(r"sk-[A-Za-z0-9_\-*]{4,}")


@dataclass(frozen=True, slots=True)
class ReportedBucket:
    """One bucket and model as a usage API reported it, normalised (module docstring)."""

    width: str
    bucket: datetime
    model: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    requests: int | None


class UsageApiError(Exception):
    """A read that failed; the message is words without the key, safe to store and show."""


@dataclass(frozen=True, slots=True)
class FetchResult:
    provider: str
    stored: int  # rows upserted (0 on an error)
    error: str  # "" when it worked
    skipped: bool = False  # no admin key: nothing read, nothing written


def admin_key(provider: str) -> str:
    """The provider's admin key from the environment ("" when unset)."""
    env = ADMIN_KEY_ENVS.get(provider)
    return os.environ.get(env, "").strip() if env else ""


def configured_providers() -> list[str]:
    """The providers with a usage API whose admin key is set."""
    return [p for p in ADMIN_KEY_ENVS if admin_key(p)]


def base_url(provider: str) -> str:
    name = provider.upper()
    return (
        os.environ.get(f"AUTOPACK_{name}_ADMIN_BASE_URL")
        or os.environ.get(f"AUTOPACK_{name}_BASE_URL")
        or DEFAULT_BASE_URLS[provider]
    ).rstrip("/")


def scrub(text: str, key: str) -> str:
    """`text` without the key or anything shaped like one, shortened."""
    if key:
        text = text.replace(key, "[key]")
    text = _KEYLIKE.sub("[key]", text)
    text = " ".join(text.split())
    return text[:MAX_ERROR_CHARS]


def _status_words(provider: str, status: int, message: str) -> str:
    label = LABELS.get(provider, provider)
    if status in (401, 403):
        what = f"{label}'s usage API refused the admin key ({status})"
    elif status == 429:
        what = f"{label}'s usage API is rate limiting the reads (429)"
    elif status >= 500:
        what = f"{label}'s usage API failed ({status})"
    else:
        what = f"{label}'s usage API refused the request ({status})"
    return f"{what}: {message}" if message else what


def _as_int(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a token count: {value!r}")
    return value


# --- OpenAI: the SDK's admin client ------------------------------------------------------------


def read_openai(
    *, key: str, url: str, start: datetime, end: datetime, width: str, page_size: int
) -> list[ReportedBucket]:
    import openai

    client = openai.OpenAI(
        api_key="", admin_api_key=key, base_url=url, max_retries=0, timeout=TIMEOUT_SECONDS
    )
    found: list[ReportedBucket] = []
    page: str | None = None
    try:
        for _ in range(MAX_PAGES):
            kwargs: dict[str, Any] = {"page": page} if page else {}
            answer = client.admin.organization.usage.completions(
                start_time=int(start.timestamp()),
                end_time=int(end.timestamp()),
                bucket_width=width,  # type: ignore[arg-type]
                group_by=["model"],
                limit=page_size,
                **kwargs,
            )
            for bucket in answer.data:
                at = datetime.fromtimestamp(bucket.start_time, UTC)
                for result in bucket.results:
                    if getattr(result, "object", "") != "organization.usage.completions.result":
                        continue
                    found.append(
                        ReportedBucket(
                            width=width,
                            bucket=at,
                            model=str(getattr(result, "model", None) or ""),
                            input_tokens=_as_int(getattr(result, "input_tokens", 0)),
                            output_tokens=_as_int(getattr(result, "output_tokens", 0)),
                            cache_read_tokens=_as_int(getattr(result, "input_cached_tokens", 0)),
                            cache_write_tokens=_as_int(
                                getattr(result, "input_cache_write_tokens", 0)
                            ),
                            requests=_as_int(getattr(result, "num_model_requests", 0)),
                        )
                    )
            if not answer.has_more or not answer.next_page:
                return found
            page = answer.next_page
    except openai.APIStatusError as exc:
        message = _openai_message(exc)
        raise UsageApiError(_status_words("openai", exc.status_code, scrub(message, key))) from None
    except openai.APITimeoutError:
        raise UsageApiError(
            f"OpenAI's usage API did not answer within {TIMEOUT_SECONDS:g} s"
        ) from None
    except openai.APIConnectionError:
        raise UsageApiError("OpenAI's usage API could not be reached (connection failed)") from None
    except (ValueError, TypeError, AttributeError, openai.APIResponseValidationError) as exc:
        raise UsageApiError(
            f"OpenAI's usage API sent an answer that could not be read: {scrub(str(exc), key)}"
        ) from None
    raise UsageApiError(f"OpenAI's usage API kept saying has_more after {MAX_PAGES} pages")


def _openai_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return ""


# --- Anthropic: plain HTTP ----------------------------------------------------------------------


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _instant(text: Any) -> datetime:
    if not isinstance(text, str):
        raise ValueError(f"not a time: {text!r}")
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def read_anthropic(
    *, key: str, url: str, start: datetime, end: datetime, width: str, page_size: int
) -> list[ReportedBucket]:
    import httpx2

    found: list[ReportedBucket] = []
    page: str | None = None
    headers = {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}
    try:
        with httpx2.Client(timeout=TIMEOUT_SECONDS) as client:
            for _ in range(MAX_PAGES):
                params: list[tuple[str, str | int | float | bool | None]] = [
                    ("starting_at", _rfc3339(start)),
                    ("ending_at", _rfc3339(end)),
                    ("bucket_width", width),
                    ("group_by[]", "model"),
                    ("limit", page_size),
                ]
                if page:
                    params.append(("page", page))
                response = client.get(
                    f"{url}/v1/organizations/usage_report/messages", params=params, headers=headers
                )
                if response.status_code != 200:
                    raise UsageApiError(
                        _status_words(
                            "anthropic",
                            response.status_code,
                            scrub(_anthropic_message(response), key),
                        )
                    )
                answer = response.json()
                for bucket in answer["data"]:
                    at = _instant(bucket["starting_at"])
                    for result in bucket["results"]:
                        creation = result.get("cache_creation") or {}
                        read = _as_int(result.get("cache_read_input_tokens"))
                        write = _as_int(creation.get("ephemeral_5m_input_tokens")) + _as_int(
                            creation.get("ephemeral_1h_input_tokens")
                        )
                        found.append(
                            ReportedBucket(
                                width=width,
                                bucket=at,
                                model=str(result.get("model") or ""),
                                input_tokens=_as_int(result.get("uncached_input_tokens"))
                                + read
                                + write,
                                output_tokens=_as_int(result.get("output_tokens")),
                                cache_read_tokens=read,
                                cache_write_tokens=write,
                                requests=None,
                            )
                        )
                if not answer.get("has_more") or not answer.get("next_page"):
                    return found
                page = str(answer["next_page"])
    except httpx2.TimeoutException:
        raise UsageApiError(
            f"Anthropic's usage API did not answer within {TIMEOUT_SECONDS:g} s"
        ) from None
    except httpx2.HTTPError:
        raise UsageApiError(
            "Anthropic's usage API could not be reached (connection failed)"
        ) from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UsageApiError(
            f"Anthropic's usage API sent an answer that could not be read: {scrub(str(exc), key)}"
        ) from None
    raise UsageApiError(f"Anthropic's usage API kept saying has_more after {MAX_PAGES} pages")


def _anthropic_message(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return ""


Reader = Callable[..., list[ReportedBucket]]
READERS: dict[str, Reader] = {"openai": read_openai, "anthropic": read_anthropic}


# --- the fetch (a service: reads, then one transaction) --------------------------------------


def fetch_range(*, now: datetime, days: int) -> tuple[datetime, datetime]:
    """[start, end) read by a fetch: the last `days` UTC days, today included, up to now."""
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=max(1, days) - 1), now.astimezone(UTC)


def provider_usage_fetch(
    *,
    provider: str,
    now: datetime | None = None,
    days: int | None = None,
    page_size: int | None = None,
) -> FetchResult:
    """Read `provider`'s usage API (hour and day buckets of the last `days` UTC days) and store
    what it reports; on an error store nothing but the error, in words. A provider without an
    admin key is skipped (FetchResult.skipped; nothing written)."""
    if provider not in READERS:
        raise ValueError(f"{provider!r} has no usage API; only {', '.join(READERS)} do")
    key = admin_key(provider)
    if not key:
        return FetchResult(provider, 0, "", skipped=True)
    at = (now or timezone.now()).astimezone(UTC)
    start, end = fetch_range(now=at, days=days or settings.AUTOPACK_PROVIDER_USAGE_DAYS)
    url = base_url(provider)
    found: list[ReportedBucket] = []
    try:
        for width in WIDTHS:
            found += READERS[provider](
                key=key,
                url=url,
                start=start,
                end=end,
                width=str(width),
                page_size=min(page_size or PAGE_LIMITS[width], PAGE_LIMITS[width]),
            )
    except UsageApiError as exc:
        words = str(exc)
        logger.warning("reading the usage API of %s failed: %s", provider, words)
        ProviderUsageFetch.objects.update_or_create(
            provider=provider, defaults={"attempted_at": at, "error": words}
        )
        return FetchResult(provider, 0, words)
    stored = _store(provider=provider, found=found, start=start, end=end, at=at)
    return FetchResult(provider, stored, "")


def _merge(found: Iterable[ReportedBucket]) -> dict[tuple[str, datetime, str], ReportedBucket]:
    """One row per key: an API may split a model's bucket (by tier, key, workspace…)."""
    merged: dict[tuple[str, datetime, str], ReportedBucket] = {}
    for row in found:
        key = (row.width, row.bucket, row.model)
        if (old := merged.get(key)) is not None:
            row = ReportedBucket(
                width=row.width,
                bucket=row.bucket,
                model=row.model,
                input_tokens=old.input_tokens + row.input_tokens,
                output_tokens=old.output_tokens + row.output_tokens,
                cache_read_tokens=old.cache_read_tokens + row.cache_read_tokens,
                cache_write_tokens=old.cache_write_tokens + row.cache_write_tokens,
                requests=None
                if old.requests is None or row.requests is None
                else old.requests + row.requests,
            )
        merged[key] = row
    return merged


@transaction.atomic
def _store(
    *, provider: str, found: list[ReportedBucket], start: datetime, end: datetime, at: datetime
) -> int:
    rows = [
        ProviderReportedUsage(
            provider=provider,
            bucket_width=width,
            bucket=bucket,
            model=model,
            input_tokens=r.input_tokens,
            output_tokens=r.output_tokens,
            cache_read_tokens=r.cache_read_tokens,
            cache_write_tokens=r.cache_write_tokens,
            requests=r.requests,
            fetched_at=at,
        )
        for (width, bucket, model), r in _merge(found).items()
    ]
    ProviderReportedUsage.objects.bulk_create(
        rows,
        update_conflicts=True,
        unique_fields=["provider", "bucket_width", "bucket", "model"],
        update_fields=[
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "requests",
            "fetched_at",
        ],
    )
    # What this read covered and no longer reports (a model gone from a bucket) is not kept.
    for width in WIDTHS:
        first = datetime.fromtimestamp(
            int(start.timestamp()) // WIDTH_SECONDS[width] * WIDTH_SECONDS[width], UTC
        )
        ProviderReportedUsage.objects.filter(
            provider=provider, bucket_width=width, bucket__gte=first, bucket__lt=end
        ).exclude(fetched_at=at).delete()
    fetch, _created = ProviderUsageFetch.objects.select_for_update().get_or_create(
        provider=provider, defaults={"attempted_at": at}
    )
    fetch.attempted_at = fetch.succeeded_at = at
    fetch.error = ""
    fetch.buckets = len(rows)
    if fetch.covered_from is None or start < fetch.covered_from:
        fetch.covered_from = start
    fetch.save()
    return len(rows)


def provider_usage_fetch_all(
    *, now: datetime | None = None, days: int | None = None
) -> list[FetchResult]:
    """provider_usage_fetch for every provider whose admin key is set (beat, the command)."""
    return [
        provider_usage_fetch(provider=provider, now=now, days=days)
        for provider in configured_providers()
    ]
