"""The prose of docs/benchmarks.md that does not come from a measurement: what in the design
each figure rests on, and why a missed target is out of reach (shown only when it is missed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .core import Figure

# The request path before issue 18 (runs/pollcache.py, runs/authentication.py, the claim of
# runs/claiming.py and runs/rawrows.py, the triggers of runs 0002), measured by this suite on this
# machine just before that code was removed; the plain design's figures come from each run.
BEFORE = Path(__file__).with_name("before_plain.json")

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
  1 s). Under this load a database round trip costs a sync worker about as much as all of
  Django and DRF: the plain design (DRF's token lookup, the run's `updated_at` read by the
  ORM, Django's health check) makes three and is measured beside it (details). Without
  notifications (SQLite, or while that session is down) a poll makes one statement besides
  Django's health check: the token's user and the run's `updated_at` (`Manager.raw()`,
  `runs/authentication.py`), the status then cached under that `updated_at`. The status itself
  does not load the run's plan and run_context (JSON that grows with the number of phases),
  and takes the current phase and tier names in the run's query. The target's p99 is read at
  64 pollers each polling every second (twice the dashboard's rate); in a closed loop of 64
  connections, Little's law puts the mean latency at 64 / throughput, and even the constant
  view's p99 is above 30 ms on these two cores.
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
  call — is the ORM's: lock the run (the lock order everywhere), read the phase with its tier,
  move it to building, insert the attempt and its CLAIMED event (`services.phase_claim`). The
  builder's model is routed and recorded in the same transaction, the claimed phase (with its
  run and tier) is handed to the executor instead of read again, and the notes to the
  supervisor are read only when the run has any (`Run.note_count`). A one-statement claim
  measured the same within this machine's noise once the git work was cut, and was removed
  (the section below).
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
  --index`, `git commit`) and keeps nothing for the phase; a git process costs 3–5 ms here.
- **Many runs at once** share the workers fairly because a run never has more than one phase
  queued: its next phase is sent only when the previous one commits, to the back of the one
  queue, and a worker reserves no more messages than it has pool processes
  (`CELERY_WORKER_PREFETCH_MULTIPLIER = 1`, late acks), so the queue serves the runs in
  turn. A phase is done once because its claim is a conditional UPDATE on the phase's
  dispatch token (a second delivery finds it claimed and exits); the figure checks that after
  the end from three sides: attempts, CLAIMED events and the simulated provider's log of
  model calls. Its workers are started with the README's command (`--concurrency 2`,
  prefork), its floor's the same way. The floor shows the broker is not what limits the rate:
  a phase's own work is (routing, prompts, two SDK calls over HTTP, its git work), on the
  cores the workers share."""

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
### The status API's target

A token poll makes no query while the notification session is up; if the throughput half is
missed, look in `test-artifacts/bench/` for "lost the notification connection" (every poll
then reads the database once) before anything else, then at the plain design's figure in the
details (if both dropped, the machine was busy). The p99 half is for pollers at a realistic
rate (64 of them, each polling every second, twice as often as the dashboard): about 60 polls
a second, of which each web process recomputes the status once per
`AUTOPACK_STATUS_CACHE_SECONDS` (1 s) — 2 of 60, over 1% — so the p99 is the recompute's
latency: about 12 ms of run_status on an idle machine (its ORM statements and the serializer),
30 ms and more with the load client and the other worker on the same two cores. It measured
26.9 to 40 ms across issue 18's runs, before and after its changes alike. At 64 connections in
a closed loop Little's law fixes the mean latency at 64 / throughput.""",
    "orchestration": """\
### Why the per-phase overhead is above 15 ms

Since issue 13 a phase does real work on its run's git tree before its builder call, and the
figure counts it: the claim finds the run's tree (one `git rev-parse`), and every attempt makes
sure the tree is exactly its savepoint — one `git status` that leaves a clean tree alone, with
`git reset --hard` and `git clean` only when it lists something — while the commit's file list
for the prompt is read alongside (`git ls-tree`). Two git processes in a row at 2–3 ms each on
this machine; it was five in a row until issue 18 (rev-parse twice, reset, clean, ls-files),
and that is what makes a worker killed mid-apply leave nothing behind, so it stays. The rest
is the claim's transaction, the routing decision and the SDK's own request handling; the
15 ms target was set when a phase changed no files. The git work's own cost against plain git
is the apply-and-commit figure above.""",
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
    "many_runs": """\
### Many runs at once

A starved run or a phase done twice is a defect, not noise: the details name the breach (which
phases, how often). The workers' logs are `bench-many-*.log` in the log folder
(`test-artifacts/bench/`).""",
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
statement, the builder's routing decision, COMMIT), starting its lease thread, restoring the
run's tree and listing its files, building the prompt and the SDK's own request handling.
History: reusing the worker's database connection took the median from about 27 ms to about
15 ms (before the git work of issue 13); the one-statement claim that followed saves about
3 ms more (issue 18 measured the ORM's claim against it: the section above)."""

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
  is not throttled.
- The many-runs figure, the first to start workers as the README does (prefork pool), found
  pool processes that hung on their first phase: the pool forked while the worker's
  provider-report thread held the router's lock, and a child inherited it held (3 of 8 in one
  run; 3 runs never started). The router now gives each forked child a fresh lock
  (`os.register_at_fork` in `routing/router.py`). The bench's empty-chain app no longer makes
  itself Celery's current app, which had sent the next figure's phases to its queue."""


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def plain_design(figures: list[Figure]) -> str:
    """The table of issue 18: for each piece of the old request path, its figure before (from
    BEFORE), the plain design's, and what is kept now (this run)."""
    before = json.loads(BEFORE.read_text())
    old = {f["key"]: f for f in before["figures"]}
    plain = before["plain"]
    new = {f.key: f for f in figures}
    status, claim = new.get("status_api"), new.get("orchestration")
    o_status, o_claim = old["status_api"], old["orchestration"]
    s_extra = status.extra if status else {}
    c_extra = claim.extra if claim else {}

    def status_text(rps: Any, ratio: Any, p99: Any, floor: Any) -> str:
        return (
            f"{_fmt(rps, ',.0f')} req/s, {_fmt(ratio, '.0%')} of the floor "
            f"({_fmt(floor, ',.0f')}); p99 at 64 pollers {_fmt(p99, '.1f')} ms"
        )

    def claim_text(value: Any, hop: Any, floor: Any) -> str:
        return (
            f"{_fmt(value, '.1f')} ms median (commit → claimed {_fmt(hop, '.1f')} ms; "
            f"floor {_fmt(floor, '.1f')} ms)"
        )

    ps, one = plain["status_api"], before["one_statement_claim"]
    rows = [
        ("piece", f"before ({before['commit']})", "plain design", "now (this run)"),
        ("---", "---", "---", "---"),
        (
            "the status poll from memory, kept exact by `LISTEN`/`NOTIFY` "
            "(`runs/pollcache.py`, the triggers of runs 0002)",
            status_text(
                o_status["value"],
                o_status["extra"]["ratio"],
                o_status["extra"]["p99_poll_ms"],
                o_status["floor"],
            ),
            "DRF's `TokenAuthentication`, the status cached by the run's `updated_at` read "
            "by the ORM (this run, bench/urls.py): "
            + status_text(
                s_extra.get("plain_rps"),
                s_extra.get("plain_ratio"),
                s_extra.get("plain_p99_poll_ms"),
                status.floor if status else None,
            ),
            "**kept** (the plain design misses both halves of the target): "
            + (
                status_text(
                    status.value, s_extra.get("ratio"), s_extra.get("p99_poll_ms"), status.floor
                )
                if status
                else "—"
            ),
        ),
        (
            "without notifications (SQLite, or the session down): the token and the run's "
            "`updated_at` in one prebuilt statement",
            "(not measured apart)",
            "as above",
            "**kept** as one `Manager.raw()` statement (public API, Django converts the "
            f"columns); measured at {plain['commit']} ({plain['measured']}) where it served "
            "every poll: " + status_text(ps["value"], ps["ratio"], ps["p99_poll_ms"], ps["floor"]),
        ),
        (
            "that statement standing in for Django's connection health check (the private "
            "`health_check_done`)",
            "part of the line above",
            "Django's own check (`CONN_HEALTH_CHECKS`)",
            "**removed**: Django's check runs (a poll from memory makes no query at all)",
        ),
        (
            "every other API view's token check as one prebuilt statement",
            "no figure depends on it",
            "DRF's `TokenAuthentication`",
            "**removed** (the ingest figure above authenticates each batch this way)",
        ),
        (
            "the one-statement claim (`runs/claiming.py`, `runs/rawrows.py`)",
            claim_text(o_claim["value"], o_claim["extra"]["hop_ms"], o_claim["floor"])
            + " (with five git processes per attempt, since cut to two)",
            "the ORM's claim (lock the run, read and move the phase, insert the attempt and "
            "its event), this run: "
            + (claim_text(claim.value, c_extra.get("hop_ms"), claim.floor) if claim else "—"),
            "**removed**: brought back over the cut git work it measured "
            + ", ".join(f"{v:.1f}" for v in one["medians_ms"])
            + f" ms ({one['commit']}, {one['measured']}); the ORM's claim measured 16.4 ms "
            "at 28843d9 and this run's figure: within this machine's run-to-run spread, and "
            "neither meets 15 ms",
        ),
    ]
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    return f"""\
## The plain request path (issue 18)

Until {before["commit"]} the status API and the phase claim rested on about 700 lines
(`runs/pollcache.py`, `runs/authentication.py`, `runs/claiming.py`, `runs/rawrows.py`, the
triggers of runs 0002). Issue 18 measured the plain design of each piece and kept a piece only
where the plain design misses a target and the piece meets it, without private APIs.
"Before" is that code measured by this suite on this machine at {before["measured"]}
(`{before["command"]}`); the plain status API is measured in every run beside the one served
(bench/urls.py), the plain claim is this run's; the status without notifications was measured
at {plain["commit"]} ({plain["note"]}). Floors differ between runs (a busier machine lowers
both): compare each figure with its own floor.

{table}

What is left uses documented APIs only: psycopg's `Connection.pgconn` (its libpq
`consume_input`/`notifies`), Django's `connection_created` signal and execute wrappers,
`Manager.raw()`, `Model.from_db()` and `_meta`. Every other API view authenticates with DRF's
`TokenAuthentication` as it is. A revoked token, an inactive user or a paused run shows on the
very next request on both paths (tests/runs/test_pollcache.py, test_status_poll.py,
test_authentication.py)."""


def sections(figures: list[Figure]) -> list[str]:
    result = [DESIGN, plain_design(figures)]
    missed = [f for f in figures if f.met is False and f.key in MISSED]
    if missed:
        result.append("## Targets missed")
        result += [MISSED[f.key] for f in missed]
    result += [PHASE_OVERHEAD, NOTICED]
    return result
