"""Cap windows in words: what every surface (badges, usage panel, usage and status API, MCP,
usage_report) says of a usage.selectors.window_usage row.

"week 62% of 20 M tokens · resets Thu 18:00 (in 2 d 3 h)", "session 35% of 8 requests · frees
from 14:20 (in 1 h 5 min)", "day no cap". Times are in the site's zone (AUTOPACK_TIME_ZONE,
settings.TIME_ZONE), which a page names once (zone_name). Pure: no database; `now` and `zone`
can be given so a test (or a caller with its own clock) reads the same words every time.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.utils import timezone

from .windows import CapUnit, WindowKind

if TYPE_CHECKING:
    from .forecast import WindowForecast

TONE_OK, TONE_WARN, TONE_FULL = "ok", "warn", "full"
SEPARATOR = " · "


def zone_name() -> str:
    """The zone every reset is written in (settings.TIME_ZONE, from AUTOPACK_TIME_ZONE)."""
    return str(settings.TIME_ZONE)


def _zone(zone: ZoneInfo | None) -> ZoneInfo:
    return zone if zone is not None else ZoneInfo(zone_name())


def short_number(value: int | Decimal | float) -> str:
    """20 M, 1.5 M, 500 k, 1.2 k, 950: a cap or a use at a glance."""
    n = float(value)
    for size, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1000, "k")):
        if abs(n) >= size:
            scaled = n / size
            text = f"{scaled:.0f}" if abs(scaled) >= 100 else f"{scaled:.1f}".removesuffix(".0")
            return f"{text} {suffix}"
    return f"{n:,.0f}"


def amount_text(value: int | Decimal | float | None, unit: str) -> str:
    """An amount in its unit: "20 M tokens", "$5.00", "1,200 requests"."""
    if value is None:
        return "–"
    if unit == CapUnit.USD:
        return f"${Decimal(value):,.2f}"
    if unit == CapUnit.REQUESTS:
        count = int(value)
        return f"{count:,} request{'' if count == 1 else 's'}"
    return f"{short_number(value)} tokens"


def percent_text(value: float | None) -> str:
    if value is None:
        return "no cap"
    if 0 < value < 1:
        return "<1%"
    return f"{value:.0f}%"


def duration_text(delta: timedelta) -> str:
    """2 d 3 h, 3 h 5 min, 12 min, under a minute (the two largest parts)."""
    seconds = int(delta.total_seconds())
    if seconds < 60:
        return "under a minute"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min"


def when_text(at: datetime, *, now: datetime, zone: ZoneInfo | None = None) -> str:
    """An instant in the site's zone, as short as it reads unambiguously from now: "14:20"
    today, "Thu 18:00" in the next six days, "Mar 5 18:00" (", 2027" in another year) else."""
    tz = _zone(zone)
    local, today = at.astimezone(tz), now.astimezone(tz)
    clock = f"{local:%H:%M}"
    if local.date() == today.date():
        return clock
    if 0 < (local.date() - today.date()).days < 7:  # a weekday names one day of the next six
        return f"{local:%a} {clock}"
    year = f", {local.year}" if local.year != today.year else ""
    return f"{local:%b} {local.day}{year} {clock}"


def reset_text(row: dict[str, Any], *, now: datetime, zone: ZoneInfo | None = None) -> str:
    """ "resets Thu 18:00 (in 2 d 3 h)"; a rolling window "frees from 14:20 (in 1 h 5 min)"
    (when its oldest counted usage leaves it) or "nothing to free" (no usage in it)."""
    reset = row["reset"]
    rolling = row["kind"] == WindowKind.ROLLING
    if reset is None:
        return "nothing to free" if rolling else ""
    verb = "frees from" if rolling else "resets"
    return f"{verb} {when_text(reset, now=now, zone=zone)} (in {duration_text(reset - now)})"


def tone(row: dict[str, Any]) -> str:
    """The colour of a window: full at its hard cap, warn past its soft limit, else ok."""
    if row["over_hard"]:
        return TONE_FULL
    return TONE_WARN if row["over_soft"] else TONE_OK


def usage_text(row: dict[str, Any]) -> str:
    """ "62% of 20 M tokens" (the unit whose percent is highest), or "no cap"."""
    unit = row["unit"]
    if unit is None:
        return "no cap"
    return f"{percent_text(row['percent'])} of {amount_text(row['caps'][unit], unit)}"


_UNIT_WORDS = {CapUnit.TOKENS.value: "tokens", CapUnit.USD.value: "USD", CapUnit.REQUESTS.value: ""}


def _rate(value: float, unit: str) -> str:
    """A pace per hour: "$1.20", "1.2 M", "950", "1.7" (one decimal under 10)."""
    if unit == CapUnit.USD:
        return f"${value:,.2f}"
    if 0 < abs(value) < 10:
        return f"{value:.1f}".removesuffix(".0")
    return short_number(value)


def burn_text(forecast: WindowForecast) -> str:
    """ "burning 1.2 M tokens/h (last hour), 0.8 M/h this week" (a rolling window: "… over the
    last 5 h"), then USD and requests the same way when the window caps them."""
    if forecast.kind == WindowKind.ROLLING:
        span = f"over the last {forecast.hours_so_far:.0f} h"
    else:
        span = "today" if forecast.window == "day" else f"this {forecast.window}"
    capped = {c.unit for c in forecast.caps}
    parts = []
    for unit, last in forecast.last_hour.items():
        if unit != CapUnit.TOKENS and unit not in capped:
            continue
        rate = _rate(last, unit)
        name = {CapUnit.TOKENS.value: " tokens", CapUnit.REQUESTS.value: " requests"}.get(unit, "")
        if rate == "1":
            name = name.removesuffix("s")  # "1 request/h"
        so_far = _rate(forecast.so_far[unit], unit)
        parts.append(f"{rate}{name}/h (last hour), {so_far}/h {span}")
    return "burning " + "; ".join(parts)


def forecast_text(
    forecast: WindowForecast,
    *,
    now: datetime | None = None,
    zone: ZoneInfo | None = None,
    subject: str = "the cap",
) -> str:
    """ "at this pace the cap is reached Wed 09:10, 1 d 9 h before the reset", "at this pace it
    lasts past the reset" (a rolling window: "… it stays under its cap"), "" without a cap. The
    cap is named by its unit when the window has caps in several ("the requests cap");
    `subject` replaces "the cap" ("its week cap")."""
    at = now if now is not None else forecast.now
    first = forecast.first
    if first is None:
        if not forecast.caps:
            return ""
        if forecast.kind == WindowKind.ROLLING:
            return "at this pace it stays under its cap"
        return "at this pace it lasts past the reset"
    if len(forecast.caps) > 1 and first.unit != CapUnit.TOKENS and subject.endswith(" cap"):
        subject = f"{subject.removesuffix(' cap')} {_UNIT_WORDS[first.unit] or first.unit} cap"
    assert first.reached_at is not None
    if first.reached_at <= at:
        return f"{subject} is reached"
    reached = f"at this pace {subject} is reached {when_text(first.reached_at, now=at, zone=zone)}"
    if first.before_reset is None:
        return f"{reached} (in {duration_text(first.reached_at - at)})"
    return f"{reached}, {duration_text(first.before_reset)} before the reset"


def window_words(
    row: dict[str, Any], *, now: datetime | None = None, zone: ZoneInfo | None = None
) -> dict[str, Any]:
    """A window_usage row with its words: usage ("62% of 20 M tokens"), used ("12.4 M tokens"
    of the top unit), cap, reset ("resets Thu 18:00 (in 2 d 3 h)"), tone, bar (0–100, for a
    bar's width), and text, the whole line "week 62% of 20 M tokens · resets …"."""
    at = now if now is not None else timezone.now()
    unit = row["unit"] or CapUnit.TOKENS.value
    usage = usage_text(row)
    reset = reset_text(row, now=at, zone=zone)
    percent = row["percent"]
    forecast = row.get("forecast")  # usage.forecast.forecast_usage's rows have one
    burn = burn_text(forecast) if forecast is not None else ""
    ahead = forecast_text(forecast, now=at, zone=zone) if forecast is not None else ""
    return {
        **row,
        "burn_text": burn,
        "forecast_text": ahead,
        # "burning 1.2 M tokens/h (last hour), 0.8 M/h this week · at this pace the cap is …"
        "pace_text": SEPARATOR.join(part for part in (burn, ahead) if part),
        "usage_text": usage,
        "used_text": amount_text(row[unit], unit),
        "cap_text": amount_text(row["caps"][unit], unit) if row["unit"] else "no cap",
        "percent_text": percent_text(percent),
        "reset_text": reset,
        "tone": tone(row),
        "bar": 0 if percent is None else max(0, min(100, round(percent))),
        "text": SEPARATOR.join(part for part in (f"{row['window']} {usage}", reset) if part),
    }


def worst(rows: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The window nearest its cap (ties: the first); a window without a percent counts last."""
    found: dict[str, Any] | None = None
    for row in rows:
        if found is None or (row["percent"] or -1.0) > (found["percent"] or -1.0):
            found = row
    return found


def by_provider(
    rows: Iterable[dict[str, Any]], *, now: datetime | None = None, zone: ZoneInfo | None = None
) -> dict[str, list[dict[str, Any]]]:
    """window_usage's rows with their words, grouped by provider (their order kept)."""
    at = now if now is not None else timezone.now()
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["provider"], []).append(window_words(row, now=at, zone=zone))
    return grouped


def provider_line(provider: str, words: Iterable[dict[str, Any]]) -> str:
    """ "anthropic · week 62% of 20 M tokens · resets Thu 18:00 (in 2 d 3 h) · session 35% …"
    (rows from window_words)."""
    return SEPARATOR.join([provider, *(w["text"] for w in words)])


def api_row(words: dict[str, Any]) -> dict[str, Any]:
    """What the usage and status APIs say of one window (window_words' row)."""
    return {
        "provider": words["provider"],
        "name": words["window"],
        "kind": words["kind"],
        "description": words["description"],
        "percent": words["percent"],
        "unit": words["unit"],
        "caps": dict(words["caps"]),  # every unit: the effective cap or None
        # "autopack": Autopack's usage against its share; "everything": outside tools' too,
        # against the whole cap (ProviderQuota.outside_usage).
        "counts": words.get("counts", "autopack"),
        "used": {"tokens": words["tokens"], "usd": words["usd"], "requests": words["requests"]},
        "start": words["start"],
        "reset": words["reset"],
        "over_soft": words["over_soft"],
        "over_hard": words["over_hard"],
        "text": words["text"],
        **forecast_fields(words.get("forecast")),
        "pace_text": words.get("pace_text", ""),
    }


def forecast_fields(forecast: WindowForecast | None) -> dict[str, Any]:
    """What the APIs say of a window's forecast (usage.forecast); all None without one:
    burn_last_hour and burn_so_far ({tokens, usd, requests} per hour; requests None unless
    the window caps them), cap_reached_at (at the last hour's pace; None: never before the
    reset), cap_reached_unit, before_reset_seconds (how long before the reset)."""
    if forecast is None:
        return {
            "burn_last_hour": None,
            "burn_so_far": None,
            "cap_reached_at": None,
            "cap_reached_unit": None,
            "before_reset_seconds": None,
        }

    def rates(per_hour: dict[str, float]) -> dict[str, float | None]:
        return {unit: per_hour.get(unit) for unit in CapUnit.values}

    before = forecast.before_reset
    return {
        "burn_last_hour": rates(forecast.last_hour),
        "burn_so_far": rates(forecast.so_far),
        "cap_reached_at": forecast.reached_at,
        "cap_reached_unit": forecast.unit,
        "before_reset_seconds": int(before.total_seconds()) if before is not None else None,
    }
