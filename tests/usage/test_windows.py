"""Cap windows (issue 16): calendar, anchored and rolling spans across daylight-saving changes,
the usage of every window in one statement, models.yaml's windows keys and the admin."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import IntegrityError, connection, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from routing.config import ModelsConfigError, parse_models_config
from routing.mapping import models_export, models_import
from usage.models import ProviderQuota, ProviderWindow, UsageEvent
from usage.selectors import get_provider_usage_summary, provider_windows, window_usage
from usage.services import UsageRecord, provider_quota_upsert, record_usage, usage_fold
from usage.types import TokenUsage
from usage.windows import (
    CalendarUnit,
    WindowConfigError,
    WindowSpec,
    window_from_config,
    window_span,
)

H = timedelta(hours=1)
US = timedelta(microseconds=1)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def fixed_span(window: WindowSpec, now: datetime) -> tuple[datetime, datetime]:
    start, reset = window_span(window, now)
    assert reset is not None
    return start, reset


def spec(provider: str = "p", **raw: Any) -> WindowSpec:
    raw.setdefault("name", "w")
    if not any(k.startswith("cap_") for k in raw):
        raw["cap_tokens"] = 1000
    return window_from_config(raw, provider=provider, where="w")


LA_DAY = spec(kind="calendar", unit="day", time_zone="America/Los_Angeles")
NY_WEEK = spec(
    kind="anchored", days=7, anchor="2026-01-01T18:00", time_zone="America/New_York"
)  # Thursday 18:00


# ---- spans -------------------------------------------------------------------------------


def test_a_los_angeles_day_is_23_hours_on_the_march_change_and_25_on_the_november_one() -> None:
    start, reset = fixed_span(LA_DAY, utc(2026, 3, 8, 20))  # noon PDT, 8 March 2026
    assert (start, reset) == (utc(2026, 3, 8, 8), utc(2026, 3, 9, 7))  # PST to PDT midnight
    assert reset - start == 23 * H
    start, reset = fixed_span(LA_DAY, utc(2026, 11, 1, 20))
    assert (start, reset) == (utc(2026, 11, 1, 7), utc(2026, 11, 2, 8))
    assert reset - start == 25 * H
    # An ordinary day either side, and the instant of local midnight belongs to the new day.
    assert window_span(LA_DAY, utc(2026, 3, 9, 7)) == (utc(2026, 3, 9, 7), utc(2026, 3, 10, 7))
    assert window_span(LA_DAY, utc(2026, 3, 9, 7) - US)[1] == utc(2026, 3, 9, 7)


def test_a_week_anchored_on_thursday_evening_in_new_york_keeps_18_00_across_dst() -> None:
    # EST (UTC-5) until 8 March 2026, EDT (UTC-4) until 1 November.
    start, reset = fixed_span(NY_WEEK, utc(2026, 3, 10, 12))
    assert (start, reset) == (utc(2026, 3, 5, 23), utc(2026, 3, 12, 22))
    assert reset - start == 167 * H
    start, reset = fixed_span(NY_WEEK, utc(2026, 11, 3))
    assert (start, reset) == (utc(2026, 10, 29, 22), utc(2026, 11, 5, 23))
    assert reset - start == 169 * H
    # Before the anchor too: the windows repeat backwards from it.
    assert window_span(NY_WEEK, utc(2025, 12, 31)) == (utc(2025, 12, 25, 23), utc(2026, 1, 1, 23))
    # At the reset instant the next window starts.
    assert window_span(NY_WEEK, utc(2026, 3, 12, 22))[0] == utc(2026, 3, 12, 22)


def test_a_length_in_hours_repeats_in_absolute_time_across_dst() -> None:
    daily = spec(kind="anchored", hours=24, anchor="2026-01-01T18:00", time_zone="America/New_York")
    assert window_span(daily, utc(2026, 7, 1, 12)) == (utc(2026, 6, 30, 23), utc(2026, 7, 1, 23))


def test_a_rolling_window_starts_n_hours_ago_and_its_reset_comes_from_the_usage() -> None:
    now = utc(2026, 3, 8, 9, 17, 5)
    assert window_span(spec(kind="rolling", hours=5), now) == (now - 5 * H, None)


def test_calendar_weeks_and_months_follow_the_local_calendar() -> None:
    week = spec(kind="calendar", unit="week", time_zone="Asia/Tokyo")
    # Sunday 23:00 UTC is Monday 08:00 in Tokyo: the new ISO week has begun there.
    assert window_span(week, utc(2026, 3, 8, 23)) == (utc(2026, 3, 8, 15), utc(2026, 3, 15, 15))
    month = spec(kind="calendar", unit="month", time_zone="America/Los_Angeles")
    assert window_span(month, utc(2026, 3, 31, 12)) == (utc(2026, 3, 1, 8), utc(2026, 4, 1, 7))


ZONES = [
    "UTC",
    "America/Los_Angeles",
    "America/New_York",
    "Europe/London",
    "Australia/Lord_Howe",  # a 30-minute change
    "America/Santiago",  # clocks change at midnight: some local midnights do not exist
    "America/Havana",
]
SPECS = st.one_of(
    st.builds(
        lambda u, z: spec(kind="calendar", unit=u, time_zone=z),
        st.sampled_from(CalendarUnit.values),
        st.sampled_from(ZONES),
    ),
    st.builds(
        lambda d, h, z, a: spec(
            kind="anchored", time_zone=z, anchor=a, **({"days": d} if h is None else {"hours": h})
        ),
        st.integers(1, 14),
        st.one_of(st.none(), st.integers(1, 200)),
        st.sampled_from(ZONES),
        st.datetimes(datetime(2020, 1, 1), datetime(2030, 1, 1)).map(lambda d: d.isoformat()),
    ),
)
INSTANTS = st.datetimes(datetime(2021, 1, 1), datetime(2029, 1, 1)).map(
    lambda d: d.replace(tzinfo=UTC)
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(window=SPECS, now=INSTANTS)
def test_spans_hold_now_and_tile_time(window: WindowSpec, now: datetime) -> None:
    start, reset = window_span(window, now)
    assert reset is not None
    assert start <= now < reset
    assert window_span(window, start) == (start, reset)
    assert window_span(window, reset)[0] == reset  # the next one starts where this one ends
    assert window_span(window, start - US)[1] == start  # the previous one ends where it starts


# ---- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key", "words"),
    [
        ({"kind": "sliding", "hours": 5}, "kind", "unknown kind 'sliding'"),
        ({"kind": "calendar", "unit": "day", "time_zone": "Mars/Olympus"}, "time_zone", "unknown"),
        ({"kind": "calendar", "unit": "day", "time_zone": "posix/UTC"}, "time_zone", "unknown"),
        ({"kind": "calendar", "unit": "fortnight"}, "unit", "day, week, month"),
        ({"kind": "rolling", "hours": 0}, "hours", "at least 1"),
        ({"kind": "anchored", "days": 0, "anchor": "2026-01-01T18:00"}, "days", "at least 1"),
        ({"kind": "anchored", "days": 7, "anchor": "Thursday"}, "anchor", "ISO date-time"),
        ({"kind": "anchored", "days": 7}, "anchor", "required"),
        ({"kind": "anchored", "days": 7, "hours": 5, "anchor": "2026-01-01"}, "hours", "one"),
        ({"kind": "rolling", "hours": 5, "time_zone": "UTC"}, "time_zone", "not used"),
        ({"kind": "rolling", "hours": 5, "cap_tokens": -1}, "cap_tokens", "at least 0"),
        ({"kind": "rolling", "hours": 5, "cap_usd": "-0.5"}, "cap_usd", "at least 0"),
        ({"kind": "rolling", "hours": 5, "cap_requests": 1.5}, "cap_requests", "whole"),
        ({"kind": "rolling", "hours": 5, "cap_usd": "nan"}, "cap_usd", "finite"),
        ({"kind": "rolling", "hours": 5, "soft_limit": 0}, "soft_limit", "greater than 0"),
        ({"kind": "rolling", "hours": 5, "autopack_share": 2}, "autopack_share", "at most 1"),
        ({"kind": "rolling", "hours": 5, "color": "red"}, "color", "unknown key"),
        ({"name": "Week 1", "kind": "rolling", "hours": 5}, "name", "short name"),
    ],
)
def test_a_bad_window_is_refused_with_its_key_named(
    raw: dict[str, Any], key: str, words: str
) -> None:
    raw = {"name": "w", "cap_tokens": 1, **raw}
    with pytest.raises(WindowConfigError) as caught:
        window_from_config(raw, provider="p", where="providers.p.windows[1]")
    assert caught.value.key == key
    assert str(caught.value).startswith(f"providers.p.windows[1].{key}: ")
    assert words in str(caught.value)


def test_a_window_without_any_cap_is_refused() -> None:
    with pytest.raises(WindowConfigError, match=r"^w\.cap_tokens: a window needs a cap"):
        window_from_config({"name": "x", "kind": "rolling", "hours": 5}, provider="p", where="w")


def committed_yaml() -> dict[str, Any]:
    data = yaml.safe_load(Path(settings.AUTOPACK_MODELS_FILE).read_text())
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda w: w[1].update(anchor="next Thursday"),
            "providers.anthropic.windows[1].anchor: expected an ISO date-time",
        ),
        (
            lambda w: w.append({"name": "session", "kind": "rolling", "hours": 3, "cap_tokens": 1}),
            "providers.anthropic.windows[2].name: duplicate window 'session'",
        ),
        (lambda w: w[0].update(kind="hourly"), "providers.anthropic.windows[0].kind: unknown kind"),
        (lambda w: w[0].pop("cap_tokens"), "providers.anthropic.windows[0].cap_tokens: a window"),
        (
            lambda w: w[0].update(hours=0),
            "providers.anthropic.windows[0].hours: must be at least 1",
        ),
        (lambda w: w.append("day"), "providers.anthropic.windows[2]: expected a mapping"),
    ],
)
def test_models_yaml_is_refused_whole_naming_the_window_key(change: Any, message: str) -> None:
    data = committed_yaml()
    change(data["providers"]["anthropic"]["windows"])
    with pytest.raises(ModelsConfigError) as caught:
        parse_models_config(data)
    assert str(caught.value).startswith(message)


def test_the_committed_models_yaml_has_each_plans_windows() -> None:
    providers = parse_models_config(committed_yaml()).providers
    shapes = {
        name: [(w.name, w.kind, w.hours, w.days, w.unit, w.time_zone) for w in p.windows]
        for name, p in providers.items()
    }
    assert shapes == {
        "openai": [
            ("session", "rolling", 5, None, None, "UTC"),
            ("week", "rolling", 168, None, None, "UTC"),
        ],
        "anthropic": [
            ("session", "rolling", 5, None, None, "UTC"),
            ("week", "anchored", None, 7, None, "America/New_York"),
        ],
        "google_gemini": [("day", "calendar", None, None, "day", "America/Los_Angeles")],
        "glm": [("session", "rolling", 5, None, None, "UTC")],
    }
    assert providers["glm"].windows[0].caps == {"requests": 2400}
    # The legacy keys still load.
    assert providers["anthropic"].weekly_cap_tokens == 20_000_000


# ---- storage, import and export ----------------------------------------------------------


@pytest.mark.django_db
def test_import_stores_the_windows_and_export_writes_them_back_the_same(tmp_path: Path) -> None:
    data = committed_yaml()
    data["providers"]["glm"]["windows"].append(
        {
            "name": "month",
            "kind": "calendar",
            "unit": "month",
            "time_zone": "Asia/Shanghai",
            "cap_usd": 12.5,
            "cap_requests": 9000,
            "autopack_share": 0.5,
            "soft_limit": 0.9,
        }
    )
    models_import(data=data)
    rows = {(w.provider, w.name): w for w in ProviderWindow.objects.all()}
    assert len(rows) == 7
    assert rows[("glm", "month")].cap_usd == Decimal("12.5")
    exported = models_export()
    again = parse_models_config(exported)
    for name, provider in parse_models_config(data).providers.items():
        assert set(again.providers[name].windows) == set(provider.windows)
    models_import(data=exported)
    assert models_export() == exported
    anchor = exported["providers"]["anthropic"]["windows"][1]["anchor"]
    assert anchor == "2026-01-01T18:00:00-05:00"  # wall-clock time with its offset
    # Through the commands and YAML text too (the anchor stays a string, not a timestamp).
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    call_command("export_models", "-o", str(first), stdout=io.StringIO())
    call_command("import_models", str(first), stdout=io.StringIO())
    call_command("export_models", "-o", str(second), stdout=io.StringIO())
    assert first.read_text() == second.read_text()
    assert "anchor: '2026-01-01T18:00:00-05:00'" in first.read_text()
    # A provider whose windows are dropped from the file loses them.
    del exported["providers"]["glm"]["windows"]
    models_import(data=exported)
    assert not ProviderWindow.objects.filter(provider="glm").exists()


@pytest.mark.django_db
def test_legacy_caps_are_utc_calendar_windows_unless_a_window_takes_their_name() -> None:
    ProviderWindow.objects.all().delete()
    provider_quota_upsert(
        provider="openai",
        daily_cap_tokens=100,
        weekly_cap_tokens=None,
        monthly_cap_tokens=3000,
        autopack_share="1",
        soft_limit="0.8",
    )
    legacy = [w for w in provider_windows(provider="openai")]
    assert [(w.name, w.kind, w.unit, w.time_zone, w.cap_tokens, w.legacy) for w in legacy] == [
        ("day", "calendar", "day", "UTC", 100, True),
        ("month", "calendar", "month", "UTC", 3000, True),
    ]
    ProviderWindow.objects.create(
        provider="openai",
        name="day",
        kind="calendar",
        unit="day",
        time_zone="America/Los_Angeles",
        cap_tokens=500,
    )
    names = [(w.name, w.time_zone, w.legacy) for w in provider_windows(provider="openai")]
    assert names == [("day", "America/Los_Angeles", False), ("month", "UTC", True)]


# ---- usage per window --------------------------------------------------------------------


def call(
    provider: str, at: datetime, *, prompt: int = 100, completion: int = 10, model: str = ""
) -> None:
    model = model or {"anthropic": "claude-sonnet-4-5", "glm": "glm-4.6"}.get(
        provider, "gpt-5-mini"
    )
    record_usage(
        record=UsageRecord(
            call_id=uuid.uuid4().hex,
            provider=provider,
            model=model,
            role="builder",
            usage=TokenUsage(prompt_tokens=prompt, completion_tokens=completion),
            created_at=at,
        )
    )


def only(rows: list[dict[str, Any]], provider: str, window: str) -> dict[str, Any]:
    [row] = [r for r in rows if r["provider"] == provider and r["window"] == window]
    return row


@pytest.fixture
def no_windows(db: None) -> None:
    ProviderWindow.objects.all().delete()
    ProviderQuota.objects.all().delete()


def window(provider: str, name: str, **fields: Any) -> ProviderWindow:
    row = ProviderWindow(provider=provider, name=name, **fields)
    row.full_clean()
    row.save()
    return row


@pytest.mark.usefixtures("no_windows")
@pytest.mark.parametrize("fold", [False, True])
def test_usage_counts_the_start_and_not_now_whether_events_are_folded_or_not(fold: bool) -> None:
    # A 5-hour window anchored at :30, so both ends fall inside an hour.
    window(
        "openai",
        "five",
        kind="anchored",
        hours=5,
        anchor=utc(2026, 3, 1, 0, 30),
        time_zone="UTC",
        cap_tokens=10_000,
    )
    now = utc(2026, 3, 2, 3, 45)  # in the window [01:30, 06:30) of 2 March
    start = utc(2026, 3, 2, 1, 30)
    call("openai", start - US, prompt=1)  # the window before
    call("openai", start, prompt=10)  # included: the start
    call("openai", utc(2026, 3, 2, 1, 59), prompt=20)  # the partial first hour
    call("openai", utc(2026, 3, 2, 2, 0), prompt=40)  # a whole hour
    call("openai", utc(2026, 3, 2, 3, 0), prompt=80)  # the partial last hour
    call("openai", now - US, prompt=160)  # included
    call("openai", now, prompt=320)  # excluded: now
    call("anthropic", utc(2026, 3, 2, 2, 0), prompt=640)  # another provider
    if fold:
        usage_fold()
        assert not UsageEvent.objects.filter(rolled_up=False).exists()
    row = only(window_usage(now=now), "openai", "five")
    assert row["tokens"] == 10 + 20 + 40 + 80 + 160 + 5 * 10
    assert row["requests"] == 5
    assert (row["start"], row["reset"]) == (start, utc(2026, 3, 2, 6, 30))
    assert row["caps"] == {"tokens": 10_000, "usd": None, "requests": None}
    assert row["percent"] == pytest.approx(3.6) and row["unit"] == "tokens"
    assert not row["over_soft"] and not row["over_hard"]


@pytest.mark.usefixtures("no_windows")
def test_requests_and_usd_caps_the_highest_percent_wins_and_share_and_soft_limit_apply() -> None:
    provider_quota_upsert(
        provider="glm",
        daily_cap_tokens=None,
        weekly_cap_tokens=None,
        monthly_cap_tokens=None,
        autopack_share="0.5",
        soft_limit="0.75",
    )
    window("glm", "session", kind="rolling", hours=5, cap_requests=8, cap_tokens=1_000_000)
    window(
        "glm",
        "spend",
        kind="calendar",
        unit="day",
        time_zone="Asia/Shanghai",
        cap_usd=Decimal("1"),
        autopack_share=Decimal("1"),
        soft_limit=Decimal("0.5"),
    )
    now = utc(2026, 3, 2, 12)
    for minutes in (30, 60, 90):
        call("glm", now - timedelta(minutes=minutes), prompt=1000, completion=100)
    rows = window_usage(now=now, providers=["glm"])
    session = only(rows, "glm", "session")
    assert session["caps"] == {"tokens": 500_000, "usd": None, "requests": 4}  # share 0.5
    assert session["requests"] == 3 and session["percent"] == 75.0 and session["unit"] == "requests"
    assert session["over_soft"] and not session["over_hard"]  # 3 >= 0.75 × 4
    spend = only(rows, "glm", "spend")
    cost = sum(
        (e.cost_usd or Decimal(0) for e in UsageEvent.objects.filter(provider="glm")), Decimal(0)
    )
    assert cost > 0 and spend["usd"] == cost
    assert spend["caps"]["usd"] == Decimal(1) and spend["unit"] == "usd"
    assert spend["percent"] == pytest.approx(float(cost * 100))
    call("glm", now - timedelta(minutes=10))
    session = only(window_usage(now=now, providers=["glm"]), "glm", "session")
    assert session["over_hard"] and session["percent"] == 100.0


@pytest.mark.usefixtures("no_windows")
@pytest.mark.parametrize("fold", [False, True])
def test_a_rolling_window_resets_when_its_oldest_usage_leaves_it(fold: bool) -> None:
    window("anthropic", "session", kind="rolling", hours=5, cap_tokens=1000)
    now = utc(2026, 3, 2, 12, 20)
    assert only(window_usage(now=now), "anthropic", "session")["reset"] is None
    oldest = utc(2026, 3, 2, 8, 37, 12)  # inside a whole hour of the window: the rollup's
    call("anthropic", oldest)
    call("anthropic", utc(2026, 3, 2, 11, 0))
    call("anthropic", now - 5 * H - US)  # already out
    if fold:
        usage_fold()
    row = only(window_usage(now=now), "anthropic", "session")
    assert row["start"] == now - 5 * H
    assert row["reset"] == oldest + 5 * H  # to the second, from the folded hour as well
    assert row["tokens"] == 220


@pytest.mark.usefixtures("no_windows")
def test_legacy_caps_read_the_same_as_the_calendar_period_summary() -> None:
    provider_quota_upsert(
        provider="openai",
        daily_cap_tokens=1000,
        weekly_cap_tokens=5000,
        monthly_cap_tokens=None,
        autopack_share="0.5",
        soft_limit="0.8",
    )
    now = utc(2026, 3, 12, 15, 30)
    for at in (utc(2026, 3, 12, 0), utc(2026, 3, 11, 23, 59), utc(2026, 3, 9), utc(2026, 3, 8, 23)):
        call("openai", at)
    usage_fold()
    call("openai", utc(2026, 3, 12, 15))  # pending
    rows = window_usage(now=now)
    assert [(r["window"], r["legacy"]) for r in rows] == [("day", True), ("week", True)]
    for row, period in zip(rows, ("day", "week"), strict=True):
        [summary] = get_provider_usage_summary(period=period, now=now)
        assert row["tokens"] == summary["total_tokens"]
        assert row["caps"]["tokens"] == summary["cap"]
        assert row["percent"] == pytest.approx(summary["percent_of_cap"])
        assert row["start"].tzinfo is not None
    assert only(rows, "openai", "day")["start"] == utc(2026, 3, 12)
    assert only(rows, "openai", "week")["reset"] == utc(2026, 3, 16)


@pytest.mark.usefixtures("no_windows")
def test_every_window_of_every_provider_is_read_in_one_usage_statement() -> None:
    now = utc(2026, 3, 8, 20, 20)  # the day Los Angeles and New York move their clocks
    for provider in ("openai", "anthropic", "google_gemini", "glm"):
        window(provider, "session", kind="rolling", hours=5, cap_tokens=10**6)
        window(
            provider,
            "week",
            kind="anchored",
            days=7,
            anchor=utc(2026, 1, 1, 23),
            time_zone="America/New_York",
            cap_tokens=10**7,
        )
        window(
            provider,
            "day",
            kind="calendar",
            unit="day",
            time_zone="America/Los_Angeles",
            cap_requests=100,
        )
        call(provider, now - timedelta(minutes=10))
        call(provider, utc(2026, 3, 8, 15, 40))  # the session's partial first hour
        call(provider, utc(2026, 3, 6, 1))
    usage_fold()
    with CaptureQueriesContext(connection) as queries:
        rows = window_usage(now=now)
    # ProviderWindow, ProviderQuota, the usage (one UNION ALL for 12 windows).
    assert len(queries) == 3, [q["sql"][:200] for q in queries]
    assert len(rows) == 12
    day = only(rows, "glm", "day")
    assert (day["start"], day["reset"]) == (utc(2026, 3, 8, 8), utc(2026, 3, 9, 7))
    assert day["requests"] == 2 and day["percent"] == 2.0
    week = only(rows, "anthropic", "week")
    assert (week["start"], week["reset"]) == (utc(2026, 3, 5, 23), utc(2026, 3, 12, 22))
    assert week["requests"] == 3
    session = only(rows, "openai", "session")
    assert session["reset"] == utc(2026, 3, 8, 20, 40)
    # Given the windows, only the quotas and the usage are read.
    specs = provider_windows()
    with CaptureQueriesContext(connection) as queries:
        assert window_usage(now=now, windows=specs) == rows
    assert len(queries) == 2


@pytest.mark.usefixtures("no_windows")
def test_a_rolling_reset_in_a_folded_hour_costs_one_more_statement() -> None:
    window("glm", "session", kind="rolling", hours=5, cap_requests=10)
    now = utc(2026, 3, 2, 12, 20)
    call("glm", utc(2026, 3, 2, 9, 10))
    usage_fold()
    with CaptureQueriesContext(connection) as queries:
        [row] = window_usage(now=now)
    assert len(queries) == 4
    assert row["reset"] == utc(2026, 3, 2, 14, 10)


# ---- admin -------------------------------------------------------------------------------


@pytest.fixture
def admin_client_(db: None) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    return client


def window_form(**changes: Any) -> dict[str, Any]:
    form = {
        "provider": "anthropic",
        "name": "weekly",
        "kind": "anchored",
        "unit": "",
        "time_zone": "America/New_York",
        "hours": "",
        "days": "7",
        "anchor_0": "2026-01-01",
        "anchor_1": "23:00:00",
        "cap_tokens": "20000000",
        "cap_usd": "",
        "cap_requests": "",
        "autopack_share": "",
        "soft_limit": "",
    }
    form.update(changes)
    return form


def test_the_admin_adds_a_window_and_refuses_a_bad_one_naming_the_field(
    admin_client_: Client,
) -> None:
    add = reverse("admin:usage_providerwindow_add")
    before = ProviderWindow.objects.count()
    page = admin_client_.post(add, window_form(time_zone="America/Gotham"))
    assert page.status_code == 200
    assert "time_zone" in page.context["adminform"].form.errors
    assert "unknown time zone" in page.content.decode()
    page = admin_client_.post(add, window_form(days="", hours=""))
    assert page.status_code == 200 and "hours" in page.context["adminform"].form.errors
    page = admin_client_.post(add, window_form(kind="rolling", hours="5", days=""))
    errors = page.context["adminform"].form.errors
    assert page.status_code == 200 and set(errors) == {"time_zone"}  # not used by rolling
    page = admin_client_.post(add, window_form(cap_tokens=""))
    assert page.status_code == 200 and "cap_tokens" in page.context["adminform"].form.errors
    assert ProviderWindow.objects.count() == before
    page = admin_client_.post(add, window_form())
    assert page.status_code == 302
    row = ProviderWindow.objects.get(provider="anthropic", name="weekly")
    assert row.spec().describe() == "7 d from Thu 2026-01-01 18:00 America/New_York"
    listing = admin_client_.get(reverse("admin:usage_providerwindow_changelist"))
    assert listing.status_code == 200
    assert "7 d from Thu 2026-01-01 18:00 America/New_York" in listing.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "rolling", "hours": 5},  # no cap
        {
            "kind": "rolling",
            "hours": 5,
            "cap_tokens": 1,
            "anchor": datetime(2026, 1, 1, tzinfo=UTC),
        },
        {"kind": "rolling", "hours": 5, "cap_tokens": 1, "time_zone": "UTC"},
        {"kind": "anchored", "days": 7, "cap_tokens": 1},  # no anchor
        {"kind": "calendar", "unit": "", "cap_tokens": 1},
        {"kind": "rolling", "hours": 5, "cap_usd": Decimal("-1")},
        {"kind": "rolling", "hours": 5, "cap_tokens": 1, "soft_limit": Decimal(0)},
    ],
)
def test_the_database_refuses_a_window_of_the_wrong_shape(fields: dict[str, Any]) -> None:
    before = ProviderWindow.objects.count()
    with pytest.raises(IntegrityError), transaction.atomic():
        ProviderWindow.objects.create(provider="glm", name="bad", **fields)
    assert ProviderWindow.objects.count() == before
