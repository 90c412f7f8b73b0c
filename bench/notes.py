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
- **record_usage** is one plain insert on PostgreSQL (`ON CONFLICT DO NOTHING` on the call
  id; a single statement needs no `BEGIN`/`COMMIT` round trips). It no longer touches the
  hourly rollups: the event is stored pending (`rolled_up = false`, in a small partial index)
  and `usage_fold`, run by beat every `AUTOPACK_USAGE_FOLD_SECONDS`, adds thousands of pending
  events to both rollups and flips their flag in one statement. Upserting two hot rollup rows
  on every call had made it 2.5× the floor; it once was five round trips (BEGIN, insert, two
  upserts, COMMIT).
- **The bulk import** streams binary `COPY` into a temporary staging table and moves the rows
  with one statement (insert, skip duplicates, roll up, store as folded), per batch of 5,000.
- **Ingest over HTTP** (`POST /usage/events`, `runs/usage_ingest.py`) checks a batch whole
  before storing it: each event's fields, then the batch against the database and the router
  in one query per kind (runs, phases), then one transaction (`usage/ingest.py`: one `SELECT`
  of the call ids already stored, then the bulk import's COPY and statement). An event in the
  plain shape clients send (strings that need no trimming, numbers as numbers, times with
  their offset) is checked inline, with the same limits read from the serializer's fields;
  anything else goes through the DRF serializer, which words the errors. DRF's per-field
  machinery had cost about 60 µs an event: checking took about 34 ms of a 500-event batch's
  84 ms in the view (in process, on this machine), and about 12 of 43 since; the figure was
  near 7,000 events/s with it. The figure's server runs `bench/settings.py`, whose per-user
  rate (`AUTOPACK_API_RATE`; its default, 600/minute, allows ten batches a second) is lifted as
  for the status figure; each pass counts only if every answer is a 201 and the events and
  rollups hold each event exactly once.
- **Usage summaries** read the hourly rollups plus the events not folded yet, in one
  `UNION ALL` statement (so a fold committing meanwhile cannot count an event twice or not at
  all); a calendar window starts and ends on the hour, and the pending events are a few
  seconds' worth, so the table size does not enter the query at all.
- **Cap windows** (`usage.selectors.window_usage`): the usage of every provider × window is
  one `UNION ALL` statement of ungrouped indexed range reads, per window the whole hours from
  the hourly rollups, the whole minutes of the partial first and last hours from a per-minute,
  per-provider rollup (written by the same statement as the hourly ones), the sub-minute edges
  from the events (index on created_at, provider; at most a minute at each end) and the events
  not folded yet; its cost grows with windows and hours, not with events. Reading the partial
  hours from the events had cost ~14k events an hour per provider at 10M events. Reading the
  windows and quotas adds two statements.
- **The status API** answers a token poll from memory, with no query. Each web process keeps
  token rows and statuses and `LISTEN`s on its own PostgreSQL session; triggers notify every
  change of a run, token or user, and the process applies what arrived (a non-blocking socket
  read) before it serves from memory, so a revoked token or a paused run is seen by the next
  request (`runs/pollcache.py`; token and issue counts may lag `AUTOPACK_STATUS_CACHE_SECONDS`,
  1 s). Under this load one database round trip cost a sync worker about as much as all of
  Django and DRF: the poll used to make three (Django's connection health check, DRF's ORM
  token lookup — 0.4 ms of Python by itself — and the run's `updated_at`). Without
  notifications (SQLite, or while that session is down) it makes one: the token and the
  run's `updated_at` in a single prebuilt statement, which also stands in for the health
  check. The status itself does not load the run's plan and run_context (JSON that grows with
  the number of phases), and takes the current phase and tier names in the run's query. The
  target's p99 is read at 64 pollers each polling every second (twice the dashboard's rate);
  in a closed loop of 64 connections, Little's law puts the mean latency at 64 / throughput,
  and even the constant view's p99 is above 30 ms on these two cores (see the details).
- **Pages** annotate instead of querying per row, so a run of 1,000 phases costs the same
  queries as one of 10.
- **Workers** import the provider SDKs and load genai-prices' data (about 3.5 MB) when they
  start (`runs/tasks.py`), so neither the first phase's latency nor the worker's memory after
  it carries a second of imports. And they keep
  their PostgreSQL connection from one task to the next (`CELERY_DB_REUSE_MAX` in settings,
  `close_old_connections` around each task in `autopack_site/celery.py`): Celery's Django
  fix-up otherwise closes every connection before and after each task, and a new connection
  cost each phase about 10 ms — a third of the per-phase overhead before the change.
- **The claim of a phase** — between one phase's commit and the next phase's first provider
  call — is one statement on PostgreSQL (`runs/claiming.py`): it locks the run, moves the
  phase to building and inserts the attempt and its CLAIMED event, and PostgreSQL's re-check
  of an UPDATE after a lock wait keeps it as safe as the ORM's claim, which still decides
  every other case. The builder's model is routed and recorded in the same transaction, the
  claimed phase (with its run and tier) is handed to the executor instead of read again, and
  the notes to the supervisor are read only when the run has any (`Run.note_count`). Each ORM
  statement costs about 0.7 ms of a worker's time on this machine, and the claim had eight.
- **Per-phase work does not grow with the run**: locks of the run leave out its plan (JSON of
  every phase, about a millisecond per lock on a 200-phase run), and partial indexes answer
  "is a phase still in flight?" and "which phase is next?" without walking the finished ones.
- **Status load figure, throttling**: the per-user throttle (`AUTOPACK_API_RATE`) counts every
  poll of the figure, with its rate lifted far above the load in `bench/settings.py` (at its
  default, 600/minute, it would answer 429 within the first second). It is one cache increment
  per window of the rate's period (`runs/permissions.py`); DRF's own throttle copied a list of
  every request of the period on each request, which at a lifted rate cost more than the
  view.
- **Apply and commit** (`runs/workspace.py`) validates the whole change in memory, writes each
  file once (a temporary file renamed into place), and then starts six short git processes
  (add with an explicit path list, commit, rev-parse, update-ref for the attempt's ref,
  numstat, the diff read only up to its bound), each with a fixed environment and no hooks;
  `gc.auto=0` keeps a repack out of the timed path. The floor starts two (`git apply
  --index`, `git commit`) and keeps nothing for the phase; a git process costs 3–5 ms here."""

MISSED = {
    "record_usage": """\
### record_usage above 2× one INSERT

What is left above the floor is Python: pricing the call (genai-prices, about 5 µs), building
the row and Django's cursor, plus the pending-index entry. The statement is the floor's insert
with `ON CONFLICT DO NOTHING RETURNING id`; a miss on a busy machine shows in the p95s above.""",
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
    "ingest": """\
### Ingest over HTTP below 5,000 events/s

Look first at the per-batch latency in the details and at the floor: the two workers, their
PostgreSQL sessions and the load client share two cores, so a neighbour's load shows in both.
Of a batch's time in the view, about a third is checking (inline for plain events; an event
with padded strings, numbers as strings or the like goes through DRF's serializer at several
times the cost) and the rest storing it as record_usage_bulk does.""",
    "status_api": """\
### The status API below 60% of the constant view

A token poll makes no query while the notification session is up; if this figure is missed,
look in `test-artifacts/bench/` for "lost the notification connection" (every poll then reads
the database once) before anything else. The p99 half of the target is for pollers at a
realistic rate (64 of them, each polling every second, twice as often as the dashboard); at 64
connections in a closed loop Little's law fixes the mean latency at 64 / throughput.""",
    "orchestration": """\
### Why the per-phase overhead is above 15 ms

Since issue 13 a phase does real work on its run's git tree before its builder call, and the
figure counts it: the claim finds the run's tree (one `git rev-parse`; it was seven git
processes until 2026-12-06, when the figure was 43.8 ms), every attempt
restores the tree to its savepoint (`git reset --hard`, `git clean`, and the savepoint ref
when it moved) and lists its files for the prompt (`git ls-files`). That is five or six git
processes at 3–5 ms each on this machine, most of "claimed → first provider call", and it is
what makes a worker killed mid-apply leave nothing behind, so it stays. The engine's own part
is "commit → claimed" plus a few ms of prompt and routing, about what it was before the git
work (10–11 ms); the 15 ms target was set when a phase changed no files. The git work's own
cost against plain git is the apply-and-commit figure above.""",
    "worker_memory": """\
### Why the worker grows

The worker's memory after its first phases is dominated by what one-off work loads (the SDK
clients, price tables, Django's query compiler caches); the growth from there to the last
phase is what history would add, and is shown separately above.""",
    "window_usage": """\
### Cap windows

The statement reads, per window, the rollups of its whole hours, at most 2 × 59 minute rows and
two sub-minute ranges of events, so it grows with windows × hours (a week is 168 hours × the
provider's models), not with events: a large figure several times the small one would be a
regression, less than that is noise at these few milliseconds; a flat figure above 20 ms is the
cost of those rollup rows.""",
    "usage_summary": """\
### Usage summary

A miss here is noise unless the large figure is several times the small one: the query reads
only the rollups of the week, whose size depends on hours × models, not on events.""",
}


PHASE_OVERHEAD = """\
## Per-phase overhead: where the rest goes

The floor (an empty Celery task chain) is what Redis and Celery cost per hop: sending the
task (Celery's `send_task` alone is about 1.5 ms here), the worker acknowledging the previous
message and fetching the next. On top of that, between one phase's commit and the next
provider call, a phase pays for the end of the verdict's transaction (queuing the next phase,
COMMIT), the claim's transaction (BEGIN, Django's connection health check, the claim
statement, the builder's routing decision, COMMIT), starting its lease thread, building the
prompt and the SDK's own request handling. History: reusing the worker's database connection
took the median from about 27 ms to about 15 ms; on a slower day of this machine that code
measured 17.6 ms, and the one-statement claim with the changes above brought it to 10–11 ms
(this page's figure is from one full run)."""

NOTICED = """\
## Noticed along the way

- The admin page of a run lists at most 50 of its phases (from a few before the current one),
  with a link to the run's phases in the phase list: rendering every phase as an inline row
  took over a second for a 1,000-phase run.
- The simulated provider stalled 40 ms on kept-alive connections (Nagle's algorithm against
  the client's delayed ACK, the headers and body being separate writes); it sets TCP_NODELAY
  now, as a real API's server would not stall either.
- A worker's memory grows by most of its figure during its first phases (SDK clients, price
  tables, Django's compiled queries) and by about 2–3 MB over the next ~1,000: the details
  show both.
- The per-user throttle at its default (600/minute) refuses 64 API pollers that share one
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
