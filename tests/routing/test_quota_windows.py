"""The router over every cap window (issue 16): a provider at 100% of ANY of its windows is not
called, past any window's soft limit it is soft, and the reason names the window and its reset.

Claude-like (a 5-hour rolling session and a week anchored on Thursday 18:00 New York), Gemini-like
(a day at midnight Los Angeles, across the change to summer time) and GLM-like (prompts per 5
hours) windows, with usage placed at chosen instants and the quota state read at a chosen clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone

from routing.models import RoutingPolicy
from routing.router import RoutingError, quota_snapshot, reset_words, router
from routing.types import DecisionScope, RouteKey
from tests.factories import metered_call, set_provider_keys, windows_plan
from usage.models import ProviderWindow

pytestmark = pytest.mark.django_db

CLAUDE = [
    {"name": "session", "kind": "rolling", "hours": 5, "cap_tokens": 1_000},
    {
        "name": "week",
        "kind": "anchored",
        "days": 7,
        "anchor": "2026-01-01T18:00",  # a Thursday
        "time_zone": "America/New_York",
        "cap_tokens": 100_000,
    },
]
GEMINI = [
    {
        "name": "day",
        "kind": "calendar",
        "unit": "day",
        "time_zone": "America/Los_Angeles",
        "cap_tokens": 1_000,
    }
]
GLM = [{"name": "prompts", "kind": "rolling", "hours": 5, "cap_requests": 3}]


@pytest.fixture(autouse=True)
def plans(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    set_provider_keys(monkeypatch)
    plan = {"openai": [], "anthropic": CLAUDE, "google_gemini": GEMINI, "glm": GLM}
    for provider, raw in plan.items():
        windows_plan(provider, *raw)
    router.invalidate()
    yield
    router.invalidate()


def used(provider: str, model: str, at: datetime, tokens: int = 0) -> None:
    metered_call(provider, model, prompt=tokens, completion=0, at=at)


def decide(role: str, category: str, complexity: str, at: datetime) -> Any:
    """The decision at the clock `at` (the quota state read at that instant)."""
    return router.select(RouteKey(role, category, complexity), now=at, quota=quota_snapshot(now=at))


def test_a_claude_like_provider_spent_in_its_session_falls_back_until_the_session_resets() -> None:
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    spent = now - timedelta(hours=1)
    used("anthropic", "claude-sonnet-5-5", spent, 1_000)
    reset = spent + timedelta(hours=5)

    d = decide("builder", "ui", "medium", now)
    assert (d.model, d.scope) == ("gpt-6.1-sol", DecisionScope.QUOTA_FALLBACK)
    assert d.reason == (
        f"quota fallback: anthropic session 100% (resets {reset_words(reset, now=now)}); "
        "claude-sonnet-5-5 → gpt-6.1-sol"
    )
    state = quota_snapshot(now=now).states["anthropic"]
    assert (state.level, state.window, state.reset) == ("hard", "session", reset)
    # The session counts (now − 5 h, now]: the spent usage leaves it exactly at the reset.
    assert state.until == reset
    assert decide("builder", "ui", "medium", reset - timedelta(microseconds=1)).model == (
        "gpt-6.1-sol"
    )
    assert decide("builder", "ui", "medium", reset).model == "claude-sonnet-5-5"


def test_a_claude_like_week_anchored_in_new_york_resets_at_18_00_local_after_the_dst_change() -> (
    None
):
    # The week from Thu 2026-03-05 18:00 EST (23:00 UTC) ends Thu 2026-03-12 18:00 EDT: 22:00 UTC,
    # a week of 167 hours (US clocks go forward on Sunday 2026-03-08).
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    used("anthropic", "claude-sonnet-5-5", datetime(2026, 3, 6, 0, 0, tzinfo=UTC), 100_000)
    state = quota_snapshot(now=now).states["anthropic"]
    assert (state.level, state.window, state.percent) == ("hard", "week", 100.0)
    assert state.reset == datetime(2026, 3, 12, 22, 0, tzinfo=UTC)
    # The session window is clear (the usage is days old): one window at 100% is enough.
    d = decide("builder", "ui", "medium", now)
    assert d.model == "gpt-6.1-sol"
    assert d.reason.startswith("quota fallback: anthropic week 100% (resets Thu ")
    assert decide("builder", "ui", "medium", state.reset).model == "claude-sonnet-5-5"


def test_a_window_past_its_soft_limit_makes_the_provider_soft_and_says_which() -> None:
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    used("anthropic", "claude-sonnet-5-5", now - timedelta(minutes=30), 850)
    d = decide("builder", "ui", "medium", now)
    assert d.model == "gpt-6.1-sol"
    assert d.reason.startswith("quota fallback: anthropic over soft limit: session 85% (resets ")


def test_a_gemini_like_day_at_midnight_in_los_angeles_lasts_23_hours_on_the_dst_day() -> None:
    # Sunday 2026-03-08 in Los Angeles: 00:00 PST (08:00 UTC) to 00:00 PDT on Monday (07:00 UTC).
    now = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)
    used("google_gemini", "gemini-3.8-flash", datetime(2026, 3, 8, 9, 0, tzinfo=UTC), 1_000)
    # Usage of the day before (Saturday, Los Angeles time) counts for nothing today.
    used("google_gemini", "gemini-3.8-flash", datetime(2026, 3, 8, 7, 59, tzinfo=UTC), 5_000)
    state = quota_snapshot(now=now).states["google_gemini"]
    assert (state.level, state.window, state.percent) == ("hard", "day", 100.0)
    assert state.reset == datetime(2026, 3, 9, 7, 0, tzinfo=UTC)

    d = decide("builder", "docs", "medium", now)
    assert d.model == "gpt-6-luna"
    assert d.reason.startswith("quota fallback: google_gemini day 100% (resets ")
    assert decide("builder", "docs", "medium", state.reset - timedelta(seconds=1)).model == (
        "gpt-6-luna"
    )
    assert decide("builder", "docs", "medium", state.reset).model == "gemini-3.8-flash"


def test_a_glm_like_window_counted_in_requests_refuses_the_fourth_prompt() -> None:
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    for minutes in (50, 40):
        used("glm", "glm-5.3", now - timedelta(minutes=minutes), 10)
    assert decide("builder", "docs", "low", now).model == "glm-5.3"  # 2 of 3 prompts
    used("glm", "glm-5.3", now - timedelta(minutes=30), 10)
    d = decide("builder", "docs", "low", now)
    assert d.model == "gemini-4-hydrogen"
    reset = now - timedelta(minutes=50) + timedelta(hours=5)
    assert d.reason.startswith(
        f"quota fallback: glm prompts 100% (resets {reset_words(reset, now=now)})"
    )
    state = quota_snapshot(now=now).states["glm"]
    assert (state.level, state.window, state.percent) == ("hard", "prompts", 100.0)
    assert state.until == reset
    # The oldest prompt leaves the window at the reset: 2 of 3 again, glm serves.
    assert decide("builder", "docs", "low", reset - timedelta(microseconds=1)).model == (
        "gemini-4-hydrogen"
    )
    assert decide("builder", "docs", "low", reset).model == "glm-5.3"


def test_a_call_no_provider_may_serve_waits_for_the_earliest_reset() -> None:
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    windows_plan("openai", {"name": "session", "kind": "rolling", "hours": 5, "cap_tokens": 100})
    used("openai", "gpt-6.1-sol", now - timedelta(hours=2), 100)
    used("anthropic", "claude-sonnet-5-5", now - timedelta(hours=4), 1_000)
    used("google_gemini", "gemini-4-hydrogen", now - timedelta(hours=1), 1_000)
    for _ in range(3):
        used("glm", "glm-5.3", now - timedelta(hours=3), 1)
    with pytest.raises(RoutingError) as refused:
        decide("builder", "ui", "medium", now)
    assert refused.value.blocked == (
        "anthropic session at 100%",
        "openai session at 100%",
        "google_gemini day at 100%",
        "glm prompts at 100%",
    )
    # anthropic's session frees first: its usage of 4 h ago leaves it at 4 h ago + 5 h.
    assert refused.value.resume_at == now + timedelta(hours=1)


def test_saving_a_window_moves_the_mapping_version_so_every_router_reloads() -> None:
    version = RoutingPolicy.objects.get(pk=1).version
    row = ProviderWindow.objects.get(provider="glm", name="prompts")
    row.cap_requests = 100
    row.save()
    assert RoutingPolicy.objects.get(pk=1).version == version + 1
    row.delete()
    assert RoutingPolicy.objects.get(pk=1).version == version + 2


def test_the_router_reads_windows_in_its_cached_quota_state_without_a_query(
    django_assert_num_queries: Any,
) -> None:
    used("anthropic", "claude-sonnet-5-5", timezone.now() - timedelta(minutes=5), 1_000)
    router.invalidate()
    key = RouteKey("builder", "ui", "medium")
    assert router.select(key).model == "gpt-6.1-sol"  # loads the state and the quota
    with django_assert_num_queries(0):
        for _ in range(10):
            d = router.select(key)
    assert d.reason.startswith("quota fallback: anthropic session 100% (resets ")
