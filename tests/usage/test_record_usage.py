from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from genai_prices import Usage, calc_price

from usage.models import InvalidRoleError, RunUsageRollup, UsageEvent, UsageRollup
from usage.services import UsageRecord, record_usage, usage_fold

from .conftest import NOW

pytestmark = pytest.mark.django_db
MakeRecord = Callable[..., UsageRecord]


def rollup_state() -> list[tuple[Any, ...]]:
    return [
        *UsageRollup.objects.values_list("bucket", "calls", "prompt_tokens", "cost_usd"),
        *RunUsageRollup.objects.values_list("bucket", "calls", "prompt_tokens", "cost_usd"),
    ]


def statements(ctx: CaptureQueriesContext) -> list[str]:
    # The test's own transaction turns record_usage's atomic into a savepoint; those are not
    # queries the hot path pays for outside tests.
    return [q["sql"] for q in ctx.captured_queries if "SAVEPOINT" not in q["sql"]]


def test_it_stores_the_counts_as_given_and_the_fold_adds_them_to_both_rollups(
    make_record: MakeRecord,
) -> None:
    record = make_record(
        prompt=1200,
        completion=300,
        cached=200,
        cache_write=100,
        reasoning=50,
        run_id=7,
        phase_id=70,
        provider_request_id="req-1",
        latency_ms=812,
    )
    event, created = record_usage(record=record)
    assert created is True
    event.refresh_from_db()
    assert (
        event.prompt_tokens,
        event.completion_tokens,
        event.cached_input_tokens,
        event.cache_write_tokens,
        event.reasoning_tokens,
    ) == (1200, 300, 200, 100, 50)
    assert (event.run_id, event.phase_id, event.provider_request_id, event.latency_ms) == (
        7,
        70,
        "req-1",
        812,
    )
    assert event.created_at == NOW
    assert event.rolled_up is False and UsageRollup.objects.count() == 0
    assert usage_fold() == 1
    event.refresh_from_db()
    assert event.rolled_up is True
    rollup = UsageRollup.objects.get()
    assert rollup.bucket == NOW.replace(minute=0)
    assert (
        rollup.calls,
        rollup.prompt_tokens,
        rollup.completion_tokens,
        rollup.cached_input_tokens,
        rollup.cache_write_tokens,
        rollup.reasoning_tokens,
    ) == (1, 1200, 300, 200, 100, 50)
    assert rollup.cost_usd == event.cost_usd
    assert RunUsageRollup.objects.get().run_id == 7


def test_the_same_call_id_twice_stores_one_event_and_leaves_the_rollups_alone(
    make_record: MakeRecord,
) -> None:
    record = make_record(call_id="openai:req-42")
    first, created = record_usage(record=record)
    usage_fold()
    before = rollup_state()
    again, created_again = record_usage(record=make_record(call_id="openai:req-42", prompt=9))
    assert usage_fold() == 0
    assert (created, created_again) == (True, False)
    assert again.pk == first.pk and again.prompt_tokens == 1000
    assert UsageEvent.objects.count() == 1
    assert rollup_state() == before


def test_a_new_call_costs_one_statement_and_a_repeated_one_two(
    make_record: MakeRecord,
) -> None:
    # PostgreSQL: one plain insert, the rollups are left to usage_fold (issue 7: it sits on the
    # path of every LLM call); SQLite takes three in a transaction.
    record = make_record()
    with CaptureQueriesContext(connection) as new:
        record_usage(record=record)
    with CaptureQueriesContext(connection) as repeated:
        record_usage(record=record)
    assert len(statements(new)) == (1 if connection.vendor == "postgresql" else 3)
    assert len(statements(repeated)) == 2


def test_calls_in_the_same_hour_add_up_in_one_rollup_row(make_record: MakeRecord) -> None:
    for minutes in (0, 10, 29):
        record_usage(
            record=make_record(prompt=10, completion=1, created_at=NOW + timedelta(minutes=minutes))
        )
    record_usage(record=make_record(prompt=5, created_at=NOW + timedelta(minutes=30)))
    assert usage_fold() == 4
    rows = list(UsageRollup.objects.order_by("bucket").values_list("calls", "prompt_tokens"))
    assert rows == [(3, 30), (1, 5)]
    assert list(RunUsageRollup.objects.values_list("run_id", flat=True).distinct()) == [0]


def test_the_cost_comes_from_genai_prices_for_a_known_model(make_record: MakeRecord) -> None:
    event, _ = record_usage(
        record=make_record(
            provider="anthropic",
            model="claude-sonnet-4-5",
            prompt=10_000,
            completion=2_000,
            cached=4_000,
            cache_write=1_000,
            reasoning=500,
        )
    )
    expected = calc_price(
        Usage(
            input_tokens=10_000,
            cache_read_tokens=4_000,
            cache_write_tokens=1_000,
            output_tokens=2_000,
            output_reasoning_tokens=500,
        ),
        "claude-sonnet-4-5",
        provider_id="anthropic",
        genai_request_timestamp=NOW,
    ).total_price
    event.refresh_from_db()
    assert event.cost_usd == Decimal(expected) and event.cost_usd > 0


@pytest.mark.parametrize(
    ("provider", "model"), [("google_gemini", "gemini-2.5-flash"), ("glm", "glm-4.6")]
)
def test_our_provider_names_are_priced_under_their_genai_prices_ids(
    make_record: MakeRecord, provider: str, model: str
) -> None:
    event, _ = record_usage(record=make_record(provider=provider, model=model))
    assert event.cost_usd is not None and event.cost_usd > 0


def test_an_unknown_model_is_stored_without_a_cost(make_record: MakeRecord) -> None:
    event, created = record_usage(record=make_record(model="our-local-llama"))
    assert created is True
    event.refresh_from_db()
    assert event.cost_usd is None
    usage_fold()
    rollup = UsageRollup.objects.get()
    assert (rollup.unpriced_calls, rollup.cost_usd) == (1, Decimal(0))


@pytest.mark.parametrize(
    "counts",
    [
        {"prompt": -1},
        {"completion": -5},
        {"cached": -1},
        {"reasoning": -1, "completion": 0},
        {"prompt": 100, "cached": 80, "cache_write": 30},
        {"completion": 10, "reasoning": 11},
    ],
)
def test_the_database_rejects_negative_counts_and_parts_above_totals(
    make_record: MakeRecord, counts: dict[str, int]
) -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        record_usage(record=make_record(**counts))
    assert UsageEvent.objects.count() == 0
    assert UsageRollup.objects.count() == 0


@pytest.mark.parametrize("role", ["planner", "agent:", "", "Builder", None])
def test_a_role_that_is_not_builder_auditor_or_agent_is_refused_naming_it(
    make_record: MakeRecord, role: object
) -> None:
    record_usage(record=make_record(role="agent:doc_writer"))
    usage_fold()
    before = (UsageEvent.objects.count(), rollup_state())
    with CaptureQueriesContext(connection) as ctx, pytest.raises(InvalidRoleError) as refused:
        record_usage(record=make_record(role=role))
    # A ValueError naming the role, raised before any statement: never an IntegrityError.
    assert isinstance(refused.value, ValueError)
    assert f"invalid role {role!r}" in str(refused.value)
    assert "builder, auditor or agent:<name>" in str(refused.value)
    assert statements(ctx) == []
    assert (UsageEvent.objects.count(), rollup_state()) == before


def test_the_database_still_refuses_a_bad_role_written_past_the_service(
    make_record: MakeRecord,
) -> None:
    event, _ = record_usage(record=make_record(role="builder"))
    with pytest.raises(IntegrityError), transaction.atomic():
        UsageEvent.objects.filter(pk=event.pk).update(role="planner")
    assert UsageEvent.objects.get().role == "builder"


def test_the_reported_model_and_1_hour_writes_are_stored_and_priced(
    make_record: MakeRecord,
) -> None:
    record = make_record(
        provider="anthropic",
        model="claude-opus-4-1",
        reported_model="claude-opus-4-1-20250805",
        prompt=150_000,
        completion=2_000,
        cached=20_000,
        cache_write=120_000,
        cache_write_1h=80_000,
    )
    event, _ = record_usage(record=record)
    event.refresh_from_db()
    assert (event.model, event.reported_model, event.cache_write_1h_tokens) == (
        "claude-opus-4-1",
        "claude-opus-4-1-20250805",
        80_000,
    )
    assert event.cost_usd == Decimal("3.48")  # tests/usage/test_prices.py works it out by hand
    assert event.model_shown == "claude-opus-4-1 (claude-opus-4-1-20250805)"
    usage_fold()
    rollup = UsageRollup.objects.get()
    assert (rollup.model, rollup.reported_model, rollup.cost_usd) == (
        "claude-opus-4-1",
        "claude-opus-4-1-20250805",
        Decimal("3.48"),
    )


def test_the_database_refuses_more_1_hour_writes_than_writes(make_record: MakeRecord) -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        record_usage(record=make_record(cache_write=10, cache_write_1h=11))
    assert UsageEvent.objects.count() == 0


def test_a_naive_created_at_is_refused() -> None:
    from usage.types import TokenUsage

    with pytest.raises(ValueError, match="timezone-aware"):
        UsageRecord(
            call_id="x",
            provider="openai",
            model="gpt-5",
            role="builder",
            usage=TokenUsage(1, 1),
            created_at=NOW.replace(tzinfo=None),
        )
