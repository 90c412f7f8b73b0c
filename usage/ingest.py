"""Recording usage sent from outside Autopack's workers (POST /usage/events, runs.metering).

An agent that runs as its own script (`agent:planner`) reports its calls here, in batches, and
may send a batch again when it is not sure the first one arrived (a timeout, a restart): every
event carries the call's `call_id`, and a call_id already stored is not counted again. The
answer says which call_ids were new and which had been recorded before, so a client can tell a
replay from a first delivery.

A batch is all or nothing: the events are checked before this is called (runs.usage_ingest),
and they are stored in one transaction through the bulk import (services.record_usage_bulk:
one COPY and one INSERT … SELECT that rolls the new events up), so a batch that fails half-way
leaves no event of it behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from django.db import transaction

from .models import LOST_CALL_PREFIX, UsageEvent
from .services import UsageRecord, record_usage_bulk

# A reply to a batch that raced another one holding the same call_ids is worked out again
# (see usage_events_record); a third race in a row would take a client replaying as fast as it
# can, and is reported rather than looped on.
_ATTEMPTS = 3


class IngestRefused(ValueError):
    """A batch this service will not store as sent (nothing of it was stored)."""


class IngestRaced(RuntimeError):
    """Concurrent batches with the same call_ids kept racing this one; nothing was stored."""


@dataclass(frozen=True)
class IngestResult:
    """call_ids in the order the batch sent them."""

    new: list[str]  # stored by this batch
    already_recorded: list[str]  # stored before: counted once, by the earlier delivery


class _Raced(Exception):
    pass


def usage_events_record(*, records: Sequence[UsageRecord]) -> IngestResult:
    """Store a batch of outside usage, idempotently per call_id, all or nothing.

    Refuses (IngestRefused, nothing stored) a batch naming one call_id twice, since one call_id
    is one call and which of the two to keep would be a guess, and a call_id with the prefix of
    Autopack's own lost calls (usage.models.LOST_CALL_PREFIX).

    Which call_ids are new is read before the insert, in the insert's transaction. A batch
    racing another that holds some of the same call_ids waits on the unique index until the
    other commits, and then inserts fewer rows than it expected: it is rolled back and worked
    out again, and the second look sees the other's rows. So the answer is exact, and each
    call is counted once, whichever of the two arrives first.
    """
    call_ids = [r.call_id for r in records]
    seen: set[str] = set()
    for index, call_id in enumerate(call_ids):
        if call_id in seen:
            raise IngestRefused(f"events[{index}].call_id: {call_id!r} is in this batch twice")
        if call_id.startswith(LOST_CALL_PREFIX):
            raise IngestRefused(
                f"events[{index}].call_id: the prefix {LOST_CALL_PREFIX!r} is Autopack's own"
            )
        seen.add(call_id)
    if not records:
        return IngestResult(new=[], already_recorded=[])
    for _attempt in range(_ATTEMPTS):
        try:
            return _record_once(records, call_ids)
        except _Raced:
            continue
    raise IngestRaced(
        "other requests kept recording some of these call_ids at the same moment; "
        "nothing of this batch was stored: send it again"
    )


@transaction.atomic
def _record_once(records: Sequence[UsageRecord], call_ids: list[str]) -> IngestResult:
    stored = set(UsageEvent.objects.filter(call_id__in=call_ids).values_list("call_id", flat=True))
    fresh = [r for r in records if r.call_id not in stored]
    # One batch, one COPY: inside this atomic block record_usage_bulk's batches are savepoints.
    inserted = record_usage_bulk(records=fresh, batch_size=max(1, len(fresh))) if fresh else 0
    if inserted != len(fresh):
        raise _Raced
    return IngestResult(
        new=[r.call_id for r in fresh],
        already_recorded=[c for c in call_ids if c in stored],
    )
