"""The common claim of a queued phase as one statement (PostgreSQL).

A claim sits between one phase's commit and the next phase's first provider call, the
orchestration overhead docs/benchmarks.md measures. Through the ORM it is five statements
after BEGIN (lock the run, read the phase, move it to building, insert the attempt, insert the
CLAIMED event), and on two cores each cost about 0.7 ms, most of it the ORM building SQL. The
common case — a running run, the phase queued with this task's token, no attempt before —
is done here by one statement built once from the models' metadata:

    WITH locked_run AS MATERIALIZED (SELECT … FROM run WHERE id = <the phase's run> FOR UPDATE),
         claimed AS (UPDATE phase SET state = 'building', … FROM locked_run
                     WHERE <running, queued, this token, no attempt yet> RETURNING …),
         attempt AS (INSERT INTO phaseattempt SELECT … FROM claimed RETURNING id),
         event AS (INSERT INTO phaseevent SELECT … FROM claimed)
    SELECT <the phase, its tier, the run, the attempt's id> FROM claimed, …

Why it is as safe as the ORM's claim:

- Lock order: the row to update comes out of a join with `locked_run`, so the run is locked
  (waiting for whoever holds it) before the phase row is, as everywhere else.
- Fresh state: every change of a phase's state is made with its run locked. If such a change
  committed while this statement waited for the run, the phase row it read is outdated, and
  PostgreSQL's UPDATE re-checks its conditions on the newest version of the row (READ
  COMMITTED's EvalPlanQual): a phase re-dispatched or unqueued meanwhile is not claimed.
- Anything else (a run pausing or stopping, a stale or duplicate token, a phase whose earlier
  attempt was abandoned) matches no row and the ORM's claim decides, in the same transaction,
  with the run already locked. So do other databases (SQLite for `make run`).
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import Field, Model

from .holders import Holder
from .models import Phase, PhaseAttempt, PhaseEvent, Run, Tier
from .rawrows import Converters, convert_row, row_converters
from .states import PhaseState, RunState

# The run's fields a claim needs (AttemptTicket, the builder's prompt, the run's tree and its
# checks); the rest stay deferred.
RUN_FIELDS = (
    "id",
    "name",
    "state",
    "max_attempts",
    "run_context",
    "note_count",
    "workspace",
    "source",
    "protected_paths",
    "check_commands",
    "workspace_path",
    "branch",
    "base_commit",
    "head_commit",
)


def _fields(model: type[Model], names: tuple[str, ...] | None = None) -> list[Any]:
    return [f for f in model._meta.concrete_fields if names is None or f.attname in names]


def _insert_fields(model: type[Model]) -> list[Any]:
    """The columns a new row of a phase's `model` (attempt, event) is written with, but for its
    primary key and its phase, which the statement takes from the claimed row."""
    return [f for f in model._meta.concrete_fields if not f.primary_key and f.attname != "phase_id"]


def _insert_values(obj: Model) -> list[Any]:
    """Values of `obj` for _insert_fields, prepared as Model.save would (auto_now_add filled)."""
    return [
        f.get_db_prep_save(f.pre_save(obj, add=True), connection) for f in _insert_fields(type(obj))
    ]


@functools.cache
def _statement() -> tuple[str, list[Any], list[Any], list[Any], Converters]:
    """The statement (parameters: see claim_first_attempt), the fields of the phase, tier and
    run in the order of its result's columns, and the converters of that row."""
    q = connection.ops.quote_name
    phase_fields = _fields(Phase)
    tier_fields = _fields(Tier)
    run_fields = _fields(Run, RUN_FIELDS)
    run_t, phase_t, tier_t = (q(m._meta.db_table) for m in (Run, Phase, Tier))
    attempt_t, event_t = q(PhaseAttempt._meta.db_table), q(PhaseEvent._meta.db_table)

    def col(model: type[Model], name: str) -> str:
        field = model._meta.get_field(name)
        if not isinstance(field, Field):  # a reverse relation or generic key has no column
            raise TypeError(f"{model.__name__}.{name} is not a concrete field")
        return q(field.column)

    attempt_cols = [q(f.column) for f in _insert_fields(PhaseAttempt)]
    event_cols = [q(f.column) for f in _insert_fields(PhaseEvent)]
    sql = f"""
        WITH locked_run AS MATERIALIZED (
            SELECT {", ".join(f"r.{q(f.column)}" for f in run_fields)} FROM {run_t} r
            WHERE r.{col(Run, "id")} = (
                SELECT p0.{col(Phase, "run")} FROM {phase_t} p0 WHERE p0.{col(Phase, "id")} = %s
            )
            FOR UPDATE
        ),
        claimed AS (
            UPDATE {phase_t} p SET
                {col(Phase, "state")} = %s,
                {col(Phase, "attempt_count")} = 1,
                {col(Phase, "started_at")} = COALESCE(p.{col(Phase, "started_at")}, %s),
                {col(Phase, "lease_expires_at")} = %s,
                {col(Phase, "holder_host")} = %s,
                {col(Phase, "holder_pid_space")} = %s,
                {col(Phase, "holder_pid")} = %s,
                {col(Phase, "holder_started")} = %s,
                {col(Phase, "heartbeat_at")} = %s,
                {col(Phase, "updated_at")} = %s
            FROM locked_run
            WHERE p.{col(Phase, "id")} = %s
                AND p.{col(Phase, "run")} = locked_run.{col(Run, "id")}
                AND locked_run.{col(Run, "state")} = %s
                AND p.{col(Phase, "state")} = %s
                AND p.{col(Phase, "dispatch_token")} = %s
                AND p.{col(Phase, "attempt_count")} = 0
            RETURNING {", ".join(f"p.{q(f.column)}" for f in phase_fields)}
        ),
        attempt AS (
            INSERT INTO {attempt_t} ({col(PhaseAttempt, "phase")}, {", ".join(attempt_cols)})
            SELECT claimed.{col(Phase, "id")}, {", ".join(["%s"] * len(attempt_cols))}
            FROM claimed
            RETURNING {col(PhaseAttempt, "id")}
        ),
        event AS (
            INSERT INTO {event_t} ({col(PhaseEvent, "phase")}, {", ".join(event_cols)})
            SELECT claimed.{col(Phase, "id")}, {", ".join(["%s"] * len(event_cols))}
            FROM claimed
        )
        SELECT {", ".join(f"claimed.{q(f.column)}" for f in phase_fields)},
            {", ".join(f"t.{q(f.column)}" for f in tier_fields)},
            {", ".join(f"locked_run.{q(f.column)}" for f in run_fields)},
            attempt.{col(PhaseAttempt, "id")}
        FROM claimed
        JOIN {tier_t} t ON t.{col(Tier, "id")} = claimed.{col(Phase, "tier")}
        CROSS JOIN locked_run CROSS JOIN attempt
    """  # noqa: S608 - names from the models' metadata, values as parameters
    converters = row_converters((*phase_fields, *tier_fields, *run_fields))
    return sql, phase_fields, tier_fields, run_fields, converters


def _instance(model: type[Model], fields: list[Any], values: list[Any]) -> Any:
    # from_db marks the object as loaded (fields not given are deferred), as a queryset would.
    return model.from_db(connection.alias, [f.attname for f in fields], values)


def claim_first_attempt(
    *, phase_id: int, token: str, now: datetime, lease_expires_at: datetime, holder: Holder
) -> tuple[Phase, int] | None:
    """Inside the caller's transaction: claim the phase for its first attempt if the run is
    running and the phase is queued with `token` and has no attempt, recording `holder` and its
    first heartbeat (`now`). Returns the phase (with
    its tier and run: those of RUN_FIELDS loaded) and the new attempt's id; None when that is
    not the case (or the database is not PostgreSQL), and then nothing was written."""
    if connection.vendor != "postgresql":
        return None
    assert connection.in_atomic_block, "a claim runs inside the caller's transaction"
    sql, phase_fields, tier_fields, run_fields, converters = _statement()
    # The first attempt, as the ORM's claim writes it: number 1, no feedback (no attempt
    # before it that was not abandoned), and its CLAIMED event.
    attempt = PhaseAttempt(number=1, dispatch_token=token, feedback=[])
    event = PhaseEvent(kind=PhaseEvent.Kind.CLAIMED, message="attempt 1")
    params = [
        phase_id,
        PhaseState.BUILDING.value,
        now,
        lease_expires_at,
        holder.host,
        holder.pid_space,
        holder.pid,
        holder.started,
        now,
        now,
        phase_id,
        RunState.RUNNING.value,
        PhaseState.QUEUED.value,
        token,
        *_insert_values(attempt),
        *_insert_values(event),
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        return None
    row = convert_row(row, converters)  # the attempt's id, last, needs no conversion
    n_phase, n_tier = len(phase_fields), len(tier_fields)
    phase = _instance(Phase, phase_fields, row[:n_phase])
    phase.tier = _instance(Tier, tier_fields, row[n_phase : n_phase + n_tier])
    phase.run = _instance(Run, run_fields, row[n_phase + n_tier : -1])
    return phase, int(row[-1])
