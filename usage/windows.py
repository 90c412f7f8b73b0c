"""Cap windows: the spans a provider's plan counts its caps over, and their validation.

A window is one of three kinds (WindowKind):

- calendar: a day, ISO week (from Monday) or month in an IANA time zone. A day in
  America/Los_Angeles is 23 or 25 hours long on the days its clocks change.
- anchored: a length that repeats from an anchor instant, e.g. 7 days from Thursday 18:00
  America/New_York. A length in whole days repeats at the same local wall-clock time across
  daylight-saving changes (so such a "week" can be 167 or 169 hours); a length in hours
  repeats in absolute time.
- rolling: the last N hours. Its start is now − N h; it "resets" (frees usage) when its oldest
  counted usage leaves it, which only the usage read knows (usage.selectors.window_usage).

Each window has a cap in tokens (in + out), in USD or in requests (calls), one or more, and
may override the provider's autopack_share and soft_limit. The legacy
daily/weekly/monthly_cap_tokens of a ProviderQuota are calendar windows in UTC named day,
week and month (legacy_windows), derived when read.

Local wall-clock times are turned into instants with PEP 495's fold=0: a time that happens
twice (clocks back) is its first occurrence, a time that does not exist (clocks forward) is
read with the offset before the change, i.e. as the instant the clocks jump.

This module is pure (no database): window_from_config is the one validation every writer uses
(models.yaml import, the admin's ProviderWindow.clean, the services).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from django.db import models


class WindowKind(models.TextChoices):
    CALENDAR = "calendar", "Calendar"
    ANCHORED = "anchored", "Anchored"
    ROLLING = "rolling", "Rolling"


class CalendarUnit(models.TextChoices):
    DAY = "day", "Day"
    WEEK = "week", "ISO week"
    MONTH = "month", "Month"


class CapUnit(models.TextChoices):
    TOKENS = "tokens", "tokens"
    USD = "usd", "USD"
    REQUESTS = "requests", "requests"


# The config key (and ProviderWindow field) of each unit's cap.
CAP_KEYS: dict[CapUnit, str] = {
    CapUnit.TOKENS: "cap_tokens",
    CapUnit.USD: "cap_usd",
    CapUnit.REQUESTS: "cap_requests",
}
# Every key a window may have in models.yaml, in the order export writes them.
WINDOW_KEYS = (
    "name",
    "kind",
    "unit",
    "time_zone",
    "hours",
    "days",
    "anchor",
    "cap_tokens",
    "cap_usd",
    "cap_requests",
    "autopack_share",
    "soft_limit",
)
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MAX_HOURS = 24 * 366  # longer than any plan counts; keeps the arithmetic in datetime's range
MAX_DAYS = 366


class WindowConfigError(ValueError):
    """A window refused; `key` is the offending key (a ProviderWindow field of the same name),
    and the message starts with its full path ("providers.anthropic.windows[1].anchor: …")."""

    def __init__(self, where: str, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{where}.{key}: {problem}" if where else f"{key}: {problem}")


@dataclass(frozen=True)
class WindowSpec:
    """One cap window of one provider (see the module docstring)."""

    provider: str
    name: str
    kind: WindowKind
    unit: CalendarUnit | None = None  # calendar
    time_zone: str = "UTC"  # calendar and anchored
    hours: int | None = None  # rolling; anchored (absolute length)
    days: int | None = None  # anchored (wall-clock length)
    anchor: datetime | None = None  # anchored: an aware instant
    cap_tokens: int | None = None
    cap_usd: Decimal | None = None
    cap_requests: int | None = None
    autopack_share: Decimal | None = None  # None: the provider's
    soft_limit: Decimal | None = None  # None: the provider's
    legacy: bool = False  # derived from ProviderQuota's daily/weekly/monthly_cap_tokens

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    @property
    def caps(self) -> dict[str, int | Decimal]:
        """The plan caps this window has (before autopack_share), keyed by the unit's value
        ("tokens", "usd", "requests"), as window_usage's rows key them."""
        found = {str(unit): getattr(self, key) for unit, key in CAP_KEYS.items()}
        return {unit: cap for unit, cap in found.items() if cap is not None}

    def describe(self) -> str:
        """A short human description: "day in America/Los_Angeles", "7 d from Thu 18:00
        America/New_York", "last 5 h"."""
        if self.kind == WindowKind.CALENDAR:
            return f"{self.unit} in {self.time_zone}"
        if self.kind == WindowKind.ROLLING:
            return f"last {self.hours} h"
        assert self.anchor is not None
        local = self.anchor.astimezone(self.zone)
        length = f"{self.days} d" if self.days is not None else f"{self.hours} h"
        return f"{length} from {local:%a %Y-%m-%d %H:%M} {self.time_zone}"


# ---- spans -------------------------------------------------------------------------------


def _local(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant (UTC) of a naive local wall-clock time (fold=0, see the module docstring)."""
    return wall.replace(tzinfo=zone, fold=0).astimezone(UTC)


def _calendar_start(unit: CalendarUnit, day: date) -> date:
    if unit == CalendarUnit.DAY:
        return day
    if unit == CalendarUnit.WEEK:
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def _calendar_next(unit: CalendarUnit, start: date) -> date:
    if unit == CalendarUnit.DAY:
        return start + timedelta(days=1)
    if unit == CalendarUnit.WEEK:
        return start + timedelta(days=7)
    return (start + timedelta(days=32)).replace(day=1)


def window_span(spec: WindowSpec, now: datetime) -> tuple[datetime, datetime | None]:
    """(start, reset) of the window holding `now`, both aware UTC instants, start <= now < reset.

    A rolling window's reset is None here: it is when its oldest counted usage leaves it, known
    only from the usage (usage.selectors.window_usage gives it)."""
    if now.tzinfo is None:
        raise ValueError("window_span needs a timezone-aware now")
    now = now.astimezone(UTC)
    if spec.kind == WindowKind.ROLLING:
        assert spec.hours is not None
        return now - timedelta(hours=spec.hours), None
    zone = spec.zone
    if spec.kind == WindowKind.CALENDAR:
        assert spec.unit is not None
        first = _calendar_start(spec.unit, now.astimezone(zone).date())
        start = _local(datetime.combine(first, time()), zone)
        if start > now:  # local midnight skipped by a clock change after `now`'s instant
            first = _calendar_start(spec.unit, first - timedelta(days=1))
            start = _local(datetime.combine(first, time()), zone)
        return start, _local(datetime.combine(_calendar_next(spec.unit, first), time()), zone)
    assert spec.anchor is not None
    if spec.days is None:
        assert spec.hours is not None
        length = timedelta(hours=spec.hours)
        start = spec.anchor.astimezone(UTC) + ((now - spec.anchor) // length) * length
        return start, start + length
    # Whole days: count in local wall-clock time, then correct the rare off-by-one a clock
    # change between the anchor's wall time and now's makes.
    step = timedelta(days=spec.days)
    anchor_wall = spec.anchor.astimezone(zone).replace(tzinfo=None)
    k = (now.astimezone(zone).replace(tzinfo=None) - anchor_wall) // step
    while _local(anchor_wall + k * step, zone) > now:
        k -= 1
    while _local(anchor_wall + (k + 1) * step, zone) <= now:
        k += 1
    return _local(anchor_wall + k * step, zone), _local(anchor_wall + (k + 1) * step, zone)


# ---- validation --------------------------------------------------------------------------


def _whole(value: Any, where: str, key: str, *, low: int, high: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise WindowConfigError(where, key, f"expected a whole number, got {value!r}")
    if value < low:
        raise WindowConfigError(where, key, f"must be at least {low}, got {value!r}")
    if high is not None and value > high:
        raise WindowConfigError(where, key, f"must be at most {high}, got {value!r}")
    return value


def _number(value: Any, where: str, key: str) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise WindowConfigError(where, key, f"expected a number, got {value!r}")
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise WindowConfigError(where, key, f"expected a number, got {value!r}") from None
    if not result.is_finite():
        raise WindowConfigError(where, key, f"expected a finite number, got {value!r}")
    return result


def _fraction(value: Any, where: str, key: str, *, allow_zero: bool) -> Decimal | None:
    result = _number(value, where, key)
    if result is None:
        return None
    if not ((result >= 0 if allow_zero else result > 0) and result <= 1):
        low = "0" if allow_zero else "greater than 0"
        raise WindowConfigError(where, key, f"must be {low} and at most 1, got {value!r}")
    return result


@cache
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones())  # reads the tz database's directory once


def _time_zone(value: Any, where: str) -> str:
    if value is None:
        return "UTC"
    if not isinstance(value, str) or not value:
        raise WindowConfigError(where, "time_zone", f"expected an IANA time zone, got {value!r}")
    # available_timezones() rather than ZoneInfo() alone: ZoneInfo also opens any file path
    # under the tz directories (e.g. "posix/…", "../…"), which is not a zone name.
    if value != "UTC" and value not in _zone_names():
        raise WindowConfigError(where, "time_zone", f"unknown time zone {value!r}")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise WindowConfigError(where, "time_zone", f"unknown time zone {value!r}") from None
    return value


def _anchor(value: Any, zone: ZoneInfo, where: str) -> datetime:
    if value is None:
        raise WindowConfigError(where, "anchor", "required for an anchored window")
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise WindowConfigError(
                where, "anchor", f"expected an ISO date-time like 2026-01-01T18:00, got {value!r}"
            ) from None
    else:
        raise WindowConfigError(where, "anchor", f"expected an ISO date-time, got {value!r}")
    # A time without an offset is a wall-clock time in the window's time zone.
    return _local(parsed, zone) if parsed.tzinfo is None else parsed.astimezone(UTC)


def window_from_config(raw: Any, *, provider: str, where: str = "") -> WindowSpec:
    """A WindowSpec from one models.yaml window mapping (or a ProviderWindow's fields), or
    WindowConfigError naming the key (`where` is its path, e.g. "providers.glm.windows[0]")."""
    if not isinstance(raw, Mapping):
        problem = f"expected a mapping, got {type(raw).__name__}"
        raise WindowConfigError(where.rpartition(".")[0], where.rpartition(".")[2], problem)
    unknown = sorted(str(k) for k in raw if k not in WINDOW_KEYS)
    if unknown:
        raise WindowConfigError(where, unknown[0], f"unknown key (one of {', '.join(WINDOW_KEYS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise WindowConfigError(
            where, "name", f"expected a short name (a-z, 0-9, _ and -), got {name!r}"
        )
    kind = raw.get("kind")
    if kind not in WindowKind.values:
        raise WindowConfigError(
            where, "kind", f"unknown kind {kind!r} (one of {', '.join(WindowKind.values)})"
        )
    kind = WindowKind(kind)
    present = {k for k, v in raw.items() if v is not None and v != ""}
    allowed = {
        WindowKind.CALENDAR: {"unit", "time_zone"},
        WindowKind.ANCHORED: {"time_zone", "hours", "days", "anchor"},
        WindowKind.ROLLING: {"hours"},
    }[kind]
    for key in ("unit", "time_zone", "hours", "days", "anchor"):
        if key in present and key not in allowed:
            raise WindowConfigError(where, key, f"not used by a {kind} window")
    unit: CalendarUnit | None = None
    time_zone = _time_zone(raw.get("time_zone") or None, where)
    hours = _whole(raw.get("hours"), where, "hours", low=1, high=MAX_HOURS)
    days = _whole(raw.get("days"), where, "days", low=1, high=MAX_DAYS)
    anchor: datetime | None = None
    if kind == WindowKind.CALENDAR:
        if raw.get("unit") not in CalendarUnit.values:
            raise WindowConfigError(
                where,
                "unit",
                f"expected one of {', '.join(CalendarUnit.values)}, got {raw.get('unit')!r}",
            )
        unit = CalendarUnit(raw["unit"])
    elif kind == WindowKind.ROLLING:
        if hours is None:
            raise WindowConfigError(where, "hours", "required for a rolling window (the last N h)")
    else:
        if (hours is None) == (days is None):
            raise WindowConfigError(
                where, "hours", "an anchored window has a length in hours or in days (one)"
            )
        anchor = _anchor(raw.get("anchor"), ZoneInfo(time_zone), where)
    cap_tokens = _whole(raw.get("cap_tokens"), where, "cap_tokens", low=0)
    cap_usd = _number(raw.get("cap_usd"), where, "cap_usd")
    if cap_usd is not None and cap_usd < 0:
        raise WindowConfigError(where, "cap_usd", f"must be at least 0, got {raw['cap_usd']!r}")
    cap_requests = _whole(raw.get("cap_requests"), where, "cap_requests", low=0)
    if cap_tokens is None and cap_usd is None and cap_requests is None:
        raise WindowConfigError(
            where, "cap_tokens", "a window needs a cap: cap_tokens, cap_usd or cap_requests"
        )
    return WindowSpec(
        provider=provider,
        name=name,
        kind=kind,
        unit=unit,
        time_zone=time_zone if kind != WindowKind.ROLLING else "UTC",
        hours=hours,
        days=days,
        anchor=anchor,
        cap_tokens=cap_tokens,
        cap_usd=cap_usd,
        cap_requests=cap_requests,
        autopack_share=_fraction(
            raw.get("autopack_share"), where, "autopack_share", allow_zero=True
        ),
        soft_limit=_fraction(raw.get("soft_limit"), where, "soft_limit", allow_zero=False),
    )


def windows_from_config(raw: Any, *, provider: str, where: str) -> tuple[WindowSpec, ...]:
    """A provider's `windows:` list (None: none), each validated, names unique."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise WindowConfigError(
            where.rpartition(".")[0],
            where.rpartition(".")[2],
            f"expected a list of windows, got {type(raw).__name__}",
        )
    specs: list[WindowSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        spec = window_from_config(item, provider=provider, where=f"{where}[{i}]")
        if spec.name in seen:
            raise WindowConfigError(f"{where}[{i}]", "name", f"duplicate window {spec.name!r}")
        seen.add(spec.name)
        specs.append(spec)
    return tuple(specs)


def window_to_config(spec: WindowSpec) -> dict[str, Any]:
    """The models.yaml mapping of a window (window_from_config reads it back equal)."""
    out: dict[str, Any] = {"name": spec.name, "kind": str(spec.kind)}
    if spec.unit is not None:
        out["unit"] = str(spec.unit)
    if spec.kind != WindowKind.ROLLING:
        out["time_zone"] = spec.time_zone
    if spec.hours is not None:
        out["hours"] = spec.hours
    if spec.days is not None:
        out["days"] = spec.days
    if spec.anchor is not None:
        # The local wall-clock time with its offset: readable, and the same instant back.
        out["anchor"] = spec.anchor.astimezone(spec.zone).isoformat()
    if spec.cap_tokens is not None:
        out["cap_tokens"] = spec.cap_tokens
    if spec.cap_usd is not None:
        out["cap_usd"] = _plain(spec.cap_usd)
    if spec.cap_requests is not None:
        out["cap_requests"] = spec.cap_requests
    if spec.autopack_share is not None:
        out["autopack_share"] = _plain(spec.autopack_share)
    if spec.soft_limit is not None:
        out["soft_limit"] = _plain(spec.soft_limit)
    return out


def _plain(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


LEGACY_UNITS = (CalendarUnit.DAY, CalendarUnit.WEEK, CalendarUnit.MONTH)


def legacy_windows(
    provider: str, caps: Mapping[CalendarUnit, int | None]
) -> tuple[WindowSpec, ...]:
    """A ProviderQuota's daily/weekly/monthly_cap_tokens as calendar windows in UTC named day,
    week and month (only those with a cap)."""
    return tuple(
        WindowSpec(
            provider=provider,
            name=str(unit),
            kind=WindowKind.CALENDAR,
            unit=unit,
            cap_tokens=caps[unit],
            legacy=True,
        )
        for unit in LEGACY_UNITS
        if caps.get(unit) is not None
    )


def merge_windows(
    configured: Iterable[WindowSpec], legacy: Sequence[WindowSpec]
) -> list[WindowSpec]:
    """The configured windows, then the legacy ones whose name no configured window takes."""
    configured = list(configured)
    taken = {w.name for w in configured}
    return configured + [w for w in legacy if w.name not in taken]
