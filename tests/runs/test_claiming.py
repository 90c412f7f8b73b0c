"""The claim of a queued phase (services.phase_claim), pinned by what it does, not how: claimed
once by its token, nothing written when not claimed, exactly one winner among concurrent claims,
and no claim for a paused or stopped run."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from runs import services
from runs.holders import holder_this_process
from runs.models import Phase, PhaseAttempt, PhaseEvent, Run
from runs.plans import parse_plan_bytes
from runs.states import PhaseState, RunState
from tests.factories import set_provider_keys

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"


@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    set_provider_keys(monkeypatch)


def started_run() -> tuple[Run, Phase]:
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    services.run_start(run_id=run.pk)
    return run, Phase.objects.get(run=run, position=1)


def claim_direct(phase_id: int, token: str) -> tuple[Phase, int] | None:
    """The claim as a task makes it: the claimed phase (with its run and tier) and the new
    attempt's id, or None."""
    ticket = services.phase_claim(phase_id=phase_id, token=token)
    return None if ticket is None else (ticket.phase, ticket.attempt_id)


def written(phase: Phase) -> tuple[Any, ...]:
    """What a claim writes: the phase's row, its attempts and its events."""
    row = Phase.objects.filter(pk=phase.pk).values().get()
    return (
        row,
        list(PhaseAttempt.objects.filter(phase=phase).values_list("pk", "number", "outcome")),
        list(PhaseEvent.objects.filter(phase=phase).values_list("pk", "kind")),
    )


# --- one claim at a time ----------------------------------------------------------------------


@pytest.mark.django_db
def test_a_first_claim_moves_the_phase_to_building_with_its_holder_and_clock() -> None:
    run, phase = started_run()
    holder = holder_this_process()
    before = timezone.now()
    claimed = claim_direct(phase.pk, phase.dispatch_token)
    after = timezone.now()
    assert claimed is not None
    got, attempt_id = claimed
    assert (got.pk, got.state, got.attempt_count) == (phase.pk, PhaseState.BUILDING, 1)
    assert (got.run.pk, got.run.name, got.run.state) == (run.pk, run.name, RunState.RUNNING)
    assert got.tier.pk == phase.tier_id
    phase.refresh_from_db()
    assert (phase.state, phase.attempt_count) == (PhaseState.BUILDING, 1)
    # Started now, with its first heartbeat, and leased for the lease's length from then.
    assert phase.started_at is not None and before <= phase.started_at <= after
    assert phase.heartbeat_at is not None and before <= phase.heartbeat_at <= after
    lease = timedelta(seconds=settings.AUTOPACK_PHASE_LEASE_SECONDS)
    assert phase.lease_expires_at is not None
    assert before + lease <= phase.lease_expires_at <= after + lease
    assert (phase.holder_host, phase.holder_pid_space, phase.holder_pid) == (
        holder.host,
        holder.pid_space,
        holder.pid,
    )
    attempt = PhaseAttempt.objects.get(phase=phase)
    assert (attempt.pk, attempt.number, attempt.dispatch_token, attempt.feedback) == (
        attempt_id,
        1,
        phase.dispatch_token,
        [],
    )
    assert attempt.outcome == PhaseAttempt.Outcome.IN_PROGRESS
    assert list(phase.events.values_list("kind", "message")) == [
        (PhaseEvent.Kind.CLAIMED, "attempt 1")
    ]


def _stale_token(run: Run, phase: Phase) -> str:
    return "not-the-token"


def _claimed_already(run: Run, phase: Phase) -> str:
    assert services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token) is not None
    return phase.dispatch_token


def _paused(run: Run, phase: Phase) -> str:
    services.run_pause(run_id=run.pk)
    return phase.dispatch_token


def _stopped(run: Run, phase: Phase) -> str:
    services.run_stop(run_id=run.pk)
    return phase.dispatch_token


def _paused_mid_phase_then_handed_on(run: Run, phase: Phase) -> str:
    # A pause requested while the phase builds; its worker is then lost: the sweeper pauses.
    assert services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token) is not None
    services.run_pause(run_id=run.pk)
    assert services.phases_sweep_expired(now=timezone.now() + timedelta(days=1)) == 1
    return phase.dispatch_token


@pytest.mark.django_db
@pytest.mark.parametrize(
    "case",
    [_stale_token, _claimed_already, _paused, _stopped, _paused_mid_phase_then_handed_on],
    ids=lambda f: f.__name__.strip("_"),
)
def test_a_claim_that_does_not_apply_gets_nothing_and_writes_nothing(
    case: Callable[[Run, Phase], str],
) -> None:
    run, phase = started_run()
    token = case(run, phase)
    before = written(phase)
    run_state = Run.objects.get(pk=run.pk).state
    assert claim_direct(phase.pk, token) is None
    assert claim_direct(phase.pk, token) is None  # and again: still nothing
    assert written(phase) == before
    assert Run.objects.get(pk=run.pk).state == run_state


@pytest.mark.django_db
def test_a_phase_of_a_stopped_run_is_cancelled_and_never_claimed() -> None:
    run, phase = started_run()
    token = phase.dispatch_token
    services.run_stop(run_id=run.pk)
    assert services.phase_claim(phase_id=phase.pk, token=token) is None
    phase.refresh_from_db()
    run.refresh_from_db()
    assert (run.state, phase.state) == (RunState.STOPPED, PhaseState.CANCELLED)
    assert not phase.attempts.exists()


@pytest.mark.django_db
def test_after_pause_and_resume_only_the_new_token_claims_the_first_attempt() -> None:
    run, phase = started_run()
    old = phase.dispatch_token
    services.run_pause(run_id=run.pk)
    services.run_resume(run_id=run.pk)
    phase.refresh_from_db()
    assert phase.state == PhaseState.QUEUED and phase.dispatch_token not in ("", old)
    assert services.phase_claim(phase_id=phase.pk, token=old) is None
    ticket = services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token)
    assert ticket is not None and ticket.attempt_number == 1
    assert PhaseAttempt.objects.filter(phase=phase).count() == 1


@pytest.mark.django_db
def test_a_phase_handed_on_mid_revision_is_claimed_as_its_next_attempt() -> None:
    """A phase handed on with an attempt already counted: a stale token claims nothing, the
    phase's token claims its second attempt."""
    _run, phase = started_run()
    ticket = services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token)
    assert ticket is not None
    assert services.phase_builder_done(ticket=ticket, model="m", output="built")
    services.phase_checks_record(ticket=ticket, checks=[])
    services.phase_verdict_record(
        ticket=ticket, model="a", verdict={"verdict": "revise", "issues": []}
    )
    assert services.phases_sweep_expired(now=timezone.now() + timedelta(days=1)) == 1
    phase.refresh_from_db()
    assert (phase.state, phase.attempt_count) == (PhaseState.QUEUED, 1)
    before = written(phase)
    assert claim_direct(phase.pk, "not-the-token") is None
    assert written(phase) == before
    again = services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token)
    assert again is not None and again.attempt_number == 2


# --- concurrent claims, each thread on its own database connection -----------------------------


def both_at_once(*targets: Callable[[], Any]) -> list[Any]:
    """Run the targets together, each in a thread with its own connection, started at one
    barrier; their results (or exceptions) in order."""
    barrier = threading.Barrier(len(targets))
    out: list[Any] = [None] * len(targets)

    def body(i: int, target: Callable[[], Any]) -> None:
        try:
            barrier.wait(10)
            out[i] = target()
        except BaseException as exc:  # handed to the test
            out[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=body, args=(i, t)) for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    for result in out:
        if isinstance(result, BaseException):
            raise result
    return out


ROUNDS = 5


@pytest.mark.django_db(transaction=True)
def test_two_deliveries_claiming_at_once_give_exactly_one_winner() -> None:
    for _ in range(ROUNDS):
        _run, phase = started_run()
        token = phase.dispatch_token
        results = both_at_once(
            partial(services.phase_claim, phase_id=phase.pk, token=token),
            partial(services.phase_claim, phase_id=phase.pk, token=token),
        )
        assert sum(r is not None for r in results) == 1, results
        phase.refresh_from_db()
        assert (phase.state, phase.attempt_count) == (PhaseState.BUILDING, 1)
        assert phase.attempts.count() == 1
        assert phase.events.filter(kind=PhaseEvent.Kind.CLAIMED).count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_stale_and_a_current_token_at_once_only_the_current_one_claims() -> None:
    for _ in range(ROUNDS):
        _run, phase = started_run()
        token = phase.dispatch_token
        stale, current = both_at_once(
            partial(services.phase_claim, phase_id=phase.pk, token="stale-" + token[:8]),
            partial(services.phase_claim, phase_id=phase.pk, token=token),
        )
        assert stale is None and current is not None
        assert current.token == token and current.attempt_number == 1
        assert PhaseAttempt.objects.filter(phase=phase).count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("control", ["pause", "stop"])
def test_a_claim_racing_a_pause_or_stop_is_all_one_or_all_the_other(control: str) -> None:
    """Whichever commits first, the outcome is one of the two orders, never a mix: a claimed
    phase keeps building while the run waits for it, or the run paused/stopped and nothing was
    claimed."""
    act = services.run_pause if control == "pause" else services.run_stop
    for _ in range(ROUNDS):
        run, phase = started_run()
        token = phase.dispatch_token
        ticket, _ = both_at_once(
            partial(services.phase_claim, phase_id=phase.pk, token=token),
            partial(act, run_id=run.pk),
        )
        run.refresh_from_db()
        phase.refresh_from_db()
        attempts = phase.attempts.count()
        if ticket is not None:
            waiting = RunState.PAUSE_REQUESTED if control == "pause" else RunState.STOPPING
            assert (run.state, phase.state, attempts) == (waiting, PhaseState.BUILDING, 1)
        else:
            done = RunState.PAUSED if control == "pause" else RunState.STOPPED
            left = PhaseState.PENDING if control == "pause" else PhaseState.CANCELLED
            assert (run.state, phase.state, attempts) == (done, left, 0)
