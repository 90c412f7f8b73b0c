from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from usage.services import UsageRecord
from usage.types import TokenUsage

# A Wednesday, mid-month, mid-day: far from every period boundary unless a test moves it.
NOW = datetime(2025, 3, 12, 15, 30, tzinfo=UTC)


@pytest.fixture
def make_record() -> Callable[..., UsageRecord]:
    def make(
        *,
        prompt: int = 1000,
        completion: int = 100,
        cached: int = 0,
        cache_write: int = 0,
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
        )
        return UsageRecord(usage=usage, **fields)

    return make
