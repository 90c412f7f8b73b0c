"""Budget guards: evaluated after every recorded usage event (DESIGN.md, issue "budget guards").

The first time a guard's provider passes its threshold, every active run it applies to takes
the guard's action through the ordinary services: a pause after the current phase, a stop at
the next checkpoint. The reason names the rule and the figure.
"""

from __future__ import annotations

from decimal import Decimal

from django.db import IntegrityError, transaction
from django.db.models import Q

from usage.selectors import get_provider_usage_summary
from usage.vocabulary import Period

# Imports go one way: this module acts through the services' transitions (pause, stop); the
# services never import it (a plan's guards are written by runs.services.run_create and
# validated by runs.plans).
from . import services
from .models import BudgetGuard, GuardFiring, Run
from .states import IllegalTransition, RunState

GUARDED_STATES = (RunState.RUNNING, RunState.PAUSE_REQUESTED)


def guards_evaluate() -> list[GuardFiring]:
    # Called after every provider call, and most of the time no guard applies: the first
    # question is the one query that can answer "none".
    guards = list(
        BudgetGuard.objects.filter(enabled=True).filter(
            Q(run__isnull=True) | Q(run__state__in=GUARDED_STATES)
        )
    )
    if not guards:
        return []
    active = dict(Run.objects.filter(state__in=GUARDED_STATES).values_list("pk", "state"))
    if not active:
        return []
    # A run's guard counts only while its run is guarded (it may have finished meanwhile).
    guards = [g for g in guards if g.run_id is None or g.run_id in active]
    already = set(
        GuardFiring.objects.filter(run_id__in=list(active)).values_list("guard_id", "run_id")
    )
    percents: dict[tuple[str, str], float | None] = {}
    for period in {g.period for g in guards}:
        for row in get_provider_usage_summary(period=period):
            percents[(row["provider"], period)] = row["percent_of_cap"]
    fired = []
    for guard in guards:
        percent = percents.get((guard.provider, guard.period))
        if percent is None or Decimal(str(percent)) < guard.threshold_percent:
            continue
        targets = [guard.run_id] if guard.run_id else list(active)
        for run_id in targets:
            if (guard.pk, run_id) in already:
                continue
            firing = _fire(guard, run_id, percent)
            if firing is not None:
                fired.append(firing)
    return fired


def _fire(guard: BudgetGuard, run_id: int, percent: float) -> GuardFiring | None:
    period = Period(guard.period).adjective
    message = (
        f"budget guard '{guard}' fired: {guard.provider} is at {percent:.1f}% of its {period} cap"
    )
    try:
        with transaction.atomic():
            firing = GuardFiring.objects.create(
                guard=guard,
                run_id=run_id,
                percent_of_cap=Decimal(f"{percent:.2f}"),
                message=message,
            )
            if guard.action == BudgetGuard.Action.STOP:
                services.run_stop(run_id=run_id, reason=message)
            else:
                services.run_pause(run_id=run_id, reason=message)
    except IntegrityError:
        return None  # fired for this run already (another worker got there first)
    except IllegalTransition:
        return None  # the run finished or was stopped meanwhile
    return firing
