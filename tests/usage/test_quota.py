from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from usage.models import ProviderQuota
from usage.services import provider_quota_upsert

pytestmark = pytest.mark.django_db
VALID: dict[str, Any] = {
    "provider": "test_provider",
    "daily_cap_tokens": 1000,
    "weekly_cap_tokens": 5000,
    "monthly_cap_tokens": None,
    "autopack_share": Decimal("0.25"),
    "soft_limit": Decimal("0.8"),
}


def test_it_creates_then_replaces_a_providers_caps() -> None:
    quota = provider_quota_upsert(**VALID)
    again = provider_quota_upsert(**{**VALID, "daily_cap_tokens": 2000, "autopack_share": 1.0})
    assert again.pk == quota.pk
    quota.refresh_from_db()
    assert (quota.daily_cap_tokens, quota.autopack_share) == (2000, Decimal(1))
    assert quota.effective_cap("day") == 2000
    assert quota.effective_cap("month") is None


def test_the_effective_cap_is_the_cap_times_autopack_share() -> None:
    quota = provider_quota_upsert(**VALID)
    assert (quota.effective_cap("day"), quota.effective_cap("week")) == (250, 1250)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("daily_cap_tokens", -1),
        ("weekly_cap_tokens", -10),
        ("monthly_cap_tokens", 1.5),
        ("autopack_share", Decimal("1.01")),
        ("autopack_share", -0.1),
        ("autopack_share", "lots"),
        ("soft_limit", 0),
        ("soft_limit", Decimal("1.5")),
        ("soft_limit", float("nan")),
        ("provider", ""),
    ],
)
def test_an_invalid_value_is_refused_naming_the_field_and_nothing_is_written(
    field: str, value: Any
) -> None:
    provider_quota_upsert(**VALID)
    before = list(ProviderQuota.objects.values())
    with pytest.raises(ValidationError) as excinfo:
        provider_quota_upsert(**{**VALID, field: value})
    assert field in excinfo.value.message_dict
    assert list(ProviderQuota.objects.values()) == before


def test_the_database_refuses_a_share_above_one_even_past_the_service() -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        ProviderQuota.objects.create(provider="direct", autopack_share=Decimal("1.5"))
    with pytest.raises(IntegrityError), transaction.atomic():
        ProviderQuota.objects.create(provider="direct", soft_limit=Decimal(0))
    assert not ProviderQuota.objects.filter(provider="direct").exists()
