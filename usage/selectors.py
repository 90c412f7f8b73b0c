"""Reads: usage summaries against provider caps, per model, per run and phase, per day.

Periods are CALENDAR periods in UTC, not rolling windows (PERIOD_SEMANTICS):

- day:   from 00:00 UTC today to 00:00 UTC tomorrow,
- week:  ISO week, from Monday 00:00 UTC to the next Monday 00:00 UTC,
- month: from the 1st 00:00 UTC to the 1st of the next month 00:00 UTC.

Provider plans reset their daily/weekly/monthly allowances on such boundaries, so a cap is
compared with what was used since the last reset, not with the last 24 h / 7 d / 30 d. Windows
are half-open: an event at exactly 00:00 belongs to the new day.

Summaries read the hourly rollups (see usage.models), never the whole event table, so their
cost does not grow with the number of events. The event reads are the events not folded into
the rollups yet (a partial index holds only those: a few seconds' worth), the partial hours at
the edges of a window that does not start or end on the hour, and the per-phase totals of given
runs or phases (an index lookup). The rollups and the pending events are read in ONE statement
(a UNION ALL): a fold committing between two statements would otherwise count its events twice
or not at all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Count, Exists, IntegerField, Min, OuterRef, Q, QuerySet, Sum, Value
from django.db.models.functions import TruncDate
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from .models import (
    NO_RUN,
    OUTSIDE_SOURCES,
    ProviderQuota,
    ProviderWindow,
    RunUsageRollup,
    UsageEvent,
    UsageMinuteRollup,
    UsageRollup,
)
from .vocabulary import AGENT_ROLE_PREFIX, FIXED_ROLES, PERIODS, Period
from .windows import (
    CalendarUnit,
    CapUnit,
    WindowKind,
    WindowSpec,
    legacy_windows,
    merge_windows,
    window_span,
)

PERIOD_SEMANTICS = "calendar-utc"  # see the module docstring
# `model` is the catalogue model; `reported_model` the one the provider said answered ("" when
# it said none). Group by model to add up every snapshot that answered for it.
GROUP_BY_FIELDS: tuple[str, ...] = ("provider", "model", "reported_model", "role", "run")
_COUNTS = ("n_calls", "n_unpriced", "n_estimated")

_SUM_FIELDS = {
    "tokens_in": "prompt_tokens",
    "tokens_out": "completion_tokens",
    "cached_input_tokens": "cached_input_tokens",
    "cache_write_tokens": "cache_write_tokens",
    "reasoning_tokens": "reasoning_tokens",
}

# Three parts: core usage is the builder's and the auditor's (Autopack's own calls); aux usage
# is what Autopack's agents (`agent:<name>`, from the workers or POST /usage/events) used;
# outside usage is outside tools' (a person's own Claude Code, Codex, …: models.OUTSIDE_SOURCES,
# the rollups' `outside`). The roles' constraint admits nothing else, so core + aux + outside
# is the total. Summed with FILTER in the same grouped statement as the totals (the rollups
# keep the role and `outside`), so the split costs no query of its own.
_OUTSIDE_ROLLUP = Q(outside=True)
_OUTSIDE_EVENT = Q(source__in=OUTSIDE_SOURCES)
_CORE = Q(role__in=FIXED_ROLES)
_AUX = Q(role__startswith=AGENT_ROLE_PREFIX)
# name → (field, part: "core" | "aux" | "outside")
_SPLIT_FIELDS: dict[str, tuple[str, str]] = {
    "core_tokens_in": ("prompt_tokens", "core"),
    "core_tokens_out": ("completion_tokens", "core"),
    "aux_tokens_in": ("prompt_tokens", "aux"),
    "aux_tokens_out": ("completion_tokens", "aux"),
    "outside_tokens_in": ("prompt_tokens", "outside"),
    "outside_tokens_out": ("completion_tokens", "outside"),
}


def _part(part: str, *, from_events: bool) -> Q:
    """The filter of one part of the split, on the events (`source`) or a rollup (`outside`)."""
    outside = _OUTSIDE_EVENT if from_events else _OUTSIDE_ROLLUP
    if part == "outside":
        return outside
    return (_CORE if part == "core" else _AUX) & ~outside


def _split_sums(*, from_events: bool) -> dict[str, Any]:
    return {
        out: Sum(field, filter=_part(part, from_events=from_events))
        for out, (field, part) in _SPLIT_FIELDS.items()
    }


def _now(now: datetime | None) -> datetime:
    return (now or timezone.now()).astimezone(UTC)


def period_window(period: str, *, now: datetime | None = None) -> tuple[datetime, datetime]:
    """[start, end) of the calendar period (UTC) holding `now`; ValueError for other periods."""
    try:
        period = Period(period)
    except ValueError:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, not {period!r}") from None
    day = _now(now).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == Period.DAY:
        return day, day + timedelta(days=1)
    if period == Period.WEEK:
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    start = day.replace(day=1)
    return start, (start + timedelta(days=32)).replace(day=1)


def _ceil_hour(at: datetime) -> datetime:
    floor = at.replace(minute=0, second=0, microsecond=0)
    return floor if floor == at else floor + timedelta(hours=1)


def _floor_hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def _sums(*, from_events: bool, split: bool = False) -> dict[str, Any]:
    aggregates: dict[str, Any] = {out: Sum(field) for out, field in _SUM_FIELDS.items()}
    aggregates["cost"] = Sum("cost_usd")
    if split:
        aggregates.update(_split_sums(from_events=from_events))
    if from_events:
        aggregates["n_calls"] = Count("id")
        aggregates["n_unpriced"] = Count("id", filter=Q(cost_usd__isnull=True))
        aggregates["n_estimated"] = Count("id", filter=Q(estimated=True))
    else:
        aggregates["n_calls"] = Sum("calls")
        aggregates["n_unpriced"] = Sum("unpriced_calls")
        aggregates["n_estimated"] = Sum("estimated_calls")
    return aggregates


def _empty_row(*, split: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(_SUM_FIELDS, 0)
    row.update(cost=Decimal(0), **dict.fromkeys(_COUNTS, 0))
    if split:
        row.update(dict.fromkeys(_SPLIT_FIELDS, 0))
    return row


def _add_rows(
    into: dict[tuple[Any, ...], dict[str, Any]],
    rows: Iterable[dict[str, Any]],
    keys: Sequence[str],
    *,
    split: bool = False,
) -> None:
    names = (*_SUM_FIELDS, "cost", *_COUNTS, *(_SPLIT_FIELDS if split else ()))
    for row in rows:
        key = tuple(row[k] for k in keys)
        acc = into.setdefault(key, _empty_row(split=split))
        for name in names:
            acc[name] += row[name] or 0


def _finish(key_names: Sequence[str], key: tuple[Any, ...], acc: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = dict(zip(key_names, key, strict=True))
    row.update({name: int(acc[name]) for name in _SUM_FIELDS})
    row.update({name: int(acc[name]) for name in _SPLIT_FIELDS if name in acc})
    row["calls"] = int(acc["n_calls"])
    row["unpriced_calls"] = int(acc["n_unpriced"])
    # Calls whose tokens are an estimate (lost calls, streams cut before their final usage).
    row["estimated_calls"] = int(acc["n_estimated"])
    # Cost is the sum of the priced calls; None only when no call of the group had a price.
    priced = row["calls"] - row["unpriced_calls"]
    row["cost_usd"] = Decimal(acc["cost"]) if priced or not row["calls"] else None
    return row


def _one_statement(parts: Sequence[QuerySet[Any]]) -> list[dict[str, Any]]:
    """The rows of all `parts` (values() querysets of the same columns) from one UNION ALL."""
    if not parts:
        return []
    return list(parts[0].union(*parts[1:], all=True)) if len(parts) > 1 else list(parts[0])


def get_usage_summary(
    *,
    time_window: tuple[datetime, datetime] | Period | str,
    group_by: Sequence[str],
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Usage in [start, end) (or a calendar period) grouped by any of provider, model, role, run.

    Rows hold the group keys (`run` as run_id, None for calls outside a run) and tokens_in
    (prompt), tokens_out (completion), cached_input_tokens, cache_write_tokens,
    reasoning_tokens, cost_usd, calls, unpriced_calls, estimated_calls. Without group_by: one
    total row.
    """
    return _summarise(time_window=time_window, group_by=group_by, now=now, split=False)


def _summarise(
    *,
    time_window: tuple[datetime, datetime] | Period | str,
    group_by: Sequence[str],
    now: datetime | None,
    split: bool,
) -> list[dict[str, Any]]:
    """get_usage_summary; with split, each row also holds core_tokens_in, core_tokens_out,
    aux_tokens_in, aux_tokens_out, outside_tokens_in and outside_tokens_out (_SPLIT_FIELDS),
    from the same statement."""
    unknown = [g for g in group_by if g not in GROUP_BY_FIELDS]
    if unknown:
        raise ValueError(f"cannot group usage by {unknown}; choose from {GROUP_BY_FIELDS}")
    if isinstance(time_window, str):
        start, end = period_window(time_window, now=now)
    else:
        start, end = time_window
    if timezone.is_naive(start) or timezone.is_naive(end):
        raise ValueError("time_window needs timezone-aware datetimes")
    key_names = tuple(dict.fromkeys(group_by))  # de-duplicated, order kept
    by_run = "run" in key_names
    fields = ["run_id" if k == "run" else k for k in key_names]

    # Without keys, rows are still grouped (by provider) and added up below: an ungrouped
    # values() would select every column, which a UNION of two tables cannot take.
    columns = fields or ["provider"]
    parts: list[QuerySet[Any]] = []
    hours_from, hours_to = _ceil_hour(start), _floor_hour(end)
    edges: list[tuple[datetime, datetime]] = []
    if hours_from < hours_to:
        rollups = (RunUsageRollup if by_run else UsageRollup).objects.filter(
            bucket__gte=hours_from, bucket__lt=hours_to
        )
        parts.append(
            rollups.values(*columns).annotate(**_sums(from_events=False, split=split)).order_by()
        )
        pending = UsageEvent.objects.filter(
            rolled_up=False, created_at__gte=hours_from, created_at__lt=hours_to
        )
        parts.append(
            pending.values(*columns).annotate(**_sums(from_events=True, split=split)).order_by()
        )
        edges = [(start, hours_from), (hours_to, end)]
    elif start < end:
        edges = [(start, end)]  # within one hour: the events are all there is
    for edge_start, edge_end in edges:
        if edge_start < edge_end:
            events = UsageEvent.objects.filter(created_at__gte=edge_start, created_at__lt=edge_end)
            parts.append(
                events.values(*columns).annotate(**_sums(from_events=True, split=split)).order_by()
            )
    rows = _one_statement(parts)
    if by_run:
        for row in rows:  # the run rollup's "no run" is 0; an event's is None
            row["run_id"] = None if row["run_id"] == NO_RUN else row["run_id"]
    acc: dict[tuple[Any, ...], dict[str, Any]] = {}
    _add_rows(acc, rows, fields, split=split)
    if not fields:
        return [_finish((), (), acc.get((), _empty_row(split=split)))]
    return [
        _finish(fields, key, acc[key])
        for key in sorted(acc, key=lambda k: tuple((v is None, v) for v in k))
    ]


def _percent(total: int, cap: int | None) -> float | None:
    if cap is None:
        return None
    if cap == 0:
        return 100.0  # share 0 (or a 0 cap): nothing may be used, so it is all used
    return total * 100 / cap


def get_provider_usage_summary(*, period: str, now: datetime | None = None) -> list[dict[str, Any]]:
    """Each provider with a ProviderQuota or with usage in the period, against its cap.

    cap is the effective cap (plan cap × autopack_share; the whole cap when the provider's
    outside_usage is whole_cap) in total tokens (in + out); counts says what is held against it
    ("autopack" or "everything", as window_usage's rows) and counted_tokens how much;
    percent_of_cap is counted / cap × 100 (None without a cap); over_soft_limit when counted
    reaches soft_limit × cap, over_hard_limit when it reaches the cap. tokens_in, tokens_out and
    total_tokens are everything seen, outside tools' usage included; the split fields
    (core_tokens_in/out, aux_tokens_in/out, outside_tokens_in/out) say whose it was.
    """
    usage = {
        row["provider"]: row
        for row in _summarise(time_window=period, group_by=["provider"], now=now, split=True)
    }
    quotas, replaced = _quotas_with_replaced()
    rows = []
    for provider in sorted(usage.keys() | quotas.keys()):
        found = usage.get(provider)
        row = _against_cap(provider, found, quotas.get(provider), period, replaced.get(provider))
        row.update({name: found[name] if found else 0 for name in _SPLIT_FIELDS})
        rows.append(row)
    return rows


def _quotas_with_replaced() -> tuple[dict[str, ProviderQuota], dict[str, frozenset[str]]]:
    """Every ProviderQuota by provider, and per provider the legacy period names (day, week,
    month) whose cap a configured cap window of that name counts instead (one statement)."""
    names = [str(p) for p in PERIODS]
    quotas = ProviderQuota.objects.annotate(
        **{
            f"replaced_{name}": Exists(
                ProviderWindow.objects.filter(provider=OuterRef("provider"), name=name)
            )
            for name in names
        }
    )
    by_provider: dict[str, ProviderQuota] = {}
    replaced: dict[str, frozenset[str]] = {}
    for quota in quotas:
        by_provider[quota.provider] = quota
        replaced[quota.provider] = frozenset(n for n in names if getattr(quota, f"replaced_{n}"))
    return by_provider, replaced


def _against_cap(
    provider: str,
    row: dict[str, Any] | None,
    quota: ProviderQuota | None,
    period: str,
    replaced_periods: frozenset[str] | None = None,
) -> dict[str, Any]:
    """A provider's usage in a calendar period in UTC against its legacy cap of that period.
    When a configured cap window has the period's name (usage.selectors.provider_windows), that
    window counts the cap and the legacy one is not in force: cap and percent_of_cap are None
    and cap_window names the window, so no surface shows a second, different percent for it."""
    tokens_in = row["tokens_in"] if row else 0
    tokens_out = row["tokens_out"] if row else 0
    total = tokens_in + tokens_out
    everything = quota is not None and quota.counts_everything
    counted = total
    if not everything and row:  # share: outside tools' usage is not held against the cap
        counted -= row.get("outside_tokens_in", 0) + row.get("outside_tokens_out", 0)
    replaced = str(period) in (replaced_periods or ())
    cap = quota.effective_cap(period) if quota and not replaced else None
    return {
        "provider": provider,
        "period": str(period),
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "total_tokens": total,
        "counts": "everything" if everything else "autopack",
        "counted_tokens": counted,
        "cap": cap,
        "cap_window": str(period) if replaced else None,
        "percent_of_cap": _percent(counted, cap),
        "over_soft_limit": cap is not None
        and quota is not None
        and counted >= cap * Decimal(quota.soft_limit),
        "over_hard_limit": cap is not None and counted >= cap,
    }


def get_model_usage_summary(*, period: str, now: datetime | None = None) -> list[dict[str, Any]]:
    """Per provider and catalogue model in the period: tokens in/out, cached, reasoning, cost,
    calls (estimated_calls of them estimated), and reported_models: the names the provider
    reported for it, sorted (none when it reported none). One read, grouped by reported model
    too, then added up per catalogue model."""
    rows = get_usage_summary(
        time_window=period, group_by=["provider", "model", "reported_model"], now=now
    )
    return _per_catalogue_model(rows)


def _per_catalogue_model(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by provider, model and reported_model (sorted so), added up per provider and
    catalogue model, the reported names listed in reported_models."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        reported = row.pop("reported_model")
        into = merged.get((row["provider"], row["model"]))
        if into is None:
            into = merged[(row["provider"], row["model"])] = {**row, "reported_models": []}
        else:
            for name in (*_SUM_FIELDS, "calls", "unpriced_calls", "estimated_calls"):
                into[name] += row[name]
            for name in _SPLIT_FIELDS.keys() & row.keys():  # rows summed with split=True
                into[name] += row[name]
            if row["cost_usd"] is not None:
                into["cost_usd"] = (into["cost_usd"] or Decimal(0)) + row["cost_usd"]
        if reported:
            into["reported_models"].append(reported)
    return list(merged.values())


def get_usage_overview(*, period: str, now: datetime | None = None) -> dict[str, Any]:
    """The usage panel's and the usage API's figures for a calendar period, in two statements
    (the usage, one UNION ALL grouped by provider, model and reported model; the caps):

    - providers: get_provider_usage_summary's rows, each also with core_tokens_in,
      core_tokens_out, aux_tokens_in, aux_tokens_out, outside_tokens_in, outside_tokens_out
      (core: builder and auditor; aux: Autopack's agents; outside: outside tools) and
      daily_cap (the effective daily cap, None without one or when a configured window named
      day replaces it, for the 30-day chart; daily_cap_window: "day" then);
    - models: get_model_usage_summary's rows, each also with the same six split fields.

    The provider rows are the model rows added up, so the two always agree.
    """
    rows = _summarise(
        time_window=period,
        group_by=["provider", "model", "reported_model"],
        now=now,
        split=True,
    )
    models = _per_catalogue_model(rows)
    added = ("tokens_in", "tokens_out", *_SPLIT_FIELDS)
    per_provider: dict[str, dict[str, int]] = {}
    for model in models:
        acc = per_provider.setdefault(model["provider"], dict.fromkeys(added, 0))
        for name in added:
            acc[name] += model[name]
    quotas, replaced = _quotas_with_replaced()
    providers = []
    for provider in sorted(per_provider.keys() | quotas.keys()):
        usage = per_provider.get(provider)
        quota = quotas.get(provider)
        gone = replaced.get(provider, frozenset())
        row = _against_cap(provider, usage, quota, period, gone)
        row.update({name: usage[name] if usage else 0 for name in _SPLIT_FIELDS})
        # The chart's daily cap line: the legacy UTC day's, unless a "day" window replaces it.
        day_in_force = quota is not None and Period.DAY.value not in gone
        row["daily_cap"] = quota.effective_cap(Period.DAY) if quota and day_in_force else None
        row["daily_cap_window"] = Period.DAY.value if quota and not day_in_force else None
        providers.append(row)
    return {"period": str(period), "providers": providers, "models": models}


def run_usage_totals(*, run_id: int) -> dict[str, Any]:
    """A run's totals (tokens_in, tokens_out, cached_input_tokens, cache_write_tokens,
    reasoning_tokens, cost_usd, calls, unpriced_calls, estimated_calls), from the run rollup and
    its events not folded yet."""
    rollups = RunUsageRollup.objects.filter(run_id=run_id).values("run_id")
    pending = UsageEvent.objects.filter(run_id=run_id, rolled_up=False).values("run_id")
    rows = _one_statement(
        [
            rollups.annotate(**_sums(from_events=False)).order_by(),
            pending.annotate(**_sums(from_events=True)).order_by(),
        ]
    )
    acc: dict[tuple[Any, ...], dict[str, Any]] = {(): _empty_row()}
    _add_rows(acc, rows, ())
    return _finish((), (), acc[()])


def runs_usage_totals(*, run_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """run_usage_totals for many runs in one statement (the runs list): {run_id: totals}."""
    ids = list(run_ids)
    keys = ("run_id",)
    rollups = RunUsageRollup.objects.filter(run_id__in=ids).values(*keys)
    pending = UsageEvent.objects.filter(run_id__in=ids, rolled_up=False).values(*keys)
    rows = _one_statement(
        [
            rollups.annotate(**_sums(from_events=False)).order_by(),
            pending.annotate(**_sums(from_events=True)).order_by(),
        ]
    )
    acc: dict[tuple[Any, ...], dict[str, Any]] = {}
    _add_rows(acc, rows, keys)
    return {key[0]: _finish(keys, key, acc[key]) for key in acc}


def phase_usage_totals(
    *, run_ids: Iterable[int] | None = None, phase_ids: Iterable[int] | None = None
) -> list[dict[str, Any]]:
    """Per run, phase and role: the rows the run page shows; they add up to run_usage_totals.

    Calls of a run outside any phase have phase_id None.
    """
    if run_ids is None and phase_ids is None:
        raise ValueError("give run_ids or phase_ids")
    events = UsageEvent.objects.all()
    if run_ids is not None:
        events = events.filter(run_id__in=list(run_ids))
    if phase_ids is not None:
        events = events.filter(phase_id__in=list(phase_ids))
    keys = ("run_id", "phase_id", "role")
    acc: dict[tuple[Any, ...], dict[str, Any]] = {}
    _add_rows(acc, events.values(*keys).annotate(**_sums(from_events=True)).order_by(), keys)
    return [
        _finish(keys, key, acc[key])
        for key in sorted(acc, key=lambda k: tuple((v is None, v) for v in k))
    ]


def tokens_per_day(*, days: int = 30, now: datetime | None = None) -> list[dict[str, Any]]:
    """The last `days` UTC days, today included, oldest first, days without usage as zeros:
    {"day": date, "tokens_in", "tokens_out", "cost_usd"}."""
    if days < 1:
        raise ValueError("days must be at least 1")
    today = _now(now).date()
    first = today - timedelta(days=days - 1)
    start = datetime.combine(first, datetime.min.time(), tzinfo=UTC)
    end = start + timedelta(days=days)
    sums = {
        "tokens_in": Sum("prompt_tokens"),
        "tokens_out": Sum("completion_tokens"),
        "cost": Sum("cost_usd"),
    }
    rollups = (
        UsageRollup.objects.filter(bucket__gte=start, bucket__lt=end)
        .annotate(day=TruncDate("bucket", tzinfo=UTC))
        .values("day")
    )
    pending = (
        UsageEvent.objects.filter(rolled_up=False, created_at__gte=start, created_at__lt=end)
        .annotate(day=TruncDate("created_at", tzinfo=UTC))
        .values("day")
    )
    found: dict[date, dict[str, Any]] = {}
    for row in _one_statement(
        [rollups.annotate(**sums).order_by(), pending.annotate(**sums).order_by()]
    ):
        acc = found.setdefault(row["day"], {"tokens_in": 0, "tokens_out": 0, "cost": None})
        acc["tokens_in"] += row["tokens_in"] or 0
        acc["tokens_out"] += row["tokens_out"] or 0
        if row["cost"] is not None:
            acc["cost"] = (acc["cost"] or 0) + row["cost"]
    result = []
    for offset in range(days):
        day = first + timedelta(days=offset)
        total = found.get(day)
        result.append(
            {
                "day": day,
                "tokens_in": int(total["tokens_in"]) if total else 0,
                "tokens_out": int(total["tokens_out"]) if total else 0,
                "cost_usd": Decimal(total["cost"])
                if total and total["cost"] is not None
                else Decimal(0),
            }
        )
    return result


def tokens_per_day_by_provider(
    *, days: int = 30, providers: Iterable[str] = (), now: datetime | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Per provider with usage in the last `days` UTC days (today included), and per provider
    in `providers` even without: those days, oldest first, days without usage as zeros:
    {"day": date, "tokens_in", "tokens_out", "core_tokens_in", "core_tokens_out",
    "aux_tokens_in", "aux_tokens_out", "outside_tokens_in", "outside_tokens_out"}. Providers
    sorted by name. One statement (the rollups and the pending events, grouped by day and
    provider), whatever the number of providers."""
    if days < 1:
        raise ValueError("days must be at least 1")
    first = _now(now).date() - timedelta(days=days - 1)
    start = datetime.combine(first, datetime.min.time(), tzinfo=UTC)
    end = start + timedelta(days=days)
    names = ("tokens_in", "tokens_out", *_SPLIT_FIELDS)
    totals: dict[str, Any] = {
        "tokens_in": Sum("prompt_tokens"),
        "tokens_out": Sum("completion_tokens"),
    }
    rollups = (
        UsageRollup.objects.filter(bucket__gte=start, bucket__lt=end)
        .annotate(day=TruncDate("bucket", tzinfo=UTC))
        .values("day", "provider")
        .annotate(**totals, **_split_sums(from_events=False))
    )
    pending = (
        UsageEvent.objects.filter(rolled_up=False, created_at__gte=start, created_at__lt=end)
        .annotate(day=TruncDate("created_at", tzinfo=UTC))
        .values("day", "provider")
        .annotate(**totals, **_split_sums(from_events=True))
    )
    found: dict[str, dict[date, dict[str, int]]] = {}
    for row in _one_statement([rollups.order_by(), pending.order_by()]):
        acc = found.setdefault(row["provider"], {}).setdefault(row["day"], dict.fromkeys(names, 0))
        for name in names:
            acc[name] += int(row[name] or 0)
    for provider in providers:
        found.setdefault(provider, {})
    zeros = dict.fromkeys(names, 0)
    return {
        provider: [
            {"day": day, **by_day.get(day, zeros)}
            for day in (first + timedelta(days=offset) for offset in range(days))
        ]
        for provider, by_day in sorted(found.items())
    }


def lost_calls(*, run_id: int, phase_id: int | None = None) -> list[UsageEvent]:
    """The estimated events of a run (or of one of its phases), oldest first: lost calls, whose
    worker died before the answer, metered with their input estimated
    (services.in_flight_calls_lose; UsageEvent.is_lost_call), and streams cut before their
    final usage, metered with what the provider had reported before the cut. Read through a
    partial index that holds only those, so a status poll can afford it."""
    events = UsageEvent.objects.filter(run_id=run_id, estimated=True)
    if phase_id is not None:
        events = events.filter(phase_id=phase_id)
    return list(events.order_by("created_at", "id"))


# ---- cap windows (usage.windows) ---------------------------------------------------------


def _windows_and_quotas(
    providers: Iterable[str] | None,
) -> tuple[list[WindowSpec], dict[str, ProviderQuota]]:
    """The windows of `providers` (all: None), configured then legacy, and their quotas: two
    statements."""
    rows = ProviderWindow.objects.all()
    quotas_qs = ProviderQuota.objects.all()
    if providers is not None:
        wanted = list(providers)
        rows = rows.filter(provider__in=wanted)
        quotas_qs = quotas_qs.filter(provider__in=wanted)
    configured: dict[str, list[WindowSpec]] = {}
    for row in rows.order_by("provider", "name"):
        configured.setdefault(row.provider, []).append(row.spec())
    quotas = {q.provider: q for q in quotas_qs}
    specs: list[WindowSpec] = []
    for provider in sorted(configured.keys() | quotas.keys()):
        quota = quotas.get(provider)
        legacy = (
            legacy_windows(
                provider,
                {
                    CalendarUnit.DAY: quota.daily_cap_tokens,
                    CalendarUnit.WEEK: quota.weekly_cap_tokens,
                    CalendarUnit.MONTH: quota.monthly_cap_tokens,
                },
            )
            if quota
            else ()
        )
        specs.extend(merge_windows(configured.get(provider, ()), legacy))
    return specs, quotas


def provider_windows(*, provider: str | None = None) -> list[WindowSpec]:
    """Every cap window of a provider (of every provider: None), sorted by provider: the
    configured ProviderWindow rows by name, then the legacy daily/weekly/monthly_cap_tokens as
    calendar windows in UTC named day, week and month, unless a configured window has that
    name."""
    specs, _quotas = _windows_and_quotas(None if provider is None else [provider])
    return specs


_MINUTE = timedelta(minutes=1)


def _floor_minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


@functools.cache
def _window_part_sql(vendor: str) -> dict[str, str]:
    """The SELECTs of window_usage's UNION ALL, each one ungrouped aggregate over one
    provider's index range, written once per backend, filled with parameters: "hours"
    (UsageRollup), "minutes" (UsageMinuteRollup), "events <lo> <hi>" (UsageEvent, with the
    comparisons of the range's two ends) and "pending" (the events not folded yet). Each takes,
    after its range, whether it counts everything: false leaves outside tools' usage out (the
    provider's outside_usage is share), true counts it too (whole_cap)."""
    q = connection.ops.quote_name
    rollup, minute, event = UsageRollup._meta, UsageMinuteRollup._meta, UsageEvent._meta

    def col(meta: Any, name: str) -> str:
        return q(meta.get_field(name).column)

    def sums(meta: Any) -> str:
        return ", ".join(
            f"SUM({col(meta, name)})" for name in ("prompt_tokens", "completion_tokens", "cost_usd")
        )

    # Outside tools' usage: the rollups keep it apart (`outside`); an event says it by source.
    outside_sources = ", ".join(f"'{source}'" for source in sorted(OUTSIDE_SOURCES))
    not_outside = {
        rollup.db_table: f"NOT {col(rollup, 'outside')}",
        minute.db_table: f"NOT {col(minute, 'outside')}",
        event.db_table: f"{col(event, 'source')} NOT IN ({outside_sources})",
    }

    def select(meta: Any, calls: str, oldest: str, at: str, lo: str, hi: str) -> str:
        # Only our own table and column names (and the constant sources) are interpolated;
        # every value is a parameter.
        return (
            f"SELECT %s, %s, {sums(meta)}, {calls}, MIN({oldest}) "  # noqa: S608
            f"FROM {q(meta.db_table)} WHERE {col(meta, 'provider')} = %s "
            f"AND {at} {lo} %s AND {at} {hi} %s AND (%s OR {not_outside[meta.db_table]})"
        )

    bucket, first_minute = col(rollup, "bucket"), col(minute, "minute")
    created = col(event, "created_at")
    parts = {
        "hours": select(rollup, f"SUM({col(rollup, 'calls')})", bucket, bucket, ">=", "<"),
        # MIN(first_at): the first event's instant, so a rolling reset needs no event read.
        "minutes": select(
            minute,
            f"SUM({col(minute, 'calls')})",
            col(minute, "first_at"),
            first_minute,
            ">=",
            "<",
        ),
    }
    for lo in (">=", ">"):
        for hi in ("<", "<="):
            parts[f"events {lo} {hi}"] = select(event, "COUNT(*)", created, created, lo, hi)
    # The events not folded yet: the predicate of the partial index usageevent_pending.
    parts["pending"] = f"{parts['events >= <']} AND {col(event, 'rolled_up')} = %s"
    return parts


def _window_sums(
    specs: Sequence[WindowSpec],
    spans: Sequence[tuple[datetime, datetime | None]],
    at: datetime,
    everything: frozenset[str] = frozenset(),
) -> list[tuple[Any, ...]]:
    """Per part: (window index, from_hours, prompt, completion, cost, calls, oldest), all
    windows in ONE statement (see window_usage). `oldest` is the instant of the part's first
    event, except from the hourly rollup (from_hours): the start of its first hour. The windows
    of the providers in `everything` count outside tools' usage too; the others leave it out.

    A window [start, now) — rolling: (start, now] — is read as: the events of [start, m1)
    (m1 the first minute boundary after start: at most a minute), the minutes of [m1, h1) (h1
    the first hour boundary from m1), the hours of [h1, h2) (h2 = now's hour), the minutes of
    [h2, m2) (m2 = now's minute) and the events of [m2, now); plus the events not folded yet
    in [m1, m2), which no rollup holds yet. The last part (minutes and events from h2 on) is the
    same for every window of a provider that spans whole hours: read once per provider (the
    events once per end comparison) and returned once per such window."""
    sql = _window_part_sql(connection.vendor)
    adapt = connection.ops.adapt_datetimefield_value
    selects: list[str] = []
    params: list[Any] = []

    def part(kind: str, w: int, provider: str, lo: datetime, hi: datetime, *more: Any) -> None:
        selects.append(sql[kind])
        params.extend(
            (w, kind == "hours", provider, adapt(lo), adapt(hi), provider in everything, *more)
        )

    m2, h2 = _floor_minute(at), _floor_hour(at)
    tails: dict[tuple[str, str], list[int]] = {}  # (provider, end comparison) → windows
    for i, (spec, (start, _reset)) in enumerate(zip(specs, spans, strict=True)):
        rolling = spec.kind == WindowKind.ROLLING
        # A rolling window has left its start (usage at exactly now − N h is out); it holds now.
        lo, hi = (">", "<=") if rolling else (">=", "<")
        m1 = _floor_minute(start)
        if rolling or m1 < start:
            m1 += _MINUTE
        if m1 > m2:  # start and now in the same minute
            if start < at:
                part(f"events {lo} {hi}", i, spec.provider, start, at)
            continue
        if start < m1:
            part(f"events {lo} <", i, spec.provider, start, m1)
        h1 = _ceil_hour(m1)
        if h1 <= h2:
            if m1 < h1:
                part("minutes", i, spec.provider, m1, h1)
            if h1 < h2:
                part("hours", i, spec.provider, h1, h2)
            tails.setdefault((spec.provider, hi), []).append(i)
        else:  # m1 in now's hour
            if m1 < m2:
                part("minutes", i, spec.provider, m1, m2)
            if m2 < at or rolling:
                part(f"events >= {hi}", i, spec.provider, m2, at)
        if m1 < m2:
            part("pending", i, spec.provider, m1, m2, False)
    shared: list[list[int]] = []  # row index -1 - k: the windows of shared[k]
    minute_tails: dict[str, list[int]] = {}
    for (provider, hi), windows in tails.items():
        minute_tails.setdefault(provider, []).extend(windows)
        if m2 < at or hi == "<=":
            part(f"events >= {hi}", -1 - len(shared), provider, m2, at)
            shared.append(windows)
    if h2 < m2:
        for provider, windows in minute_tails.items():
            part("minutes", -1 - len(shared), provider, h2, m2)
            shared.append(windows)
    if not selects:
        return []
    with connection.cursor() as cursor:
        cursor.execute(" UNION ALL ".join(selects), params)
        rows = cursor.fetchall()
    out: list[tuple[Any, ...]] = []
    for row in rows:
        if row[0] >= 0:
            out.append(row)
        else:
            out.extend((i, *row[1:]) for i in shared[-1 - row[0]])
    return out


def _instant(value: Any) -> datetime | None:
    """A MIN() over a datetime column as an aware UTC datetime (SQLite returns text)."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)
    parsed = parse_datetime(str(value))
    assert parsed is not None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def window_usage(
    *,
    now: datetime | None = None,
    providers: Iterable[str] | None = None,
    windows: Sequence[WindowSpec] | None = None,
    extra: Callable[[Sequence[WindowSpec]], Sequence[WindowSpec]] | None = None,
) -> list[dict[str, Any]]:
    """Per provider × window (provider_windows' order): the usage in [start, now) — a rolling
    window of N hours: in (now − N h, now], so usage at exactly now − N h has left it — against
    its caps. Each row:

    - provider, window (its name), kind, legacy (a daily/weekly/monthly_cap_tokens window),
      description ("day in America/Los_Angeles", "last 5 h", …);
    - start, reset (aware UTC). A rolling window's reset is when its oldest counted usage
      leaves it (that usage's instant + N h), None when it holds no usage;
    - tokens (in + out), usd (Decimal; priced calls only), requests (calls);
    - caps: {unit: effective cap (plan cap × autopack_share; the whole plan cap when counts is
      "everything") or None} for tokens, usd and requests; units: the units it has caps in;
      percents: {unit: used / effective cap × 100}; percent and unit: the highest of those and
      its unit (None without caps);
    - counts: "autopack" (the provider's outside_usage is share, the default: tokens, usd and
      requests are Autopack's usage, its workers' and its agents', and outside tools' usage is
      left out) or "everything" (whole_cap: outside tools' usage counts too, against the whole
      cap: what is left is the cap less everything seen);
    - autopack_share, soft_limit (the window's, else the provider's quota's, else 1 and 0.8);
      over_soft: some unit reached soft_limit × its effective cap; over_hard: some unit reached
      its effective cap (a 0 cap is always reached).

    How it stays fast (it runs on every dashboard tick and will feed the router): the usage of
    ALL windows is ONE statement, a UNION ALL of ungrouped indexed range reads (_window_sums),
    per window: the whole hours from UsageRollup (a month is a few thousand rows, whatever the
    number of events), the whole minutes of the partial first and last hours from
    UsageMinuteRollup (at most 59 rows each), the sub-minute edges from UsageEvent (index
    created_at, provider; at most a minute of one provider at each end) and the events not
    folded yet (partial index usageevent_pending). Its cost grows with windows and hours, not
    with events; being one statement, a fold committing meanwhile cannot count an event twice
    or not at all (the fold writes the events' flag and all three rollups in one statement).
    The SELECTs are fixed SQL text filled with parameters: built with the ORM, the 40-60 parts
    of 4 providers' windows cost 2-3 times the database's own time to compose (measured: ~47 ms
    against ~15 ms at 1 M events, 20 windows). One more statement only when a rolling window's
    oldest usage lies in a folded whole hour, to read that hour's first event (its reset to the
    microsecond; the minute rollup keeps each minute's first instant). Reading the windows adds
    two (ProviderWindow, ProviderQuota);
    pass `windows` (from provider_windows) to skip the first when the caller has them already.
    `extra(windows)`: more windows (without caps, e.g. usage.forecast's last hour per provider)
    read in the same statement and returned after them.
    """
    at = _now(now)
    if windows is None:
        specs, quotas = _windows_and_quotas(providers)
    else:
        wanted = None if providers is None else set(providers)
        specs = [w for w in windows if wanted is None or w.provider in wanted]
        quotas = {
            q.provider: q
            for q in ProviderQuota.objects.filter(provider__in={w.provider for w in specs})
        }
    if extra is not None:
        specs = [*specs, *extra(specs)]
    spans = [window_span(spec, at) for spec in specs]
    everything = frozenset(p for p, quota in quotas.items() if quota.counts_everything)
    found: dict[int, dict[str, Any]] = {}
    for w, from_rollup, tin, tout, cost, calls, oldest in _window_sums(
        specs, spans, at, everything
    ):
        acc = found.setdefault(
            int(w), {"tin": 0, "tout": 0, "cost": Decimal(0), "n": 0, "oldest": None}
        )
        acc["tin"] += int(tin or 0)
        acc["tout"] += int(tout or 0)
        acc["cost"] += Decimal(str(cost)) if cost is not None else 0
        acc["n"] += int(calls or 0)
        oldest = _instant(oldest)
        if oldest is None:
            continue
        # On a tie an event's instant wins over the start of an hour (it is exact).
        if acc["oldest"] is None or (oldest, bool(from_rollup)) < (acc["oldest"], True):
            acc["oldest"], acc["from_rollup"] = oldest, bool(from_rollup)
    _oldest_to_the_second(specs, found, everything)
    reported = _reported_extra(specs, spans, at)
    return [
        _window_row(spec, span, found.get(i), quotas.get(spec.provider), reported[i])
        for i, (spec, span) in enumerate(zip(specs, spans, strict=True))
    ]


def _reported_extra(
    specs: Sequence[WindowSpec], spans: Sequence[tuple[datetime, datetime | None]], at: datetime
) -> list[int]:
    """Per window: the tokens the provider's own usage API reported beyond what Autopack
    metered (usage.reconcile.reported_excess), when AUTOPACK_CAP_USE_LARGER is on and the window
    has caps; else 0. Three more statements only when the setting is on."""
    extra = [0] * len(specs)
    if not settings.AUTOPACK_CAP_USE_LARGER:
        return extra
    from .reconcile import reported_excess  # reconcile reads this module's helpers

    capped = [i for i, spec in enumerate(specs) if spec.caps]
    found = reported_excess(((specs[i].provider, spans[i][0]) for i in capped), now=at)
    for i, tokens in zip(capped, found, strict=True):
        extra[i] = tokens
    return extra


def _oldest_to_the_second(
    specs: Sequence[WindowSpec], found: dict[int, dict[str, Any]], everything: frozenset[str]
) -> None:
    """A rolling window whose oldest usage is a rollup bucket (an hour): the first event of that
    hour that the window counts (outside tools' only for the providers in `everything`), all
    such windows in one statement (index created_at, provider; one hour each)."""
    parts: list[QuerySet[Any]] = []
    for i, spec in enumerate(specs):
        acc = found.get(i)
        if spec.kind != WindowKind.ROLLING or not acc or not acc.get("from_rollup"):
            continue
        hour = acc["oldest"]
        events = UsageEvent.objects.filter(
            provider=spec.provider, created_at__gte=hour, created_at__lt=hour + timedelta(hours=1)
        )
        if spec.provider not in everything:
            events = events.exclude(_OUTSIDE_EVENT)
        parts.append(
            events.values("provider")
            .annotate(w=Value(i, output_field=IntegerField()), first=Min("created_at"))
            .order_by()
        )
    for row in _one_statement(parts):
        if row["first"] is not None:
            found[row["w"]]["oldest"] = row["first"]


_DEFAULT_SOFT_LIMIT = Decimal("0.8")


def _window_row(
    spec: WindowSpec,
    span: tuple[datetime, datetime | None],
    acc: dict[str, Any] | None,
    quota: ProviderQuota | None,
    reported_extra: int = 0,
) -> dict[str, Any]:
    start, reset = span
    used: dict[str, int | Decimal] = {
        CapUnit.TOKENS.value: (int(acc["tin"] + acc["tout"]) if acc else 0) + reported_extra,
        CapUnit.USD.value: Decimal(acc["cost"]) if acc else Decimal(0),
        CapUnit.REQUESTS.value: int(acc["n"]) if acc else 0,
    }
    if spec.kind == WindowKind.ROLLING:
        assert spec.hours is not None
        oldest = acc["oldest"] if acc else None
        reset = oldest + timedelta(hours=spec.hours) if oldest is not None else None
    share = spec.autopack_share
    if share is None:
        share = Decimal(quota.autopack_share) if quota else Decimal(1)
    # whole_cap: everything seen counts against the whole plan cap, the share not applied.
    counts_everything = quota is not None and quota.counts_everything
    applied = Decimal(1) if counts_everything else share
    soft = spec.soft_limit
    if soft is None:
        soft = Decimal(quota.soft_limit) if quota else _DEFAULT_SOFT_LIMIT
    caps: dict[str, int | Decimal | None] = dict.fromkeys(CapUnit.values)
    percents: dict[str, float] = {}
    over_soft = over_hard = False
    for unit, plan_cap in spec.caps.items():
        effective = Decimal(plan_cap) * applied
        cap = effective if unit == CapUnit.USD else int(effective)
        caps[unit] = cap
        value = used[unit]
        percents[unit] = 100.0 if cap == 0 else float(Decimal(value) * 100 / Decimal(cap))
        over_hard = over_hard or value >= cap
        over_soft = over_soft or value >= cap * soft
    top = max(percents, key=lambda u: percents[u]) if percents else None
    return {
        "provider": spec.provider,
        "window": spec.name,
        "kind": str(spec.kind),
        "legacy": spec.legacy,
        "description": spec.describe(),
        "start": start,
        "reset": reset,
        "tokens": used[CapUnit.TOKENS.value],
        "usd": used[CapUnit.USD.value],
        "requests": used[CapUnit.REQUESTS.value],
        "caps": caps,
        "units": list(percents),
        "percents": percents,
        "percent": percents[top] if top else None,
        "unit": top,
        "autopack_share": share,
        # Tokens the provider reported beyond the metered ones (AUTOPACK_CAP_USE_LARGER), in
        # `tokens` already; 0 when the setting is off.
        "reported_extra": reported_extra,
        "counts": "everything" if counts_everything else "autopack",
        "soft_limit": soft,
        "over_soft": over_soft,
        "over_hard": over_hard,
    }
