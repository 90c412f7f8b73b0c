"""Reconciliation: what Autopack metered against what the providers' usage APIs report.

What is compared, per provider and UTC day: TOKENS = every input token (cache reads and cache
writes included) + every output token (reasoning/thinking included). That is TokenUsage's
prompt_tokens + completion_tokens on our side (the rollups' sums), and on the provider's:

- OpenAI: `input_tokens` (which includes `input_cached_tokens` and cache writes) +
  `output_tokens` of the organization usage API;
- Anthropic: `uncached_input_tokens` + `cache_read_input_tokens` + both `cache_creation` TTLs +
  `output_tokens` of the usage report.

Both stored that way by usage.provider_usage (ProviderReportedUsage.input_tokens/output_tokens).
The metered side is everything recorded for the provider: the builder's and auditor's calls,
the agents' (POST /usage/events) and any other source recorded against it, estimated events
(lost calls, cut streams) included.

The reported figures are as of the provider's last successful read (ProviderUsageFetch.
succeeded_at), so the metered side is counted up to that same instant (the hourly rollups, then
the minute rollups and the events of the last partial minute): a call made after the read is on
neither side, and the day of the read compares like with like. Days before the first read are
not compared ("not read"). difference = reported − metered (positive: the provider saw usage
Autopack did not meter, e.g. other tools on the same organisation); percent = difference /
reported × 100; a day is flagged when |percent| > AUTOPACK_RECONCILE_THRESHOLD_PERCENT, or when
the provider reports nothing for a day Autopack metered usage on. The providers' usage APIs may
lag a few minutes behind their answers, so the current day can show a small difference that the
next read closes.

AUTOPACK_CAP_USE_LARGER (reported_excess): the cap windows count, per provider and UTC day,
the larger of the metered and the reported tokens — usage.selectors.window_usage adds to each
capped window, per day, reported − metered when positive, over the whole UTC hours of the window
up to the last read (its row's `reported_extra`), so the router, guards and every surface
follow.

Statements: reconciliation() is three (the reads' state, the reported day buckets, the metered
sums — all providers in one UNION ALL), reported_excess() three (in window_usage when the
setting is on); neither grows with the number of events or days shown beyond the rows it
returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import QuerySet, Sum
from django.db.models.functions import TruncDate, TruncHour
from django.utils import timezone

from . import display
from .models import (
    BucketWidth,
    ProviderReportedUsage,
    ProviderUsageFetch,
    UsageEvent,
    UsageMinuteRollup,
    UsageRollup,
)

_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)


def _floor_hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def _ceil_hour(at: datetime) -> datetime:
    floor = _floor_hour(at)
    return floor if floor == at else floor + _HOUR


def _floor_minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def _day_start(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), tzinfo=UTC)


def _union(parts: Sequence[QuerySet[Any]]) -> list[dict[str, Any]]:
    if not parts:
        return []
    return list(parts[0].union(*parts[1:], all=True)) if len(parts) > 1 else list(parts[0])


@dataclass(frozen=True, slots=True)
class _Read:
    provider: str
    attempted_at: datetime
    succeeded_at: datetime | None
    covered_from: datetime | None
    error: str


def _metered_parts(provider: str, start: datetime, cutoff: datetime) -> list[QuerySet[Any]]:
    """The SELECTs of `provider`'s metered tokens in [start, cutoff) per UTC day: the hours
    from the rollup, the minutes of the cutoff's hour from the minute rollup, the events not
    folded yet, and the events of the cutoff's minute."""
    hours_end = max(start, _floor_hour(cutoff))
    minutes_end = max(hours_end, _floor_minute(cutoff))
    parts: list[QuerySet[Any]] = []
    if start < hours_end:
        rollup = UsageRollup.objects.filter(bucket__gte=start, bucket__lt=hours_end)
        parts.append(_per_day(rollup, provider, "bucket"))
    if hours_end < minutes_end:
        minutes = UsageMinuteRollup.objects.filter(minute__gte=hours_end, minute__lt=minutes_end)
        parts.append(_per_day(minutes, provider, "minute"))
    if start < minutes_end:
        # Folded events are in both rollups above, the others in neither (one statement).
        pending = UsageEvent.objects.filter(
            rolled_up=False, created_at__gte=start, created_at__lt=minutes_end
        )
        parts.append(_per_day(pending, provider, "created_at"))
    if minutes_end < cutoff:
        edge = UsageEvent.objects.filter(created_at__gte=minutes_end, created_at__lt=cutoff)
        parts.append(_per_day(edge, provider, "created_at"))
    return parts


def _per_day(rows: QuerySet[Any], provider: str, column: str) -> QuerySet[Any]:
    """`rows` of `provider` summed per UTC day of `column`: day, provider, tin, tout."""
    return (
        rows.filter(provider=provider)
        .annotate(day=TruncDate(column, tzinfo=UTC))
        .values("day", "provider")
        .annotate(tin=Sum("prompt_tokens"), tout=Sum("completion_tokens"))
        .order_by()
    )


def _row(
    day: date,
    metered: tuple[int, int],
    reported: tuple[int, int] | None,
    *,
    threshold: float,
    partial_until: datetime | None,
) -> dict[str, Any]:
    m_in, m_out = metered
    row: dict[str, Any] = {
        "day": day,
        "metered_in": m_in,
        "metered_out": m_out,
        "metered": m_in + m_out,
        "reported_in": None,
        "reported_out": None,
        "reported": None,
        "difference": None,
        "percent": None,
        "flagged": False,
        "partial_until": partial_until,  # the day of the last read: compared up to then
    }
    if reported is None:
        return row
    r_in, r_out = reported
    total = r_in + r_out
    difference = total - row["metered"]
    percent = difference * 100 / total if total else (0.0 if not difference else None)
    row.update(
        reported_in=r_in,
        reported_out=r_out,
        reported=total,
        difference=difference,
        percent=percent,
        flagged=percent is None or abs(percent) > threshold,
    )
    return row


def reconciliation(*, days: int | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Per provider whose usage API was ever read, the last `days` UTC days (today included,
    newest first) up to its last successful read: metered and reported tokens (in, out,
    total), difference, percent, flagged (module docstring). Returns {"threshold",
    "flagged" (rows flagged), "providers": [{provider, attempted_at, succeeded_at, error,
    rows}]}. Three statements whatever the number of providers and days."""
    days = days or settings.AUTOPACK_RECONCILE_DAYS
    if days < 1:
        raise ValueError("days must be at least 1")
    threshold = float(settings.AUTOPACK_RECONCILE_THRESHOLD_PERCENT)
    at = (now or timezone.now()).astimezone(UTC)
    first = at.date() - timedelta(days=days - 1)
    start = _day_start(first)
    reads = [
        _Read(f.provider, f.attempted_at, f.succeeded_at, f.covered_from, f.error)
        for f in ProviderUsageFetch.objects.order_by("provider")
    ]
    if not reads:
        return {"threshold": threshold, "flagged": 0, "providers": []}
    cutoffs = {r.provider: min(r.succeeded_at, at) for r in reads if r.succeeded_at is not None}
    reported: dict[tuple[str, date], tuple[int, int]] = {}
    for row in (
        ProviderReportedUsage.objects.filter(
            provider__in=list(cutoffs),
            bucket_width=BucketWidth.DAY,
            bucket__gte=start,
            bucket__lt=_day_start(at.date()) + _DAY,
        )
        .values("provider", "bucket")
        .annotate(tin=Sum("input_tokens"), tout=Sum("output_tokens"))
        .order_by()
    ):
        day = row["bucket"].astimezone(UTC).date()
        old = reported.get((row["provider"], day), (0, 0))
        reported[(row["provider"], day)] = (old[0] + int(row["tin"]), old[1] + int(row["tout"]))
    parts: list[QuerySet[Any]] = []
    for provider, cutoff in cutoffs.items():
        parts += _metered_parts(provider, start, cutoff)
    metered: dict[tuple[str, date], tuple[int, int]] = {}
    for row in _union(parts):
        key = (row["provider"], row["day"])
        old = metered.get(key, (0, 0))
        metered[key] = (old[0] + int(row["tin"] or 0), old[1] + int(row["tout"] or 0))
    providers = []
    flagged = 0
    for read in reads:
        rows: list[dict[str, Any]] = []
        read_until = cutoffs.get(read.provider)
        if read_until is not None and read.covered_from is not None:
            cutoff = read_until
            last = cutoff.date()
            day = last
            while day >= first:
                if _day_start(day) + _DAY <= read.covered_from:
                    break  # before the first read: never compared
                covered = _day_start(day) >= read.covered_from
                row = _row(
                    day,
                    metered.get((read.provider, day), (0, 0)),
                    reported.get((read.provider, day), (0, 0)) if covered else None,
                    threshold=threshold,
                    partial_until=cutoff if day == last else None,
                )
                flagged += row["flagged"]
                rows.append(row)
                day -= _DAY
        providers.append(
            {
                "provider": read.provider,
                "attempted_at": read.attempted_at,
                "succeeded_at": read.succeeded_at,
                "error": read.error,
                "rows": rows,
            }
        )
    return {"threshold": threshold, "flagged": flagged, "providers": providers}


# --- AUTOPACK_CAP_USE_LARGER ------------------------------------------------------------------


def reported_excess(
    spans: Iterable[tuple[str, datetime]], *, now: datetime | None = None
) -> list[int]:
    """Per (provider, window start): the tokens to add so that the window counts, per UTC day,
    the larger of metered and reported — Σ over days of max(0, reported − metered), over the
    whole UTC hours from the window's start up to the provider's last read (hour buckets of
    the usage API against the hourly rollups and the events not folded yet). 0 for a provider
    never read. Three statements, whatever the number of windows."""
    spans = list(spans)
    if not spans:
        return []
    at = (now or timezone.now()).astimezone(UTC)
    cutoffs: dict[str, datetime] = {}
    for fetch in ProviderUsageFetch.objects.filter(
        provider__in={p for p, _s in spans}, succeeded_at__isnull=False
    ):
        assert fetch.succeeded_at is not None
        cutoffs[fetch.provider] = _floor_hour(min(fetch.succeeded_at, at))
    firsts: dict[str, datetime] = {}
    for provider, start in spans:
        if provider in cutoffs:
            hour = _ceil_hour(start.astimezone(UTC))
            firsts[provider] = min(firsts.get(provider, hour), hour)
    hours: dict[str, dict[datetime, list[int]]] = {}  # provider → hour → [reported, metered]
    reported_parts: list[QuerySet[Any]] = []
    metered_parts: list[QuerySet[Any]] = []
    for provider, first in firsts.items():
        end = cutoffs[provider]
        if first >= end:
            continue
        reported_parts.append(
            ProviderReportedUsage.objects.filter(
                provider=provider,
                bucket_width=BucketWidth.HOUR,
                bucket__gte=first,
                bucket__lt=end,
            )
            .values("provider", "bucket")
            .annotate(tokens=Sum("input_tokens") + Sum("output_tokens"))
            .order_by()
        )
        metered_parts.append(
            UsageRollup.objects.filter(provider=provider, bucket__gte=first, bucket__lt=end)
            .values("provider", "bucket")
            .annotate(tokens=Sum("prompt_tokens") + Sum("completion_tokens"))
            .order_by()
        )
        metered_parts.append(
            UsageEvent.objects.filter(
                provider=provider, rolled_up=False, created_at__gte=first, created_at__lt=end
            )
            .annotate(bucket=TruncHour("created_at", tzinfo=UTC))
            .values("provider", "bucket")
            .annotate(tokens=Sum("prompt_tokens") + Sum("completion_tokens"))
            .order_by()
        )
    for side, parts in ((0, reported_parts), (1, metered_parts)):
        for row in _union(parts):
            bucket = row["bucket"].astimezone(UTC)
            acc = hours.setdefault(row["provider"], {}).setdefault(bucket, [0, 0])
            acc[side] += int(row["tokens"] or 0)
    out = []
    for provider, start in spans:
        if provider not in cutoffs:
            out.append(0)
            continue
        end = cutoffs[provider]
        first = _ceil_hour(start.astimezone(UTC))
        per_day: dict[date, list[int]] = {}
        for bucket, (rep, met) in hours.get(provider, {}).items():
            if first <= bucket < end:
                acc = per_day.setdefault(bucket.date(), [0, 0])
                acc[0] += rep
                acc[1] += met
        out.append(sum(max(0, rep - met) for rep, met in per_day.values()))
    return out


# --- the usage panel's table ------------------------------------------------------------------


def _signed(value: int) -> str:
    return f"{value:+,}" if value else "0"


def _percent_text(row: dict[str, Any]) -> str:
    if row["reported"] is None:
        return ""
    if row["percent"] is None:
        return "nothing reported"
    return f"{row['percent']:+.1f}%"


def reconciliation_panel(*, now: datetime | None = None) -> dict[str, Any]:
    """reconciliation() in words for the usage panel (templates/dashboard/_usage.html): per
    provider its last read ("read 14:20 (12 min ago)", or the error of the last attempt) and
    its days, each with metered, reported, difference and percent as text and `flagged`. Read
    times in the site's zone (usage.display), days are UTC days. Three statements (one when no
    usage API was ever read)."""
    at = (now or timezone.now()).astimezone(UTC)
    result = reconciliation(now=at)
    providers = []
    for panel in result["providers"]:
        read = panel["succeeded_at"]
        status = "never read"
        if read is not None:
            ago = at - read
            since = (
                "just now" if ago < timedelta(minutes=1) else f"{display.duration_text(ago)} ago"
            )
            status = f"read {display.when_text(read, now=at)} ({since})"
        failed = ""
        if panel["error"]:
            when = display.when_text(panel["attempted_at"], now=at)
            failed = f"last read failed {when}: {panel['error']}"
        rows = []
        for row in panel["rows"]:
            reported = row["reported"]
            until = row["partial_until"]
            rows.append(
                {
                    "day": row["day"],
                    "until": f"to {display.when_text(until, now=at)}" if until else "",
                    "metered": f"{row['metered']:,}",
                    "reported": "not read" if reported is None else f"{reported:,}",
                    "difference": "" if row["difference"] is None else _signed(row["difference"]),
                    "percent": _percent_text(row),
                    "flagged": row["flagged"],
                }
            )
        providers.append(
            {"provider": panel["provider"], "status": status, "failed": failed, "rows": rows}
        )
    return {
        "providers": providers,
        "flagged": result["flagged"],
        "threshold": f"{result['threshold']:g}%",
    }
