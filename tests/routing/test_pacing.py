"""Pacing (issue 16): a provider with `pace: true` whose forecast says a window's cap is reached
before its reset, at the last hour's pace, is past its soft limit for non-critical categories
(they take the quota fallback) and the decision's reason says so; critical categories keep it;
an unpaced provider is unaffected; pacing ends when the pace slows (the clock moved).

Claude-like week anchored on Thursday 18:00 New York (cap 100,000 tokens), usage placed at
chosen instants, the quota state read at a chosen clock (quota_snapshot(now=…)).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from routing.config import ModelsConfigError, parse_models_config
from routing.mapping import models_export, models_import
from routing.models import RoutingPolicy
from routing.router import SOFT, quota_snapshot, router
from routing.types import DecisionScope, RouteKey
from tests.factories import metered_call, set_provider_keys, windows_plan
from usage import display
from usage.models import ProviderQuota

pytestmark = pytest.mark.django_db

MODELS_YAML = Path(__file__).resolve().parents[2] / "config" / "models.yaml"
WEEK = {
    "name": "week",
    "kind": "anchored",
    "days": 7,
    "anchor": "2026-01-01T18:00",  # a Thursday
    "time_zone": "America/New_York",
    "cap_tokens": 100_000,
}
# Tuesday 12:00 UTC; the week runs to Thursday 2026-03-12 18:00 EDT (22:00 UTC): 58 h left.
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
RESET = datetime(2026, 3, 12, 22, 0, tzinfo=UTC)
UI = RouteKey("builder", "ui", "medium")  # claude-sonnet-5-5, falls back to gpt-6.1-sol


def pace(provider: str, on: bool) -> None:
    ProviderQuota.objects.filter(provider=provider).update(pace=on)
    router.invalidate()


@pytest.fixture(autouse=True)
def plans(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    set_provider_keys(monkeypatch)
    for provider in ("openai", "google_gemini", "glm"):
        windows_plan(provider)
    windows_plan("anthropic", WEEK)
    pace("anthropic", True)
    yield
    router.invalidate()


def used(at: datetime, tokens: int, provider: str = "anthropic") -> None:
    model = "claude-sonnet-5-5" if provider == "anthropic" else "gpt-6.1-sol"
    metered_call(provider, model, prompt=tokens, completion=0, at=at)


def decide(key: RouteKey, at: datetime) -> Any:
    return router.select(key, now=at, quota=quota_snapshot(now=at))


def critical_key() -> RouteKey:
    category = RoutingPolicy.objects.get(pk=1).critical_categories[0]
    return RouteKey("builder", category, "medium")


def test_a_paced_provider_burning_its_week_too_fast_sends_non_critical_work_to_the_fallback() -> (
    None
):
    # 20,000 of 100,000 in the last hour (20%: under the soft limit); 80,000 left at 20,000/h
    # is reached at 16:00 UTC, 54 h before the reset.
    used(NOW - timedelta(minutes=30), 20_000)
    state = quota_snapshot(now=NOW).states["anthropic"]
    reached = NOW + timedelta(hours=4)
    when = display.when_text(reached, now=NOW)
    assert (state.level, state.paced, state.window, state.percent) == (SOFT, True, "week", 20.0)
    assert (
        state.words
        == f"paced: at this pace its week cap is reached {when}, 2 d 6 h before the reset"
    )
    assert (state.reset, state.until) == (RESET, RESET)

    d = decide(UI, NOW)
    assert (d.model, d.scope) == ("gpt-6.1-sol", DecisionScope.QUOTA_FALLBACK)
    assert d.reason == (
        f"quota fallback: anthropic paced: at this pace its week cap is reached {when}, "
        "2 d 6 h before the reset; claude-sonnet-5-5 → gpt-6.1-sol"
    )


def test_a_critical_category_keeps_a_paced_provider_even_under_fail_fast() -> None:
    used(NOW - timedelta(minutes=30), 20_000)
    key = critical_key()
    primary = router.select(key, with_quota=False).model
    assert router.state().catalogue[primary] == "anthropic"
    RoutingPolicy.objects.filter(pk=1).update(quota_policy="fail_fast", version=999)
    router.invalidate()
    d = decide(key, NOW)
    assert d.model == primary and d.scope != DecisionScope.QUOTA_FALLBACK
    assert "paced" not in d.reason


def test_an_unpaced_provider_burning_as_fast_keeps_its_work() -> None:
    pace("anthropic", False)
    used(NOW - timedelta(minutes=30), 20_000)
    assert quota_snapshot(now=NOW).states["anthropic"].level == "ok"
    assert decide(UI, NOW).model == "claude-sonnet-5-5"


def test_pacing_ends_when_the_pace_slows() -> None:
    used(NOW - timedelta(minutes=30), 20_000)
    assert decide(UI, NOW).model == "gpt-6.1-sol"
    # Two hours on, the last hour holds only 1,000 tokens: 79,000 left at 1,000/h is 79 h,
    # past the reset 56 h away: the week lasts, anthropic serves again.
    later = NOW + timedelta(hours=2)
    used(later - timedelta(minutes=15), 1_000)
    state = quota_snapshot(now=later).states["anthropic"]
    assert (state.level, state.paced) == ("ok", False)
    d = decide(UI, later)
    assert (d.model, d.scope) != ("gpt-6.1-sol", DecisionScope.QUOTA_FALLBACK)
    assert d.model == "claude-sonnet-5-5"


def test_a_pace_that_lasts_the_week_is_not_paced() -> None:
    used(NOW - timedelta(minutes=30), 1_000)  # 99,000 left at 1,000/h: 99 h > 58 h
    assert quota_snapshot(now=NOW).states["anthropic"].level == "ok"
    assert decide(UI, NOW).model == "claude-sonnet-5-5"


def test_a_window_really_past_its_soft_limit_still_says_so_when_paced() -> None:
    used(NOW - timedelta(minutes=30), 85_000)
    state = quota_snapshot(now=NOW).states["anthropic"]
    assert (state.level, state.paced) == (SOFT, False)
    assert decide(UI, NOW).reason.startswith("quota fallback: anthropic over soft limit: week 85%")


# ---- configuration: models.yaml, export, admin -----------------------------------------------


def committed() -> dict[str, Any]:
    return yaml.safe_load(MODELS_YAML.read_text())


def test_pace_is_read_from_models_yaml_applied_and_exported() -> None:
    data = committed()
    assert data["providers"]["anthropic"]["pace"] is False
    data["providers"]["glm"]["pace"] = True
    models_import(data=data)
    paced = set(ProviderQuota.objects.filter(pace=True).values_list("provider", flat=True))
    assert paced == {"glm"}
    exported = models_export()["providers"]
    assert exported["glm"]["pace"] is True and exported["anthropic"]["pace"] is False
    assert parse_models_config(models_export()).providers["glm"].pace is True


def test_a_pace_that_is_not_true_or_false_is_refused_with_its_key() -> None:
    data = committed()
    data["providers"]["glm"]["pace"] = "yes"
    with pytest.raises(ModelsConfigError, match=r"^providers\.glm\.pace: expected true or false"):
        parse_models_config(data)


def test_pace_is_editable_in_the_admin() -> None:
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    quota = ProviderQuota.objects.get(provider="glm")
    form = {
        "provider": "glm",
        "daily_cap_tokens": "",
        "weekly_cap_tokens": "",
        "monthly_cap_tokens": "",
        "autopack_share": quota.autopack_share,
        "soft_limit": quota.soft_limit,
        "pace": "on",
    }
    version = RoutingPolicy.objects.get(pk=1).version
    url = reverse("admin:usage_providerquota_change", args=[quota.pk])
    response = client.post(url, form)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert ProviderQuota.objects.get(provider="glm").pace is True
    # The router re-reads its quota state: the save moved the version.
    assert RoutingPolicy.objects.get(pk=1).version > version
