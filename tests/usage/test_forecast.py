"""Burn rates and forecasts per provider × window (usage.forecast, issue 16).

The maths on hand-made window_usage rows at a given clock (pure), then the same read from the
database (forecast_usage: the windows' usage and every provider's last hour in one statement)
with usage placed at chosen instants and the clock moved by passing `now`, and the surfaces
that say it: the usage panel, GET /dashboard/usage, usage_report.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.factories import metered_call, windows_plan
from tests.runs.test_mcp import stdio_server
from usage import display
from usage.forecast import LAST_HOUR, attach_forecasts, forecast_usage, forecast_window
from usage.services import provider_windows_set

UTC_ZONE = ZoneInfo("UTC")
# Wednesday 2026-03-11 12:00 UTC: 60 h into the ISO week (Mon 00:00 UTC → Mon 16th 00:00 UTC).
NOW = datetime(2026, 3, 11, 12, 0, tzinfo=UTC)
WEEK_START = datetime(2026, 3, 9, tzinfo=UTC)
WEEK_RESET = datetime(2026, 3, 16, tzinfo=UTC)


def row(**fields: Any) -> dict[str, Any]:
    """A window_usage row (only the keys the forecast reads)."""
    caps = fields.pop("caps", {"tokens": 1_000})
    base: dict[str, Any] = {
        "provider": "anthropic",
        "window": "week",
        "kind": "calendar",
        "start": WEEK_START,
        "reset": WEEK_RESET,
        "tokens": 0,
        "usd": Decimal(0),
        "requests": 0,
        "caps": {"tokens": None, "usd": None, "requests": None, **caps},
        "units": list(caps),
    }
    return {**base, **fields}


def last_hour(tokens: int = 0, usd: str = "0", requests: int = 0) -> dict[str, Any]:
    return row(
        window=LAST_HOUR,
        kind="rolling",
        tokens=tokens,
        usd=Decimal(usd),
        requests=requests,
        caps={},
        start=NOW - timedelta(hours=1),
        reset=None,
    )


# ---- the maths (pure) ----------------------------------------------------------------------


def test_a_week_that_runs_out_before_its_reset_says_when_and_how_long_before() -> None:
    f = forecast_window(row(tokens=600, usd=Decimal("6")), last_hour(100, "1.5"), now=NOW)
    assert f.hours_so_far == 60
    assert f.last_hour == {"tokens": 100.0, "usd": 1.5}
    assert f.so_far == {"tokens": 10.0, "usd": 0.1}
    # 400 tokens left at 100/h: Wed 16:00, 4 d 8 h before Monday 00:00.
    assert f.reached_at == NOW + timedelta(hours=4)
    assert f.before_reset == timedelta(days=4, hours=8)
    assert (f.unit, f.runs_out) == ("tokens", True)
    assert display.burn_text(f) == "burning 100 tokens/h (last hour), 10/h this week"
    assert display.forecast_text(f, zone=UTC_ZONE) == (
        "at this pace the cap is reached 16:00, 4 d 8 h before the reset"
    )


def test_a_week_that_lasts_past_its_reset_and_one_with_no_pace_reach_nothing() -> None:
    slow = forecast_window(row(tokens=600), last_hour(1), now=NOW)  # 400 h > the 108 h left
    idle = forecast_window(row(tokens=600), None, now=NOW)
    for f in (slow, idle):
        assert (f.reached_at, f.before_reset, f.runs_out) == (None, None, False)
        assert display.forecast_text(f) == "at this pace it lasts past the reset"
    assert idle.last_hour["tokens"] == 0
    # Reached exactly at the reset (108,000 at 1,000/h: Monday 00:00) is not before it.
    at_reset = forecast_window(row(tokens=0, caps={"tokens": 108_000}), last_hour(1_000), now=NOW)
    assert at_reset.reached_at is None


def test_a_tiny_pace_against_a_large_cap_lasts_without_overflowing() -> None:
    f = forecast_window(
        row(caps={"usd": Decimal("1000000")}, kind="anchored", reset=None),
        last_hour(usd="0.000000001"),
        now=NOW,
    )
    assert f.reached_at is None


def test_moving_the_clock_moves_the_forecast() -> None:
    later = NOW + timedelta(days=3)  # Saturday 12:00: 36 h left
    f = forecast_window(row(tokens=600), last_hour(20), now=later)  # 400 / 20 = 20 h
    assert f.reached_at == later + timedelta(hours=20)
    assert f.before_reset == timedelta(hours=16)
    assert f.so_far["tokens"] == pytest.approx(600 / 132)
    g = forecast_window(row(tokens=600), last_hour(10), now=later)  # 40 h: past the reset
    assert g.reached_at is None


def test_a_window_at_its_cap_is_reached_now_and_the_first_cap_reached_decides() -> None:
    full = forecast_window(row(tokens=1_000), None, now=NOW)
    assert full.reached_at == NOW and display.forecast_text(full) == "the cap is reached"
    both = forecast_window(
        row(tokens=100, requests=8, caps={"tokens": 1_000, "requests": 10}),
        last_hour(100, requests=1),
        now=NOW,
    )
    # Requests: 2 left at 1/h (2 h); tokens: 900 at 100/h (9 h).
    assert (both.unit, both.reached_at) == ("requests", NOW + timedelta(hours=2))
    assert both.last_hour["requests"] == 1
    assert display.forecast_text(both, zone=UTC_ZONE, subject="its week cap") == (
        "at this pace its week requests cap is reached 14:00, 4 d 10 h before the reset"
    )
    assert display.burn_text(both) == (
        "burning 100 tokens/h (last hour), 1.7/h this week; "
        "1 request/h (last hour), 0.1/h this week"
    )


def test_a_rolling_window_is_reached_only_when_the_pace_outruns_what_leaves_it() -> None:
    session = {"window": "session", "kind": "rolling", "start": NOW - timedelta(hours=5)}
    # 500 in the last 5 h leave at 100/h; at 300/h it gains 200/h: 500 left in 2.5 h.
    fast = forecast_window(row(**session, tokens=500), last_hour(300), now=NOW)
    assert fast.reached_at == NOW + timedelta(hours=2.5)
    assert fast.before_reset is None
    assert display.forecast_text(fast, zone=UTC_ZONE) == (
        "at this pace the cap is reached 14:30 (in 2 h 30 min)"
    )
    assert display.burn_text(fast) == "burning 300 tokens/h (last hour), 100/h over the last 5 h"
    # At 150/h it settles at 750: under the cap.
    slow = forecast_window(row(**session, tokens=500), last_hour(150), now=NOW)
    assert slow.reached_at is None
    assert display.forecast_text(slow) == "at this pace it stays under its cap"


def test_attach_forecasts_takes_the_last_hour_rows_out_and_pairs_each_provider() -> None:
    rows = [
        row(tokens=600),
        row(provider="glm", window="day", tokens=10),
        last_hour(100),
        {**last_hour(5), "provider": "glm"},
    ]
    out = attach_forecasts(rows, now=NOW)
    assert [(r["provider"], r["window"]) for r in out] == [("anthropic", "week"), ("glm", "day")]
    assert [r["forecast"].last_hour["tokens"] for r in out] == [100, 5]


# ---- read from the database ----------------------------------------------------------------


def used(provider: str, at: datetime, tokens: int, model: str = "claude-sonnet-5-5") -> None:
    metered_call(provider, model, prompt=tokens, completion=0, at=at)


WEEK = {"name": "week", "kind": "calendar", "unit": "week", "cap_tokens": 100_000}
SESSION = {"name": "session", "kind": "rolling", "hours": 5, "cap_tokens": 50_000}


@pytest.mark.django_db
def test_forecast_usage_reads_the_last_hour_and_the_clock_moves_it() -> None:
    windows_plan("anthropic", WEEK, SESSION)
    used("anthropic", WEEK_START + timedelta(hours=1), 30_000)  # Monday: the week so far
    used("anthropic", NOW - timedelta(minutes=40), 6_000)
    used("anthropic", NOW - timedelta(minutes=10), 4_000)
    rows = {r["window"]: r for r in forecast_usage(now=NOW, providers=["anthropic"])}
    assert set(rows) == {"week", "session"}  # the last hour is not a window of its own
    week = rows["week"]["forecast"]
    assert week.last_hour["tokens"] == 10_000
    assert week.so_far["tokens"] == pytest.approx(40_000 / 60)
    # 60,000 left at 10,000/h: 18:00 today, well before Monday.
    assert week.reached_at == NOW + timedelta(hours=6)
    assert week.before_reset == WEEK_RESET - (NOW + timedelta(hours=6))
    session = rows["session"]["forecast"]
    # 10,000 in the session leave at 2,000/h; at 10,000/h it gains 8,000/h: 40,000 in 5 h.
    assert session.reached_at == NOW + timedelta(hours=5)

    # Two hours later nothing came in the last hour: the pace is zero, the week lasts.
    later = NOW + timedelta(hours=2)
    rows = {r["window"]: r for r in forecast_usage(now=later, providers=["anthropic"])}
    assert rows["week"]["forecast"].last_hour["tokens"] == 0
    assert rows["week"]["forecast"].reached_at is None


@pytest.mark.django_db
def test_forecast_usage_costs_the_same_statements_for_one_provider_or_many() -> None:
    windows_plan("anthropic", WEEK, SESSION)
    used("anthropic", NOW - timedelta(minutes=30), 1_000)

    def count() -> int:
        with CaptureQueriesContext(connection) as captured:
            forecast_usage(now=NOW)
        return len(captured.captured_queries)

    few = count()
    for n in range(5):
        windows_plan(f"p{n}", WEEK, {**SESSION, "name": f"s{n}"})
        for minutes in (10, 20, 70, 200):
            used(f"p{n}", NOW - timedelta(minutes=minutes), 100 + n, model=f"m{n}")
    assert count() == few <= 5


# ---- the surfaces ---------------------------------------------------------------------------


@pytest.fixture
def burning() -> datetime:
    """anthropic with one window (cap 100,000) that resets 99 h from now, whatever the day the
    test runs, and 10,000 tokens in the last hour: its cap is reached in about 9 h."""
    now = timezone.now()
    for provider in ("openai", "anthropic", "google_gemini", "glm"):
        provider_windows_set(provider=provider, windows=())
    anchor = (now - timedelta(hours=1)).isoformat()
    windows_plan(
        "anthropic", {**WEEK, "kind": "anchored", "unit": None, "hours": 100, "anchor": anchor}
    )
    used("anthropic", now - timedelta(minutes=20), 10_000)
    return now


@pytest.mark.django_db
def test_the_usage_api_gives_each_window_its_burn_rates_and_forecast(burning: datetime) -> None:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=User.objects.create_user("r", is_staff=True))
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    body = client.get("/dashboard/usage?period=week&window=week").json()
    anthropic = next(p for p in body["providers"] if p["provider"] == "anthropic")
    (week,) = anthropic["windows"]
    assert week["burn_last_hour"]["tokens"] == 10_000
    assert week["burn_last_hour"]["requests"] is None  # the window caps no requests
    assert week["burn_so_far"]["tokens"] > 0
    assert week["cap_reached_unit"] == "tokens"
    reached = datetime.fromisoformat(week["cap_reached_at"])
    # 90,000 left at 10,000/h: about 9 h from now (the request's own clock, a moment later).
    assert timedelta(hours=8, minutes=59) < reached - burning < timedelta(hours=9, minutes=1)
    reset = datetime.fromisoformat(week["reset"])
    assert week["before_reset_seconds"] == int((reset - reached).total_seconds())
    assert week["pace_text"].startswith("burning 10 k tokens/h (last hour), ")
    assert " · at this pace the cap is reached " in week["pace_text"]


@pytest.mark.django_db
def test_usage_report_says_each_windows_pace(burning: datetime) -> None:
    out = io.StringIO()
    call_command("usage_report", "--period", "week", stdout=out)
    line = next(x for x in out.getvalue().splitlines() if x.startswith("anthropic week: "))
    assert line.startswith("anthropic week: burning 10 k tokens/h (last hour), ")
    assert "at this pace the cap is reached " in line and line.endswith(" before the reset")


@pytest.mark.django_db
def test_the_usage_panel_shows_each_windows_pace(burning: datetime) -> None:
    user = User.objects.create_user("viewer", is_staff=True)
    client = Client()
    client.force_login(user)
    html = client.get("/dashboard/usage/partial?period=week").content.decode()
    assert '<span class="muted usage-window-pace">burning 10 k tokens/h (last hour), ' in html
    assert "at this pace the cap is reached " in html


@pytest.fixture
def mcp_log(tmp_path: Path) -> Iterator[TextIO]:
    with (tmp_path / "mcp-server.log").open("w+") as log:
        yield log


@pytest.mark.django_db(transaction=True)
def test_mcp_usage_summary_says_each_windows_pace(
    burning: datetime, tmp_path: Path, mcp_log: TextIO
) -> None:
    User.objects.create_user("reader", is_staff=True)
    with stdio_server("reader", tmp_path, mcp_log) as client:
        text = client.text("usage_summary", period="week")
    lines = text.splitlines()
    at = lines.index(next(x for x in lines if x.startswith("anthropic · week ")))
    pace = lines[at + 1]
    assert pace.startswith("  week: burning 10 k tokens/h (last hour), ")
    assert "at this pace the cap is reached " in pace and pace.endswith(" before the reset")
