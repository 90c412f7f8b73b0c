"""The state machine and its services, without a worker (on_commit never fires inside `db`)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from runs import services
from runs.models import Phase, PhaseAttempt, PhaseEvent, PhaseRoutingDecision, Run
from runs.notes import run_note_add
from runs.plans import parse_plan_bytes
from runs.states import IllegalTransition, PhaseState, RunState
from tests.factories import set_provider_keys

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"
pytestmark = pytest.mark.django_db


@pytest.fixture
def run() -> Run:
    return services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))


def first_phase(run: Run) -> Phase:
    return Phase.objects.get(run=run, position=1)


def start_and_claim(run: Run) -> tuple[Phase, services.AttemptTicket]:
    services.run_start(run_id=run.pk)
    phase = first_phase(run)
    ticket = services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token)
    assert ticket is not None
    return phase, ticket


def built(ticket: services.AttemptTicket, checks: list[dict[str, Any]] | None = None) -> str:
    """The builder replied and its change's checks were recorded (none: the plan has none)."""
    assert services.phase_builder_done(ticket=ticket, model="m", output="built")
    return services.phase_checks_record(ticket=ticket, checks=checks or []).outcome


def test_creating_a_run_writes_its_tiers_and_phases_in_order(run: Run) -> None:
    assert run.state == RunState.PENDING
    assert (run.total_tiers, run.total_phases, run.percent_complete) == (3, 9, 0)
    positions = list(run.phases.values_list("tier__index", "index", "position"))
    assert positions[:4] == [(1, 1, 1), (1, 2, 2), (1, 3, 3), (2, 1, 4)]


def test_starting_a_run_queues_its_first_phase(run: Run) -> None:
    services.run_start(run_id=run.pk)
    run.refresh_from_db()
    phase = first_phase(run)
    assert run.state == RunState.RUNNING
    assert (run.current_tier_index, run.current_phase_index) == (1, 1)
    assert phase.state == PhaseState.QUEUED and phase.dispatch_token
    assert run.phases.filter(state=PhaseState.QUEUED).count() == 1


def test_a_second_delivery_of_the_same_task_does_not_claim_the_phase_again(run: Run) -> None:
    services.run_start(run_id=run.pk)
    phase = first_phase(run)
    first = services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token)
    second = services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token)
    assert first is not None and second is None
    phase.refresh_from_db()
    assert phase.state == PhaseState.BUILDING and phase.attempt_count == 1
    assert PhaseAttempt.objects.filter(phase=phase).count() == 1


def test_a_stale_token_cannot_claim_a_phase(run: Run) -> None:
    services.run_start(run_id=run.pk)
    phase = first_phase(run)
    assert services.phase_claim(phase_id=phase.pk, token="not-the-token") is None
    phase.refresh_from_db()
    assert phase.state == PhaseState.QUEUED


def test_pausing_before_a_worker_claims_pauses_at_once_and_resume_requeues(run: Run) -> None:
    services.run_start(run_id=run.pk)
    old_token = first_phase(run).dispatch_token
    services.run_pause(run_id=run.pk)
    run.refresh_from_db()
    assert run.state == RunState.PAUSED
    assert first_phase(run).state == PhaseState.PENDING
    assert services.phase_claim(phase_id=first_phase(run).pk, token=old_token) is None
    services.run_resume(run_id=run.pk)
    run.refresh_from_db()
    assert run.state == RunState.RUNNING and first_phase(run).state == PhaseState.QUEUED


def test_pausing_during_a_phase_waits_for_it_and_repeating_the_pause_is_harmless(run: Run) -> None:
    services.run_start(run_id=run.pk)
    phase = first_phase(run)
    services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token)
    services.run_pause(run_id=run.pk)
    services.run_pause(run_id=run.pk)
    run.refresh_from_db()
    assert run.state == RunState.PAUSE_REQUESTED
    assert first_phase(run).state == PhaseState.BUILDING


def test_a_phase_approved_during_a_pause_request_pauses_the_run_without_queuing_more(
    run: Run,
) -> None:
    _phase, ticket = start_and_claim(run)
    services.run_pause(run_id=run.pk)
    built(ticket)
    result = services.phase_verdict_record(
        ticket=ticket, model="a", verdict={"verdict": "approve", "issues": []}
    )
    run.refresh_from_db()
    assert result.outcome == "complete"
    assert run.state == RunState.PAUSED
    assert (run.completed_phases, run.percent_complete) == (1, 11)
    assert not run.phases.filter(state=PhaseState.QUEUED).exists()


def test_a_revise_verdict_starts_the_next_attempt_with_the_issues_as_feedback(run: Run) -> None:
    phase, ticket = start_and_claim(run)
    built(ticket)
    issues = [{"severity": "major", "title": "No test", "detail": "add one"}]
    result = services.phase_verdict_record(
        ticket=ticket, model="a", verdict={"verdict": "revise", "issues": issues}
    )
    phase.refresh_from_db()
    assert result.outcome == "revise" and result.next_ticket is not None
    assert result.next_ticket.attempt_number == 2
    assert result.next_ticket.feedback == issues
    assert (phase.state, phase.attempt_count, phase.issues_major) == (PhaseState.BUILDING, 2, 1)


def test_a_phase_not_approved_within_max_attempts_fails_the_run(run: Run) -> None:
    Run.objects.filter(pk=run.pk).update(max_attempts=1)
    _phase, ticket = start_and_claim(run)
    built(ticket)
    services.phase_verdict_record(
        ticket=ticket,
        model="a",
        verdict={"verdict": "revise", "issues": [{"severity": "critical", "title": "Broken"}]},
    )
    run.refresh_from_db()
    assert run.state == RunState.FAILED
    assert "not approved after 1 attempt: Broken" in run.state_reason
    assert run.phases.filter(state=PhaseState.SKIPPED).count() == 8


def test_stopping_mid_phase_cancels_it_at_the_builder_checkpoint(run: Run) -> None:
    phase, ticket = start_and_claim(run)
    services.run_stop(run_id=run.pk)
    run.refresh_from_db()
    assert run.state == RunState.STOPPING
    assert services.phase_builder_done(ticket=ticket, model="m", output="built") is False
    run.refresh_from_db()
    phase.refresh_from_db()
    assert run.state == RunState.STOPPED
    assert phase.state == PhaseState.CANCELLED and phase.builder_output == "built"
    assert not run.phases.exclude(state=PhaseState.CANCELLED).exists()


@pytest.mark.parametrize("control", ["run_resume", "run_pause", "run_stop"])
def test_controls_on_a_completed_run_are_illegal_and_change_nothing(run: Run, control: str) -> None:
    Run.objects.filter(pk=run.pk).update(state=RunState.COMPLETED)
    with pytest.raises(IllegalTransition) as info:
        getattr(services, control)(run_id=run.pk)
    assert info.value.current == RunState.COMPLETED
    run.refresh_from_db()
    assert run.state == RunState.COMPLETED


def test_resuming_a_pending_run_is_illegal(run: Run) -> None:
    with pytest.raises(IllegalTransition):
        services.run_resume(run_id=run.pk)


def test_the_sweeper_hands_a_phase_with_an_expired_lease_to_a_new_task(run: Run) -> None:
    services.run_start(run_id=run.pk)
    phase = first_phase(run)
    old = phase.dispatch_token
    services.phase_claim(phase_id=phase.pk, token=old)
    Phase.objects.filter(pk=phase.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert services.phases_sweep_expired() == 1
    phase.refresh_from_db()
    assert phase.state == PhaseState.QUEUED and phase.dispatch_token != old
    assert (phase.attempt_count, phase.lost_worker_count) == (0, 1)
    assert phase.attempts.get().outcome == PhaseAttempt.Outcome.ABANDONED
    assert phase.events.filter(kind=PhaseEvent.Kind.WORKER_LOST).count() == 1
    assert services.phase_claim(phase_id=phase.pk, token=old) is None
    assert services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token) is not None


def test_the_sweeper_leaves_a_phase_whose_lease_is_alive(run: Run) -> None:
    services.run_start(run_id=run.pk)
    phase = first_phase(run)
    services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token)
    assert services.phases_sweep_expired() == 0
    phase.refresh_from_db()
    assert phase.state == PhaseState.BUILDING


# --- the claim: one statement on PostgreSQL for a first attempt, the ORM otherwise -----------


def test_a_first_claim_writes_the_attempt_its_event_and_the_builders_route(
    run: Run, monkeypatch: pytest.MonkeyPatch, django_assert_num_queries: Any
) -> None:
    set_provider_keys(monkeypatch)
    services.run_start(run_id=run.pk)
    phase = first_phase(run)
    before = timezone.now()
    ticket = services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token)
    assert ticket is not None
    phase.refresh_from_db()
    assert (phase.state, phase.attempt_count) == (PhaseState.BUILDING, 1)
    assert phase.started_at is not None and phase.lease_expires_at is not None
    assert phase.started_at >= before and phase.lease_expires_at > phase.started_at
    attempt = phase.attempts.get()
    assert (attempt.pk, attempt.number, attempt.outcome) == (
        ticket.attempt_id,
        1,
        PhaseAttempt.Outcome.IN_PROGRESS,
    )
    assert (attempt.dispatch_token, attempt.feedback) == (phase.dispatch_token, [])
    assert list(phase.events.values_list("kind", "message")) == [
        (PhaseEvent.Kind.CLAIMED, "attempt 1")
    ]
    route = PhaseRoutingDecision.objects.get(phase=phase)
    assert ticket.builder_route is not None
    assert (route.role, route.attempt_number, route.model) == (
        "builder",
        1,
        ticket.builder_route.model,
    )
    # The prompt's material came with the claim: reading it costs no query.
    with django_assert_num_queries(0):
        names = (ticket.phase.name, ticket.phase.tier.name, ticket.phase.run.name)
    assert names == (phase.name, phase.tier.name, run.name)
    assert ticket.run_has_notes is False


def test_a_phase_handed_on_mid_revision_is_claimed_with_the_last_verdicts_issues(
    run: Run,
) -> None:
    # attempt_count > 0: the ORM's claim, which carries the auditor's issues over.
    phase, ticket = start_and_claim(run)
    built(ticket)
    issues = [{"severity": "major", "title": "No test", "detail": "add one"}]
    services.phase_verdict_record(
        ticket=ticket, model="a", verdict={"verdict": "revise", "issues": issues}
    )
    Phase.objects.filter(pk=phase.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert services.phases_sweep_expired() == 1
    phase.refresh_from_db()
    assert (phase.state, phase.attempt_count) == (PhaseState.QUEUED, 1)
    again = services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token)
    assert again is not None
    assert (again.attempt_number, again.feedback) == (2, issues)
    assert again.phase.tier.name and again.phase.run.name == run.name
    assert list(
        phase.events.filter(kind=PhaseEvent.Kind.CLAIMED).values_list("message", flat=True)
    ) == [
        "attempt 1",
        "attempt 2",
    ]


def test_a_run_with_notes_says_so_in_the_ticket(run: Run, tmp_path: Path, settings: Any) -> None:
    settings.AUTOPACK_WORKSPACE_ROOT = str(tmp_path)
    run_note_add(run_id=run.pk, text="Use the existing mailer.")
    services.run_start(run_id=run.pk)
    phase = first_phase(run)
    ticket = services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token)
    assert ticket is not None and ticket.run_has_notes is True


def _in_thread(target: Any) -> tuple[threading.Thread, list[Any]]:
    """Run target() on its own database connection; its result or exception lands in the list."""
    out: list[Any] = []

    def body() -> None:
        try:
            out.append(target())
        except BaseException as exc:  # handed to the test
            out.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=body)
    thread.start()
    return thread, out


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("change", ["redispatch", "pause"])
def test_a_claim_waiting_for_the_run_sees_what_the_holder_changed(change: str) -> None:
    """The claim reads the phase in the statement that waits for the run's lock: a phase the
    lock's holder re-dispatched (new token) or unqueued (pause) must not be claimed with the
    old token once the holder commits."""
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    services.run_start(run_id=run.pk)
    phase = first_phase(run)
    old = phase.dispatch_token
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with transaction.atomic():
            locked = Run.objects.select_for_update().get(pk=run.pk)
            holding.set()
            release.wait(10)
            if change == "redispatch":
                services._dispatch(Phase.objects.select_for_update().get(pk=phase.pk))
            else:
                services._unqueue(Phase.objects.select_for_update().get(pk=phase.pk))
                services._set_run_state(locked, RunState.PAUSED)

    held, held_out = _in_thread(holder)
    assert holding.wait(10)
    claiming, claim_out = _in_thread(lambda: services.phase_claim(phase_id=phase.pk, token=old))
    time.sleep(0.3)  # the claim is now waiting for the run's lock
    assert claiming.is_alive()
    release.set()
    held.join(10)
    claiming.join(10)
    assert held_out == [None]
    assert claim_out == [None]  # not claimed
    phase.refresh_from_db()
    assert phase.state == (PhaseState.QUEUED if change == "redispatch" else PhaseState.PENDING)
    assert not phase.attempts.exists()
    assert not phase.events.filter(kind=PhaseEvent.Kind.CLAIMED).exists()
