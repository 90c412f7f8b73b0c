"""The admin's cap editor and model mapping editor."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from routing.models import (
    CatalogueModel,
    ModelChange,
    ModelRoute,
    RoutingPolicy,
    WorkerProviderReport,
)
from routing.router import router, select_model
from tests.factories import legacy_caps_only, metered_call, quota_form, set_provider_keys
from usage.models import ProviderQuota

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    return client


def test_the_cap_list_shows_percent_of_cap_per_period_and_whether_a_key_is_set(
    admin_client_: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This process's own keys count for nothing there: the workers' report (routing.reach).
    monkeypatch.setenv("ANTHROPIC_API_KEY", "a-key-that-must-not-be-shown")
    monkeypatch.setenv("GLM_API_KEY", "a-key-that-must-not-be-shown")
    router.invalidate()
    WorkerProviderReport.objects.create(
        worker="host pid 1 started now", providers=["anthropic"], reported_at=timezone.now()
    )
    legacy_caps_only("anthropic")  # its configured week would replace the weekly cap
    ProviderQuota.objects.filter(provider="anthropic").update(weekly_cap_tokens=10_000)
    metered_call("anthropic", "claude-sonnet-4-5", prompt=1_500, completion=500)
    page = admin_client_.get(reverse("admin:usage_providerquota_changelist"))
    assert page.status_code == 200
    html = page.content.decode()
    assert "20.0% of tokens" in html  # 2,000 of a 10,000 weekly cap
    assert "a-key-that-must-not-be-shown" not in html
    rows = {q.provider: q for q in page.context["cl"].result_list}
    model_admin = page.context["cl"].model_admin
    assert model_admin.key_configured(rows["anthropic"]) == "a running worker has its key"
    assert model_admin.key_configured(rows["glm"]) == "running workers report no key"


def test_a_cap_edited_in_the_admin_is_saved_and_reaches_the_router(
    admin_client_: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_provider_keys(monkeypatch)
    legacy_caps_only("openai")
    quota = ProviderQuota.objects.get(provider="openai")
    metered_call("openai", "gpt-5", prompt=900, completion=0)
    version = RoutingPolicy.objects.get(pk=1).version
    url = reverse("admin:usage_providerquota_change", args=[quota.pk])
    response = admin_client_.post(url, quota_form(quota, weekly_cap_tokens=1_000))
    assert response.status_code == 302
    quota.refresh_from_db()
    assert quota.weekly_cap_tokens == 1_000
    # The save moved the mapping version: every process's router re-reads its quota state.
    assert RoutingPolicy.objects.get(pk=1).version > version

    router.invalidate()  # what the version check does in a worker within seconds
    decision = select_model(role="builder", category="tests", complexity="low")
    assert decision.model == "claude-haiku-5-5"  # gpt-6-luna's openai is over its soft limit
    assert decision.reason.startswith("quota fallback: openai")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("weekly_cap_tokens", "-5"),
        ("daily_cap_tokens", "lots"),
        ("autopack_share", "1.5"),
        ("autopack_share", "-0.1"),
        ("soft_limit", "0"),
        ("soft_limit", "abc"),
    ],
)
def test_a_bad_cap_is_refused_with_the_field_and_nothing_changes(
    admin_client_: Client, field: str, value: str
) -> None:
    quota = ProviderQuota.objects.get(provider="openai")
    before = ProviderQuota.objects.values().get(pk=quota.pk)
    url = reverse("admin:usage_providerquota_change", args=[quota.pk])
    response = admin_client_.post(url, quota_form(quota, **{field: value}))
    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert ProviderQuota.objects.values().get(pk=quota.pk) == before


def test_caps_are_edited_in_the_list_itself(admin_client_: Client) -> None:
    quotas = list(ProviderQuota.objects.order_by("provider"))
    form: dict[str, Any] = {
        "form-TOTAL_FORMS": str(len(quotas)),
        "form-INITIAL_FORMS": str(len(quotas)),
        "_save": "Save",
    }
    for i, quota in enumerate(quotas):
        form[f"form-{i}-id"] = quota.pk
        for name, value in quota_form(quota).items():
            if name != "provider":
                form[f"form-{i}-{name}"] = value
    target = next(i for i, q in enumerate(quotas) if q.provider == "glm")
    form[f"form-{target}-weekly_cap_tokens"] = 123_456
    form[f"form-{target}-autopack_share"] = "0.5"
    response = admin_client_.post(reverse("admin:usage_providerquota_changelist"), form)
    assert response.status_code == 302
    glm = ProviderQuota.objects.get(provider="glm")
    assert (glm.weekly_cap_tokens, glm.autopack_share) == (123_456, Decimal("0.5"))
    assert glm.effective_cap("week") == 61_728


def test_a_mapping_row_edited_in_the_admin_is_a_recorded_global_change(
    admin_client_: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_provider_keys(monkeypatch)
    route = ModelRoute.objects.get(layer="baseline", role="builder", category="", complexity="low")
    glm = CatalogueModel.objects.get(name="glm-4.6")
    page = admin_client_.get(reverse("admin:routing_modelroute_change", args=[route.pk]))
    assert page.status_code == 200
    assert '<optgroup label="glm">' in page.content.decode()  # choices grouped by provider

    response = admin_client_.post(
        reverse("admin:routing_modelroute_change", args=[route.pk]), {"model": glm.pk}
    )
    assert response.status_code == 302
    change = ModelChange.objects.get()
    assert (change.scope, change.old_model, change.new_model) == ("global", "gpt-6-luna", "glm-4.6")
    assert change.changed_by is not None and change.changed_by.username == "root"
    router.invalidate()
    assert select_model(role="builder", category="tests", complexity="low").model == "glm-4.6"
    history = admin_client_.get(reverse("admin:routing_modelchange_changelist"))
    assert "glm-4.6" in history.content.decode()
