"""The cap windows figure: every window percentage of 4 providers × 3 windows, read by
usage.selectors.window_usage at the usage summary's two table sizes (the same events)."""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.db import connection, reset_queries
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from usage.models import ProviderWindow
from usage.selectors import window_usage
from usage.windows import CalendarUnit, WindowKind

from .core import Figure, Size, log, median, percentile
from .data import CATALOGUE, EVENTS, windows_replaced

PROVIDERS = tuple(dict.fromkeys(p for p, _ in CATALOGUE))  # the 4 providers of the events
SESSION_HOURS = 5
# The floor's provider: the one with the most events (three of the eight models cycled).
FLOOR_PROVIDER = "anthropic"
TARGET = "≤ 20 ms at 10M events, flat from 1M to 10M"
FLOOR_LABEL = f"one indexed SUM over the raw events of one provider's last {SESSION_HOURS} h"


def window_rows() -> list[ProviderWindow]:
    """Three windows per provider, of the three kinds, in the shapes of the real plans: a
    rolling 5-hour session, a week anchored at a Thursday 18:00 in New York (Claude's) and a
    calendar day ending at midnight Pacific time (Gemini's). The caps are placeholders in the
    shape of config/models.yaml; the session of GLM counts requests, as its plan does."""
    anchor = datetime(2026, 1, 1, 18, 0, tzinfo=ZoneInfo("America/New_York"))
    rows = []
    for provider in PROVIDERS:
        session_cap: dict[str, Any] = (
            {"cap_requests": 2_400} if provider == "glm" else {"cap_tokens": 4_000_000}
        )
        rows += [
            ProviderWindow(
                provider=provider,
                name="session",
                kind=WindowKind.ROLLING,
                hours=SESSION_HOURS,
                **session_cap,
            ),
            ProviderWindow(
                provider=provider,
                name="week",
                kind=WindowKind.ANCHORED,
                days=7,
                anchor=anchor,
                time_zone="America/New_York",
                cap_tokens=20_000_000,
                cap_usd=Decimal("500"),
            ),
            ProviderWindow(
                provider=provider,
                name="day",
                kind=WindowKind.CALENDAR,
                unit=CalendarUnit.DAY,
                time_zone="America/Los_Angeles",
                cap_tokens=4_000_000,
            ),
        ]
    return rows


def window_point(size: Size, events: int) -> dict[str, Any]:
    """window_usage() (reading the windows and quotas too, as a caller without them does)
    timed over size.summary_requests calls with only the 12 windows above in force, and the
    floor: the raw events of the shortest window of one provider summed by one statement over
    the index on (created_at, provider)."""
    with windows_replaced(window_rows()):
        return _window_point(size, events)


def _window_point(size: Size, events: int) -> dict[str, Any]:
    for _ in range(3):
        rows = window_usage()
    expected = len(PROVIDERS) * 3
    if len(rows) != expected:
        raise RuntimeError(f"{len(rows)} windows, not {expected}: {rows!r:.500}")
    reset_queries()
    with CaptureQueriesContext(connection) as captured:
        rows = window_usage()
    queries = len(captured.captured_queries)
    times = []
    for _ in range(size.summary_requests):
        t0 = time.perf_counter()
        window_usage()
        times.append(time.perf_counter() - t0)

    now = timezone.now()
    start = now - timedelta(hours=SESSION_HOURS)
    floor_sql = (
        "SELECT sum(prompt_tokens), sum(completion_tokens), sum(cost_usd), count(*) "  # noqa: S608
        f"FROM {EVENTS} WHERE provider = %s AND created_at >= %s AND created_at < %s"
    )
    params = (FLOOR_PROVIDER, start, now)
    floor_times = []
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN {floor_sql}", params)
        # The scan nodes, without their cost estimates: which index serves the range.
        plan = " / ".join(
            re.sub(r"\s*\(cost=[^)]*\)", "", str(r[0])).strip(" ->")
            for r in cursor.fetchall()
            if "Scan" in str(r[0])
        )
        for _ in range(3):
            t0 = time.perf_counter()
            cursor.execute(floor_sql, params)
            floor_row = cursor.fetchone()
            floor_times.append(time.perf_counter() - t0)
    in_floor = int(floor_row[3])
    # Per window name, over the 4 providers: the calls counted and the highest percent.
    by_name: dict[str, dict[str, Any]] = {}
    for row in rows:
        acc = by_name.setdefault(
            row["window"], {"description": row["description"], "calls": 0, "percents": []}
        )
        acc["calls"] += int(row["requests"])
        if row["percent"] is not None:
            acc["percents"].append(float(row["percent"]))
    point: dict[str, Any] = {
        "events": float(events),
        "median_ms": median(times) * 1e3,
        "p95_ms": percentile(times, 95) * 1e3,
        "floor_ms": median(floor_times) * 1e3,
        "in_floor": float(in_floor),
        "queries": float(queries),
        "plan": plan,
        "windows": by_name,
    }
    log(
        f"windows at {events:,} events: {point['median_ms']:.1f} ms median for "
        f"{len(rows)} windows, {queries} statements (floor SUM {point['floor_ms']:.1f} ms over "
        f"{in_floor:,} events of {FLOOR_PROVIDER}'s last {SESSION_HOURS} h; plan: {plan})"
    )
    return point


def _point_note(point: dict[str, Any]) -> str:
    calls = "; ".join(
        f"{name} ({w['description']}) {w['calls']:,} calls"
        + (f", up to {max(w['percents']):,.1f}% of a cap" if w["percents"] else "")
        for name, w in point["windows"].items()
    )
    return (
        f"{int(point['events']):,} events: median {point['median_ms']:.1f} ms, "
        f"p95 {point['p95_ms']:.1f} ms; floor {point['floor_ms']:.1f} ms "
        f"({int(point['in_floor']):,} events of {FLOOR_PROVIDER} in the last {SESSION_HOURS} h); "
        f"{int(point['queries'])} statements; counted over the 4 providers: {calls}"
    )


def window_figure(small: dict[str, Any], large: dict[str, Any] | None) -> Figure:
    notes = [_point_note(small)]
    label = f"all window percentages, {len(PROVIDERS)} providers × 3 windows"
    if large is None:
        return Figure(
            key="window_usage",
            label=f"{label} (window_usage())",
            value=None,
            unit="ms",
            floor=small["floor_ms"],
            floor_label=FLOOR_LABEL,
            target=TARGET,
            met=None,
            notes=[*notes, "the large point was not run"],
        )
    # "Flat" as the usage summary judges it: at most half again the small point, or 2 ms more.
    flat = large["median_ms"] <= max(small["median_ms"] * 1.5, small["median_ms"] + 2)
    notes.append(_point_note(large))
    notes.append(
        f"{'flat' if flat else 'NOT flat'}: ×{large['median_ms'] / small['median_ms']:.2f} "
        "from the small to the large table"
    )
    notes.append(f"the floor's plan: {large['plan']}")
    return Figure(
        key="window_usage",
        label=f"{label}, at {int(large['events']):,} events (median)",
        value=large["median_ms"],
        unit="ms",
        floor=large["floor_ms"],
        floor_label=FLOOR_LABEL,
        target=TARGET,
        met=large["median_ms"] <= 20 and flat,
        notes=notes,
    )
