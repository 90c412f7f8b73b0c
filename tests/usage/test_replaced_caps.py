"""A legacy daily/weekly/monthly cap that a configured cap window of the same name replaces
(issue 16): no surface shows a second percent for it on the calendar period in UTC, the admin's
day/week/month columns show the window in force, and editing the replaced field is refused."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from tests.factories import metered_call, quota_form
from usage.models import ProviderQuota, ProviderWindow
from usage.selectors import get_provider_usage_summary, get_usage_overview

pytestmark = pytest.mark.django_db


def test_a_period_whose_window_is_configured_has_no_second_percent() -> None:
    # config/models.yaml: anthropic has a configured "week" (anchored) but no "day" window.
    assert ProviderWindow.objects.filter(provider="anthropic", name="week").exists()
    assert not ProviderWindow.objects.filter(provider="anthropic", name="day").exists()
    metered_call("anthropic", "claude-sonnet-4-5", prompt=1_500, completion=500)

    week = {r["provider"]: r for r in get_provider_usage_summary(period="week")}["anthropic"]
    assert (week["cap"], week["percent_of_cap"], week["cap_window"]) == (None, None, "week")
    assert week["total_tokens"] == 2_000  # the usage itself is still told
    day = {r["provider"]: r for r in get_provider_usage_summary(period="day")}["anthropic"]
    assert day["cap_window"] is None
    assert day["cap"] == ProviderQuota.objects.get(provider="anthropic").effective_cap("day")
    assert day["percent_of_cap"] == pytest.approx(2_000 * 100 / day["cap"])

    # Gemini's configured "day" (midnight Pacific) replaces the UTC day: no chart cap line.
    overview = {r["provider"]: r for r in get_usage_overview(period="day")["providers"]}
    assert overview["google_gemini"]["daily_cap"] is None
    assert overview["google_gemini"]["daily_cap_window"] == "day"
    assert overview["anthropic"]["daily_cap"] is not None
    assert overview["anthropic"]["daily_cap_window"] is None


def test_the_usage_page_and_api_name_the_window_instead(admin_client: Client) -> None:
    metered_call("anthropic", "claude-sonnet-4-5", prompt=1_500, completion=500)
    html = admin_client.get("/dashboard/caps/?period=week").content.decode()
    assert "Weekly cap: its week window above" in html
    assert "daily cap: its day window above" in html  # google_gemini's chart

    body = admin_client.get("/dashboard/usage?period=week").json()
    anthropic = next(p for p in body["providers"] if p["provider"] == "anthropic")
    assert (anthropic["cap_window"], anthropic["percent_of_cap"]) == ("week", None)
    week = next(w for w in anthropic["windows"] if w["name"] == "week")
    assert week["percent"] is not None  # the window in force carries the percent


def test_the_admin_columns_show_the_window_in_force(admin_client: Client) -> None:
    ProviderQuota.objects.filter(provider="anthropic").update(weekly_cap_tokens=10_000)
    metered_call("anthropic", "claude-sonnet-4-5", prompt=1_500, completion=500)
    page = admin_client.get(reverse("admin:usage_providerquota_changelist"))
    rows = {q.provider: q for q in page.context["cl"].result_list}
    model_admin = page.context["cl"].model_admin
    # Not 20% of the replaced 10,000 weekly cap: 2,000 of the anchored week's 20 M.
    week = model_admin.percent_week(rows["anthropic"])
    assert week.startswith("0.0% of tokens (window: 7 d from Thu")
    assert "20.0%" not in page.content.decode()
    assert model_admin.percent_day(rows["anthropic"]) == "0.1% of tokens"  # legacy UTC day


def test_editing_a_replaced_cap_is_refused_by_name_and_changes_nothing(
    admin_client: Client,
) -> None:
    quota = ProviderQuota.objects.get(provider="anthropic")
    before = ProviderQuota.objects.values().get(pk=quota.pk)
    url = reverse("admin:usage_providerquota_change", args=[quota.pk])
    response = admin_client.post(url, quota_form(quota, weekly_cap_tokens=1_000))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "cap window “week”" in errors["weekly_cap_tokens"][0]
    assert ProviderQuota.objects.values().get(pk=quota.pk) == before

    # The same field in the list's editable cells is refused by the same rule.
    quotas = list(ProviderQuota.objects.order_by("provider"))
    form: dict[str, Any] = {
        "form-TOTAL_FORMS": str(len(quotas)),
        "form-INITIAL_FORMS": str(len(quotas)),
        "_save": "Save",
    }
    for i, q in enumerate(quotas):
        form[f"form-{i}-id"] = q.pk
        for name, value in quota_form(q).items():
            if name != "provider":
                form[f"form-{i}-{name}"] = value
    target = next(i for i, q in enumerate(quotas) if q.provider == "anthropic")
    form[f"form-{target}-weekly_cap_tokens"] = 5
    response = admin_client.post(reverse("admin:usage_providerquota_changelist"), form)
    assert response.status_code == 200
    assert "cap window “week”" in response.content.decode()
    assert ProviderQuota.objects.values().get(pk=quota.pk) == before

    # A cap no window replaces is still edited as before.
    response = admin_client.post(url, quota_form(quota, daily_cap_tokens=7_000))
    assert response.status_code == 302
    quota.refresh_from_db()
    assert quota.daily_cap_tokens == 7_000
