"""A worker SIGKILLed in the middle of a real build (issue 13): while it applies a change, and
while a check runs. The next claim restores the run's tree to its savepoint: nothing
half-applied survives, the check's processes are gone with the worker, and nothing runs twice."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runs import services
from runs.models import PhaseAttempt, PhaseEvent, Run
from runs.plans import parse_plan_bytes
from runs.sandbox import sandbox_status
from tests.conftest import WorkerProcess, wait_for
from tests.runs.test_builds import APPROVE, _processes_with, git
from tests.sim_fixtures import write_reply

from .checks import assert_completed, assert_no_phase_ran_twice, wait_finished

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.needs_broker,
    pytest.mark.slow,
]


def start(tag: str, checks: str = "") -> Run:
    plan = (
        f"name: {tag}\ntiers:\n  - name: One\n    phases:\n"
        f"      - {{name: {tag} step 1, category: core_backend, complexity: low{checks}}}\n"
    )
    run = services.run_create(plan=parse_plan_bytes(plan.encode()))
    services.run_start(run_id=run.pk)
    return run


def test_a_worker_killed_while_applying_leaves_nothing_half_applied(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str], sim: Any
) -> None:
    tag = "killapply"
    suffix = uuid.uuid4().hex[:6]
    sim.add_script(role="auditor", verdict=APPROVE, count=-1)
    first = {f"half/{i}.txt": f"first {i}\n" for i in range(4)}
    sim.add_script(role="builder", text=write_reply(first), count=1)
    sim.add_script(role="builder", text=write_reply({"whole.txt": "second\n"}), count=1)
    worker_env["AUTOPACK_TEST_KILL_AFTER_WRITES"] = "2"
    doomed = start_worker(
        f"doomed-{suffix}", beat=False, extra_args=["--include", "tests.reliability.applykill"]
    )
    del worker_env["AUTOPACK_TEST_KILL_AFTER_WRITES"]
    run = start(tag)
    proc = doomed.proc
    assert proc is not None
    wait_for(lambda: proc.poll() is not None, timeout=60, what="the worker to die mid-apply")
    run.refresh_from_db()
    tree = Path(run.workspace_path)
    # The kill came between two writes: the tree holds half of the change.
    assert sorted(p.name for p in (tree / "half").iterdir()) == ["0.txt", "1.txt"]

    start_worker(f"rescuer-{suffix}")
    wait_finished(run)
    assert_completed(run)
    assert_no_phase_ran_twice(run, sim, tag)
    assert not (tree / "half").exists()
    assert (tree / "whole.txt").read_text() == "second\n"
    phase = run.phases.get()
    abandoned = phase.attempts.get(outcome=PhaseAttempt.Outcome.ABANDONED)
    assert abandoned.commit_sha == ""  # killed before its commit
    approved = phase.attempts.get(outcome=PhaseAttempt.Outcome.APPROVED)
    assert git(
        run.workspace_path, "show", "--name-only", "--format=", approved.commit_sha
    ).split() == ["whole.txt"]
    assert phase.events.filter(kind=PhaseEvent.Kind.WORKER_LOST).count() == 1


@pytest.mark.skipif(not sandbox_status().available, reason="bubblewrap cannot make a sandbox")
def test_a_worker_killed_while_a_check_runs_takes_the_check_with_it(
    start_worker: Callable[..., WorkerProcess], sim: Any
) -> None:
    tag = "killcheck"
    suffix = uuid.uuid4().hex[:6]
    sim.add_script(role="auditor", verdict=APPROVE, count=-1)
    # The first change makes its check hang (a file `hang`); the retry's does not.
    sim.add_script(role="builder", text=write_reply({"hang": "", "a.txt": "a\n"}), count=1)
    sim.add_script(role="builder", text=write_reply({"a.txt": "b\n"}), count=1)
    doomed = start_worker(f"doomed-{suffix}", beat=False)
    run = start(tag, checks=", checks: ['test ! -f hang || { touch started; sleep 6005; }']")

    def check_running() -> bool:
        run.refresh_from_db()
        return bool(run.workspace_path) and (Path(run.workspace_path) / "started").exists()

    wait_for(check_running, timeout=60, what="the check to start")
    doomed.kill()
    # The sandbox dies with the worker (--die-with-parent, its own PID namespace).
    wait_for(lambda: not _processes_with("6005"), timeout=15, what="the check's processes gone")

    start_worker(f"rescuer-{suffix}")
    wait_finished(run)
    assert_completed(run)
    assert_no_phase_ran_twice(run, sim, tag)
    tree = Path(run.workspace_path)
    assert not (tree / "hang").exists() and not (tree / "started").exists()
    assert (tree / "a.txt").read_text() == "b\n"
    phase = run.phases.get()
    abandoned = phase.attempts.get(outcome=PhaseAttempt.Outcome.ABANDONED)
    assert abandoned.commit_sha and abandoned.checks == []  # committed, its check never ended
    run.refresh_from_db()
    branch = git(run.workspace_path, "rev-list", f"{run.base_commit}..{run.branch}").split()
    assert branch == [phase.commit_sha] != [abandoned.commit_sha]
