"""Writes: metering provider calls (one and in bulk) and setting provider caps."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone

from .models import (
    LOST_CALL_PREFIX,
    NO_RUN,
    OUTSIDE_SOURCES,
    TOKEN_FIELDS,
    InFlightCall,
    ProviderQuota,
    ProviderWindow,
    RunUsageRollup,
    UsageEvent,
    UsageMinuteRollup,
    UsageRollup,
    UsageSource,
    check_role,
)
from .prices import price_usd
from .types import TokenUsage
from .windows import WindowSpec

_SOURCES = frozenset(UsageSource.values)  # checked per record: built once


@dataclass(frozen=True)
class UsageRecord:
    """What one provider call billed, as handed to record_usage."""

    call_id: str
    provider: str
    model: str  # the catalogue model Autopack asked for: caps and summaries group by it
    role: str
    usage: TokenUsage
    # The model the provider says answered (a dated snapshot, Gemini's modelVersion); "" when
    # it said none or nothing answered (a lost call).
    reported_model: str = ""
    run_id: int | None = None
    phase_id: int | None = None
    provider_request_id: str = ""
    latency_ms: int = 0
    created_at: datetime | None = None  # None: now
    # The call's InFlightCall key, if it was opened (in_flight_call_open): the same statement
    # that stores the event closes it.
    in_flight_key: str = ""
    # The tokens are an estimate, not the provider's final count: a lost call
    # (in_flight_calls_lose), or a stream cut before its final usage.
    estimated: bool = False
    # Who reported the call (UsageEvent.source: worker, api, otel, provider_api).
    source: str = UsageSource.WORKER
    # A cost the reporter stated (Claude Code's cost_usd): used only when the price table knows
    # no price for the model, so that every cost Autopack computes comes from one table.
    reported_cost_usd: Decimal | None = None

    def __post_init__(self) -> None:
        # Checked here, so that every writer (record_usage, the bulk import, the lost calls)
        # refuses a bad role with a message naming it (InvalidRoleError, a ValueError) before
        # anything reaches the database, whose constraint would only say IntegrityError.
        check_role(self.role)
        if self.source not in _SOURCES:
            raise ValueError(f"UsageRecord.source {self.source!r} is not a UsageSource")
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
    "cache_write_1h_tokens",
    "reported_model",
    "provider_request_id",
    "latency_ms",
    "cost_usd",
    "created_at",
    "estimated",
    "source",
)
# PostgreSQL types of _EVENT_COLUMNS, in order, for binary COPY (varchar is sent as text).
_STAGE_TYPES = (
    *("text",) * 3,
    "int8",
    "int8",
    "text",
    *("int8",) * len(TOKEN_FIELDS),
    "int8",
    "text",
    "text",
    "int4",
    "numeric",
    "timestamptz",
    "bool",
    "text",
)
_ROLLUP_SUMS = ("calls", "unpriced_calls", "estimated_calls", *TOKEN_FIELDS, "cost_usd")


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


@functools.cache
def _event_insert_sql(*, folded: bool, closes: bool = False) -> str:
    """Insert one event, `folded` (rolled up by the caller, in the same transaction) or pending
    (the column's default: usage_fold rolls it up). With `closes`
    the statement also deletes the call's InFlightCall row (its key is the first parameter):
    one statement, so the call is never both in flight and metered, nor neither."""
    table = _q(UsageEvent._meta.db_table)
    cols = ", ".join(_q(c) for c in _EVENT_COLUMNS)
    marks = ", ".join(["%s"] * len(_EVENT_COLUMNS))
    if folded:
        cols, marks = f"{cols}, {_q('rolled_up')}", f"{marks}, TRUE"
    close = ""
    if closes:
        # A data-modifying CTE runs whether or not the INSERT below inserts anything.
        close = (
            f"WITH closed AS (DELETE FROM {_q(InFlightCall._meta.db_table)} "  # noqa: S608
            f"WHERE {_q('call_key')} = %s) "
        )
    # ON CONFLICT DO NOTHING rather than SELECT-then-INSERT: a retried task racing the original
    # waits on the unique index and then sees the winner's row, never an IntegrityError.
    return (
        f"{close}INSERT INTO {table} ({cols}) VALUES ({marks}) "  # noqa: S608
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


# `outside`: the event's source is an outside tool's (models.OUTSIDE_SOURCES), kept apart in
# every rollup so the cap windows can leave it out and the panel can show it on its own.
_ROLLUP_KEY = ("bucket", "provider", "model", "reported_model", "role", "outside")
_RUN_ROLLUP_KEY = ("bucket", "run_id", "provider", "model", "reported_model", "role", "outside")
# UsageMinuteRollup: its key and the sums of what the cap windows count.
_MINUTE_KEY = ("provider", "minute", "outside")
_MINUTE_SUMS = ("calls", "prompt_tokens", "completion_tokens", "cost_usd")


def _minute_upsert_sql(source: str | None = None) -> str:
    """_rollup_upsert_sql for UsageMinuteRollup: `source` a SELECT of provider, minute, outside,
    _MINUTE_SUMS and first_at; without it one VALUES row."""
    table = _q(UsageMinuteRollup._meta.db_table)
    cols = (*_MINUTE_KEY, *_MINUTE_SUMS, "first_at")
    body = source or f"VALUES ({', '.join(['%s'] * len(cols))})"
    first = _q("first_at")
    sets = ", ".join(
        [
            *(f"{_q(c)} = {table}.{_q(c)} + excluded.{_q(c)}" for c in _MINUTE_SUMS),
            # The earlier of the two (CASE rather than LEAST, which SQLite lacks).
            f"{first} = CASE WHEN excluded.{first} < {table}.{first} "
            f"THEN excluded.{first} ELSE {table}.{first} END",
        ]
    )
    where = " WHERE true" if source and connection.vendor == "sqlite" else ""
    return (
        f"INSERT INTO {table} ({', '.join(_q(c) for c in cols)}) {body}{where} "
        f"ON CONFLICT ({', '.join(_q(c) for c in _MINUTE_KEY)}) DO UPDATE SET {sets}"
    )


def is_outside(source: str) -> bool:
    """Whether usage of this source is outside tools' (the rollups' `outside` key)."""
    return source in OUTSIDE_SOURCES


def minute_bucket(at: datetime) -> datetime:
    """Start of the UTC minute holding `at`: UsageMinuteRollup's key."""
    return at.astimezone(UTC).replace(second=0, microsecond=0)


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
        u.cache_write_1h_tokens,
        record.reported_model,
        record.provider_request_id,
        record.latency_ms,
        cost,
        at,
        record.estimated,
        record.source,
    )


def _price(record: UsageRecord, at: datetime) -> Decimal | None:
    price = price_usd(
        provider=record.provider,
        model=record.model,
        usage=record.usage,
        at=at,
        reported_model=record.reported_model,
    )
    return price if price is not None else record.reported_cost_usd


def record_usage(*, record: UsageRecord) -> tuple[UsageEvent, bool]:
    """Store the tokens of one provider call; idempotent per call_id. Summaries count it at
    once (see usage.models).

    A second call with the same call_id returns the stored event with created=False and adds
    nothing. On PostgreSQL a new call is ONE plain insert, atomic by itself (no BEGIN/COMMIT
    round trips): it sits on the path of every LLM call, so adding the event to the rollups is
    left to usage_fold, which does it for thousands of events at once. A repeated call is two
    statements (the insert that does nothing, then reading the stored row). Elsewhere (SQLite)
    it is three statements in one transaction that roll the event up as well. A record with an
    in_flight_key closes that call in the same statement (PostgreSQL) or transaction.
    """
    # One instant for the event and its rollup hour, even when the record brings none.
    at = record.created_at or timezone.now()
    cost = _price(record, at)
    row = _event_row(record, cost, at)
    if connection.vendor == "postgresql":
        closes = bool(record.in_flight_key)
        sql = _event_insert_sql(folded=False, closes=closes)
        with connection.cursor() as cursor:
            cursor.execute(sql, (record.in_flight_key, *row) if closes else row)
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
    if record.in_flight_key:
        InFlightCall.objects.filter(call_key=record.in_flight_key).delete()
    with connection.cursor() as cursor:
        cursor.execute(_event_insert_sql(folded=True), row)
        inserted = cursor.fetchone()
        if inserted is None:
            return None
        sums = _single_sums(record, cost)
        bucket = hour_bucket(at)
        outside = is_outside(record.source)
        key = (record.provider, record.model, record.reported_model, record.role, outside)
        cursor.execute(_rollup_upsert_sql(UsageRollup, _ROLLUP_KEY), (bucket, *key, *sums))
        cursor.execute(
            _rollup_upsert_sql(RunUsageRollup, _RUN_ROLLUP_KEY),
            (bucket, record.run_id if record.run_id is not None else NO_RUN, *key, *sums),
        )
        u = record.usage
        cursor.execute(
            _minute_upsert_sql(),
            (
                record.provider,
                minute_bucket(at),
                outside,
                1,
                u.prompt_tokens,
                u.completion_tokens,
                cost or Decimal(0),
                at,
            ),
        )
    return tuple(inserted)


_ROLLED_UP_COLUMNS = (
    "id",
    "run_id",
    "provider",
    "model",
    "reported_model",
    "role",
    "estimated",
    "source",
    *TOKEN_FIELDS,
    "cost_usd",
)


def _with_rollups_sql(events_cte: str) -> str:
    """One PostgreSQL statement's WITH clause: `events_cte` (an INSERT or UPDATE … RETURNING
    at least _ROLLED_UP_COLUMNS and created_at) is named `ins`, and exactly the rows it returns
    are added to both hourly rollups and to the minute rollup. The caller appends the final
    SELECT over `new`."""
    sums = (
        "count(*), count(*) FILTER (WHERE cost_usd IS NULL), count(*) FILTER (WHERE estimated), "
        + ", ".join(f"sum({c})" for c in TOKEN_FIELDS)
        + ", coalesce(sum(cost_usd), 0)"
    )
    # ORDER BY: concurrent statements (two folds, a fold and an import) then lock rollup rows
    # in the same order, so they wait for each other instead of deadlocking.
    rollup = _rollup_upsert_sql(
        UsageRollup,
        _ROLLUP_KEY,
        f"SELECT bucket, provider, model, reported_model, role, outside, {sums} "  # noqa: S608
        "FROM new GROUP BY bucket, provider, model, reported_model, role, outside "
        "ORDER BY bucket, provider, model, reported_model, role, outside",
    )
    run_rollup = _rollup_upsert_sql(
        RunUsageRollup,
        _RUN_ROLLUP_KEY,
        f"SELECT bucket, coalesce(run_id, {NO_RUN}) AS run, provider, model, reported_model, "  # noqa: S608
        f"role, outside, {sums} FROM new "
        "GROUP BY bucket, run, provider, model, reported_model, role, outside "
        "ORDER BY bucket, run, provider, model, reported_model, role, outside",
    )
    minute_rollup = _minute_upsert_sql(
        "SELECT provider, minute, outside, count(*), sum(prompt_tokens), "
        "sum(completion_tokens), coalesce(sum(cost_usd), 0), min(created_at) FROM new "
        "GROUP BY provider, minute, outside ORDER BY provider, minute, outside"
    )
    # The sources of outside tools: constants of ours, not input (see _q's note above).
    outside = ", ".join(f"'{source}'" for source in sorted(OUTSIDE_SOURCES))
    return f"""
        WITH ins AS ({events_cte}),
        new AS (
            SELECT ins.*, date_trunc('hour', ins.created_at AT TIME ZONE 'UTC')
                AT TIME ZONE 'UTC' AS bucket,
                date_trunc('minute', ins.created_at AT TIME ZONE 'UTC')
                AT TIME ZONE 'UTC' AS minute,
                ins.{_q("source")} IN ({outside}) AS outside
            FROM ins
        ),
        r1 AS ({rollup}),
        r2 AS ({run_rollup}),
        r3 AS ({minute_rollup})
        """  # noqa: S608


def _returning() -> str:
    # Only what the rollups read: the CTE materialises RETURNING, call_ids are the bulk of it.
    return ", ".join(_q(c) for c in (*_ROLLED_UP_COLUMNS, "created_at"))


def _insert_with_rollups_sql(source: str) -> str:
    """Insert the events `source` yields (a SELECT of _EVENT_COLUMNS), skip call_ids already
    stored, and add exactly the inserted ones to both rollups, storing them as rolled up (the
    bulk import). RETURNING skips duplicates, within this statement and against earlier ones,
    so a duplicate is never counted twice."""
    event_table = _q(UsageEvent._meta.db_table)
    event_cols = ", ".join(_q(c) for c in _EVENT_COLUMNS)
    return _with_rollups_sql(
        f"INSERT INTO {event_table} ({event_cols}, {_q('rolled_up')}) "  # noqa: S608
        f"SELECT *, TRUE FROM ({source}) AS source "
        f"ON CONFLICT ({_q('call_id')}) DO NOTHING RETURNING {_returning()}"
    )


@functools.cache
def _fold_sql() -> str:
    """Roll up the oldest pending events (at most %s) and mark them: one statement, so a
    summary's snapshot sees each event either pending or in the rollups, never both."""
    table = _q(UsageEvent._meta.db_table)
    pending = (
        f"SELECT {_q('id')} FROM {table} WHERE NOT {_q('rolled_up')} "  # noqa: S608
        f"ORDER BY {_q('created_at')} LIMIT %s FOR UPDATE SKIP LOCKED"
    )
    returning = ", ".join(f"e.{_q(c)}" for c in (*_ROLLED_UP_COLUMNS, "created_at"))
    update = (
        f"UPDATE {table} e SET {_q('rolled_up')} = TRUE "  # noqa: S608
        f"WHERE e.{_q('id')} IN ({pending}) RETURNING {returning}"
    )
    return _with_rollups_sql(update) + "SELECT count(*) FROM new"  # noqa: S608


# Any constant: one fold at a time (see usage_fold).
_FOLD_LOCK = 0x7573616765  # "usage"


def usage_fold(*, batch_size: int = 20_000, max_batches: int = 50) -> int:
    """Add pending events to the rollups (see usage.models); returns how many. PostgreSQL only
    (elsewhere events are stored rolled up). Beat runs it every AUTOPACK_USAGE_FOLD_SECONDS;
    it is safe to run at any time, any number of times, from anywhere: a second fold running
    at once returns 0 rather than wait, and a summary is exact before, during and after."""
    if batch_size < 1 or max_batches < 1:
        raise ValueError("batch_size and max_batches must be at least 1")
    if connection.vendor != "postgresql":
        return 0
    folded = 0
    for _ in range(max_batches):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", (_FOLD_LOCK,))
            if not cursor.fetchone()[0]:
                return folded
            cursor.execute(_fold_sql(), (batch_size,))
            (count,) = cursor.fetchone()
        folded += int(count)
        if count < batch_size:
            break
    return folded


def _single_sums(record: UsageRecord, cost: Decimal | None) -> tuple[Any, ...]:
    """One event's contribution to a rollup row, in _ROLLUP_SUMS order."""
    u = record.usage
    return (
        1,
        0 if cost is not None else 1,
        1 if record.estimated else 0,
        u.prompt_tokens,
        u.completion_tokens,
        u.cached_input_tokens,
        u.cache_write_tokens,
        u.reasoning_tokens,
        cost or Decimal(0),
    )


# --- calls in flight, and lost calls ----------------------------------------------------------

# No tokenizer is installed (and none is downloaded): about four characters a token is the
# providers' own rule of thumb for English text and code. It is an estimate either way, and is
# stored as one (UsageEvent.estimated).
CHARS_PER_TOKEN = 4


def estimate_prompt_tokens(*, system: str, prompt: str) -> int:
    """The input tokens of a call estimated from its text: characters / 4, rounded up."""
    return math.ceil((len(system) + len(prompt)) / CHARS_PER_TOKEN)


def in_flight_call_open(
    *,
    call_key: str,
    provider: str,
    model: str,
    role: str,
    system: str,
    prompt: str,
    run_id: int | None = None,
    phase_id: int | None = None,
    attempt: int | None = None,
) -> None:
    """Record a call just before it is sent (committed at once outside a transaction): if its
    worker dies before the answer, in_flight_calls_lose meters it. Close it with record_usage
    (UsageRecord.in_flight_key) on an answer, or in_flight_call_close on an error.

    A key already open is left as it is (ON CONFLICT DO NOTHING): the same call sent again.
    A bad role raises InvalidRoleError before anything is written (or sent)."""
    check_role(role)
    InFlightCall.objects.bulk_create(
        [
            InFlightCall(
                call_key=call_key,
                provider=provider,
                model=model,
                role=role,
                run_id=run_id,
                phase_id=phase_id,
                attempt=attempt,
                estimated_prompt_tokens=estimate_prompt_tokens(system=system, prompt=prompt),
            )
        ],
        ignore_conflicts=True,
    )


def in_flight_call_close(*, call_key: str) -> None:
    """Close a call that ended in an error: a provider bills no usage for a request it refused
    or failed, so nothing is metered (one DELETE; nothing when already closed)."""
    InFlightCall.objects.filter(call_key=call_key).delete()


@transaction.atomic
def in_flight_calls_lose(*, phase_id: int) -> list[UsageEvent]:
    """Meter the calls of a phase still in flight as lost: called when the phase's attempt is
    abandoned (its worker is gone), so none of them will ever get its answer. Returns the
    events. Each locked call becomes a UsageEvent with estimated=True, prompt_tokens = the estimate
    from its prompt, completion tokens 0 (nothing says how much the model wrote), at the time
    the call was sent; it counts in every summary and cap like any other event.

    Counted once: the rows are locked and deleted here, so a second sweeper (or one racing the
    call's own close) finds none, and the event's call_id ("lost:" + key) is unique. A call
    whose answer still arrives after this (a worker cut off, not dead) is metered from that
    answer as well: its input then counts twice, which errs on the side of the caps."""
    calls = list(InFlightCall.objects.select_for_update().filter(phase_id=phase_id))
    if not calls:
        return []
    InFlightCall.objects.filter(pk__in=[c.pk for c in calls]).delete()
    return [
        record_usage(
            record=UsageRecord(
                call_id=f"{LOST_CALL_PREFIX}{call.call_key}",
                provider=call.provider,
                model=call.model,
                role=call.role,
                usage=TokenUsage(prompt_tokens=call.estimated_prompt_tokens, completion_tokens=0),
                run_id=call.run_id,
                phase_id=call.phase_id,
                created_at=call.started_at,
                estimated=True,
            )
        )[0]
        for call in calls
    ]


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


@transaction.atomic
def provider_windows_set(*, provider: str, windows: Iterable[WindowSpec]) -> list[ProviderWindow]:
    """Replace a provider's configured cap windows (models.yaml import). Each is checked as the
    admin checks it (ProviderWindow.clean: usage.windows.window_from_config), and a bad one
    raises ValidationError naming the field before anything is written."""
    rows = [
        ProviderWindow(provider=provider, name=w.name, **ProviderWindow.fields_of(w))
        for w in windows
    ]
    for row in rows:
        # Not the unique and DB constraints: the rows they would meet are deleted below.
        row.full_clean(validate_unique=False, validate_constraints=False)
    ProviderWindow.objects.filter(provider=provider).delete()
    return ProviderWindow.objects.bulk_create(rows)
