"""Cap windows read from the rollups are exact (issue 16): window_usage, which reads whole hours
from UsageRollup, whole minutes from UsageMinuteRollup, sub-minute edges and pending events
from UsageEvent, gives the same totals as a brute-force sum over the raw events, at any instant
and for any window; and a rolling window counts (now − N h, now]. Outside tools' usage (source
otel) counts only for a provider whose outside_usage is whole_cap."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.factories import metered_call
from usage.models import (
    OutsideUsage,
    ProviderQuota,
    ProviderWindow,
    UsageEvent,
    UsageMinuteRollup,
    UsageSource,
)
from usage.selectors import window_usage
from usage.services import UsageRecord, record_usage, record_usage_bulk, usage_fold
from usage.types import TokenUsage
from usage.windows import WindowKind, WindowSpec, window_from_config, window_span

H = timedelta(hours=1)
MIN = timedelta(minutes=1)
US = timedelta(microseconds=1)
# The events lie in [BASE, BASE + SPREAD); a Sunday of a US clock change, so that calendar
# days in Los Angeles are 23 hours long here.
BASE = datetime(2026, 3, 7, 20, 0, tzinfo=UTC)
SPREAD = timedelta(hours=30)
PROVIDERS = ("openai", "anthropic")
MODELS = {"openai": ("gpt-5-mini", "no-such-model"), "anthropic": ("claude-sonnet-4-5",)}
# anthropic's windows count everything seen (whole_cap); openai's only Autopack's (share).
COUNTS_EVERYTHING = {"anthropic"}
Row = tuple[str, datetime, int, Decimal | None, bool]  # provider, at, tokens, cost, outside


def spec(provider: str, **raw: Any) -> WindowSpec:
    raw.setdefault("name", "w")
    raw.setdefault("cap_tokens", 10**9)
    return window_from_config(raw, provider=provider, where="w")


def record(provider: str, at: datetime, rng: random.Random) -> UsageRecord:
    # A third from outside tools (OTLP), some from Autopack's agents over the API.
    source = rng.choice([UsageSource.WORKER, UsageSource.API, UsageSource.OTEL])
    return UsageRecord(
        call_id=uuid.uuid4().hex,
        provider=provider,
        # An unknown model has no price: its calls count as requests and tokens, not in USD.
        model=rng.choice(MODELS[provider]),
        role="builder" if source == UsageSource.WORKER else "agent:claude-code",
        source=source,
        usage=TokenUsage(prompt_tokens=rng.randint(1, 5000), completion_tokens=rng.randint(0, 900)),
        created_at=at,
    )


def instants(rng: random.Random, n: int) -> list[datetime]:
    """Random instants of the spread, a third of them on a minute or an hour boundary, some
    several in one minute."""
    out: list[datetime] = []
    for _ in range(n):
        at = BASE + timedelta(microseconds=rng.randrange(int(SPREAD / US)))
        shape = rng.random()
        if shape < 0.2:
            at = at.replace(second=0, microsecond=0)
        elif shape < 0.33:
            at = at.replace(minute=0, second=0, microsecond=0)
        elif shape < 0.45 and out:
            at = out[-1] + timedelta(seconds=rng.randint(0, 50))
        out.append(at)
    return out


@pytest.fixture
def events(db: None) -> list[Row]:
    """Events of two providers, from workers, agents and outside tools, folded in every way:
    bulk-imported (stored folded), recorded then folded, recorded and left pending. Returns
    (provider, created_at, tokens, cost, outside)."""
    ProviderWindow.objects.all().delete()
    ProviderQuota.objects.all().delete()
    for provider in COUNTS_EVERYTHING:
        ProviderQuota.objects.create(provider=provider, outside_usage=OutsideUsage.WHOLE_CAP)
    rng = random.Random(16)
    record_usage_bulk(
        records=[record(rng.choice(PROVIDERS), at, rng) for at in instants(rng, 400)],
        batch_size=150,
    )
    for at in instants(rng, 300):
        record_usage(record=record(rng.choice(PROVIDERS), at, rng))
    usage_fold(batch_size=100, max_batches=2)  # the oldest 200 of those 300
    for at in instants(rng, 200):
        record_usage(record=record(rng.choice(PROVIDERS), at, rng))
    assert UsageEvent.objects.filter(rolled_up=False).count() == 300
    assert UsageMinuteRollup.objects.filter(outside=True).exists()
    assert UsageMinuteRollup.objects.filter(outside=False).exists()
    return [
        (
            e.provider,
            e.created_at,
            e.prompt_tokens + e.completion_tokens,
            e.cost_usd,
            e.source == UsageSource.OTEL,
        )
        for e in UsageEvent.objects.all()
    ]


def brute_force(rows: list[Row], window: WindowSpec, now: datetime) -> dict[str, Any]:
    start, _reset = window_span(window, now)
    if window.provider not in COUNTS_EVERYTHING:
        rows = [r for r in rows if not r[4]]
    if window.kind == WindowKind.ROLLING:
        inside = [r for r in rows if r[0] == window.provider and start < r[1] <= now]
    else:
        inside = [r for r in rows if r[0] == window.provider and start <= r[1] < now]
    reset = None
    if window.kind == WindowKind.ROLLING and inside:
        assert window.hours is not None
        reset = min(r[1] for r in inside) + timedelta(hours=window.hours)
    return {
        "tokens": sum(r[2] for r in inside),
        "requests": len(inside),
        "usd": sum((r[3] for r in inside if r[3] is not None), Decimal(0)),
        "reset": reset if window.kind == WindowKind.ROLLING else window_span(window, now)[1],
    }


FIXED_WINDOWS = [
    spec(provider, name=name, **raw)
    for provider in PROVIDERS
    for name, raw in (
        ("la-day", {"kind": "calendar", "unit": "day", "time_zone": "America/Los_Angeles"}),
        # +05:45 and +05:30: days that start neither on the hour nor on the half hour in UTC.
        ("kathmandu-day", {"kind": "calendar", "unit": "day", "time_zone": "Asia/Kathmandu"}),
        ("kolkata-day", {"kind": "calendar", "unit": "day", "time_zone": "Asia/Kolkata"}),
        ("utc-day", {"kind": "calendar", "unit": "day"}),
    )
]


@st.composite
def instants_near(draw: st.DrawFn, rows: list[datetime]) -> datetime:
    """An instant of the spread: anywhere, or on an event, or N hours after one (where a
    rolling window's oldest usage leaves it), give or take a microsecond, or on a boundary."""
    how = draw(st.sampled_from(["any", "event", "event+hours", "minute", "hour"]))
    if how == "any" or not rows:
        at = BASE + timedelta(microseconds=draw(st.integers(0, int((SPREAD + 6 * H) / US))))
    else:
        at = draw(st.sampled_from(rows))
        if how == "event+hours":
            at += draw(st.sampled_from([1, 2, 5])) * H
    if how == "minute":
        at = at.replace(second=0, microsecond=0)
    elif how == "hour":
        at = at.replace(minute=0, second=0, microsecond=0)
    return at + draw(st.sampled_from([-US, timedelta(0), timedelta(0), US]))


def test_window_usage_is_the_raw_events_sum_at_any_instant_for_any_window(
    events: list[Row],
) -> None:
    event_instants = sorted(r[1] for r in events)

    @hypothesis_settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        now=instants_near(event_instants),
        rolling_hours=st.sampled_from([1, 2, 5, 24]),
        anchor_offset=st.integers(0, int(24 * H / US) - 1),
        anchored_hours=st.sampled_from([1, 3, 7, 24]),
    )
    def check(now: datetime, rolling_hours: int, anchor_offset: int, anchored_hours: int) -> None:
        anchor = BASE - timedelta(days=2) + timedelta(microseconds=anchor_offset)
        windows = [
            *FIXED_WINDOWS,
            *(spec(p, name="rolling", kind="rolling", hours=rolling_hours) for p in PROVIDERS),
            *(
                spec(
                    p,
                    name="anchored",
                    kind="anchored",
                    hours=anchored_hours,
                    anchor=anchor.isoformat(),
                    time_zone="UTC",
                )
                for p in PROVIDERS
            ),
        ]
        rows = window_usage(now=now, windows=windows)
        assert len(rows) == len(windows)
        for window, row in zip(windows, rows, strict=True):
            expected = brute_force(events, window, now)
            got = {k: row[k] for k in ("tokens", "requests", "usd", "reset")}
            assert got == expected, (window.provider, window.name, window.describe(), now)
            everything = window.provider in COUNTS_EVERYTHING
            assert row["counts"] == ("everything" if everything else "autopack")

    check()


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize(
    "now",
    [
        datetime(2026, 3, 2, 12, 0, tzinfo=UTC),  # on the hour: the start is on the hour too
        datetime(2026, 3, 2, 12, 20, tzinfo=UTC),  # on a minute
        datetime(2026, 3, 2, 12, 20, 13, 500_000, tzinfo=UTC),  # inside a minute
    ],
)
def test_a_rolling_window_counts_after_now_minus_n_hours_up_to_and_with_now(
    db: None, fold: bool, now: datetime
) -> None:
    ProviderWindow.objects.all().delete()
    ProviderQuota.objects.all().delete()
    session = spec("glm", name="session", kind="rolling", hours=5, cap_requests=100)
    start = now - 5 * H

    def call(at: datetime, tokens: int) -> None:
        metered_call("glm", "glm-4.6", prompt=tokens, completion=0, at=at)

    call(start, 1)  # left: usage at exactly now − 5 h is out
    call(start + US, 10)  # the oldest counted
    call(start + MIN, 100)
    call(start + H, 1000)
    call(now - US, 10_000)
    call(now, 100_000)  # counted: the window holds now
    call(now + US, 1_000_000)  # not yet
    if fold:
        usage_fold()
        assert not UsageEvent.objects.filter(rolled_up=False).exists()
    with CaptureQueriesContext(connection) as queries:
        [row] = window_usage(now=now, windows=[session])
    assert (row["tokens"], row["requests"]) == (111_110, 5)
    assert row["start"] == start
    # Exact: its oldest usage + 5 h; the first event's instant comes from the minute rollup (or
    # the events), so no statement beyond the quotas and the usage.
    assert row["reset"] == start + US + 5 * H
    assert len(queries) == 2
    # At the reset the oldest usage has left, and the reset moves to the next oldest.
    [later] = window_usage(now=row["reset"], windows=[session])
    assert (later["tokens"], later["requests"]) == (1_111_100, 5)
    assert later["reset"] == start + MIN + 5 * H
    [before] = window_usage(now=row["reset"] - US, windows=[session])
    assert (before["tokens"], before["requests"]) == (111_110, 5)
