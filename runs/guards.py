"""Budget guards: evaluated after every recorded usage event (DESIGN.md, issue "budget guards").

The first time a guard's provider passes its threshold, every active run it applies to takes
the guard's action through the ordinary services: a pause after the current phase, a stop at
the next checkpoint. The reason names the rule and the figure.
"""

from __future__ import annotations

from decimal import Decimal

from django.db import IntegrityError, transaction
from django.db.models import Q

from usage.selectors import window_usage

# Imports go one way: this module acts through the services' transitions (pause, stop); the
# services never import it (a plan's guards are written by runs.services.run_create and
# validated by runs.plans).
from . import services
from .models import BudgetGuard, GuardFiring, Run
from .plans import guard_validate
from .states import RUN_TERMINAL, IllegalTransition, RunState

GUARDED_STATES = (RunState.RUNNING, RunState.PAUSE_REQUESTED)

# How a person reads the four providers DESIGN.md names; any other catalogue provider (an
# OpenAI-compatible server configured under a name of its own) reads as that name.
PROVIDER_LABELS = {
    "openai": "OpenAI",
    "anthropic": "Anthropic",
    "google_gemini": "Google Gemini",
    "glm": "GLM",
}


def provider_label(provider: str) -> str:
    return PROVIDER_LABELS.get(provider, provider)


def guard_sentence(
    *, provider: str, window: str, threshold_percent: Decimal, action: str, all_runs: bool
) -> str:
    """A guard as a person says it: "Stop the run when Anthropic passes 80% of its week window"
    ("every run" for a guard of all runs)."""
    verb = "Stop" if action == BudgetGuard.Action.STOP else "Pause"
    # normalize() drops the column's trailing zeros: "80%", "80.5%", never "80.00%".
    threshold = f"{Decimal(str(threshold_percent)).normalize():f}"
    return (
        f"{verb} {'every run' if all_runs else 'the run'} when {provider_label(provider)} "
        f"passes {threshold}% of its {window} window"
    )


def guard_text(guard: BudgetGuard) -> str:
    return guard_sentence(
        provider=guard.provider,
        window=guard.window,
        threshold_percent=guard.threshold_percent,
        action=guard.action,
        all_runs=guard.run_id is None,
    )


@transaction.atomic
def guard_create(
    *,
    run_id: int | None,
    provider: object,
    threshold_percent: object,
    action: object,
    period: object = None,
    window: object = None,
) -> BudgetGuard:
    """A guard for one run, or with no run for every run (those running and those started
    later). Validated by runs.plans.guard_validate like a plan's and the admin's: GuardInvalid
    names the bad fields and nothing is written. It fires at the next usage recorded past its
    threshold (guards_evaluate runs after every provider call). It watches `window` (a cap
    window of the provider) or the legacy `period` (day, week, month: the window of that name)."""
    spec = guard_validate(
        provider=provider,
        window=window,
        period=period,
        threshold_percent=threshold_percent,
        action=action,
    )
    if run_id is not None:
        # Locked so a run finishing meanwhile can't be given a guard that would never act.
        run = Run.objects.select_for_update().get(pk=run_id)
        if run.state in RUN_TERMINAL:
            raise IllegalTransition(
                "run",
                run_id,
                run.state,
                "guarded",
                message=f"Run {run_id} has {RunState(run.state).label.lower()}, so a guard for "
                "it could never act; nothing was added.",
            )
    return BudgetGuard.objects.create(
        run_id=run_id,
        provider=spec.provider,
        window=spec.window,
        period=spec.period,
        threshold_percent=spec.threshold_percent,
        action=spec.action,
    )


@transaction.atomic
def guard_delete(*, guard_id: int, run_id: int | None) -> None:
    """Remove a guard of this run (run_id) or a guard for all runs (None); a guard of
    another scope is not found (BudgetGuard.DoesNotExist). Its firings go with it."""
    scope = Q(run__isnull=True) if run_id is None else Q(run_id=run_id)
    BudgetGuard.objects.filter(scope).get(pk=guard_id).delete()


def guards_list(*, run_id: int | None) -> list[dict[str, object]]:
    """The guards watching a run (its own, then those for all runs), with whether each fired
    for it; with no run, the guards for all runs. Run.DoesNotExist for an unknown run."""
    if run_id is None:
        guards = BudgetGuard.objects.filter(run__isnull=True)
        firings: dict[int, GuardFiring] = {}
    else:
        Run.objects.only("pk").get(pk=run_id)
        guards = BudgetGuard.objects.filter(Q(run_id=run_id) | Q(run__isnull=True))
        firings = {f.guard_id: f for f in GuardFiring.objects.filter(run_id=run_id)}
    return [
        {
            "guard_id": guard.pk,
            "run_id": guard.run_id,
            "scope": "run" if guard.run_id else "all runs",
            "rule": str(guard),
            "provider": guard.provider,
            "window": guard.window,
            "period": guard.period,
            "threshold_percent": guard.threshold_percent,
            "action": guard.action,
            "enabled": guard.enabled,
            "fired": guard.pk in firings,
            "message": firings[guard.pk].message if guard.pk in firings else "",
        }
        # Null run ids sort last in PostgreSQL and first in SQLite: order explicitly.
        for guard in sorted(guards, key=lambda g: (g.run_id is None, g.pk))
    ]


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
    # Every window of the guards' providers in one read (usage.selectors.window_usage: three
    # statements, whatever the number of guards and windows).
    percents: dict[tuple[str, str], float | None] = {
        (row["provider"], row["window"]): row["percent"]
        for row in window_usage(providers={g.provider for g in guards})
    }
    fired = []
    for guard in guards:
        percent = percents.get((guard.provider, guard.window))
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
    message = (
        f"budget guard '{guard}' fired: {guard.provider} is at {percent:.1f}% of its "
        f"{guard.window} window"
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
