"""Burn rates and forecasts per provider × cap window (issue 16, "Burn rate and forecasts").

For every window of usage.selectors.window_usage: how fast its usage grows, in tokens/h and USD/h
(and requests/h when it caps requests), over the last hour (window_usage's rolling span of one
hour ending at now) and over the window so far (start → now); and, per capped unit, the instant
its effective cap is reached if the last hour's pace goes on, with how long before the window's
reset that is.

- calendar and anchored windows: the cap is reached at now + (cap − used) / pace. None when the
  pace is zero or that instant is at or past the reset ("it lasts past the reset").
- rolling windows (the last N h) never reset whole: what enters at the pace is offset by what
  leaves. The usage in it is taken as spread evenly over its N h (its own rate so far, s), so in
  d hours it holds used + (pace − s)·d; the cap is reached when that reaches it within N h, and
  None otherwise (it settles at pace × N h, under the cap). before_reset is None for them.
- a unit already at its cap: reached_at is now (the window is HARD anyway).

Forecasts are estimates: every surface says "at this pace".

Pure maths (forecast_window, attach_forecasts; rows + now in, no database) for the per-run
forecasts (runs) and the router's pacing (routing.router.provider_quota_states) to build on;
forecast_usage reads it all in window_usage's one statement: the windows of every provider plus
one synthetic rolling 1-hour window per provider (LAST_HOUR), so the last hour costs no
query of its own, whatever the number of providers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from .windows import MAX_HOURS, CapUnit, WindowKind, WindowSpec

# The name of the synthetic last-hour window (not a valid configured name: it starts with "_",
# usage.windows.NAME_PATTERN, so it never meets a real one).
LAST_HOUR = "_last_hour"
HOUR = timedelta(hours=1)
# The units a rate is always given in; requests only when the window caps them.
RATE_UNITS = (CapUnit.TOKENS.value, CapUnit.USD.value)


@dataclass(frozen=True)
class CapForecast:
    """One capped unit of one window at the last hour's pace."""

    unit: str  # "tokens", "usd" or "requests"
    cap: int | Decimal  # effective cap (plan cap × autopack_share)
    used: int | Decimal
    per_hour: float  # the last hour's pace in this unit
    reached_at: datetime | None  # None: pace zero, or it lasts past the reset
    before_reset: timedelta | None  # reset − reached_at (None: rolling, or not reached)


@dataclass(frozen=True)
class WindowForecast:
    """A window's burn rates and when its cap is reached at the last hour's pace.

    last_hour / so_far: {unit: per hour} for tokens, usd, and requests when capped in them;
    so_far is over start → now (its hours in hours_so_far). reached_at, before_reset and unit
    are those of the cap reached first (None: none is reached at this pace)."""

    provider: str
    window: str
    kind: str
    now: datetime
    reset: datetime | None
    hours_so_far: float
    last_hour: dict[str, float]
    so_far: dict[str, float]
    caps: tuple[CapForecast, ...]

    @property
    def first(self) -> CapForecast | None:
        reached = [c for c in self.caps if c.reached_at is not None]
        return min(reached, key=lambda c: c.reached_at or self.now) if reached else None

    @property
    def reached_at(self) -> datetime | None:
        first = self.first
        return first.reached_at if first else None

    @property
    def before_reset(self) -> timedelta | None:
        first = self.first
        return first.before_reset if first else None

    @property
    def unit(self) -> str | None:
        first = self.first
        return first.unit if first else None

    @property
    def runs_out(self) -> bool:
        """Some cap is reached at this pace before the window resets (pacing's test)."""
        return self.first is not None


def last_hour_windows(providers: Iterable[str]) -> list[WindowSpec]:
    """One synthetic rolling 1-hour window (no cap) per provider, for window_usage."""
    return [
        WindowSpec(provider=p, name=LAST_HOUR, kind=WindowKind.ROLLING, hours=1)
        for p in sorted(set(providers))
    ]


def _amount(row: dict[str, Any] | None, unit: str) -> float:
    return float(row[unit]) if row is not None else 0.0


def forecast_window(
    row: dict[str, Any], last_hour: dict[str, Any] | None, *, now: datetime
) -> WindowForecast:
    """The forecast of one window_usage row, given its provider's last-hour row (the LAST_HOUR
    window's; None: no usage in the last hour). Pure."""
    hours_so_far = max((now - row["start"]).total_seconds() / 3600, 0.0)
    units = [*RATE_UNITS]
    if row["caps"].get(CapUnit.REQUESTS.value) is not None:
        units.append(CapUnit.REQUESTS.value)
    pace = {unit: _amount(last_hour, unit) for unit in units}  # over one hour: per hour
    so_far = {
        unit: (_amount(row, unit) / hours_so_far if hours_so_far > 0 else 0.0) for unit in units
    }
    rolling = row["kind"] == WindowKind.ROLLING
    reset = row["reset"]
    caps: list[CapForecast] = []
    for unit in row["units"]:
        cap, used = row["caps"][unit], row[unit]
        rate = pace[unit]
        reached: datetime | None = None
        remaining = float(cap) - float(used)
        if remaining <= 0:
            reached = now
        elif rolling:
            # Usage in the window taken as even over its N h: it leaves at used / N per hour.
            leaving = float(used) / hours_so_far if hours_so_far > 0 else 0.0
            if rate > leaving:
                hours = remaining / (rate - leaving)
                if hours <= hours_so_far:
                    reached = now + timedelta(hours=hours)
        elif rate > 0:
            hours = remaining / rate  # compared before it is made a timedelta: may be huge
            left = (reset - now).total_seconds() / 3600 if reset is not None else MAX_HOURS
            if hours < min(left, MAX_HOURS):
                reached = now + timedelta(hours=hours)
            if reached is not None and reset is not None and reached >= reset:
                reached = None
        before = reset - reached if reached is not None and reset and not rolling else None
        caps.append(
            CapForecast(
                unit=unit,
                cap=cap,
                used=used,
                per_hour=rate,
                reached_at=reached,
                before_reset=before,
            )
        )
    return WindowForecast(
        provider=row["provider"],
        window=row["window"],
        kind=row["kind"],
        now=now,
        reset=reset,
        hours_so_far=hours_so_far,
        last_hour=pace,
        so_far=so_far,
        caps=tuple(caps),
    )


def attach_forecasts(rows: Sequence[dict[str, Any]], *, now: datetime) -> list[dict[str, Any]]:
    """window_usage's rows read with last_hour_windows: the real rows (their order kept), each
    with "forecast" (WindowForecast); the LAST_HOUR rows taken out. Pure."""
    last = {r["provider"]: r for r in rows if r["window"] == LAST_HOUR}
    return [
        {**r, "forecast": forecast_window(r, last.get(r["provider"]), now=now)}
        for r in rows
        if r["window"] != LAST_HOUR
    ]


def forecast_usage(
    *, now: datetime | None = None, providers: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """window_usage's rows, each with its "forecast": three statements whatever the number of
    providers, windows and events (the windows and quotas 2, and the usage of every window and
    of every provider's last hour in ONE statement; one more, as window_usage, when a rolling
    window's oldest usage lies in a folded hour)."""
    from django.utils import timezone

    from .selectors import window_usage

    at = now if now is not None else timezone.now()
    rows = window_usage(
        now=at,
        providers=providers,
        extra=lambda specs: last_hour_windows(s.provider for s in specs),
    )
    return attach_forecasts(rows, now=at)


def paced_providers() -> frozenset[str]:
    """The providers whose ProviderQuota.pace is on (one statement)."""
    from .models import ProviderQuota

    return frozenset(ProviderQuota.objects.filter(pace=True).values_list("provider", flat=True))
