from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from usage.models import UsageEvent
from usage.selectors import (
    PERIOD_SEMANTICS,
    get_model_usage_summary,
    get_provider_usage_summary,
    get_usage_summary,
    period_window,
    phase_usage_totals,
    run_usage_totals,
    tokens_per_day,
)
from usage.services import UsageRecord, provider_quota_upsert, record_usage, usage_fold

from .conftest import NOW

pytestmark = pytest.mark.django_db
MakeRecord = Callable[..., UsageRecord]
HOUR = timedelta(hours=1)


@pytest.fixture
def mixed_usage(make_record: MakeRecord) -> None:
    rows = [
        # provider, model, role, run, phase, prompt, completion, cached, reasoning
        ("openai", "gpt-5", "builder", 1, 11, 1000, 100, 200, 50),
        ("openai", "gpt-5", "auditor", 1, 11, 400, 40, 0, 0),
        ("openai", "gpt-5-mini", "builder", 1, 12, 300, 30, 0, 10),
        ("anthropic", "claude-opus-4-1", "auditor", 2, 21, 2000, 200, 1000, 0),
        ("glm", "glm-4.6", "agent:docs", None, None, 50, 5, 0, 0),
    ]
    for i, (provider, model, role, run, phase, p, c, cached, reasoning) in enumerate(rows):
        record_usage(
            record=make_record(
                provider=provider,
                model=model,
                role=role,
                run_id=run,
                phase_id=phase,
                prompt=p,
                completion=c,
                cached=cached,
                reasoning=reasoning,
                created_at=NOW - timedelta(minutes=40 * i),
            )
        )


def tokens(rows: list[dict[str, object]], *keys: str) -> dict[object, tuple[object, ...]]:
    return {
        tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]: (
            r["tokens_in"],
            r["tokens_out"],
        )
        for r in rows
    }


@pytest.mark.usefixtures("mixed_usage")
def test_a_summary_groups_by_provider_model_role_and_run() -> None:
    window = (NOW - timedelta(days=1), NOW + HOUR)
    by_provider = get_usage_summary(time_window=window, group_by=["provider"])
    assert tokens(by_provider, "provider") == {
        "anthropic": (2000, 200),
        "glm": (50, 5),
        "openai": (1700, 170),
    }
    by_model = get_usage_summary(time_window=window, group_by=["model"])
    assert tokens(by_model, "model")["gpt-5"] == (1400, 140)
    by_role = get_usage_summary(time_window=window, group_by=["role"])
    assert tokens(by_role, "role") == {
        "agent:docs": (50, 5),
        "auditor": (2400, 240),
        "builder": (1300, 130),
    }
    by_run = get_usage_summary(time_window=window, group_by=["run"])
    assert tokens(by_run, "run_id") == {1: (1700, 170), 2: (2000, 200), None: (50, 5)}
    combined = get_usage_summary(time_window=window, group_by=["provider", "role"])
    assert tokens(combined, "provider", "role")[("openai", "builder")] == (1300, 130)
    (total,) = get_usage_summary(time_window=window, group_by=[])
    assert (total["tokens_in"], total["tokens_out"], total["calls"]) == (3750, 375, 5)
    assert (total["cached_input_tokens"], total["reasoning_tokens"]) == (1200, 60)


@pytest.mark.usefixtures("mixed_usage")
def test_a_summary_cost_is_none_only_when_nothing_in_the_group_was_priced(
    make_record: MakeRecord,
) -> None:
    record_usage(record=make_record(provider="local", model="llama-3", created_at=NOW))
    rows = {
        r["provider"]: r
        for r in get_usage_summary(time_window="day", group_by=["provider"], now=NOW)
    }
    assert rows["local"]["cost_usd"] is None and rows["local"]["unpriced_calls"] == 1
    assert rows["openai"]["cost_usd"] > 0 and rows["openai"]["unpriced_calls"] == 0


def test_a_window_that_does_not_start_on_the_hour_is_exact_to_the_second(
    make_record: MakeRecord,
) -> None:
    start = NOW.replace(minute=20, second=30)
    for at, prompt in [
        (start - timedelta(seconds=1), 1),
        (start, 10),
        (start + timedelta(hours=2), 100),
        (start + timedelta(hours=3), 1000),
    ]:
        record_usage(record=make_record(prompt=prompt, completion=0, created_at=at))
    (row,) = get_usage_summary(time_window=(start, start + timedelta(hours=3)), group_by=[])
    assert (row["tokens_in"], row["calls"]) == (110, 2)
    (inside_one_hour,) = get_usage_summary(
        time_window=(start, start + timedelta(minutes=5)), group_by=[]
    )
    assert inside_one_hour["tokens_in"] == 10


def test_an_unknown_group_or_period_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot group"):
        get_usage_summary(time_window="day", group_by=["phase"])
    with pytest.raises(ValueError, match="period must be one of"):
        get_provider_usage_summary(period="year")


def test_periods_are_calendar_periods_in_utc() -> None:
    assert PERIOD_SEMANTICS == "calendar-utc"
    now = datetime(2025, 3, 12, 15, 30, tzinfo=UTC)  # Wednesday
    assert period_window("day", now=now) == (
        datetime(2025, 3, 12, tzinfo=UTC),
        datetime(2025, 3, 13, tzinfo=UTC),
    )
    assert period_window("week", now=now) == (
        datetime(2025, 3, 10, tzinfo=UTC),
        datetime(2025, 3, 17, tzinfo=UTC),
    )
    assert period_window("month", now=now) == (
        datetime(2025, 3, 1, tzinfo=UTC),
        datetime(2025, 4, 1, tzinfo=UTC),
    )
    december = datetime(2025, 12, 31, 23, 59, tzinfo=UTC)
    assert period_window("month", now=december)[1] == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("period", "boundary"),
    [
        ("day", datetime(2025, 3, 12, tzinfo=UTC)),
        ("week", datetime(2025, 3, 10, tzinfo=UTC)),  # Monday
        ("month", datetime(2025, 3, 1, tzinfo=UTC)),
    ],
)
def test_an_event_one_second_before_a_period_starts_is_not_counted_and_one_at_its_start_is(
    make_record: MakeRecord, period: str, boundary: datetime
) -> None:
    second = timedelta(seconds=1)
    record_usage(
        record=make_record(
            provider="boundary", prompt=1, completion=0, created_at=boundary - second
        )
    )
    record_usage(
        record=make_record(provider="boundary", prompt=10, completion=0, created_at=boundary)
    )
    record_usage(
        record=make_record(
            provider="boundary", prompt=100, completion=0, created_at=boundary + second
        )
    )
    rows = {r["provider"]: r for r in get_provider_usage_summary(period=period, now=NOW)}
    assert rows["boundary"]["tokens_in"] == 110


def test_percent_of_cap_uses_the_cap_times_autopack_share(make_record: MakeRecord) -> None:
    provider_quota_upsert(
        provider="anthropic",
        daily_cap_tokens=100_000,
        weekly_cap_tokens=None,
        monthly_cap_tokens=1_000_000,
        autopack_share=Decimal("0.5"),
        soft_limit=Decimal("0.8"),
    )
    record_usage(
        record=make_record(
            provider="anthropic", model="claude-opus-4-1", prompt=35_000, completion=5_000
        )
    )
    day = {r["provider"]: r for r in get_provider_usage_summary(period="day", now=NOW)}
    row = day["anthropic"]
    assert (row["cap"], row["total_tokens"], row["percent_of_cap"]) == (50_000, 40_000, 80.0)
    assert (row["over_soft_limit"], row["over_hard_limit"]) == (True, False)
    week = {r["provider"]: r for r in get_provider_usage_summary(period="week", now=NOW)}
    assert (week["anthropic"]["cap"], week["anthropic"]["percent_of_cap"]) == (None, None)
    assert week["anthropic"]["over_hard_limit"] is False
    month = {r["provider"]: r for r in get_provider_usage_summary(period="month", now=NOW)}
    assert month["anthropic"]["percent_of_cap"] == 8.0


def test_reaching_the_effective_cap_is_over_the_hard_limit(make_record: MakeRecord) -> None:
    provider_quota_upsert(
        provider="openai",
        daily_cap_tokens=2_000,
        weekly_cap_tokens=None,
        monthly_cap_tokens=None,
        autopack_share=Decimal("0.5"),
        soft_limit=1,
    )
    record_usage(record=make_record(prompt=900, completion=100))
    row = next(
        r for r in get_provider_usage_summary(period="day", now=NOW) if r["provider"] == "openai"
    )
    assert (row["percent_of_cap"], row["over_soft_limit"], row["over_hard_limit"]) == (
        100.0,
        True,
        True,
    )


def test_every_provider_with_a_quota_or_usage_is_listed(make_record: MakeRecord) -> None:
    provider_quota_upsert(
        provider="quiet",
        daily_cap_tokens=10,
        weekly_cap_tokens=None,
        monthly_cap_tokens=None,
        autopack_share=1,
        soft_limit=0.8,
    )
    record_usage(record=make_record(provider="uncapped", model="x"))
    rows = {r["provider"]: r for r in get_provider_usage_summary(period="day", now=NOW)}
    assert rows["quiet"]["total_tokens"] == 0 and rows["quiet"]["percent_of_cap"] == 0
    assert rows["uncapped"]["cap"] is None and rows["uncapped"]["percent_of_cap"] is None
    assert rows["uncapped"]["over_soft_limit"] is False


@pytest.mark.usefixtures("mixed_usage")
def test_the_model_summary_lists_tokens_and_cost_per_model() -> None:
    rows = get_model_usage_summary(period="day", now=NOW)
    assert [(r["provider"], r["model"]) for r in rows] == [
        ("anthropic", "claude-opus-4-1"),
        ("glm", "glm-4.6"),
        ("openai", "gpt-5"),
        ("openai", "gpt-5-mini"),
    ]
    gpt5 = rows[2]
    assert (gpt5["tokens_in"], gpt5["tokens_out"], gpt5["calls"]) == (1400, 140, 2)
    assert isinstance(gpt5["cost_usd"], Decimal) and gpt5["cost_usd"] > 0


def test_two_snapshots_answering_for_one_catalogue_model_are_one_row_naming_both(
    make_record: MakeRecord,
) -> None:
    for i, (reported, prompt) in enumerate(
        [
            ("claude-sonnet-4-5-20250929", 1000),
            ("claude-sonnet-4-5-20251101", 300),
            ("claude-sonnet-4-5-20250929", 200),
            ("", 40),  # a lost call: no model reported
        ]
    ):
        record_usage(
            record=make_record(
                provider="anthropic",
                model="claude-sonnet-4-5",
                reported_model=reported,
                prompt=prompt,
                completion=10,
                estimated=reported == "",
                created_at=NOW - timedelta(minutes=50 * i),
            )
        )
    for _folded in (False, True):
        (row,) = get_model_usage_summary(period="day", now=NOW)
        assert (row["provider"], row["model"]) == ("anthropic", "claude-sonnet-4-5")
        assert row["reported_models"] == [
            "claude-sonnet-4-5-20250929",
            "claude-sonnet-4-5-20251101",
        ]
        assert (row["tokens_in"], row["tokens_out"], row["calls"]) == (1540, 40, 4)
        assert row["estimated_calls"] == 1
        assert row["cost_usd"] == sum(
            (e.cost_usd or Decimal(0) for e in UsageEvent.objects.all()), start=Decimal(0)
        )
        # The provider's cap is counted over all of them; summaries by model group by the
        # catalogue model.
        providers = get_provider_usage_summary(period="day", now=NOW)
        (anthropic,) = [p for p in providers if p["provider"] == "anthropic"]
        assert anthropic["total_tokens"] == 1580
        rows = get_usage_summary(time_window="day", group_by=["model"], now=NOW)
        assert [(r["model"], r["tokens_in"]) for r in rows] == [("claude-sonnet-4-5", 1540)]
        usage_fold()


@pytest.mark.usefixtures("mixed_usage")
def test_phase_and_role_totals_add_up_to_the_run_total() -> None:
    phases = phase_usage_totals(run_ids=[1])
    assert [(r["phase_id"], r["role"], r["tokens_in"]) for r in phases] == [
        (11, "auditor", 400),
        (11, "builder", 1000),
        (12, "builder", 300),
    ]
    total = run_usage_totals(run_id=1)
    assert (total["tokens_in"], total["tokens_out"], total["calls"]) == (1700, 170, 3)
    assert sum(r["tokens_in"] for r in phases) == total["tokens_in"]
    assert sum(r["cost_usd"] for r in phases) == total["cost_usd"]
    assert [r["tokens_in"] for r in phase_usage_totals(phase_ids=[21])] == [2000]
    assert run_usage_totals(run_id=999)["calls"] == 0


def test_tokens_per_day_lists_every_day_oldest_first_with_zeros(make_record: MakeRecord) -> None:
    record_usage(record=make_record(prompt=5, completion=1, created_at=NOW))
    record_usage(
        record=make_record(
            prompt=7, completion=2, created_at=datetime(2025, 3, 10, 23, 59, 59, tzinfo=UTC)
        )
    )
    record_usage(
        record=make_record(
            prompt=1000, completion=0, created_at=datetime(2025, 3, 5, 23, 59, 59, tzinfo=UTC)
        )
    )
    days = tokens_per_day(days=7, now=NOW)
    assert [d["day"] for d in days] == [date(2025, 3, d) for d in range(6, 13)]
    assert [(d["tokens_in"], d["tokens_out"]) for d in days] == [
        (0, 0),
        (0, 0),
        (0, 0),
        (0, 0),
        (7, 2),
        (0, 0),
        (5, 1),
    ]
