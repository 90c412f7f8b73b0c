"""record_usage stores a pending event; usage_fold adds pending events to the rollups. Every
summary counts each event exactly once before, during and after its fold."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection

from usage.models import RunUsageRollup, UsageEvent, UsageRollup
from usage.selectors import get_usage_summary, run_usage_totals, tokens_per_day
from usage.services import UsageRecord, record_usage, record_usage_bulk, usage_fold

from .conftest import NOW

MakeRecord = Callable[..., UsageRecord]


def every_summary() -> dict[str, Any]:
    window = (NOW - timedelta(days=1), NOW + timedelta(days=1))
    return {
        "total": get_usage_summary(time_window=window, group_by=[]),
        "by_run": get_usage_summary(time_window=window, group_by=["run", "provider"]),
        "by_model": get_usage_summary(time_window=window, group_by=["provider", "model", "role"]),
        # an unaligned window: partial hours from the events, the rest from rollups + pending
        "unaligned": get_usage_summary(
            time_window=(NOW - timedelta(hours=5, minutes=17), NOW + timedelta(minutes=43)),
            group_by=["provider"],
        ),
        "run_1": run_usage_totals(run_id=1),
        "days": tokens_per_day(days=3, now=NOW + timedelta(days=1)),
    }


def record_some(make_record: MakeRecord, n: int) -> None:
    for i in range(n):
        record_usage(
            record=make_record(
                provider=("openai", "anthropic")[i % 2],
                model=("gpt-5", "claude-sonnet-4-5")[i % 2],
                role=("builder", "auditor")[i % 3 % 2],
                run_id=(1, 2, None)[i % 3],
                prompt=100 + i,
                completion=10 + i,
                created_at=NOW - timedelta(minutes=37 * i),
            )
        )


@pytest.mark.django_db
def test_summaries_are_the_same_before_and_after_the_fold(make_record: MakeRecord) -> None:
    record_some(make_record, 30)
    assert UsageRollup.objects.count() == 0  # nothing folded yet...
    before = every_summary()
    assert before["total"][0]["calls"] == 30  # ...and every summary counts it all
    assert before["run_1"]["calls"] == 10
    assert usage_fold() == 30
    assert not UsageEvent.objects.filter(rolled_up=False).exists()
    assert UsageRollup.objects.exists() and RunUsageRollup.objects.exists()
    assert every_summary() == before
    assert usage_fold() == 0  # nothing left: a second fold changes nothing
    assert every_summary() == before


@pytest.mark.django_db
def test_a_fold_goes_through_the_backlog_in_batches_oldest_first(make_record: MakeRecord) -> None:
    record_some(make_record, 10)
    assert usage_fold(batch_size=3, max_batches=2) == 6
    pending = UsageEvent.objects.filter(rolled_up=False)
    assert pending.count() == 4
    oldest_pending = min(pending.values_list("created_at", flat=True))
    newest_folded = max(
        UsageEvent.objects.filter(rolled_up=True).values_list("created_at", flat=True)
    )
    assert newest_folded < oldest_pending  # every folded event is older than every pending one
    assert usage_fold(batch_size=3) == 4


@pytest.mark.django_db
def test_imported_events_arrive_folded_and_single_ones_pending(make_record: MakeRecord) -> None:
    record_usage_bulk(records=[make_record(call_id=f"bulk-{i}") for i in range(5)])
    record_usage(record=make_record(call_id="single"))
    assert list(UsageEvent.objects.filter(rolled_up=False).values_list("call_id", flat=True)) == [
        "single"
    ]
    assert get_usage_summary(time_window="day", group_by=[], now=NOW)[0]["calls"] == 6


@pytest.mark.django_db(transaction=True)
def test_a_summary_taken_while_folds_run_counts_each_event_once(make_record: MakeRecord) -> None:
    # Folds commit between any two statements a summary could make: a summary that read the
    # rollups and the pending events separately would see some events twice or not at all.
    record_some(make_record, 300)
    expected = every_summary()
    done = threading.Event()
    errors: list[BaseException] = []

    def fold_slowly() -> None:
        try:
            while usage_fold(batch_size=7, max_batches=1):
                time.sleep(0.001)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            connection.close()
            done.set()

    folder = threading.Thread(target=fold_slowly)
    folder.start()
    checks = 0
    while not done.is_set():
        assert every_summary() == expected
        checks += 1
    folder.join()
    assert not errors
    assert every_summary() == expected
    assert checks > 5  # the summaries did run while the folds did
    assert not UsageEvent.objects.filter(rolled_up=False).exists()
