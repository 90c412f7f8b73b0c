"""Calls in flight and lost calls: a call is recorded before it is sent; its answer closes it in
the statement that meters it; one never answered becomes an estimated lost call when its
attempt is abandoned, counted once, in every summary and against the caps."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from usage.models import InFlightCall, InvalidRoleError, UsageEvent
from usage.selectors import (
    get_provider_usage_summary,
    lost_calls,
    phase_usage_totals,
    run_usage_totals,
)
from usage.services import (
    UsageRecord,
    estimate_prompt_tokens,
    in_flight_call_close,
    in_flight_call_open,
    in_flight_calls_lose,
    provider_quota_upsert,
    record_usage,
    usage_fold,
)

pytestmark = pytest.mark.django_db
MakeRecord = Callable[..., UsageRecord]

SYSTEM = "You are the builder."
PROMPT = "Autopack-Role: builder\nPhase 1: a step\n" + "x" * 4001


def open_call(key: str, *, phase_id: int = 70, **fields: Any) -> None:
    fields.setdefault("provider", "anthropic")
    fields.setdefault("model", "claude-haiku-4-5")
    fields.setdefault("role", "builder")
    in_flight_call_open(
        call_key=key,
        system=SYSTEM,
        prompt=PROMPT,
        run_id=7,
        phase_id=phase_id,
        attempt=1,
        **fields,
    )


def anthropic_today() -> dict[str, Any]:
    (row,) = [r for r in get_provider_usage_summary(period="day") if r["provider"] == "anthropic"]
    return row


def test_the_estimate_is_the_prompts_characters_over_four_rounded_up() -> None:
    assert estimate_prompt_tokens(system="", prompt="abcd") == 1
    assert estimate_prompt_tokens(system="ab", prompt="abc") == 2
    assert estimate_prompt_tokens(system=SYSTEM, prompt=PROMPT) == math.ceil(
        (len(SYSTEM) + len(PROMPT)) / 4
    )


def test_an_answer_closes_its_call_in_the_one_statement_that_meters_it(
    make_record: MakeRecord,
) -> None:
    open_call("tok:1:builder")
    assert InFlightCall.objects.get().estimated_prompt_tokens == estimate_prompt_tokens(
        system=SYSTEM, prompt=PROMPT
    )
    record = make_record(
        call_id="anthropic:req-1", in_flight_key="tok:1:builder", run_id=7, phase_id=70
    )
    with CaptureQueriesContext(connection) as ctx:
        event, created = record_usage(record=record)
    assert created is True
    assert len(ctx.captured_queries) == 1
    assert not InFlightCall.objects.exists()
    event.refresh_from_db()
    assert (event.estimated, event.prompt_tokens) == (False, 1000)
    # Nothing is left to lose: the phase handed on later meters no lost call.
    assert in_flight_calls_lose(phase_id=70) == []
    assert UsageEvent.objects.count() == 1


def test_a_repeated_answer_still_meters_once_and_leaves_the_call_closed(
    make_record: MakeRecord,
) -> None:
    open_call("tok:1:builder")
    record = make_record(call_id="anthropic:req-1", in_flight_key="tok:1:builder")
    first, _ = record_usage(record=record)
    again, created = record_usage(record=record)
    assert (again.pk, created) == (first.pk, False)
    assert not InFlightCall.objects.exists()
    assert UsageEvent.objects.count() == 1


def test_a_call_closed_after_a_provider_error_meters_nothing_now_or_when_abandoned() -> None:
    open_call("tok:1:builder")
    in_flight_call_close(call_key="tok:1:builder")
    in_flight_call_close(call_key="tok:1:builder")  # closing twice is harmless
    assert not InFlightCall.objects.exists()
    assert in_flight_calls_lose(phase_id=70) == []
    assert not UsageEvent.objects.exists()


def test_a_call_still_in_flight_when_its_attempt_is_abandoned_is_one_estimated_lost_call() -> None:
    open_call("tok:1:builder")
    started = InFlightCall.objects.get()

    (lost,) = in_flight_calls_lose(phase_id=70)

    lost.refresh_from_db()
    estimate = math.ceil((len(SYSTEM) + len(PROMPT)) / 4)
    assert lost.estimated is True
    assert (lost.prompt_tokens, lost.completion_tokens, lost.cached_input_tokens) == (
        estimate,
        0,
        0,
    )
    assert (lost.provider, lost.model, lost.role, lost.run_id, lost.phase_id) == (
        "anthropic",
        "claude-haiku-4-5",
        "builder",
        7,
        70,
    )
    assert lost.call_id == "lost:tok:1:builder" and lost.provider_request_id == ""
    assert lost.created_at == started.started_at  # billed when it was sent
    assert lost.cost_usd is not None and lost.cost_usd > 0  # priced like any input
    # Nothing answered, so no model was reported; the 1-hour writes are none either.
    assert (lost.reported_model, lost.cache_write_1h_tokens, lost.is_lost_call) == ("", 0, True)
    assert not InFlightCall.objects.exists()


def test_losing_a_phases_calls_twice_counts_each_call_once() -> None:
    open_call("tok:1:builder")
    open_call("tok:1:auditor0", role="auditor")
    assert len(in_flight_calls_lose(phase_id=70)) == 2
    assert in_flight_calls_lose(phase_id=70) == []  # the sweeper running again
    assert UsageEvent.objects.filter(estimated=True).count() == 2
    assert usage_fold() == 2
    assert in_flight_calls_lose(phase_id=70) == []
    assert run_usage_totals(run_id=7)["calls"] == 2


def test_losing_a_phases_calls_leaves_other_phases_calls_in_flight() -> None:
    open_call("a:1:builder", phase_id=70)
    open_call("b:1:builder", phase_id=71)
    in_flight_calls_lose(phase_id=70)
    assert list(InFlightCall.objects.values_list("call_key", flat=True)) == ["b:1:builder"]
    assert list(UsageEvent.objects.values_list("phase_id", flat=True)) == [70]


@pytest.mark.parametrize("role", ["planner", "agent:"])
def test_a_call_with_a_bad_role_is_refused_naming_it_before_it_is_opened(role: str) -> None:
    with pytest.raises(InvalidRoleError, match=f"invalid role '{role}'"):
        open_call("tok:1:builder", role=role)
    assert not InFlightCall.objects.exists()


def test_a_call_opened_twice_under_one_key_is_one_call_in_flight() -> None:
    open_call("tok:1:builder")
    open_call("tok:1:builder")
    assert InFlightCall.objects.count() == 1


def test_a_lost_call_counts_in_the_run_phase_and_provider_summaries_and_against_the_cap(
    make_record: MakeRecord,
) -> None:
    estimate = estimate_prompt_tokens(system=SYSTEM, prompt=PROMPT)
    provider_quota_upsert(
        provider="anthropic",
        daily_cap_tokens=estimate + 100,
        weekly_cap_tokens=None,
        monthly_cap_tokens=None,
        autopack_share=1,
        soft_limit="0.5",
    )
    record_usage(
        record=make_record(provider="anthropic", prompt=60, completion=40, created_at=None)
    )
    open_call("tok:1:builder")
    day = anthropic_today()
    assert (day["total_tokens"], day["over_hard_limit"]) == (100, False)

    in_flight_calls_lose(phase_id=70)

    for _folded in (False, True):  # before and after beat's fold
        day = anthropic_today()
        assert (day["tokens_in"], day["tokens_out"]) == (60 + estimate, 40)
        assert day["over_hard_limit"] is True
        assert run_usage_totals(run_id=7)["tokens_in"] == estimate
        assert run_usage_totals(run_id=7)["estimated_calls"] == 1
        (row,) = phase_usage_totals(phase_ids=[70])
        assert (row["tokens_in"], row["tokens_out"], row["calls"]) == (estimate, 0, 1)
        assert row["estimated_calls"] == 1
        usage_fold()
    assert [c.call_id for c in lost_calls(run_id=7)] == ["lost:tok:1:builder"]
    assert [c.call_id for c in lost_calls(run_id=7, phase_id=71)] == []


def test_a_cut_stream_is_an_estimated_event_beside_the_lost_calls_and_counts_everywhere(
    make_record: MakeRecord,
) -> None:
    # What the provider reported before the cut (Anthropic's message_start), recorded as
    # estimated by the provider client; then the retry's full answer.
    cut = make_record(
        call_id="anthropic:msg_cut",
        provider="anthropic",
        model="claude-sonnet-4-5",
        reported_model="claude-sonnet-4-5-20250929",
        prompt=3_000,
        completion=1,
        cache_write=2_000,
        cache_write_1h=2_000,
        run_id=7,
        phase_id=70,
        estimated=True,
        created_at=None,
    )
    retry = make_record(
        call_id="anthropic:msg_ok",
        provider="anthropic",
        model="claude-sonnet-4-5",
        reported_model="claude-sonnet-4-5-20250929",
        prompt=3_000,
        completion=500,
        cached=2_000,
        run_id=7,
        phase_id=70,
        created_at=None,
    )
    record_usage(record=cut)
    record_usage(record=retry)
    open_call("tok:1:auditor0", role="auditor")
    in_flight_calls_lose(phase_id=70)
    for _folded in (False, True):
        totals = run_usage_totals(run_id=7)
        estimate = estimate_prompt_tokens(system=SYSTEM, prompt=PROMPT)
        # Each attempt counts once, the cut one included.
        assert (totals["calls"], totals["estimated_calls"]) == (3, 2)
        assert totals["tokens_in"] == 6_000 + estimate
        assert anthropic_today()["tokens_out"] == 501
        usage_fold()
    shown = lost_calls(run_id=7)
    assert [(e.call_id, e.is_lost_call) for e in shown] == [
        ("anthropic:msg_cut", False),
        ("lost:tok:1:auditor0", True),
    ]
    assert shown[0].cache_write_1h_tokens == 2_000
    assert shown[0].cost_usd is not None and shown[0].cost_usd > 0
