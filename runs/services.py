"""Every write to runs, tiers and phases. Admin actions, API views, tasks and commands call these;
none of them changes a state by itself (STYLE.md §1, DESIGN.md "States")."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Q, Sum
from django.utils import timezone

from routing.mapping import model_change_check, model_change_record
from routing.router import RoutingDecision, RoutingError, quota_snapshot, reset_words, router
from routing.text import storable
from routing.types import RouteKey, RoutingContext
from usage.models import UsageEvent
from usage.services import in_flight_calls_lose
from usage.vocabulary import FIXED_ROLES, SEVERITIES, Role, Severity

from .context import PAUSED_FOR_QUOTA, PAUSED_FOR_QUOTA_LOOKUP, RunContext
from .holders import Holder, holder_alive_here, holder_this_process
from .models import (
    PHASE_USAGE_FIELDS,
    BudgetGuard,
    ChecksState,
    Phase,
    PhaseAttempt,
    PhaseEvent,
    PhaseRoutingDecision,
    Run,
    Tier,
)
from .plans import PlanSpec
from .prompts import REFUSAL_LIMIT, checks_refusal
from .states import (
    PHASE_IN_FLIGHT,
    PHASE_TERMINAL,
    RUN_TERMINAL,
    IllegalTransition,
    PhaseState,
    RunState,
    require_phase_transition,
    require_run_transition,
)

logger = logging.getLogger(__name__)
EXECUTE_PHASE_TASK = "runs.tasks.execute_phase"
# A phase whose worker keeps dying (e.g. the phase itself crashes it) fails instead of looping.
MAX_LOST_WORKERS = 5


class LeaseLost(Exception):
    """The phase was handed to another worker (or stopped) while this one held it."""


# --- helpers used inside a transaction -------------------------------------------------------


# The plan as imported: JSON that grows with the run's phases, read by pages only. Every
# transition locks the run, and reading and decoding the plan there cost each phase about a
# millisecond per lock on a 200-phase run (docs/benchmarks.md).
RUN_DEFERRED = ("plan",)


def _attempts(n: int) -> str:
    return f"{n} attempt{'' if n == 1 else 's'}"


def _lock_run(run_id: int) -> Run:
    # Lock order everywhere: the run row first, then its phase rows, so two workers and a
    # control request never wait on each other in opposite orders.
    try:
        return Run.objects.select_for_update().defer(*RUN_DEFERRED).get(pk=run_id)
    except Run.DoesNotExist:
        raise Run.DoesNotExist(f"run {run_id} does not exist") from None


def _set_run_state(
    run: Run, target: str, *, reason: str | None = None, also: tuple[str, ...] = ()
) -> None:
    """also: fields the caller changed on `run` that this save should write too."""
    require_run_transition(run.pk, run.state, target)
    run.state = target
    fields = ["state", "updated_at", *also]
    if reason is not None:
        run.state_reason = reason
        fields.append("state_reason")
    if target in RUN_TERMINAL:
        run.finished_at = timezone.now()
        run.current_tier_index = None
        run.current_phase_index = None
        fields += ["finished_at", "current_tier_index", "current_phase_index"]
    run.save(update_fields=fields)


def _set_phase_state(phase: Phase, target: str, **changes: Any) -> None:
    require_phase_transition(phase.pk, phase.state, target)
    if target in PHASE_TERMINAL:
        changes.update(finished_at=timezone.now(), lease_expires_at=None)
        # Terminal states are final, so its usage totals are written once, here. A phase never
        # claimed made no call: a stop cancelling a run's pending phases reads nothing.
        if phase.started_at is not None:
            changes.update(_phase_usage_totals(phase))
    phase.state = target
    for key, value in changes.items():
        setattr(phase, key, value)
    phase.save(update_fields=["state", "updated_at", *changes])


def _phase_usage_totals(phase: Phase) -> dict[str, Any]:
    """The phase's usage totals (PHASE_USAGE_FIELDS) from its events, every attempt and lost
    call in: one aggregate by usageevent_run_phase_role. Its calls are recorded before this
    transition (a lost call in the transaction that hands the phase on)."""
    sums: dict[str, Any] = {}
    for role, (tokens, calls, unpriced, cost) in PHASE_USAGE_FIELDS.items():
        of_role = Q(role=role)
        sums[tokens] = Sum(F("prompt_tokens") + F("completion_tokens"), filter=of_role)
        sums[calls] = Count("pk", filter=of_role)
        sums[unpriced] = Count("pk", filter=of_role & Q(cost_usd__isnull=True))
        sums[cost] = Sum("cost_usd", filter=of_role)
    found = UsageEvent.objects.filter(
        run_id=phase.run_id, phase_id=phase.pk, role__in=list(PHASE_USAGE_FIELDS)
    ).aggregate(**sums)
    return {name: value if value is not None else 0 for name, value in found.items()}


def _lease_deadline() -> Any:
    return timezone.now() + timedelta(seconds=settings.AUTOPACK_PHASE_LEASE_SECONDS)


def _holder_fields(now: Any) -> dict[str, Any]:
    """What a claim records of the process making it (runs.holders), its first heartbeat
    included: a holder is judged by its own heartbeats, never by those of the one before."""
    holder = holder_this_process()
    return {
        "holder_host": holder.host,
        "holder_pid_space": holder.pid_space,
        "holder_pid": holder.pid,
        "holder_started": holder.started,
        "heartbeat_at": now,
    }


def _dispatch(phase: Phase) -> None:
    """Queue a phase and send its task once the transaction commits."""
    token = uuid.uuid4().hex
    _set_phase_state(
        phase,
        PhaseState.QUEUED,
        dispatch_token=token,
        queued_at=timezone.now(),
        # A queued phase nobody claims before this deadline had its message lost (broker
        # restart); the sweeper sends it again.
        lease_expires_at=_lease_deadline(),
    )
    phase_id = phase.pk
    transaction.on_commit(lambda: _send_phase_task(phase_id, token))


def _send_phase_task(phase_id: int, token: str) -> None:
    try:
        current_app.send_task(EXECUTE_PHASE_TASK, args=[phase_id, token])
    except Exception:
        # The transition has committed; failing the caller now (a 500 for a resume that took
        # effect, a task error for a phase that completed) would misreport it. The phase sits
        # queued with a deadline and the sweeper sends it again once the broker is back.
        logger.exception(
            "phase %s is queued but its task could not be sent; the sweeper resends it", phase_id
        )


def _schedule_next(run: Run, *, also: tuple[str, ...] = ()) -> None:
    """With the run locked: dispatch its next pending phase, or finish the run. also: fields
    the caller changed on `run`, written by the same UPDATE."""
    if run.phases.filter(state__in=list(PHASE_IN_FLIGHT)).exists():
        if also:
            run.save(update_fields=[*also, "updated_at"])
        return
    nxt = run.phases.select_related("tier").filter(state=PhaseState.PENDING).first()
    if nxt is None:
        failed = run.phases.filter(state=PhaseState.FAILED).exists()
        _set_run_state(
            run,
            RunState.FAILED if failed else RunState.COMPLETED,
            reason="" if not failed else run.state_reason,
            also=also,
        )
        return
    run.current_tier_index = nxt.tier.index
    run.current_phase_index = nxt.position
    run.save(update_fields=["current_tier_index", "current_phase_index", "updated_at", *also])
    _dispatch(nxt)


def _cancel_open_phases(run: Run, *, target: str = PhaseState.CANCELLED) -> None:
    for phase in run.phases.exclude(state__in=list(PHASE_TERMINAL)).select_for_update():
        if phase.state in (PhaseState.BUILDING, PhaseState.AUDITING):
            phase.attempts.filter(outcome=PhaseAttempt.Outcome.IN_PROGRESS).update(
                outcome=PhaseAttempt.Outcome.CANCELLED, finished_at=timezone.now()
            )
        state = PhaseState.CANCELLED if phase.state != PhaseState.PENDING else target
        _set_phase_state(phase, state, dispatch_token="")


def _finish_stopped(run: Run, *, reason: str | None = None) -> None:
    _cancel_open_phases(run)
    _set_run_state(run, RunState.STOPPED, reason=reason)


def _fail_run(run: Run, *, reason: str) -> None:
    _cancel_open_phases(run, target=PhaseState.SKIPPED)
    if run.state == RunState.STOPPING:
        _set_run_state(run, RunState.STOPPED, reason=f"stopped; {reason}")
    else:
        _set_run_state(run, RunState.FAILED, reason=reason)


def _unqueue(phase: Phase) -> None:
    # Back to pending; a message still on its way becomes stale: its token no longer matches.
    _set_phase_state(phase, PhaseState.PENDING, dispatch_token="", lease_expires_at=None)


# --- run lifecycle ----------------------------------------------------------------------------


@transaction.atomic
def run_create(*, plan: PlanSpec, created_by: Any = None) -> Run:
    run = Run.objects.create(
        name=plan.name,
        plan=plan.as_dict(),
        workspace=plan.workspace,
        source=plan.source,
        protected_paths=plan.protected_paths,
        check_commands=plan.checks,
        max_attempts=plan.max_attempts,
        guards=plan.guards,
        total_tiers=len(plan.tiers),
        total_phases=plan.phase_count,
        created_by=created_by,
    )
    tiers = Tier.objects.bulk_create(
        Tier(run=run, index=i, name=t.name, total_phases=len(t.phases))
        for i, t in enumerate(plan.tiers, start=1)
    )
    phases = []
    position = 0
    for tier, spec in zip(tiers, plan.tiers, strict=True):
        for index, p in enumerate(spec.phases, start=1):
            position += 1
            phases.append(
                Phase(
                    run=run,
                    tier=tier,
                    index=index,
                    position=position,
                    name=p.name,
                    category=p.category,
                    complexity=p.complexity,
                    description=p.description,
                    acceptance_criteria=p.acceptance_criteria,
                    check_commands=p.checks,
                )
            )
    Phase.objects.bulk_create(phases, batch_size=500)
    if plan.guards:
        _guards_create_for_run(run=run, guards=plan.guards)
    if not run.workspace and not run.source:
        run.workspace = f"run-{run.pk}"
        run.save(update_fields=["workspace"])
    return run


def _guards_create_for_run(*, run: Run, guards: list[dict[str, Any]]) -> None:
    """The plan's budget guards (validated by runs.plans), as the run's own. Evaluating and
    firing them is runs.guards', which calls this module's transitions: never the other way."""
    BudgetGuard.objects.bulk_create(
        BudgetGuard(
            run=run,
            provider=g["provider"],
            window=g.get("window") or g["period"],
            period=g.get("period") or "",
            threshold_percent=Decimal(str(g["threshold_percent"])),
            action=g["action"],
        )
        for g in guards
    )


@transaction.atomic
def run_start(*, run_id: int) -> Run:
    run = _lock_run(run_id)
    if run.state == RunState.RUNNING:
        return run
    _set_run_state(run, RunState.RUNNING, reason="")
    run.started_at = timezone.now()
    # The mapping in force now stays this run's mapping: a global change made later applies
    # to runs started after it (DESIGN.md "Scopes of a model change").
    pairs = set(run.phases.values_list("category", "complexity"))
    context = RunContext.from_json(run.run_context).with_snapshot(router.mapping_snapshot(pairs))
    run.run_context = context.to_json()
    run.save(update_fields=["started_at", "run_context"])
    _schedule_next(run)
    return run


@transaction.atomic
def run_pause(*, run_id: int, reason: str = "paused by a person") -> Run:
    run = _lock_run(run_id)
    if run.state in (RunState.PAUSE_REQUESTED, RunState.PAUSED):
        return run  # repeating a pause is harmless
    require_run_transition(run.pk, run.state, RunState.PAUSE_REQUESTED)
    working = run.phases.filter(state__in=[PhaseState.BUILDING, PhaseState.AUDITING]).exists()
    if working:
        # Takes effect when the current phase reaches its terminal state.
        _set_run_state(run, RunState.PAUSE_REQUESTED, reason=reason)
    else:
        for phase in run.phases.filter(state=PhaseState.QUEUED).select_for_update():
            _unqueue(phase)
        _set_run_state(run, RunState.PAUSED, reason=reason)
    return run


@transaction.atomic
def run_resume(*, run_id: int) -> Run:
    run = _lock_run(run_id)
    if run.state == RunState.RUNNING:
        return run
    if run.state == RunState.PAUSE_REQUESTED:
        _set_run_state(run, RunState.RUNNING, reason="")
        return run
    if run.state != RunState.PAUSED:
        # A pending run is started, not resumed; a finished one cannot continue.
        raise IllegalTransition("run", run.pk, run.state, RunState.RUNNING)
    run.run_context = RunContext.from_json(run.run_context).with_paused_for("").to_json()
    run.save(update_fields=["run_context"])
    _set_run_state(run, RunState.RUNNING, reason="")
    _schedule_next(run)
    return run


@transaction.atomic
def run_model_override(
    *,
    run_id: int,
    role: str,
    category: str,
    complexity: str,
    model: str,
    changed_by: Any = None,
    via: str = "",
) -> Run:
    """Change the model of one role × category × complexity for this run only; phases not
    yet started use it, the one in flight keeps the model it was given."""
    run = _lock_run(run_id)
    if run.state in RUN_TERMINAL:
        raise IllegalTransition(
            "run",
            run.pk,
            run.state,
            "model override",
            message=f"Run {run.pk} has {RunState(run.state).label.lower()}, so a change for it "
            "alone no longer applies; nothing was changed.",
        )
    # The texts are checked first: a key is made only of what may be stored and shown.
    model_change_check(role=role, category=category, complexity=complexity, model=model)
    key = RouteKey.from_api(role=role, category=category, complexity=complexity)
    context = RunContext.from_json(run.run_context)
    old = router.select(key, context.routing, with_quota=False).model
    run.run_context = context.with_override(key, model).to_json()
    run.save(update_fields=["run_context", "updated_at"])
    model_change_record(
        run_id=run.pk,
        key=key,
        old_model=old,
        new_model=model,
        changed_by=changed_by,
        via=via,
    )
    return run


@transaction.atomic
def run_stop(*, run_id: int, reason: str = "stopped by a person") -> Run:
    run = _lock_run(run_id)
    if run.state in (RunState.STOPPING, RunState.STOPPED):
        return run
    if run.state in (RunState.PENDING, RunState.PAUSED):
        _finish_stopped(run, reason=reason)
        return run
    require_run_transition(run.pk, run.state, RunState.STOPPING)
    working = run.phases.filter(state__in=[PhaseState.BUILDING, PhaseState.AUDITING]).exists()
    if working:
        # Cancels at the worker's next checkpoint (after the builder, before the verdict commits).
        _set_run_state(run, RunState.STOPPING, reason=reason)
    else:
        _set_run_state(run, RunState.STOPPING, reason=reason)
        _finish_stopped(run)
    return run


# --- one phase, as the executor drives it ----------------------------------------------------


@dataclass(frozen=True)
class AttemptTicket:
    """What a worker holds while it works on one attempt of a phase."""

    phase_id: int
    run_id: int
    token: str
    attempt_id: int
    attempt_number: int
    max_attempts: int
    # The phase as the claim read it, with its run and tier: what the prompts are made of
    # (name, description, criteria), which no transition changes. Handing it over saves the
    # executor reading the row again right after the claim.
    phase: Phase = field(compare=False, repr=False)
    feedback: list[dict[str, Any]] = field(default_factory=list)
    # The run's routing context (mapping snapshot, run overrides) as the claim read it with
    # the run locked: every attempt of this claim routes with it, so a run override applies
    # to phases claimed after it commits and never switches a phase in flight.
    routing_context: RoutingContext = field(default_factory=RoutingContext)
    # Whether the run had notes to the supervisor when the claim read it (Run.note_count):
    # most runs have none, and then the builder's prompt needs no query for them.
    run_has_notes: bool = True
    # The builder's model for this attempt, chosen and recorded in the claim's transaction
    # (None: the executor routes, and meets the router's refusal itself).
    builder_route: RoutingDecision | None = field(default=None, compare=False)
    # Why the previous attempt went back to the builder without an audit (its change could
    # not be applied, or a check failed): the exact error or the check's output.
    refusal: str = ""
    # The files the previous attempt changed: their content goes into the builder's prompt.
    previous_files: list[str] = field(default_factory=list)


# What a transition of a phase in flight only ever writes, never reads: the texts a model
# wrote (builder output, verdict, which can be long) and the plan's own.
PHASE_DEFERRED = ("description", "acceptance_criteria", "builder_output", "auditor_verdict")


def _lock_phase_for(run: Run, phase_id: int, token: str, states: tuple[str, ...]) -> Phase:
    phase = Phase.objects.select_for_update().defer(*PHASE_DEFERRED).get(pk=phase_id)
    if phase.run_id != run.pk or phase.dispatch_token != token or phase.state not in states:
        raise LeaseLost(f"phase {phase_id} is no longer held by token {token[:8]}")
    return phase


def _start_attempt(
    phase: Phase, token: str, feedback: list[dict[str, Any]], **changes: Any
) -> PhaseAttempt:
    """Move the phase (its row locked by the caller) to BUILDING with `changes` and its next
    attempt number, in one UPDATE: the lock makes counting in Python race-free, where an
    F() increment would need a second statement to read the number back."""
    _set_phase_state(phase, PhaseState.BUILDING, attempt_count=phase.attempt_count + 1, **changes)
    return PhaseAttempt.objects.create(
        phase=phase, number=phase.attempt_count, dispatch_token=token, feedback=feedback
    )


def phase_claim(*, phase_id: int, token: str) -> AttemptTicket | None:
    """Claim a queued phase for this task; None when the message is stale or a duplicate."""
    with transaction.atomic():
        now = timezone.now()
        # The run row first (the lock order), found through the phase in the same statement.
        run = (
            Run.objects.select_for_update(of=("self",))
            .defer(*RUN_DEFERRED)
            .filter(phases__pk=phase_id)
            .first()
        )
        if run is None:
            return None
        # With its tier: the executor builds its prompts from this instance (AttemptTicket).
        phase = (
            Phase.objects.select_for_update(of=("self",)).select_related("tier").get(pk=phase_id)
        )
        phase.run = run
        if phase.state != PhaseState.QUEUED or phase.dispatch_token != token:
            # Second delivery, or re-dispatched since this message was sent. A second delivery
            # of the message its holder was working on comes back when that worker died
            # (acks_late): if the holder is known dead, hand the phase on now rather than
            # when the sweeper next finds it, by the sweeper's own transition.
            if phase.dispatch_token == token and (reason := _hand_on_reason(phase, now)):
                _phase_hand_on(run, phase, now=now, reason=f"{reason}; its task came back")
            return None
        if run.state == RunState.STOPPING:
            _finish_stopped(run)
            return None
        if run.state == RunState.PAUSE_REQUESTED:
            _unqueue(phase)
            _set_run_state(run, RunState.PAUSED)
            return None
        if run.state != RunState.RUNNING:
            _unqueue(phase)
            return None
        # attempt_count counts the attempts not abandoned: with none, there is no verdict
        # to carry over and no need to look.
        last = (
            phase.attempts.exclude(outcome=PhaseAttempt.Outcome.ABANDONED).last()
            if phase.attempt_count
            else None
        )
        feedback = (last.auditor_verdict or {}).get("issues", []) if last else []
        attempt = _start_attempt(
            phase,
            token,
            feedback,
            started_at=phase.started_at or now,
            lease_expires_at=_lease_deadline(),
            **_holder_fields(now),
        )
        PhaseEvent.objects.create(
            phase=phase, kind=PhaseEvent.Kind.CLAIMED, message=f"attempt {attempt.number}"
        )
        ticket = _claimed(
            phase,
            token,
            attempt_id=attempt.pk,
            attempt_number=attempt.number,
            feedback=feedback,
        )
        if last is None:
            return ticket
        return replace(
            ticket, refusal=attempt_refusal(last), previous_files=list(last.files_changed)
        )


def attempt_refusal(attempt: PhaseAttempt) -> str:
    """What the builder is told when `attempt` went back without an audit ("" otherwise)."""
    if attempt.edit_error:
        return attempt.edit_error
    if attempt.checks_state == ChecksState.FAILED:
        return checks_refusal(attempt.checks)
    return ""


def _claimed(
    phase: Phase,
    token: str,
    *,
    attempt_id: int,
    attempt_number: int,
    feedback: list[dict[str, Any]],
) -> AttemptTicket:
    """Inside the claim's transaction: the ticket, with the builder routed and recorded."""
    run = phase.run
    ticket = AttemptTicket(
        phase_id=phase.pk,
        run_id=run.pk,
        token=token,
        attempt_id=attempt_id,
        attempt_number=attempt_number,
        max_attempts=run.max_attempts,
        feedback=feedback,
        routing_context=RunContext.from_json(run.run_context).routing,
        phase=phase,
        run_has_notes=run.note_count > 0,
    )
    # Routing is in memory (the router's caches); recording its decision here saves the
    # commit of a statement of its own before the first provider call.
    try:
        decision = router.select(
            RouteKey(Role.BUILDER, phase.category, phase.complexity), ticket.routing_context
        )
    except RoutingError:
        return ticket  # the executor routes again and pauses or fails the phase
    phase_routing_record(ticket=ticket, decision=decision)
    return replace(ticket, builder_route=decision)


def run_tree_record(*, run_id: int, workspace_path: str, branch: str, base_commit: str) -> None:
    """The run's working tree as the first claim prepared it: the path really used (shown
    everywhere), its branch and the commit it started from. Written once; later claims
    prepare the same tree and write nothing."""
    Run.objects.filter(pk=run_id, workspace_path="").update(
        workspace_path=workspace_path,
        branch=branch,
        base_commit=base_commit,
        updated_at=timezone.now(),
    )


def phase_lease_renew(*, phase_id: int, token: str) -> bool:
    """Heartbeat: False when the lease was lost (the sweeper re-dispatched the phase)."""
    return (
        Phase.objects.filter(
            pk=phase_id,
            dispatch_token=token,
            state__in=[PhaseState.BUILDING, PhaseState.AUDITING],
        ).update(lease_expires_at=_lease_deadline(), heartbeat_at=timezone.now())
        == 1
    )


def phase_routing_record(*, ticket: AttemptTicket, decision: RoutingDecision) -> None:
    # One INSERT, atomic by itself: no BEGIN/COMMIT round trips before every provider call.
    PhaseRoutingDecision.objects.create(
        phase_id=ticket.phase_id,
        attempt_number=ticket.attempt_number,
        role=decision.role,
        category=decision.category,
        complexity=decision.complexity,
        model=decision.model,
        provider=decision.provider,
        scope=decision.scope.value,
        reason=decision.reason,
        candidates=list(decision.candidates),
    )


def phase_event_record(*, phase_id: int, kind: str, message: str) -> None:
    PhaseEvent.objects.create(phase_id=phase_id, kind=kind, message=message[:4000])


def phase_builder_done(*, ticket: AttemptTicket, model: str, output: str, prompt: str = "") -> bool:
    """Save the builder's prompt and reply (before anything is applied: a person can see what
    the builder was asked even if the worker dies next). False when the run is stopping and
    the phase was cancelled at this checkpoint. The phase stays BUILDING while its change is
    applied and checked."""
    with transaction.atomic():
        run = _lock_run(ticket.run_id)
        phase = _lock_phase_for(run, ticket.phase_id, ticket.token, (PhaseState.BUILDING,))
        PhaseAttempt.objects.filter(pk=ticket.attempt_id).update(
            builder_model=model, builder_output=output, builder_prompt=prompt
        )
        phase.builder_output = output
        phase.save(update_fields=["builder_output"])
        if run.state == RunState.STOPPING:
            _finish_stopped(run)
            return False
        return True


@dataclass(frozen=True)
class ChangeRecord:
    """A committed attempt's change, as runs.workspace.Commit reports it (the executor
    converts at the edge: services know no git)."""

    sha: str
    files: list[str]
    added: int
    removed: int
    diff: str
    diff_truncated: bool


def phase_change_record(*, ticket: AttemptTicket, change: ChangeRecord) -> None:
    """The attempt's commit: one UPDATE, no lock (only this ticket's holder writes its
    attempt; a stale holder's row is fenced off by the next transition's token check)."""
    PhaseAttempt.objects.filter(pk=ticket.attempt_id).update(
        commit_sha=change.sha,
        files_changed=change.files,
        lines_added=change.added,
        lines_removed=change.removed,
        diff=change.diff,
        diff_truncated=change.diff_truncated,
    )


def _change_fields(attempt: PhaseAttempt) -> dict[str, Any]:
    """What a phase keeps of the attempt it ends with."""
    return {
        "commit_sha": attempt.commit_sha,
        "files_changed": attempt.files_changed,
        "lines_added": attempt.lines_added,
        "lines_removed": attempt.lines_removed,
        "checks_state": attempt.checks_state,
    }


# The attempt's fields _change_fields reads.
CHANGE_FIELDS = ("commit_sha", "files_changed", "lines_added", "lines_removed", "checks_state")


def _send_back(
    run: Run, phase: Phase, ticket: AttemptTicket, *, refusal: str, why: str
) -> VerdictOutcome:
    """With the run and phase locked and the attempt finished as REVISE without an audit: the
    next attempt with `refusal` as the builder's feedback, or, at the plan's limit, the phase
    fails with `why`."""
    if run.state == RunState.STOPPING:
        _finish_stopped(run)
        return VerdictOutcome("stopped")
    if ticket.attempt_number >= ticket.max_attempts:
        attempt = PhaseAttempt.objects.only(*CHANGE_FIELDS).get(pk=ticket.attempt_id)
        reason = (
            f"Phase {phase.position} '{phase.name}' was not approved after "
            f"{_attempts(ticket.attempt_number)}: {why}"
        )
        _set_phase_state(
            phase, PhaseState.FAILED, failure_reason=reason[:4000], **_change_fields(attempt)
        )
        _fail_run(run, reason=reason[:4000])
        return VerdictOutcome("failed")
    previous = list(
        PhaseAttempt.objects.filter(pk=ticket.attempt_id).values_list("files_changed", flat=True)
    )
    attempt = _start_attempt(phase, ticket.token, [], lease_expires_at=_lease_deadline())
    return VerdictOutcome(
        "revise",
        replace(
            ticket,
            attempt_id=attempt.pk,
            attempt_number=attempt.number,
            feedback=[],
            refusal=refusal,
            previous_files=previous[0] if previous else [],
            builder_route=None,
        ),
    )


def phase_change_refuse(*, ticket: AttemptTicket, error: str) -> VerdictOutcome:
    """The builder's edits could not be applied (runs.edits.EditError; nothing was applied):
    the attempt counts, and goes back to the builder with the exact error, no auditor call."""
    with transaction.atomic():
        run = _lock_run(ticket.run_id)
        phase = _lock_phase_for(run, ticket.phase_id, ticket.token, (PhaseState.BUILDING,))
        error = storable(error)[:REFUSAL_LIMIT]
        PhaseAttempt.objects.filter(pk=ticket.attempt_id).update(
            edit_error=error, outcome=PhaseAttempt.Outcome.REVISE, finished_at=timezone.now()
        )
        PhaseEvent.objects.create(
            phase=phase,
            kind=PhaseEvent.Kind.EDIT_REFUSED,
            message=f"attempt {ticket.attempt_number}: {error}"[:4000],
        )
        return _send_back(
            run, phase, ticket, refusal=error, why=f"its change could not be applied: {error}"
        )


def phase_checks_record(*, ticket: AttemptTicket, checks: list[dict[str, Any]]) -> VerdictOutcome:
    """The checks' results for the attempt's commit (each as runs.sandbox.CheckResult's
    fields). All passed (or none): the phase moves to AUDITING ("audit"). A check failed or
    timed out: back to the builder with its output, no auditor call ("revise"/"failed"). A
    check not run (no sandbox): the builder cannot fix that, the phase fails with the reason.
    Cancelled by a stop: the run stops ("stopped")."""
    outcomes = [c["outcome"] for c in checks]
    if not checks:
        state = ChecksState.NONE
    elif "not_run" in outcomes:
        state = ChecksState.NOT_RUN
    elif all(o == "passed" for o in outcomes):
        state = ChecksState.PASSED
    else:
        state = ChecksState.FAILED
    with transaction.atomic():
        run = _lock_run(ticket.run_id)
        phase = _lock_phase_for(run, ticket.phase_id, ticket.token, (PhaseState.BUILDING,))
        attempt = PhaseAttempt.objects.only(*CHANGE_FIELDS).get(pk=ticket.attempt_id)
        attempt.checks_state = state
        cancelled = "cancelled" in outcomes
        finished: dict[str, Any] = (
            {} if state == ChecksState.PASSED or not checks else {"finished_at": timezone.now()}
        )
        if state == ChecksState.FAILED and not cancelled:
            finished["outcome"] = PhaseAttempt.Outcome.REVISE
        PhaseAttempt.objects.filter(pk=ticket.attempt_id).update(
            checks=checks, checks_state=state, **finished
        )
        if run.state == RunState.STOPPING or cancelled:
            if run.state == RunState.STOPPING:
                _finish_stopped(run)
                return VerdictOutcome("stopped")
            raise LeaseLost(f"phase {ticket.phase_id}: a check was cancelled without a stop")
        if state == ChecksState.NOT_RUN:
            first = next(c for c in checks if c["outcome"] == "not_run")
            reason = f"its checks could not run: {first.get('reason') or 'no sandbox'}"
            PhaseAttempt.objects.filter(pk=ticket.attempt_id).update(
                outcome=PhaseAttempt.Outcome.FAILED, finished_at=timezone.now()
            )
            PhaseEvent.objects.create(
                phase=phase, kind=PhaseEvent.Kind.FAILED, message=reason[:4000]
            )
            _set_phase_state(
                phase, PhaseState.FAILED, failure_reason=reason[:4000], **_change_fields(attempt)
            )
            _fail_run(run, reason=f"Phase {phase.position} '{phase.name}' failed: {reason}"[:4000])
            return VerdictOutcome("failed")
        if state == ChecksState.FAILED:
            failing = [c for c in checks if c["outcome"] != "passed"]
            summary = "; ".join(
                f"{c['command']} {c['outcome'].replace('_', ' ')}"
                + (f" (exit {c['exit_code']})" if c.get("exit_code") is not None else "")
                for c in failing
            )
            PhaseEvent.objects.create(
                phase=phase,
                kind=PhaseEvent.Kind.CHECKS_FAILED,
                message=f"attempt {ticket.attempt_number}: {summary}"[:4000],
            )
            return _send_back(
                run,
                phase,
                ticket,
                refusal=checks_refusal(checks),
                why=f"its checks failed: {summary}",
            )
        _set_phase_state(phase, PhaseState.AUDITING, lease_expires_at=_lease_deadline())
        return VerdictOutcome("audit")


@dataclass(frozen=True)
class VerdictOutcome:
    outcome: str  # complete | revise | failed | stopped (| audit: phase_checks_record)
    next_ticket: AttemptTicket | None = None


def phase_verdict_record(
    *, ticket: AttemptTicket, model: str, verdict: dict[str, Any]
) -> VerdictOutcome:
    """Store the auditor's verdict and move the phase on: complete, another attempt, or failed.
    Progress and the next dispatch happen in this same transaction."""
    with transaction.atomic():
        run = _lock_run(ticket.run_id)
        phase = _lock_phase_for(run, ticket.phase_id, ticket.token, (PhaseState.AUDITING,))
        issues = verdict.get("issues", [])
        approved = verdict.get("verdict") == "approve"
        attempt = PhaseAttempt.objects.only(*CHANGE_FIELDS).get(pk=ticket.attempt_id)
        if approved and attempt.checks_state not in (ChecksState.NONE, ChecksState.PASSED):
            # The auditor is asked only after the checks passed; this holds the rule also for
            # any other caller (and the table's constraint holds it for the database).
            raise IllegalTransition("attempt", ticket.attempt_id, attempt.checks_state, "approved")
        counts = {s: sum(1 for i in issues if i.get("severity") == s) for s in SEVERITIES}
        PhaseAttempt.objects.filter(pk=ticket.attempt_id).update(
            auditor_model=model,
            auditor_verdict=verdict,
            outcome=PhaseAttempt.Outcome.APPROVED if approved else PhaseAttempt.Outcome.REVISE,
            finished_at=timezone.now(),
        )
        phase.auditor_verdict = verdict
        phase.issues_minor += counts[Severity.MINOR]
        phase.issues_major += counts[Severity.MAJOR]
        phase.issues_critical += counts[Severity.CRITICAL]
        phase.save(
            update_fields=["auditor_verdict", "issues_minor", "issues_major", "issues_critical"]
        )
        PhaseEvent.objects.create(
            phase=phase,
            kind=PhaseEvent.Kind.VERDICT,
            message=f"attempt {ticket.attempt_number}: {verdict.get('verdict')} "
            f"({len(issues)} issues)",
        )
        if run.state == RunState.STOPPING:
            _finish_stopped(run)
            return VerdictOutcome("stopped")
        if approved:
            _set_phase_state(phase, PhaseState.COMPLETE, **_change_fields(attempt))
            progress = _progress_phase_complete(run, phase)
            if attempt.commit_sha:
                # The savepoint the next phase starts from; the executor moves the git ref
                # after this commits (workspace_restore moves it too, from this column).
                run.head_commit = attempt.commit_sha
                progress = (*progress, "head_commit")
            if run.state == RunState.PAUSE_REQUESTED:
                _set_run_state(run, RunState.PAUSED, also=progress)
            else:
                _schedule_next(run, also=progress)
            return VerdictOutcome("complete")
        if ticket.attempt_number >= ticket.max_attempts:
            titles = "; ".join(str(i.get("title", "")) for i in issues[:5]) or "no issues given"
            reason = (
                f"Phase {phase.position} '{phase.name}' was not approved after "
                f"{_attempts(ticket.attempt_number)}: {titles}"
            )
            _set_phase_state(
                phase, PhaseState.FAILED, failure_reason=reason, **_change_fields(attempt)
            )
            _fail_run(run, reason=reason)
            return VerdictOutcome("failed")
        previous = list(attempt.files_changed)
        attempt = _start_attempt(phase, ticket.token, issues, lease_expires_at=_lease_deadline())
        # The same claim goes on: token, limits and routing context carry over.
        return VerdictOutcome(
            "revise",
            replace(
                ticket,
                attempt_id=attempt.pk,
                attempt_number=attempt.number,
                feedback=issues,
                builder_route=None,  # each attempt's builder is routed (and recorded) anew
                refusal="",
                previous_files=previous,
            ),
        )


def _progress_phase_complete(run: Run, phase: Phase) -> tuple[str, ...]:
    """Count the phase done in its tier and (unsaved) on the run; returns the run's fields to
    save, which the caller writes with its own change of the run: one UPDATE, not two."""
    Tier.objects.filter(pk=phase.tier_id).update(completed_phases=F("completed_phases") + 1)
    tier = Tier.objects.get(pk=phase.tier_id)
    run.completed_phases += 1
    if tier.completed_phases == tier.total_phases:
        run.completed_tiers += 1
    return ("completed_phases", "completed_tiers")


def phase_fail(*, ticket: AttemptTicket, reason: str) -> None:
    with transaction.atomic():
        run = _lock_run(ticket.run_id)
        phase = _lock_phase_for(
            run, ticket.phase_id, ticket.token, (PhaseState.BUILDING, PhaseState.AUDITING)
        )
        PhaseAttempt.objects.filter(pk=ticket.attempt_id).update(
            outcome=PhaseAttempt.Outcome.FAILED, finished_at=timezone.now()
        )
        attempt = PhaseAttempt.objects.only(*CHANGE_FIELDS).get(pk=ticket.attempt_id)
        full = f"Phase {phase.position} '{phase.name}' failed: {reason}"
        PhaseEvent.objects.create(phase=phase, kind=PhaseEvent.Kind.FAILED, message=reason[:4000])
        _set_phase_state(phase, PhaseState.FAILED, failure_reason=reason, **_change_fields(attempt))
        _fail_run(run, reason=full)


def phase_pause_for_quota(
    *, ticket: AttemptTicket, error: RoutingError, now: datetime | None = None
) -> None:
    """The router refused every model (a window at 100%, a cooldown): put the phase back and
    pause the run until the reset it waits for (error.resume_at), stored with the pause and
    named in the reason ("paused: anthropic session at 100%, resumes at 14:20"), and the mapping
    version the refusal was decided on: a change of caps after it is checked at once."""
    with transaction.atomic():
        run = _lock_run(ticket.run_id)
        phase = _lock_phase_for(
            run, ticket.phase_id, ticket.token, (PhaseState.BUILDING, PhaseState.AUDITING)
        )
        PhaseAttempt.objects.filter(pk=ticket.attempt_id).update(
            outcome=PhaseAttempt.Outcome.ABANDONED, finished_at=timezone.now()
        )
        phase.attempt_count = max(phase.attempt_count - 1, 0)
        _set_phase_state(
            phase,
            PhaseState.PENDING,
            attempt_count=phase.attempt_count,
            dispatch_token="",
            lease_expires_at=None,
        )
        if run.state == RunState.STOPPING:
            _finish_stopped(run)
        elif run.state in (RunState.RUNNING, RunState.PAUSE_REQUESTED):
            context = RunContext.from_json(run.run_context).with_paused_for(
                PAUSED_FOR_QUOTA, resume_at=error.resume_at, version=error.version
            )
            run.run_context = context.to_json()
            run.save(update_fields=["run_context"])
            _set_run_state(run, RunState.PAUSED, reason=quota_pause_words(error, now=now))


def quota_pause_words(error: RoutingError, *, now: datetime | None = None) -> str:
    """ "paused: anthropic session at 100%, resumes at 14:20" """
    what = ", ".join(error.blocked) or str(error)
    if error.resume_at is None:
        return f"paused: {what}; resumes when a cap is raised or a model is changed"
    return f"paused: {what}, resumes at {reset_words(error.resume_at, now=now)}"


@transaction.atomic
def _quota_pause_renew(
    *, run_id: int, error: RoutingError, version: int | None, now: datetime
) -> None:
    """A quota pause checked and still refused: wait for the reset refusing it now, and for the
    next change after this version (not one check per sweep until the reset)."""
    run = _lock_run(run_id)
    context = RunContext.from_json(run.run_context)
    if run.state != RunState.PAUSED or context.paused_for != PAUSED_FOR_QUOTA:
        return
    run.run_context = context.with_paused_for(
        PAUSED_FOR_QUOTA, resume_at=error.resume_at, version=version
    ).to_json()
    run.state_reason = quota_pause_words(error, now=now)
    run.save(update_fields=["run_context", "state_reason", "updated_at"])


def runs_resume_after_quota(*, now: datetime | None = None) -> list[int]:
    """Resume runs paused for quota at the reset each waits for, not before (or at once when a
    person changed caps, windows or the mapping since: the version moved), once their next
    phase's models may be called at `now` (beat's sweep: the present; tests move the clock).

    Cost: one statement for the paused runs and one for the version; only when some run is
    due, the quota state at `now` (five statements) and its next pending phase per due run."""
    from routing.models import RoutingPolicy

    at = now or timezone.now()
    paused = list(Run.objects.filter(state=RunState.PAUSED, **PAUSED_FOR_QUOTA_LOOKUP))
    if not paused:
        return []
    version = RoutingPolicy.objects.filter(pk=1).values_list("version", flat=True).first()
    due = []
    for run in paused:
        context = RunContext.from_json(run.run_context)
        reset_passed = context.resume_at is None or context.resume_at <= at
        if reset_passed or context.paused_version != version:
            due.append((run, context))
    if not due:
        return []
    quota = quota_snapshot(now=at)
    resumed = []
    for run, context in due:
        nxt = run.phases.filter(state=PhaseState.PENDING).first()
        if nxt is None:
            continue
        try:
            for role in FIXED_ROLES:
                router.select(
                    RouteKey(role, nxt.category, nxt.complexity),
                    context.routing,
                    now=at,
                    quota=quota,
                )
        except RoutingError as exc:
            _quota_pause_renew(run_id=run.pk, error=exc, version=version, now=at)
            continue
        try:
            run_resume(run_id=run.pk)
        except IllegalTransition:
            continue  # a person stopped or resumed it meanwhile
        resumed.append(run.pk)
    return resumed


# --- the sweeper --------------------------------------------------------------------------------


def _hand_on_reason(phase: Phase, now: Any) -> str | None:
    """Why a phase in flight must go to a new task now; None while its holder may be alive.

    A live holder, however slow, keeps its phase: its pid answers on this machine, or its
    heartbeat goes on; only an expired lease (no renewal at all for the lease's length)
    overrides a live pid, as it always did."""
    if phase.state not in PHASE_IN_FLIGHT:
        return None
    expired = phase.lease_expires_at is not None and phase.lease_expires_at < now
    if phase.state == PhaseState.QUEUED:
        return "not claimed before its deadline; sent again" if expired else None
    if expired:
        return f"lease expired in state {phase.state}"
    if phase.holder_pid is None:
        return None  # claimed before holders were recorded: its lease tells
    holder = Holder(
        host=phase.holder_host,
        pid_space=phase.holder_pid_space,
        pid=phase.holder_pid,
        started=phase.holder_started or 0,
    )
    alive = holder_alive_here(holder)
    if alive is False:
        return f"its worker (pid {holder.pid} on {holder.host}) is gone, in state {phase.state}"
    lost_after = timedelta(seconds=settings.AUTOPACK_WORKER_LOST_AFTER_SECONDS)
    if alive is None and phase.heartbeat_at is not None and phase.heartbeat_at < now - lost_after:
        return (
            f"no heartbeat from its worker (pid {holder.pid} on {holder.host}) for "
            f"{(now - phase.heartbeat_at).total_seconds():.0f}s, in state {phase.state}"
        )
    return None


def _phase_hand_on(run: Run, phase: Phase, *, now: Any, reason: str) -> None:
    """With the run and the phase locked, and `reason` from _hand_on_reason: give the phase to
    a new task (a new dispatch token fences off anything its lost holder might still write),
    abandoning the attempt in progress, whose tokens stay metered and are not counted again."""
    if phase.state != PhaseState.QUEUED:
        phase.attempts.filter(outcome=PhaseAttempt.Outcome.IN_PROGRESS).update(
            outcome=PhaseAttempt.Outcome.ABANDONED, finished_at=now
        )
        # A call its worker was still waiting on was billed but never metered: it is now, as
        # a lost call with its input estimated (README "Models, caps and usage").
        in_flight_calls_lose(phase_id=phase.pk)
        phase.attempt_count = max(phase.attempt_count - 1, 0)
        phase.lost_worker_count += 1
        phase.save(update_fields=["attempt_count", "lost_worker_count"])
        PhaseEvent.objects.create(
            phase=phase,
            kind=PhaseEvent.Kind.WORKER_LOST,
            message=f"{reason}; worker lost {phase.lost_worker_count} time(s)",
        )
        if phase.lost_worker_count > MAX_LOST_WORKERS:
            why = f"its worker was lost {phase.lost_worker_count} times"
            _set_phase_state(phase, PhaseState.FAILED, failure_reason=why)
            _fail_run(run, reason=f"Phase {phase.position} '{phase.name}' failed: {why}")
            return
    else:
        PhaseEvent.objects.create(phase=phase, kind=PhaseEvent.Kind.REDISPATCHED, message=reason)
    if run.state == RunState.STOPPING:
        _finish_stopped(run)
    elif run.state == RunState.PAUSE_REQUESTED:
        _unqueue(phase)
        _set_run_state(run, RunState.PAUSED)
    else:
        _dispatch(phase)


def phases_sweep_expired(*, now: Any = None) -> int:
    """Hand on phases whose worker is gone (its pid on this machine, its heartbeat, or its
    lease) or whose message was lost, each to a new task."""
    now = now or timezone.now()
    stale = now - timedelta(seconds=settings.AUTOPACK_WORKER_LOST_AFTER_SECONDS)
    held = [PhaseState.BUILDING, PhaseState.AUDITING]
    # In-flight phases only (the partial indexes' rows): an expired lease, a stopped heartbeat,
    # or a holder on this machine, whose pid is looked at below.
    suspect = Q(lease_expires_at__lt=now) | Q(state__in=held, heartbeat_at__lt=stale)
    if here := holder_this_process().pid_space:
        suspect |= Q(state__in=held, holder_pid_space=here)
    suspects = Phase.objects.filter(suspect, state__in=list(PHASE_IN_FLIGHT))
    found = [
        (phase.pk, phase.run_id)
        for phase in suspects.only(*HAND_ON_FIELDS)
        if _hand_on_reason(phase, now)
    ]
    handled = 0
    for phase_id, run_id in found:
        with transaction.atomic():
            run = _lock_run(run_id)
            phase = Phase.objects.select_for_update().get(pk=phase_id)
            reason = _hand_on_reason(phase, now)
            if reason is None:
                continue  # renewed or finished meanwhile
            handled += 1
            _phase_hand_on(run, phase, now=now, reason=reason)
    return handled


# What _hand_on_reason reads of a phase.
HAND_ON_FIELDS = (
    "pk",
    "run_id",
    "state",
    "lease_expires_at",
    "heartbeat_at",
    "holder_host",
    "holder_pid_space",
    "holder_pid",
    "holder_started",
)
