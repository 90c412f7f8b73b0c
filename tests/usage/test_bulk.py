from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import Count, Sum

from usage.models import (
    InvalidRoleError,
    RunUsageRollup,
    UsageEvent,
    UsageMinuteRollup,
    UsageRollup,
)
from usage.prices import price_usd
from usage.services import UsageRecord, record_usage, record_usage_bulk, usage_fold

from .conftest import NOW

pytestmark = pytest.mark.django_db
MakeRecord = Callable[..., UsageRecord]


EVENT_FIELDS = (
    "call_id",
    "model",
    "reported_model",
    "role",
    "prompt_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "estimated",
    "cost_usd",
)


def expected_event(record: UsageRecord) -> tuple[object, ...]:
    u = record.usage
    return (
        record.call_id,
        record.model,
        record.reported_model,
        record.role,
        u.prompt_tokens,
        u.cache_write_tokens,
        u.cache_write_1h_tokens,
        record.estimated,
        price_usd(
            provider=record.provider,
            model=record.model,
            usage=u,
            at=record.created_at,
            reported_model=record.reported_model,
        ),
    )


def rollup_totals(model: type[UsageRollup] | type[RunUsageRollup]) -> dict[str, object]:
    return model.objects.aggregate(
        calls=Sum("calls"),
        prompt=Sum("prompt_tokens"),
        completion=Sum("completion_tokens"),
        cost=Sum("cost_usd"),
    )


def test_a_bulk_import_skips_duplicates_within_and_across_batches(
    make_record: MakeRecord,
) -> None:
    record_usage(record=make_record(call_id="known", prompt=1))
    records = [
        make_record(
            call_id=f"c{i}",
            prompt=100 + i,
            completion=10,
            run_id=i % 3 or None,
            created_at=NOW + timedelta(minutes=7 * i),
        )
        for i in range(25)
    ]
    # c3 twice in one batch, c4 again in a later batch, and one already stored
    records += [records[3], make_record(call_id="c4", prompt=999), make_record(call_id="known")]
    inserted = record_usage_bulk(records=records, batch_size=10)
    assert inserted == 25
    assert UsageEvent.objects.count() == 26
    assert UsageEvent.objects.get(call_id="c4").prompt_tokens == 104
    assert UsageEvent.objects.get(call_id="known").prompt_tokens == 1
    # Imported events are stored rolled up; the one record_usage stored waits for the fold.
    assert list(UsageEvent.objects.filter(rolled_up=False).values_list("call_id", flat=True)) == [
        "known"
    ]
    assert usage_fold() == 1
    events = UsageEvent.objects.aggregate(
        calls=Count("id"),
        prompt=Sum("prompt_tokens"),
        completion=Sum("completion_tokens"),
        cost=Sum("cost_usd"),
    )
    assert rollup_totals(UsageRollup) == events
    assert rollup_totals(RunUsageRollup) == events


def test_bulk_and_single_inserts_build_the_same_rollups(make_record: MakeRecord) -> None:
    records = [
        make_record(
            call_id=f"b{i}",
            provider=p,
            model=m,
            reported_model=reported,
            role=r,
            run_id=run,
            prompt=500 * i,
            completion=20 * i,
            cached=100 * i,
            cache_write=50 * i,
            cache_write_1h=30 * i if p == "anthropic" else 0,
            estimated=i % 3 == 0,
            created_at=NOW + timedelta(minutes=13 * i),
        )
        for i, (p, m, reported, r, run) in enumerate(
            [
                ("openai", "gpt-5", "gpt-5-2025-08-07", "builder", 1),
                ("anthropic", "claude-opus-4-1", "claude-opus-4-1-20250805", "auditor", 1),
                ("anthropic", "claude-opus-4-1", "", "auditor", 1),
                ("glm", "glm-4.6", "glm-4.6", "agent:docs", None),
                ("openai", "unknown-x", "", "builder", 2),
            ]
            * 4
        )
    ]
    for record in records:
        record_usage(record=record)
    assert usage_fold() == len(records)

    def snapshot() -> list[tuple[object, ...]]:
        fields = (
            "bucket",
            "provider",
            "model",
            "reported_model",
            "role",
            "calls",
            "unpriced_calls",
            "estimated_calls",
            "prompt_tokens",
            "completion_tokens",
            "cached_input_tokens",
            "cache_write_tokens",
            "cost_usd",
        )
        return [
            *UsageRollup.objects.order_by(*fields).values_list(*fields),
            *RunUsageRollup.objects.order_by("run_id", *fields).values_list("run_id", *fields),
            *UsageMinuteRollup.objects.order_by("provider", "minute").values_list(
                "provider",
                "minute",
                "calls",
                "prompt_tokens",
                "completion_tokens",
                "cost_usd",
                "first_at",
            ),
            *UsageEvent.objects.order_by("call_id").values_list(*EVENT_FIELDS),
        ]

    single = snapshot()
    # Every field of each record is stored as given, with its price.
    for record in records:
        assert UsageEvent.objects.values_list(*EVENT_FIELDS).get(call_id=record.call_id) == (
            expected_event(record)
        )
    assert UsageRollup.objects.aggregate(n=Sum("estimated_calls"))["n"] == 7
    UsageEvent.objects.all().delete()
    UsageRollup.objects.all().delete()
    RunUsageRollup.objects.all().delete()
    UsageMinuteRollup.objects.all().delete()
    assert record_usage_bulk(records=records, batch_size=7) == len(records)
    assert snapshot() == single

    # The portable path (SQLite: the event and its rollups in one transaction) writes the
    # same rows. Its SQL is standard, so it runs on this suite's PostgreSQL too.
    UsageEvent.objects.all().delete()
    UsageRollup.objects.all().delete()
    RunUsageRollup.objects.all().delete()
    UsageMinuteRollup.objects.all().delete()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(connection, "vendor", "sqlite")
        for record in records:
            record_usage(record=record)
    assert snapshot() == single


def test_a_bulk_import_refuses_a_bad_role_naming_it_before_writing_its_batch(
    make_record: MakeRecord,
) -> None:
    def records() -> Iterator[UsageRecord]:
        yield make_record(call_id="ok-1")
        yield make_record(call_id="bad", role="reviewer")

    with pytest.raises(InvalidRoleError, match="invalid role 'reviewer'"):
        record_usage_bulk(records=records())
    assert UsageEvent.objects.count() == 0
    assert UsageRollup.objects.count() == 0


def test_a_bulk_import_with_an_invalid_row_writes_nothing_of_that_batch(
    make_record: MakeRecord,
) -> None:
    from django.db import IntegrityError

    records = [make_record(call_id="ok-1"), make_record(call_id="bad", cached=5000)]
    with pytest.raises(IntegrityError):
        record_usage_bulk(records=records)
    assert UsageEvent.objects.count() == 0
    assert UsageRollup.objects.count() == 0


def test_the_binary_copy_types_cover_every_staged_column() -> None:
    from usage import services

    assert len(services._STAGE_TYPES) == len(services._EVENT_COLUMNS)
