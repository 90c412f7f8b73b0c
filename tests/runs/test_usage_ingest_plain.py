"""POST /usage/events checks plain events without DRF's per-field machinery
(runs.usage_ingest._plain_event, for the ingest figure of issue 17): whatever it accepts, the
serializer accepts with the same result, and what it leaves alone still goes to the serializer.
Compared event by event against UsageEventInput itself, on hand-picked edges and on generated
JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework import serializers

from runs.usage_ingest import MAX_ID, MAX_TOKENS, UsageEventInput, _plain_event, _plain_fields

BASE: dict[str, Any] = {
    "provider": "anthropic",
    "model": "claude-sonnet-5-5",
    "role": "agent:planner",
    "call_id": "call-1",
    "prompt_tokens": 1200,
    "completion_tokens": 300,
}


def _serializer(item: Any) -> tuple[str, Any]:
    try:
        return "ok", dict(UsageEventInput().run_validation(item))
    except serializers.ValidationError as exc:
        return "error", exc.detail


def _plain(item: Any) -> tuple[str, Any] | None:
    checker = UsageEventInput()
    attrs = _plain_event(item, _plain_fields(checker))
    if attrs is None:
        return None
    try:
        return "ok", checker.validate(attrs)
    except serializers.ValidationError as exc:
        return "error", exc.detail


def assert_same(item: Any) -> bool:
    """The plain path agrees with the serializer; True if it took the event at all."""
    plain = _plain(item)
    if plain is None:
        return False
    verdict = plain[0]
    expected = _serializer(item)
    if verdict == "ok":
        assert expected == plain, item
    else:
        # The view then asks the serializer, which words the error: it must refuse too.
        assert expected[0] == "error", item
    return True


def test_a_plain_event_takes_the_plain_path_with_the_serializers_result() -> None:
    full = {
        **BASE,
        "reported_model": "claude-sonnet-5-5-20261001",
        "run": 3,
        "phase": None,
        "cached_input_tokens": 200,
        "cache_write_tokens": 100,
        "cache_write_1h_tokens": 50,
        "reasoning_tokens": 20,
        "provider_request_id": "req_1",
        "time": "2026-12-06T10:00:00.123456+01:00",
        "unknown_field": "ignored, as DRF ignores it",
    }
    assert assert_same(BASE)
    assert assert_same(full)
    assert _serializer(full)[1]["time"] == datetime(2026, 12, 6, 9, 0, 0, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    "change",
    [
        {"provider": " anthropic"},  # trimmed by DRF
        {"model": "m" * 201},
        {"model": ""},
        {"model": "   "},
        {"model": 5},  # DRF makes a number a string
        {"model": "mod\x00el"},
        {"model": "mod\ud800el"},
        {"model": "modèle"},
        {"reported_model": ""},
        {"reported_model": "  "},
        {"reported_model": None},
        {"call_id": "c" * 255},
        {"call_id": "c" * 256},
        {"prompt_tokens": "1200"},
        {"prompt_tokens": 1200.0},
        {"prompt_tokens": True},
        {"prompt_tokens": -1},
        {"prompt_tokens": MAX_TOKENS},
        {"prompt_tokens": MAX_TOKENS + 1},
        {"prompt_tokens": None},
        {"cached_input_tokens": None},
        {"run": 0},
        {"run": MAX_ID},
        {"run": MAX_ID + 1},
        {"run": "7"},
        {"phase": None},
        {"time": "2026-12-06T10:00:00"},
        {"time": "2026-12-06T10:00:00Z"},
        {"time": "2026-13-45T10:00:00Z"},
        {"time": "yesterday"},
        {"time": ""},
        {"time": None},
        {"time": 1733480000},
        {"role": "builder"},
        {"role": "agent:"},
        {"role": "planner"},
        {"prompt_tokens": 10, "cached_input_tokens": 20},
        {"completion_tokens": 1, "reasoning_tokens": 2},
    ],
)
def test_an_edge_gives_what_the_serializer_gives(change: dict[str, Any]) -> None:
    assert_same({**BASE, **change})


@pytest.mark.parametrize("item", [[], "x", None, 5, {k: v for k, v in BASE.items() if k != "role"}])
def test_what_is_not_a_whole_event_is_left_to_the_serializer(item: Any) -> None:
    assert _plain(item) is None
    assert _serializer(item)[0] == "error"


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["", " ", "anthropic", "agent:x", "2026-12-06T10:00:00+00:00", "12"])
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from([*UsageEventInput().fields, "extra"]), json_scalars, max_size=16
    ),
    st.booleans(),
)
def test_generated_events_get_the_serializers_answer(fields: dict[str, Any], on_base: bool) -> None:
    assert_same({**BASE, **fields} if on_base else fields)
