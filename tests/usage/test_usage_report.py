from __future__ import annotations

import io
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from usage.services import UsageRecord, provider_quota_upsert, record_usage

pytestmark = pytest.mark.django_db


def report(*args: str) -> str:
    out = io.StringIO()
    call_command("usage_report", *args, stdout=out)
    return out.getvalue()


def test_the_report_shows_providers_against_their_cap_and_models_with_cost(
    make_record: Callable[..., UsageRecord],
) -> None:
    provider_quota_upsert(
        provider="openai",
        daily_cap_tokens=100_000,
        weekly_cap_tokens=None,
        monthly_cap_tokens=None,
        autopack_share=0.5,
        soft_limit=0.8,
    )
    now = timezone.now()
    record_usage(
        record=make_record(
            prompt=12_000,
            completion=3_000,
            created_at=now,
            reported_model="gpt-5-mini-2025-08-07",
        )
    )
    record_usage(
        record=make_record(
            model="mystery-model", prompt=1, completion=1, created_at=now, estimated=True
        )
    )
    text = report("--period", "day")
    lines = text.splitlines()
    assert lines[0].startswith("Usage for the day ")
    openai = next(line for line in lines if line.startswith("openai "))
    # In, out, outside tools' in + out (none), the cap, its percent and what it counts.
    assert openai.split() == ["openai", "12,001", "3,001", "0", "50,000", "30.0%", "Autopack's"]
    model = next(line for line in lines if line.startswith("openai/gpt-5-mini"))
    # gpt-5-mini: $0.25 / MTok in, $2 / MTok out
    # The catalogue model, with the snapshot the provider said answered.
    assert model.split() == [
        "openai/gpt-5-mini",
        "(gpt-5-mini-2025-08-07)",
        "12,000",
        "3,000",
        "$0.0090",
        "1",
    ]
    mystery = next(line for line in lines if line.startswith("openai/mystery-model"))
    assert mystery.split()[-4:] == ["unknown", "1", "(1", "estimated)"]


def test_the_report_says_so_when_a_period_has_no_usage() -> None:
    text = report("--period", "month")
    assert "Models: no usage in this period" in text
    assert datetime.now(tz=UTC).strftime("%Y-%m-01 00:00") in text


def test_an_unknown_period_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="--period must be one of day, week, month"):
        report("--period", "year")
