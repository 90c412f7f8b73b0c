"""A phase's holder (runs.holders): a dead one is found by its pid or its heartbeat, a slow
live one keeps its phase. Without a worker: the claims here are made by the test process."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db.models import F
from django.utils import timezone

from runs import services
from runs.holders import holder_alive_here, holder_this_process
from runs.models import Phase, PhaseAttempt, PhaseEvent, Run
from runs.plans import parse_plan_bytes
from runs.states import PhaseState

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"
pytestmark = pytest.mark.django_db


@pytest.fixture
def claimed() -> Phase:
    run = services.run_create(plan=parse_plan_bytes(EXAMPLE.read_bytes()))
    services.run_start(run_id=run.pk)
    phase = Phase.objects.get(run=run, position=1)
    assert services.phase_claim(phase_id=phase.pk, token=phase.dispatch_token) is not None
    phase.refresh_from_db()
    return phase


def _exited_pid() -> int:
    """The pid of a process of this machine that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_claim_records_the_process_that_holds_the_phase_and_its_first_heartbeat(
    claimed: Phase,
) -> None:
    me = holder_this_process()
    assert (claimed.holder_pid, claimed.holder_host) == (os.getpid(), me.host)
    assert (claimed.holder_pid_space, claimed.holder_started) == (me.pid_space, me.started)
    assert claimed.heartbeat_at is not None and claimed.heartbeat_at <= timezone.now()
    assert holder_alive_here(me) is True


def test_the_sweeper_hands_on_at_once_a_phase_whose_worker_is_gone_from_this_machine(
    claimed: Phase,
) -> None:
    old = claimed.dispatch_token
    Phase.objects.filter(pk=claimed.pk).update(holder_pid=_exited_pid())
    assert services.phases_sweep_expired() == 1  # its lease and heartbeat are still fresh
    claimed.refresh_from_db()
    assert claimed.state == PhaseState.QUEUED and claimed.dispatch_token != old
    assert (claimed.attempt_count, claimed.lost_worker_count) == (0, 1)
    assert claimed.attempts.get().outcome == PhaseAttempt.Outcome.ABANDONED
    lost = claimed.events.get(kind=PhaseEvent.Kind.WORKER_LOST)
    assert "is gone" in lost.message
    assert services.phase_claim(phase_id=claimed.pk, token=old) is None


def test_a_pid_now_used_by_a_later_process_is_not_taken_for_the_holder(claimed: Phase) -> None:
    Phase.objects.filter(pk=claimed.pk).update(holder_started=F("holder_started") - 1)
    assert services.phases_sweep_expired() == 1


def test_a_slow_holder_alive_on_this_machine_keeps_its_phase_whatever_its_heartbeat(
    claimed: Phase,
) -> None:
    # A heartbeat long overdue (the lease keeper starved, say): the process is there, so
    # only its lease running out hands the phase on.
    Phase.objects.filter(pk=claimed.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=10))
    assert services.phases_sweep_expired() == 0
    claimed.refresh_from_db()
    assert claimed.state == PhaseState.BUILDING and claimed.lost_worker_count == 0


def test_a_holder_on_another_machine_is_taken_for_dead_only_when_its_heartbeat_stops(
    claimed: Phase,
) -> None:
    lost_after = timedelta(seconds=settings.AUTOPACK_WORKER_LOST_AFTER_SECONDS)
    elsewhere = Phase.objects.filter(pk=claimed.pk)
    elsewhere.update(holder_pid_space="another-machine", holder_pid=_exited_pid())
    # Its pid means nothing here: however gone it looks, a recent heartbeat keeps it.
    elsewhere.update(heartbeat_at=timezone.now() - lost_after / 2)
    assert services.phases_sweep_expired() == 0
    elsewhere.update(heartbeat_at=timezone.now() - lost_after - timedelta(seconds=1))
    assert services.phases_sweep_expired() == 1
    lost = claimed.events.get(kind=PhaseEvent.Kind.WORKER_LOST)
    assert "no heartbeat" in lost.message


def test_a_renewal_of_the_lease_is_the_holders_heartbeat(claimed: Phase) -> None:
    stale = timezone.now() - timedelta(minutes=1)
    Phase.objects.filter(pk=claimed.pk).update(heartbeat_at=stale)
    assert services.phase_lease_renew(phase_id=claimed.pk, token=claimed.dispatch_token)
    claimed.refresh_from_db()
    assert claimed.heartbeat_at is not None and claimed.heartbeat_at > stale


def test_the_task_delivered_again_after_its_worker_died_hands_the_phase_on_once(
    claimed: Phase,
) -> None:
    token = claimed.dispatch_token
    Phase.objects.filter(pk=claimed.pk).update(holder_pid=_exited_pid())
    assert services.phase_claim(phase_id=claimed.pk, token=token) is None
    claimed.refresh_from_db()
    assert claimed.state == PhaseState.QUEUED and claimed.dispatch_token != token
    handed_on = claimed.dispatch_token
    lost = claimed.events.get(kind=PhaseEvent.Kind.WORKER_LOST)
    assert "its task came back" in lost.message
    # Another copy of the same message, or the sweeper after it, finds nothing to take over.
    assert services.phase_claim(phase_id=claimed.pk, token=token) is None
    assert services.phases_sweep_expired() == 0
    claimed.refresh_from_db()
    assert (claimed.dispatch_token, claimed.lost_worker_count) == (handed_on, 1)
    assert claimed.events.filter(kind=PhaseEvent.Kind.WORKER_LOST).count() == 1


def test_a_task_delivered_again_while_its_holder_lives_changes_nothing(claimed: Phase) -> None:
    before = Phase.objects.values().get(pk=claimed.pk)
    assert services.phase_claim(phase_id=claimed.pk, token=claimed.dispatch_token) is None
    assert Phase.objects.values().get(pk=claimed.pk) == before
    assert Run.objects.get(pk=claimed.run_id).phases.filter(state=PhaseState.QUEUED).count() == 0
