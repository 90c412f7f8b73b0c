"""A worker SIGKILLed mid-phase under the settings the README gives a user (60 s lease, the
default sweep and heartbeat): its phase goes to another worker within 20 s of the kill, not
after the lease's minute, by the sweeper or by the dead worker's own task coming back.
(docs: README "Settings", runs/holders.py)"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runs.models import Phase, PhaseAttempt, PhaseEvent
from runs.states import PhaseState
from tests.conftest import WorkerProcess, wait_for

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

# The bound: a killed worker's phase is handed on and done within this long.
HANDED_ON_WITHIN = 20.0
# What the shared worker_env shortens for the other fault tests; here they keep their defaults.
DEFAULTED = (
    "AUTOPACK_PHASE_LEASE_SECONDS",
    "AUTOPACK_SWEEP_INTERVAL_SECONDS",
    "AUTOPACK_WORKER_HEARTBEAT_SECONDS",
    "AUTOPACK_WORKER_LOST_AFTER_SECONDS",
)


def _state(phase: Phase) -> str:
    phase.refresh_from_db()
    return phase.state


def _children(pid: int) -> list[int]:
    """The live child processes of `pid`, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _hang_in_the_builder(worker_env: dict[str, str], sim: Any, tag: str) -> None:
    for name in DEFAULTED:
        worker_env.pop(name, None)
    sim.configure(revise_rate=0)
    sim.add_fault(kind="hang", hang_seconds=90, role="builder", match=f"{tag} step 1")


def _assert_handed_on_once_and_done(phase: Phase, run: Any, sim: Any, tag: str) -> None:
    wait_finished(run)
    assert_completed(run)
    # Every call that answered was metered once; the hung builder call, which never
    # answered, once as a lost call; and no attempt ran twice.
    assert_usage_equals_reported(run, sim, tag, lost=1)
    assert_no_phase_ran_twice(run, sim, tag)
    phase.refresh_from_db()
    assert phase.lost_worker_count == 1
    assert phase.attempts.filter(outcome=PhaseAttempt.Outcome.ABANDONED).count() == 1
    assert phase.events.filter(kind=PhaseEvent.Kind.WORKER_LOST).count() == 1


def test_a_killed_workers_phase_is_handed_on_by_the_sweeper_and_done_within_20_seconds(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str], sim: Any
) -> None:
    tag = "deadsweep"
    suffix = uuid.uuid4().hex[:6]
    _hang_in_the_builder(worker_env, sim, tag)
    timeout = worker_env["AUTOPACK_PROVIDER_TIMEOUT_SECONDS"]
    worker_env["AUTOPACK_PROVIDER_TIMEOUT_SECONDS"] = "120"  # it is killed waiting
    doomed = start_worker(f"doomed-{suffix}", beat=False)
    worker_env["AUTOPACK_PROVIDER_TIMEOUT_SECONDS"] = timeout
    run = start_run(tag, phases=2)
    wait_for(lambda: calls_of(sim, tag, role="builder"), what="the builder call")
    phase = run.phases.get(position=1)

    rescuer = start_worker(f"rescuer-{suffix}")  # with beat: the sweeper, every 5 s
    # A sweep while the holder lives leaves its phase alone, however long its call takes.
    wait_for(
        lambda: re.search(r"sweep_expired_leases\[\S+\] succeeded in ", rescuer.log()),
        timeout=60,
        what="a sweep while the first worker still holds the phase",
    )
    assert _state(phase) == PhaseState.BUILDING
    doomed.kill()
    killed = time.monotonic()
    wait_for(
        lambda: _state(phase) == PhaseState.COMPLETE,
        timeout=HANDED_ON_WITHIN,
        what="the killed worker's phase to be handed on and completed",
    )
    assert time.monotonic() - killed <= HANDED_ON_WITHIN
    _assert_handed_on_once_and_done(phase, run, sim, tag)
    assert "is gone" in phase.events.get(kind=PhaseEvent.Kind.WORKER_LOST).message


def test_a_killed_pool_process_has_its_phase_handed_on_by_its_returning_task_without_beat(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str], sim: Any
) -> None:
    # `make run`'s worker is a prefork pool: a pool process killed mid-phase has its message
    # handed back at once (acks_late, reject_on_worker_lost). No beat runs here, so nothing
    # but that returning task can hand the phase on.
    tag = "deadpool"
    _hang_in_the_builder(worker_env, sim, tag)
    worker_env["AUTOPACK_PROVIDER_TIMEOUT_SECONDS"] = "120"
    worker = start_worker(f"pool-{uuid.uuid4().hex[:6]}", pool="prefork", beat=False)
    assert worker.proc is not None
    run = start_run(tag, phases=2)
    wait_for(lambda: calls_of(sim, tag, role="builder"), what="the builder call")
    phase = run.phases.get(position=1)
    (pool_process,) = _children(worker.proc.pid)
    os.kill(pool_process, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(
        lambda: _state(phase) == PhaseState.COMPLETE,
        timeout=HANDED_ON_WITHIN,
        what="the killed pool process's phase to be handed on and completed",
    )
    assert time.monotonic() - killed <= HANDED_ON_WITHIN
    _assert_handed_on_once_and_done(phase, run, sim, tag)
    assert "its task came back" in phase.events.get(kind=PhaseEvent.Kind.WORKER_LOST).message
