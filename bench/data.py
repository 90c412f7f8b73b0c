"""Benchmark data: the database, users, runs of a given size and millions of usage events.

The big event tables are filled by PostgreSQL itself (INSERT … SELECT generate_series), and the
rollups rebuilt from them by one GROUP BY each — the state record_usage would have left.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone
from rest_framework.authtoken.models import Token

from runs import services as run_services
from runs.models import PHASE_USAGE_FIELDS, Phase, Run
from runs.plans import validate_plan
from runs.states import PHASE_TERMINAL, PhaseState, RunState
from usage.models import (
    OUTSIDE_SOURCES,
    TOKEN_FIELDS,
    ProviderQuota,
    ProviderWindow,
    RunUsageRollup,
    UsageEvent,
    UsageMinuteRollup,
    UsageRollup,
)
from usage.vocabulary import COMPLEXITIES

from .core import log

EVENTS = UsageEvent._meta.db_table
ROLLUP = UsageRollup._meta.db_table
RUN_ROLLUP = RunUsageRollup._meta.db_table
MINUTE_ROLLUP = UsageMinuteRollup._meta.db_table
# (provider, model) pairs the filled events cycle through: models of config/models.yaml's
# catalogue, eight as before (so the figures stay comparable with earlier ones).
CATALOGUE = (
    ("openai", "gpt-6.1-sol"),
    ("openai", "gpt-6-luna"),
    ("anthropic", "claude-sonnet-5-5"),
    ("anthropic", "claude-opus-5-5"),
    ("anthropic", "claude-haiku-5-5"),
    ("google_gemini", "gemini-4-hydrogen"),
    ("google_gemini", "gemini-3.8-flash"),
    ("glm", "glm-5.3"),
)
FILL_DAYS = 14  # events spread over the last two weeks: the current week holds a share of them


LEGACY_CAPS = ("daily_cap_tokens", "weekly_cap_tokens", "monthly_cap_tokens")


@contextmanager
def windows_replaced(rows: Iterable[ProviderWindow] = ()) -> Iterator[None]:
    """Only the given cap windows in force meanwhile: the providers' legacy daily/weekly/monthly
    caps (UTC calendar windows) lifted, the ProviderWindow rows (config/models.yaml has some)
    taken out and `rows` stored instead; all put back as they were afterwards. A window
    cannot be stored without a cap, so the rows are taken out and put back whole."""
    saved = list(ProviderQuota.objects.values("pk", *LEGACY_CAPS))
    windows = list(ProviderWindow.objects.all())
    ProviderQuota.objects.update(**dict.fromkeys(LEGACY_CAPS))
    ProviderWindow.objects.all().delete()
    try:
        ProviderWindow.objects.bulk_create(list(rows))
        yield
    finally:
        ProviderWindow.objects.all().delete()
        for row in saved:
            ProviderQuota.objects.filter(pk=row.pop("pk")).update(**row)
        ProviderWindow.objects.bulk_create(windows)


def truncate_usage() -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {EVENTS}, {ROLLUP}, {RUN_ROLLUP}, {MINUTE_ROLLUP}")


def truncate_runs() -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {Run._meta.db_table} CASCADE")


def staff_token() -> tuple[Any, str]:
    """A superuser (admin pages) with a DRF token (the API)."""
    user_model = get_user_model()
    user = user_model.objects.filter(username="bench").first()
    if user is None:
        user = user_model.objects.create_superuser("bench", "bench@localhost", None)
    token, _ = Token.objects.get_or_create(user=user)
    return user, token.key


def plan_of(phases: int, *, per_tier: int = 20, name: str = "Bench run") -> dict[str, Any]:
    categories = ("core_backend", "frontend", "docs", "testing", "security_auth_change", "api")
    complexities = COMPLEXITIES
    tiers = []
    for t in range(0, phases, per_tier):
        tiers.append(
            {
                "name": f"Tier {t // per_tier + 1}",
                "phases": [
                    {
                        "name": f"Phase {p + 1}",
                        "category": categories[p % len(categories)],
                        "complexity": complexities[p % len(complexities)],
                        "description": "Benchmark phase.",
                        "acceptance_criteria": ["it works"],
                    }
                    for p in range(t, min(t + per_tier, phases))
                ],
            }
        )
    return {"name": f"{name} ({phases} phases)", "max_attempts": 3, "tiers": tiers}


def page_run(phases: int) -> Run:
    """A run half done, as a page shows it mid-way: the first half of its phases complete
    with a verdict, the next one building. Set directly: this is a fixture, not a transition
    (no task may be sent, no worker is listening)."""
    run = run_services.run_create(plan=validate_plan(plan_of(phases)))
    done = phases // 2
    now = timezone.now()
    verdict = {"verdict": "approve", "summary": "Looks right.", "issues": []}
    Phase.objects.filter(run=run, position__lte=done).update(
        state=PhaseState.COMPLETE,
        attempt_count=1,
        auditor_verdict=verdict,
        started_at=now,
        finished_at=now,
        issues_minor=1,
    )
    Phase.objects.filter(run=run, position=done + 1).update(
        state=PhaseState.BUILDING, attempt_count=1, started_at=now
    )
    current = Phase.objects.select_related("tier").get(run=run, position=done + 1)
    completed_tiers = done // 20
    Run.objects.filter(pk=run.pk).update(
        state=RunState.RUNNING,
        started_at=now,
        completed_phases=done,
        completed_tiers=completed_tiers,
        current_tier_index=current.tier.index,
        current_phase_index=done + 1,
    )
    run.refresh_from_db()
    return run


def event_count() -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {EVENTS}")  # noqa: S608
        return int(cursor.fetchone()[0])


def fill_events(total: int, *, runs: list[Run], chunk: int = 1_000_000) -> float:
    """Add generated events until the table holds `total`; returns the seconds it took.

    A quarter of the events belong to each given run (spread over its phases), the rest to no
    run. Rollups are rebuilt afterwards so they hold exactly what the events hold.
    """
    start = time.perf_counter()
    have = event_count()
    run_cases = []
    for k, run in enumerate(runs):
        first_phase = (
            Phase.objects.filter(run=run).order_by("position").values_list("pk", flat=True).first()
        )
        run_cases.append((k, run.pk, first_phase, run.total_phases))
    n_cases = 4 if len(runs) <= 2 else len(runs) + 2
    run_id_sql = "CASE i % {n} {whens} ELSE NULL END".format(
        n=n_cases, whens=" ".join(f"WHEN {k} THEN {rid}" for k, rid, _, _ in run_cases)
    )
    phase_id_sql = "CASE i % {n} {whens} ELSE NULL END".format(
        n=n_cases,
        whens=" ".join(
            f"WHEN {k} THEN {fp} + (i / {n_cases}) % {tp}" for k, _, fp, tp in run_cases
        ),
    )
    providers = "ARRAY[" + ", ".join(f"'{p}'" for p, _ in CATALOGUE) + "]"
    models = "ARRAY[" + ", ".join(f"'{m}'" for _, m in CATALOGUE) + "]"
    cols = ", ".join(
        (
            "provider",
            "model",
            "role",
            "run_id",
            "phase_id",
            "call_id",
            *TOKEN_FIELDS,
            "provider_request_id",
            "latency_ms",
            "cost_usd",
            "created_at",
            "rolled_up",
        )
    )
    while have < total:
        n = min(chunk, total - have)
        with connection.cursor() as cursor:
            cursor.execute(
                f"""
                INSERT INTO {EVENTS} ({cols})
                SELECT ({providers})[1 + i % 8], ({models})[1 + i % 8],
                       CASE WHEN i % 2 = 0 THEN 'builder' ELSE 'auditor' END,
                       {run_id_sql}, {phase_id_sql},
                       'fill-' || i,
                       1000 + i % 700, 200 + i % 90, (i % 5) * 100, 0, (i % 3) * 10,
                       'req-' || i, 800 + i % 400,
                       ((1000 + i % 700) * 3 + (200 + i % 90) * 15) / 1000000.0,
                       now() - random() * interval '{FILL_DAYS} days',
                       TRUE  -- rolled up below, by rebuild_rollups
                FROM generate_series({have}::bigint, {have + n - 1}::bigint) AS i
                """  # noqa: S608 - every interpolated value is ours (no parameters: % is modulo)
            )
        have += n
        log(f"  events: {have:,} / {total:,} ({time.perf_counter() - start:.0f}s)")
    rebuild_rollups()
    fill_phase_totals(runs)
    return time.perf_counter() - start


def fill_phase_totals(runs: list[Run]) -> None:
    """The usage totals of the runs' terminal phases from their events, as a real phase has them
    from its terminal transition (runs.services._set_phase_state): page_run finishes its phases
    directly and the events come afterwards, so without this the forecast would estimate from
    phases that used nothing. One UPDATE … FROM a GROUP BY over the runs' events."""
    if not runs:
        return
    sets, sums, params = [], [], []
    for role, names in PHASE_USAGE_FIELDS.items():
        sets += [f"{name} = t.{name}" for name in names]
        sums += [
            f"COALESCE(SUM(prompt_tokens + completion_tokens) FILTER (WHERE role = %s), 0) "
            f"AS {names[0]}",
            f"COUNT(*) FILTER (WHERE role = %s) AS {names[1]}",
            f"COUNT(*) FILTER (WHERE role = %s AND cost_usd IS NULL) AS {names[2]}",
            f"COALESCE(SUM(cost_usd) FILTER (WHERE role = %s), 0) AS {names[3]}",
        ]
        params += [role] * 4
    run_ids = [run.pk for run in runs]
    terminal = sorted(state.value for state in PHASE_TERMINAL)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Phase._meta.db_table} p SET {', '.join(sets)} FROM ("  # noqa: S608
            f"SELECT run_id, phase_id, {', '.join(sums)} FROM {EVENTS} "
            f"WHERE run_id = ANY(%s) AND role = ANY(%s) GROUP BY run_id, phase_id"
            ") t WHERE p.id = t.phase_id AND p.run_id = t.run_id AND p.state = ANY(%s)",
            [*params, run_ids, list(PHASE_USAGE_FIELDS), terminal],
        )


def rebuild_rollups() -> None:
    sums = (
        "count(*), count(*) FILTER (WHERE cost_usd IS NULL), "
        + ", ".join(f"sum({c})" for c in TOKEN_FIELDS)
        + ", coalesce(sum(cost_usd), 0)"
    )
    cols = "calls, unpriced_calls, " + ", ".join(TOKEN_FIELDS) + ", cost_usd"
    bucket = "date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
    # The rollups keep outside tools' usage apart (usage.services: the `outside` key).
    outside = "source IN (" + ", ".join(f"'{s}'" for s in sorted(OUTSIDE_SOURCES)) + ")"
    with connection.cursor() as cursor:
        # Every event goes into the rollups below, so none is left for usage_fold.
        cursor.execute(f"UPDATE {EVENTS} SET rolled_up = TRUE WHERE NOT rolled_up")  # noqa: S608
        cursor.execute(f"TRUNCATE {ROLLUP}, {RUN_ROLLUP}, {MINUTE_ROLLUP}")
        cursor.execute(
            f"INSERT INTO {ROLLUP} (bucket, provider, model, role, outside, {cols}) "  # noqa: S608
            f"SELECT {bucket}, provider, model, role, {outside}, {sums} FROM {EVENTS} "
            f"GROUP BY 1, provider, model, role, 5"
        )
        cursor.execute(
            f"INSERT INTO {RUN_ROLLUP} (bucket, run_id, provider, model, role, outside, "  # noqa: S608
            f"{cols}) SELECT {bucket}, coalesce(run_id, 0), provider, model, role, {outside}, "
            f"{sums} FROM {EVENTS} GROUP BY 1, 2, provider, model, role, 6"
        )
        minute = "date_trunc('minute', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
        cursor.execute(
            f"INSERT INTO {MINUTE_ROLLUP} (provider, minute, outside, calls, "  # noqa: S608
            f"prompt_tokens, completion_tokens, cost_usd, first_at) SELECT provider, {minute}, "
            f"{outside}, count(*), sum(prompt_tokens), sum(completion_tokens), "
            f"coalesce(sum(cost_usd), 0), min(created_at) "
            f"FROM {EVENTS} GROUP BY provider, 2, 3"
        )
        cursor.execute(f"ANALYZE {EVENTS}")
        cursor.execute(f"ANALYZE {ROLLUP}")
        cursor.execute(f"ANALYZE {RUN_ROLLUP}")
        cursor.execute(f"ANALYZE {MINUTE_ROLLUP}")
