"""The prose of docs/benchmarks.md that does not come from a measurement: what in the design
each figure rests on, and why a missed target is out of reach (shown only when it is missed)."""

from __future__ import annotations

from .core import Figure

DESIGN = """\
## What the figures rest on

- **select_model** reads no database on the hot path: the mapping and the providers' quota
  state are cached per process (`routing/router.py`), the mapping re-checked by its version
  every `AUTOPACK_ROUTER_REFRESH_SECONDS`, the quota state (from the hourly rollups) every
  `AUTOPACK_QUOTA_REFRESH_SECONDS`. When the primary model's provider is fine — nearly every
  call — the fallbacks' states are not even looked at.
- **record_usage** is one SQL statement on PostgreSQL: the event insert (`ON CONFLICT DO
  NOTHING` on the call id) feeds both hourly rollup upserts through data-modifying CTEs, and
  being a single statement it needs no `BEGIN`/`COMMIT` round trips. It used to be five round
  trips (BEGIN, insert, two upserts, COMMIT).
- **The bulk import** streams binary `COPY` into a temporary staging table and moves the rows
  with the same one statement (insert, skip duplicates, roll up), per batch of 5,000.
- **Usage summaries** read the hourly rollups, never the events; a calendar window starts and
  ends on the hour, so the table size does not enter the query at all.
- **The status API** reads the run's updated_at (one primary-key read), then answers from a
  cache keyed by it, kept `AUTOPACK_STATUS_CACHE_SECONDS` (1 s): a state or progress change is
  never served stale, while token and issue counts may lag by a second. The status itself no
  longer loads the run's plan and run_context (JSON that grows with the number of phases), and
  takes the current phase and tier names in the run's query.
- **Pages** annotate instead of querying per row, so a run of 1,000 phases costs the same
  queries as one of 10.
- **Workers** import the provider SDKs when they start (`runs/tasks.py`), so neither the first
  phase's latency nor the worker's memory after it carries a second of imports. And they keep
  their PostgreSQL connection from one task to the next (`CELERY_DB_REUSE_MAX` in settings,
  `close_old_connections` around each task in `autopack_site/celery.py`): Celery's Django
  fix-up otherwise closes every connection before and after each task, and a new connection
  cost each phase about 10 ms — a third of the per-phase overhead before the change.
- **Status load figure, throttling**: DRF's per-user throttle (`AUTOPACK_API_RATE`, 600/minute)
  is switched off in `bench/settings.py` for this figure. At its default it would answer 429
  within the first second of this load (64 API pollers sharing one token at one poll every 2 s
  already exceed 600/minute); with its rate lifted it costs more than the view, because DRF
  keeps every request of the window in one cached list that is copied on each request."""

MISSED = {
    "record_usage": """\
### Why record_usage is above 2× one INSERT

The floor writes one row; `record_usage` writes three — the event and its two hourly rollup
rows (per provider/model/role, and per run) — because the rollups are what keep every summary,
the quota state and the status API flat at 10M events. All three are now one statement and one
round trip (the query count is 1), so what is left above the floor is PostgreSQL's own work for
two upserts on hot rows plus about 0.1 ms of Python (pricing, the row, Django's cursor). Measured
in-process, the statement alone costs about 0.6 ms where the floor's INSERT costs about 0.3 ms.
Going under 2× would mean taking a rollup write off the hot path (filling the run rollup
asynchronously from the events, say), trading the summaries' exactness at any instant for it;
that is a decision for the owners of `usage`, not a benchmark's, so it is left as measured.""",
    "bulk_import": """\
### Bulk import around 50% of COPY

The import does everything the floor does (a binary COPY of the same rows, from Python) and
also prices each event, moves the rows from the staging table with `INSERT … ON CONFLICT DO
NOTHING` (row by row, where COPY inserts in batches) and updates both rollups from the inserted
rows. Measured in pieces on 100,000 events: pricing and building rows about 0.45 s, COPY into
the stage about 0.45 s, the insert with both rollups about 1.4 s (1.05 s of it the insert
itself), against about 1.3 s for the floor — so about 55–60% on a quiet machine, and a few
points either side of 50% when neighbours load the disk. Dropping `ON CONFLICT` (probing the
call ids first, then COPY straight into the events) would trade the idempotency guarantee
under concurrent imports for the last few points.""",
    "status_api": """\
### Why the status API stays below 60% of the constant view

The floor is a Django view that returns a constant body: no authentication, no database. The
status API must authenticate the token (DRF's `TokenAuthentication`: one query per request;
caching it would delay a revocation, which the API promises to honour at once) and check the
run's `updated_at` (one more primary-key read) before it can answer from the cache. Two database
round trips plus DRF's request handling cost several times the constant view's work on 2 cores
that also run PostgreSQL and the load client, so the ratio stays well below 60% however little
the status itself costs: in-process, one status request costs about 1.5 ms against 0.25 ms for
the constant view (it was 11 ms for a 1,000-phase run before the changes above). The p99 half
of the target is met by pollers at a realistic rate (64 of them, each polling every second,
twice as often as the dashboard). At 64 connections in a closed loop, Little's law fixes the
mean latency at 64 / throughput: a p99 under 30 ms there would need well over 2,000
requests/s from 2 sync workers on 2 cores — about what the constant view itself manages, and
its own p99 at saturation (shown above) is over 30 ms too.""",
    "orchestration": """\
### Why the per-phase overhead is above 15 ms

See "Per-phase overhead: where the rest goes" below: the remaining time is the phase's own
database work in `runs/services.py` and `runs/executor.py`.""",
    "worker_memory": """\
### Why the worker grows

The worker's memory after its first phases is dominated by what one-off work loads (the SDK
clients, price tables, Django's query compiler caches); the growth from there to the last
phase is what history would add, and is shown separately above.""",
    "usage_summary": """\
### Usage summary

A miss here is noise unless the large figure is several times the small one: the query reads
only the rollups of the week, whose size depends on hours × models, not on events.""",
}


PHASE_OVERHEAD = """\
## Per-phase overhead: where the rest goes

The floor (an empty Celery task chain) shows that Redis and Celery cost 1–2 ms per hop. The
rest is the phase's own database work between the previous phase's commit and the next
provider call: in-process that is about 13 statements and 3 commits (each a WAL flush on a
disk shared with other test suites), in `runs/services.py` and `runs/executor.py`, which others
were changing during this work and so were not touched here. Reusing the worker's database
connection (above) took the median from about 27 ms to about 15 ms. What would give it a
margin:

1. `services.phase_claim`: drop the separate `SELECT run_id` before the transaction (lock the
   phase with `select_related("run")` and `select_for_update(of=("self", "run"))`), and in
   `_new_attempt` set `attempt_count + 1` from the locked row instead of `UPDATE … F() + 1`
   followed by `refresh_from_db` (two round trips for one number).
2. `executor._attempts`: reuse the phase and run the claim already read instead of loading
   `Phase.objects.select_related("run", "tier")` again right after it.
3. `executor._route` → `services.phase_routing_record` runs in its own transaction (a commit
   before every provider call): record the builder's decision in the claim's transaction and
   the auditor's in `phase_builder_done`'s.
4. `run_notes_text` reads the run's notes before every builder call; the prompt could take
   them from a cache invalidated by `run_note_add`."""

NOTICED = """\
## Noticed along the way

- The admin page of a 1,000-phase run makes the same 6 queries as a 10-phase one but takes
  about a second to render: every phase is an inline row. A paginated or truncated phase
  inline (with a link to the filtered phase list) would keep it fast.
- A worker's memory grows by most of its figure during its first phases (SDK clients, price
  tables, Django's compiled queries) and by about 2–3 MB over the next ~1,000: the details
  show both.
- DRF's per-user throttle at its default (600/minute) refuses 64 API pollers that share one
  token at one poll every 2 s (1,920/minute); the HTML dashboard's polling is not a DRF view and
  is not throttled."""


def sections(figures: list[Figure]) -> list[str]:
    result = [DESIGN]
    missed = [f for f in figures if f.met is False and f.key in MISSED]
    if missed:
        result.append("## Targets missed")
        result += [MISSED[f.key] for f in missed]
    result += [PHASE_OVERHEAD, NOTICED]
    return result
