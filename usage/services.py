"""Writes: metering provider calls (one and in bulk) and setting provider caps."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone

from .models import NO_RUN, TOKEN_FIELDS, ProviderQuota, RunUsageRollup, UsageEvent, UsageRollup
from .prices import price_usd
from .types import TokenUsage


@dataclass(frozen=True)
class UsageRecord:
    """What one provider call billed, as handed to record_usage."""

    call_id: str
    provider: str
    model: str
    role: str
    usage: TokenUsage
    run_id: int | None = None
    phase_id: int | None = None
    provider_request_id: str = ""
    latency_ms: int = 0
    created_at: datetime | None = None  # None: now

    def __post_init__(self) -> None:
        if self.created_at is not None and timezone.is_naive(self.created_at):
            raise ValueError("UsageRecord.created_at must be timezone-aware")


def hour_bucket(at: datetime) -> datetime:
    """Start of the UTC hour holding `at`: the rollup key (see models module docstring)."""
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


# --- SQL built from the models' metadata, so a renamed column cannot drift ------------------
# (S608 is silenced below: every interpolated name comes from _meta or constants and is quoted
# by the backend; every value is a query parameter or COPY data.)

_EVENT_COLUMNS = (
    "provider",
    "model",
    "role",
    "run_id",
    "phase_id",
    "call_id",
    *TOKEN_FIELDS,
    "provider_request_id",
    "latency_ms",
    "cost_usd",
    "created_at",
)
# PostgreSQL types of _EVENT_COLUMNS, in order, for binary COPY (varchar is sent as text).
_STAGE_TYPES = (
    *("text",) * 3,
    "int8",
    "int8",
    "text",
    *("int8",) * len(TOKEN_FIELDS),
    "text",
    "int4",
    "numeric",
    "timestamptz",
)
_ROLLUP_SUMS = ("calls", "unpriced_calls", *TOKEN_FIELDS, "cost_usd")


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def _event_insert_sql() -> str:
    table = _q(UsageEvent._meta.db_table)
    cols = ", ".join(_q(c) for c in _EVENT_COLUMNS)
    marks = ", ".join(["%s"] * len(_EVENT_COLUMNS))
    # ON CONFLICT DO NOTHING rather than SELECT-then-INSERT: a retried task racing the original
    # waits on the unique index and then sees the winner's row, never an IntegrityError.
    return (
        f"INSERT INTO {table} ({cols}) VALUES ({marks}) "  # noqa: S608
        f"ON CONFLICT ({_q('call_id')}) DO NOTHING RETURNING {_q('id')}"
    )


def _rollup_upsert_sql(model: type[Any], key: tuple[str, ...], source: str | None = None) -> str:
    """INSERT … ON CONFLICT DO UPDATE SET x = x + excluded.x (PostgreSQL and SQLite ≥ 3.24).

    `source` is a SELECT producing key + sums columns; without it one VALUES row is inserted.
    """
    table = _q(model._meta.db_table)
    cols = (*key, *_ROLLUP_SUMS)
    body = source or f"VALUES ({', '.join(['%s'] * len(cols))})"
    sets = ", ".join(f"{_q(c)} = {table}.{_q(c)} + excluded.{_q(c)}" for c in _ROLLUP_SUMS)
    # SQLite needs a WHERE in INSERT … SELECT … ON CONFLICT to parse the upsert unambiguously.
    where = " WHERE true" if source and connection.vendor == "sqlite" else ""
    return (
        f"INSERT INTO {table} ({', '.join(_q(c) for c in cols)}) {body}{where} "
        f"ON CONFLICT ({', '.join(_q(c) for c in key)}) DO UPDATE SET {sets}"
    )


_ROLLUP_KEY = ("bucket", "provider", "model", "role")
_RUN_ROLLUP_KEY = ("bucket", "run_id", "provider", "model", "role")


def _event_row(record: UsageRecord, cost: Decimal | None, at: datetime) -> tuple[Any, ...]:
    u = record.usage
    return (
        record.provider,
        record.model,
        record.role,
        record.run_id,
        record.phase_id,
        record.call_id,
        u.prompt_tokens,
        u.completion_tokens,
        u.cached_input_tokens,
        u.cache_write_tokens,
        u.reasoning_tokens,
        record.provider_request_id,
        record.latency_ms,
        cost,
        at,
    )


def _price(record: UsageRecord, at: datetime) -> Decimal | None:
    return price_usd(provider=record.provider, model=record.model, usage=record.usage, at=at)


def record_usage(*, record: UsageRecord) -> tuple[UsageEvent, bool]:
    """Store the tokens of one provider call and add them to the rollups; idempotent per call_id.

    A second call with the same call_id returns the stored event with created=False and adds
    nothing. On PostgreSQL a new call is ONE statement (the insert feeding both rollup upserts,
    atomic by itself, so no BEGIN/COMMIT round trips either): it sits on the path of every LLM
    call, and each round trip would cost as much as the insert. A repeated call is two (the
    statement that does nothing, then reading the stored row). Elsewhere (SQLite) it is three
    statements in one transaction.
    """
    # One instant for the event and its rollup hour, even when the record brings none.
    at = record.created_at or timezone.now()
    cost = _price(record, at)
    row = _event_row(record, cost, at)
    if connection.vendor == "postgresql":
        key = (record.provider, record.model, record.role)
        bucket, sums = hour_bucket(at), _single_sums(record, cost)
        run_id = record.run_id if record.run_id is not None else NO_RUN
        with connection.cursor() as cursor:
            cursor.execute(
                _record_sql_postgresql(), (*row, bucket, *key, *sums, bucket, run_id, *key, *sums)
            )
            inserted = cursor.fetchone()
    else:
        inserted = _record_portable(record, row, cost, at)
    if inserted is None:
        return UsageEvent.objects.get(call_id=record.call_id), False
    event = UsageEvent(id=inserted[0], **dict(zip(_EVENT_COLUMNS, row, strict=True)))
    event._state.adding = False
    return event, True


@transaction.atomic
def _record_portable(
    record: UsageRecord, row: tuple[Any, ...], cost: Decimal | None, at: datetime
) -> tuple[Any, ...] | None:
    with connection.cursor() as cursor:
        cursor.execute(_event_insert_sql(), row)
        inserted = cursor.fetchone()
        if inserted is None:
            return None
        sums = _single_sums(record, cost)
        bucket = hour_bucket(at)
        key = (record.provider, record.model, record.role)
        cursor.execute(_rollup_upsert_sql(UsageRollup, _ROLLUP_KEY), (bucket, *key, *sums))
        cursor.execute(
            _rollup_upsert_sql(RunUsageRollup, _RUN_ROLLUP_KEY),
            (bucket, record.run_id if record.run_id is not None else NO_RUN, *key, *sums),
        )
    return tuple(inserted)


def _insert_with_rollups_sql(source: str) -> str:
    """One PostgreSQL statement: insert the events `source` yields (a VALUES list or a SELECT),
    skip call_ids already stored, and add exactly the inserted ones to both rollups (the bulk
    import; the caller appends the final SELECT over `new`)."""
    event_table = _q(UsageEvent._meta.db_table)
    event_cols = ", ".join(_q(c) for c in _EVENT_COLUMNS)
    # Only what the rollups read: the CTE materialises RETURNING, call_ids are the bulk of it.
    returned = ", ".join(
        _q(c)
        for c in (
            "id",
            "run_id",
            "provider",
            "model",
            "role",
            *TOKEN_FIELDS,
            "cost_usd",
            "created_at",
        )
    )
    sums = (
        "count(*), count(*) FILTER (WHERE cost_usd IS NULL), "
        + ", ".join(f"sum({c})" for c in TOKEN_FIELDS)
        + ", coalesce(sum(cost_usd), 0)"
    )
    rollup = _rollup_upsert_sql(
        UsageRollup,
        _ROLLUP_KEY,
        f"SELECT bucket, provider, model, role, {sums} FROM new "  # noqa: S608
        "GROUP BY bucket, provider, model, role",
    )
    run_rollup = _rollup_upsert_sql(
        RunUsageRollup,
        _RUN_ROLLUP_KEY,
        f"SELECT bucket, coalesce(run_id, {NO_RUN}), provider, model, role, {sums} FROM new "  # noqa: S608
        "GROUP BY bucket, coalesce(run_id, 0), provider, model, role",
    )
    # The events that were really inserted (RETURNING skips duplicates, within this statement
    # and against earlier ones) feed both rollups, so a duplicate is never counted twice.
    return f"""
        WITH ins AS (
            INSERT INTO {event_table} ({event_cols})
            {source}
            ON CONFLICT ({_q("call_id")}) DO NOTHING
            RETURNING {returned}
        ),
        new AS (
            SELECT ins.*, date_trunc('hour', ins.created_at AT TIME ZONE 'UTC')
                AT TIME ZONE 'UTC' AS bucket
            FROM ins
        ),
        r1 AS ({rollup}),
        r2 AS ({run_rollup})
        """  # noqa: S608


def _single_sums(record: UsageRecord, cost: Decimal | None) -> tuple[Any, ...]:
    """One event's contribution to a rollup row, in _ROLLUP_SUMS order."""
    u = record.usage
    return (
        1,
        0 if cost is not None else 1,
        u.prompt_tokens,
        u.completion_tokens,
        u.cached_input_tokens,
        u.cache_write_tokens,
        u.reasoning_tokens,
        cost or Decimal(0),
    )


@functools.cache
def _record_sql_postgresql() -> str:
    """The event insert and both rollup upserts as one statement, the rollups fed by parameters
    `FROM ins`: they add a row only when the insert did (a repeated call_id adds nothing).
    Cached: building it from the models' metadata costs more than running it."""
    event_table = _q(UsageEvent._meta.db_table)
    event_cols = ", ".join(_q(c) for c in _EVENT_COLUMNS)

    def marks(n: int) -> str:
        return ", ".join(["%s"] * n)

    sums = len(_ROLLUP_SUMS)
    rollup = _rollup_upsert_sql(
        UsageRollup,
        _ROLLUP_KEY,
        f"SELECT {marks(len(_ROLLUP_KEY) + sums)} FROM ins",  # noqa: S608
    )
    run_rollup = _rollup_upsert_sql(
        RunUsageRollup,
        _RUN_ROLLUP_KEY,
        f"SELECT {marks(len(_RUN_ROLLUP_KEY) + sums)} FROM ins",  # noqa: S608
    )
    return (
        f"WITH ins AS (INSERT INTO {event_table} ({event_cols}) "  # noqa: S608
        f"VALUES ({marks(len(_EVENT_COLUMNS))}) "
        f"ON CONFLICT ({_q('call_id')}) DO NOTHING RETURNING {_q('id')}), "
        f"r1 AS ({rollup}), r2 AS ({run_rollup}) SELECT {_q('id')} FROM ins"
    )


# --- bulk import -----------------------------------------------------------------------------


def _batches(records: Iterable[UsageRecord], size: int) -> Iterator[list[UsageRecord]]:
    it = iter(records)
    while batch := list(itertools.islice(it, size)):
        yield batch


def record_usage_bulk(*, records: Iterable[UsageRecord], batch_size: int = 5000) -> int:
    """Import many calls; returns how many were new (call_ids already stored are skipped).

    Each batch is its own transaction rather than the whole import one: an import of millions
    of events keeps no long transaction open, and since call_id makes every batch idempotent a
    failed import is simply run again. (Inside an outer atomic block it is all one, as usual.)
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    inserted = 0
    for batch in _batches(records, batch_size):
        with transaction.atomic():
            if connection.vendor == "postgresql":
                inserted += _bulk_postgresql(batch)
            else:
                inserted += sum(record_usage(record=r)[1] for r in batch)
    return inserted


def _bulk_postgresql(batch: list[UsageRecord]) -> int:
    stage = "usage_import_stage"
    event_table = _q(UsageEvent._meta.db_table)
    event_cols = ", ".join(_q(c) for c in _EVENT_COLUMNS)
    with connection.cursor() as cursor:
        # A temp table per transaction: COPY is several times faster than multi-row INSERT, and
        # staging lets PostgreSQL drop duplicates (ON CONFLICT) and roll up in set operations.
        # Same column types as the events, no constraints or indexes: those are checked once,
        # by the INSERT … SELECT below.
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "  # noqa: S608
            f"SELECT {event_cols} FROM {event_table} WITH NO DATA"
        )
        # Binary COPY: about a third cheaper than text on both sides (no number formatting
        # and parsing), which is what keeps the import near raw COPY speed.
        with cursor.copy(f"COPY {stage} ({event_cols}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(_STAGE_TYPES)
            now = timezone.now()
            for record in batch:
                at = record.created_at or now
                copy.write_row(_event_row(record, _price(record, at), at))
        # Which copy of an in-batch duplicate wins is unspecified: one call_id is one call.
        cursor.execute(
            _insert_with_rollups_sql(f"SELECT {event_cols} FROM {stage}")  # noqa: S608
            + "SELECT count(*) FROM new"
        )
        (count,) = cursor.fetchone()
        # ON COMMIT empties it too, but batches inside one outer transaction share it.
        cursor.execute(f"TRUNCATE {stage}")
    return int(count)


# --- provider caps ---------------------------------------------------------------------------


def _as_fraction(name: str, value: Decimal | float | str) -> Decimal:
    try:
        result = Decimal(str(value))
    except (InvalidOperation, ValueError) as exc:
        raise ValidationError({name: f"{name} must be a number"}) from exc
    if not result.is_finite():
        raise ValidationError({name: f"{name} must be a finite number"})
    return result


@transaction.atomic
def provider_quota_upsert(
    *,
    provider: str,
    daily_cap_tokens: int | None,
    weekly_cap_tokens: int | None,
    monthly_cap_tokens: int | None,
    autopack_share: Decimal | float | str,
    soft_limit: Decimal | float | str,
) -> ProviderQuota:
    """Create or replace a provider's caps. Invalid values raise ValidationError naming the
    field, before anything is written."""
    errors: dict[str, str] = {}
    if not provider:
        errors["provider"] = "provider is required"
    for name, cap in (
        ("daily_cap_tokens", daily_cap_tokens),
        ("weekly_cap_tokens", weekly_cap_tokens),
        ("monthly_cap_tokens", monthly_cap_tokens),
    ):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            errors[name] = f"{name} must be a whole number ≥ 0, or empty for no cap"
    share = _as_fraction("autopack_share", autopack_share)
    soft = _as_fraction("soft_limit", soft_limit)
    if not Decimal(0) <= share <= Decimal(1):
        errors["autopack_share"] = "autopack_share must be between 0 and 1"
    if not Decimal(0) < soft <= Decimal(1):
        errors["soft_limit"] = "soft_limit must be greater than 0 and at most 1"
    if errors:
        raise ValidationError(errors)
    quota, _created = ProviderQuota.objects.update_or_create(
        provider=provider,
        defaults={
            "daily_cap_tokens": daily_cap_tokens,
            "weekly_cap_tokens": weekly_cap_tokens,
            "monthly_cap_tokens": monthly_cap_tokens,
            "autopack_share": share,
            "soft_limit": soft,
        },
    )
    return quota
