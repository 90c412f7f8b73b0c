"""Two workers, and every phase task delivered twice: each phase still runs once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery import current_app
from django.db import connection

from runs import services
from runs.models import Phase, Run
from tests.conftest import WorkerProcess, wait_for

from .checks import (
    assert_completed,
    assert_no_phase_ran_twice,
    assert_usage_equals_reported,
    create_run,
    wait_finished,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.needs_broker]
EXECUTE_PHASE = "runs.tasks.execute_phase"


class Duplicator(threading.Thread):
    """Sends a second copy of every phase task of one run as soon as its dispatch shows up,
    so the copy races the original between the two workers."""

    def __init__(self, run: Run) -> None:
        super().__init__(daemon=True, name="duplicator")
        self.run_id = run.pk
        self.sent: set[tuple[int, str]] = set()
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while not self.done.wait(0.01):
                rows = Phase.objects.filter(run_id=self.run_id).exclude(dispatch_token="")
                for key in rows.values_list("pk", "dispatch_token"):
                    if key not in self.sent:
                        self.sent.add(key)
                        current_app.send_task(EXECUTE_PHASE, args=list(key))
        finally:
            connection.close()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)


def test_two_workers_given_every_phase_task_twice_run_each_phase_once(
    start_worker: Callable[..., WorkerProcess], sim: Any
) -> None:
    tag = "twice"
    sim.configure(delay=0.2, revise_rate=0.3)
    suffix = uuid.uuid4().hex[:6]  # a fresh log: logs are appended to across sessions
    workers = [start_worker(f"one-{suffix}"), start_worker(f"two-{suffix}", beat=False)]

    def refused() -> int:
        return sum(w.log().count("'not claimed'") for w in workers)

    run = create_run(tag, phases=6)
    duplicator = Duplicator(run)
    duplicator.start()
    services.run_start(run_id=run.pk)
    try:
        wait_finished(run)
    finally:
        duplicator.stop()

    assert_completed(run)
    assert_usage_equals_reported(run, sim, tag)
    assert_no_phase_ran_twice(run, sim, tag)
    # Every dispatch was duplicated, and every copy reached a worker and was refused there.
    dispatches = {(p.pk, p.dispatch_token) for p in run.phases.all()}
    assert dispatches <= duplicator.sent and len(duplicator.sent) >= 6
    wait_for(
        lambda: refused() >= len(duplicator.sent),
        timeout=10,
        what="every duplicate to be refused",
    )
    # (More are refused only if the sweeper re-sent a phase that waited past its deadline in a
    # busy queue: the superseded message is refused too.)
    # Both workers took part (each ran a phase or refused a copy).
    assert all("succeeded in" in w.log() for w in workers)
