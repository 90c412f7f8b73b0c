"""A worker SIGKILLed at the worst moments: in the auditor call, and between the commit that
queues the next phase and the enqueue of its task. (In the builder call:
tests/runs/test_engine.py::test_a_worker_killed_mid_phase_has_its_phase_retried_and_the_run_completes.)
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery.signals import after_task_publish

from runs.models import Phase, PhaseAttempt, PhaseEvent
from runs.prompts import AUDITOR_SYSTEM, auditor_prompt
from runs.states import PhaseState
from tests.conftest import WorkerProcess, wait_for
from usage.models import UsageEvent

from .checks import (
    assert_completed,
    assert_no_phase_ran_twice,
    assert_usage_equals_reported,
    calls_of,
    start_run,
    wait_finished,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.needs_broker,
    pytest.mark.slow,
]


def test_a_worker_killed_in_the_auditor_call_has_its_phase_redone_and_the_run_completes(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str], sim: Any
) -> None:
    tag = "killaudit"
    suffix = uuid.uuid4().hex[:6]
    sim.configure(revise_rate=0)
    sim.add_fault(kind="hang", hang_seconds=60, role="auditor", match=f"{tag} step 1")
    timeout = worker_env["AUTOPACK_PROVIDER_TIMEOUT_SECONDS"]
    worker_env["AUTOPACK_PROVIDER_TIMEOUT_SECONDS"] = "60"  # it is killed waiting, not timed out
    doomed = start_worker(f"doomed-{suffix}", beat=False)
    worker_env["AUTOPACK_PROVIDER_TIMEOUT_SECONDS"] = timeout
    run = start_run(tag, phases=2)
    wait_for(lambda: calls_of(sim, tag, role="auditor"), what="the auditor call")
    doomed.kill()
    phase = run.phases.get(position=1)
    assert phase.state == PhaseState.AUDITING

    start_worker(f"rescuer-{suffix}")
    wait_finished(run)

    assert_completed(run)
    # The hung auditor call never answered: it is one lost call. The killed attempt's builder
    # call did answer and is metered once, beside the retry's own builder call.
    assert_usage_equals_reported(run, sim, tag, lost=1)
    assert_no_phase_ran_twice(run, sim, tag)
    phase.refresh_from_db()
    assert phase.lost_worker_count == 1
    assert phase.events.filter(kind=PhaseEvent.Kind.WORKER_LOST).count() == 1
    abandoned = phase.attempts.get(outcome=PhaseAttempt.Outcome.ABANDONED)
    assert abandoned.builder_output  # saved before the auditor was called
    assert UsageEvent.objects.filter(phase_id=phase.pk, role="builder").count() == 2
    lost = UsageEvent.objects.get(run_id=run.pk, estimated=True)
    phase = Phase.objects.select_related("run", "tier").get(pk=phase.pk)
    sent = AUDITOR_SYSTEM + auditor_prompt(
        phase=phase,
        attempt=1,
        builder_output=abandoned.builder_output,
        diff=abandoned.diff,
        diff_shortened=abandoned.diff_truncated,
        checks=abandoned.checks,
    )
    assert (lost.phase_id, lost.role) == (phase.pk, "auditor")
    assert (lost.prompt_tokens, lost.completion_tokens) == (math.ceil(len(sent) / 4), 0)


def test_a_worker_killed_between_commit_and_enqueue_loses_no_phase(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str], sim: Any
) -> None:
    tag = "killsend"
    suffix = uuid.uuid4().hex[:6]
    sim.configure(revise_rate=0)
    worker_env["AUTOPACK_TEST_KILL_BEFORE_SEND"] = "runs.tasks.execute_phase"
    # Redis hands an unacknowledged message out again after this long: the first phase's
    # message, which the dead worker never acknowledged, comes back during the test.
    worker_env["CELERY_VISIBILITY_TIMEOUT"] = "2"
    doomed = start_worker(
        f"doomed-{suffix}", beat=False, extra_args=["--include", "tests.reliability.killpoint"]
    )
    del worker_env["AUTOPACK_TEST_KILL_BEFORE_SEND"]
    sent: list[str] = []

    def remember(
        sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any
    ) -> None:
        if sender == "runs.tasks.execute_phase" and headers:
            sent.append(headers["id"])

    after_task_publish.connect(remember, weak=False)
    try:
        run = start_run(tag, phases=3)  # sends the first phase's task, id kept in `sent`
    finally:
        after_task_publish.disconnect(remember)
    assert doomed.proc is not None
    assert doomed.proc.wait(timeout=60) == -9  # killed itself sending the second phase's task
    first, second, third = run.phases.order_by("position")
    assert (first.state, second.state, third.state) == (
        PhaseState.COMPLETE,
        PhaseState.QUEUED,
        PhaseState.PENDING,
    )
    run.refresh_from_db()
    assert run.completed_phases == 1

    rescuer = start_worker(f"rescuer-{suffix}")
    wait_finished(run)
    wait_for(
        lambda: f"execute_phase[{sent[0]}] succeeded in" in rescuer.log(),
        timeout=30,
        what="the dead worker's unacknowledged message to be delivered again",
    )

    assert re.search(rf"execute_phase\[{sent[0]}\] succeeded in \S+ 'not claimed'", rescuer.log())
    assert_completed(run)
    assert_usage_equals_reported(run, sim, tag)
    assert_no_phase_ran_twice(run, sim, tag)
    # The lost message was sent again by the sweeper; the first phase, whose own message the
    # dead worker never acknowledged, was not run again.
    assert second.events.filter(kind=PhaseEvent.Kind.REDISPATCHED).count() == 1
    assert first.events.filter(kind=PhaseEvent.Kind.CLAIMED).count() == 1
    assert not run.phases.filter(lost_worker_count__gt=0).exists()
