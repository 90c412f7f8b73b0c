"""A terminal phase's usage totals per role (Phase.builder_tokens … auditor_cost_usd, issue 16):
services._set_phase_state writes them when a phase reaches its terminal state, so the run
forecast reads phases rather than the run's events. Phases already terminal get theirs here,
from their events: on PostgreSQL one UPDATE … FROM (a GROUP BY over the events of terminal
phases); elsewhere (SQLite) one aggregate per phase that has events."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import migrations, models
from django.db.models import Count, F, Q, Sum

# Frozen here: the roles and terminal states as they are when this migration was written.
ROLES = ("builder", "auditor")
TERMINAL = ("complete", "failed", "cancelled", "skipped")


def _postgresql(schema_editor: Any, phase_table: str, event_table: str) -> None:
    q = schema_editor.quote_name
    sets, sums, params = [], [], []
    for role in ROLES:
        names = (f"{role}_tokens", f"{role}_calls", f"{role}_unpriced_calls", f"{role}_cost_usd")
        sets += [f"{q(name)} = t.{q(name)}" for name in names]
        sums += [
            f"COALESCE(SUM(e.prompt_tokens + e.completion_tokens) FILTER (WHERE e.role = %s), 0) "
            f"AS {q(names[0])}",
            f"COUNT(*) FILTER (WHERE e.role = %s) AS {q(names[1])}",
            f"COUNT(*) FILTER (WHERE e.role = %s AND e.cost_usd IS NULL) AS {q(names[2])}",
            f"COALESCE(SUM(e.cost_usd) FILTER (WHERE e.role = %s), 0) AS {q(names[3])}",
        ]
        params += [role] * 4
    terminal = ", ".join(["%s"] * len(TERMINAL))
    roles = ", ".join(["%s"] * len(ROLES))
    sql = (
        f"UPDATE {q(phase_table)} p SET {', '.join(sets)} FROM ("  # noqa: S608
        f"SELECT e.phase_id, e.run_id, {', '.join(sums)} FROM {q(event_table)} e "
        f"WHERE e.phase_id IN (SELECT id FROM {q(phase_table)} WHERE state IN ({terminal})) "
        f"AND e.run_id IS NOT NULL AND e.role IN ({roles}) GROUP BY e.phase_id, e.run_id"
        ") t WHERE p.id = t.phase_id AND p.run_id = t.run_id"
    )
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(sql, [*params, *TERMINAL, *ROLES])


def fill_totals(apps: Any, schema_editor: Any) -> None:
    Phase = apps.get_model("runs", "Phase")
    UsageEvent = apps.get_model("usage", "UsageEvent")
    if schema_editor.connection.vendor == "postgresql":
        _postgresql(schema_editor, Phase._meta.db_table, UsageEvent._meta.db_table)
        return
    events = UsageEvent.objects.filter(run_id__isnull=False, role__in=ROLES)
    sums: dict[str, Any] = {}
    for role in ROLES:
        of_role = Q(role=role)
        sums[f"{role}_tokens"] = Sum(F("prompt_tokens") + F("completion_tokens"), filter=of_role)
        sums[f"{role}_calls"] = Count("pk", filter=of_role)
        sums[f"{role}_unpriced_calls"] = Count("pk", filter=of_role & Q(cost_usd__isnull=True))
        sums[f"{role}_cost_usd"] = Sum("cost_usd", filter=of_role)
    terminal = Phase.objects.filter(state__in=TERMINAL)
    with_events = set(
        events.filter(phase_id__in=terminal.values("pk")).values_list("phase_id", flat=True)
    )
    for pk, run_id in terminal.filter(pk__in=with_events).values_list("pk", "run_id"):
        found = events.filter(run_id=run_id, phase_id=pk).aggregate(**sums)
        Phase.objects.filter(pk=pk).update(
            **{name: value if value is not None else 0 for name, value in found.items()}
        )


class Migration(migrations.Migration):
    dependencies = [
        ("runs", "0007_budgetguard_window"),
        ("usage", "0001_initial"),
    ]

    operations = [
        *(
            migrations.AddField(model_name="phase", name=name, field=field)
            for role in ROLES
            for name, field in (
                (f"{role}_tokens", models.BigIntegerField(db_default=0, default=0)),
                (f"{role}_calls", models.PositiveIntegerField(db_default=0, default=0)),
                (f"{role}_unpriced_calls", models.PositiveIntegerField(db_default=0, default=0)),
                (
                    f"{role}_cost_usd",
                    models.DecimalField(
                        db_default=Decimal("0"),
                        decimal_places=12,
                        default=Decimal("0"),
                        max_digits=24,
                    ),
                ),
            )
        ),
        migrations.RunPython(fill_totals, migrations.RunPython.noop),
    ]
