"""Small builders the test modules share: users with permissions, provider keys, metered calls."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User

from routing.router import router
from usage.models import ProviderQuota, UsageEvent
from usage.services import UsageRecord, record_usage
from usage.types import TokenUsage

PROVIDER_KEY_VARS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GLM_API_KEY")
# Codenames of the two permissions a person grants in the admin.
CONTROL = "control_run"
OVERRIDE = "override_model"


def set_provider_keys(monkeypatch: pytest.MonkeyPatch, value: str = "test-key") -> None:
    """Every provider counts as configured; the router forgets what it cached before."""
    for name in PROVIDER_KEY_VARS:
        monkeypatch.setenv(name, value)
    router.invalidate()


def staff_user(username: str, *codenames: str) -> User:
    user = User.objects.create_user(username, is_staff=True)
    if codenames:
        user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


def metered_call(
    provider: str,
    model: str,
    *,
    prompt: int,
    completion: int,
    run_id: int | None = None,
    phase_id: int | None = None,
    role: str = "builder",
    at: datetime | None = None,
) -> UsageEvent:
    """Record one provider call as record_usage does for a real one (made `at`, default now)."""
    event, _created = record_usage(
        record=UsageRecord(
            call_id=f"test-{uuid.uuid4().hex}",
            provider=provider,
            model=model,
            role=role,
            usage=TokenUsage(prompt_tokens=prompt, completion_tokens=completion),
            run_id=run_id,
            phase_id=phase_id,
            created_at=at,
        )
    )
    return event


def legacy_caps_only(*providers: str) -> None:
    """These providers' plans have only the legacy daily/weekly/monthly caps: config/models.yaml
    gives them cap windows too, and a window named day or week takes the legacy one's place,
    while every window counts for the router. The router re-reads its quota state."""
    from usage.services import provider_windows_set

    for provider in providers:
        provider_windows_set(provider=provider, windows=())
    router.invalidate()


def windows_plan(provider: str, *windows: dict[str, Any]) -> None:
    """The provider's plan is these cap windows (each as config/models.yaml writes one) and
    nothing else: no legacy caps, the whole cap Autopack's, the soft limit at 80%."""
    from usage.services import provider_quota_upsert, provider_windows_set
    from usage.windows import window_from_config

    provider_quota_upsert(
        provider=provider,
        daily_cap_tokens=None,
        weekly_cap_tokens=None,
        monthly_cap_tokens=None,
        autopack_share="1",
        soft_limit="0.8",
    )
    provider_windows_set(
        provider=provider, windows=[window_from_config(w, provider=provider) for w in windows]
    )


def quota_form(quota: ProviderQuota, **changes: Any) -> dict[str, Any]:
    """The admin's provider caps form as posted for `quota` unchanged, then `changes`."""
    form: dict[str, Any] = {
        "provider": quota.provider,
        "daily_cap_tokens": quota.daily_cap_tokens or "",
        "weekly_cap_tokens": quota.weekly_cap_tokens or "",
        "monthly_cap_tokens": quota.monthly_cap_tokens or "",
        "autopack_share": quota.autopack_share,
        "soft_limit": quota.soft_limit,
        "outside_usage": quota.outside_usage,
    }
    if quota.pace:  # a checkbox: posted only when ticked
        form["pace"] = "on"
    form.update(changes)
    return form
