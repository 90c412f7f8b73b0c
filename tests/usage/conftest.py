from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from usage.prices import register_prices_id
from usage.services import UsageRecord
from usage.types import TokenUsage

# A Wednesday, mid-month, mid-day: far from every period boundary unless a test moves it.
NOW = datetime(2025, 3, 12, 15, 30, tzinfo=UTC)


@pytest.fixture(autouse=True, scope="session")
def _glm_is_priced_as_zai() -> None:
    # What routing registers from config/models.yaml (GLM's API is Z.ai's); registered here so
    # these tests do not depend on routing having loaded its configuration.
    register_prices_id("glm", "zai")


@pytest.fixture
def make_record() -> Callable[..., UsageRecord]:
    def make(
        *,
        prompt: int = 1000,
        completion: int = 100,
        cached: int = 0,
        cache_write: int = 0,
        cache_write_1h: int = 0,
        reasoning: int = 0,
        **fields: Any,
    ) -> UsageRecord:
        fields.setdefault("call_id", uuid.uuid4().hex)
        fields.setdefault("provider", "openai")
        fields.setdefault("model", "gpt-5-mini")
        fields.setdefault("role", "builder")
        fields.setdefault("created_at", NOW)
        usage = TokenUsage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_input_tokens=cached,
            cache_write_tokens=cache_write,
            reasoning_tokens=reasoning,
            cache_write_1h_tokens=cache_write_1h,
        )
        return UsageRecord(usage=usage, **fields)

    return make
