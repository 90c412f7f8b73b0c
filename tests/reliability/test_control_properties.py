"""Pause, resume, stop and model overrides fired at a running run, one at a time and in
concurrent bursts, in an order Hypothesis chooses: after every step the state machine's
invariants hold, and the run ends in a legal final state with usage and phases intact."""

from __future__ import annotations

import itertools
import os
import threading
import time
from datetime import datetime
from typing import Any

import pytest
from django.db import close_old_connections, connection, transaction
from django.utils import timezone
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from runs import services
from runs.models import PhaseEvent, Run
from runs.states import (
    PHASE_IN_FLIGHT,
    PHASE_TERMINAL,
    RUN_TERMINAL,
    RUN_TRANSITIONS,
    IllegalTransition,
    PhaseState,
    RunState,
)
from tests.conftest import WorkerProcess, wait_for

from .checks import (
    assert_completed,
    assert_no_phase_ran_twice,
    assert_usage_equals_reported,
    start_run,
    state_of,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.needs_broker,
    pytest.mark.slow,
]

CATEGORY, COMPLEXITY = "core_backend", "low"
MODELS = ["gpt-5", "gpt-5-mini", "claude-haiku-4-5", "gemini-2.5-flash", "glm-4.6"]
CONTROLS = ["pause", "resume", "stop"]
# A refused control is only right when the run is already where it cannot apply; these
# states are absorbing, so checking them after the refusal is free of races.
REFUSED_ONLY_IN = {
    "pause": {RunState.STOPPING, *RUN_TERMINAL},
    "resume": {RunState.STOPPING, *RUN_TERMINAL},
    "stop": {RunState.COMPLETED, RunState.FAILED},
    "override": set(RUN_TERMINAL),
}


def _reachable() -> dict[str, set[str]]:
    closure = {s: {s} for s in RUN_TRANSITIONS}
    changed = True
    while changed:
        changed = False
        for seen in closure.values():
            more = set().union(*(RUN_TRANSITIONS[s] for s in seen)) - seen
            if more:
                seen |= more
                changed = True
    return closure


REACHABLE = _reachable()
_examples = itertools.count(1)


class RunControls(RuleBasedStateMachine):
    sim: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.tag = f"prop{next(_examples)}x{int(time.time() * 1000) % 100000}"
        self.run: Run = start_run(self.tag, phases=4, max_attempts=4)
        self.last_state = RunState.RUNNING
        self.stop_accepted = False
        # (commit time, role, model) of each accepted run override
        self.overrides: list[tuple[datetime, str, str]] = []
        self.lock = threading.Lock()

    # --- firing controls ----------------------------------------------------------------------

    def _fire(self, action: str) -> None:
        """One control, as an admin action, API view or command would call it."""
        try:
            if action == "pause":
                services.run_pause(run_id=self.run.pk)
            elif action == "resume":
                services.run_resume(run_id=self.run.pk)
            elif action == "stop":
                services.run_stop(run_id=self.run.pk)
                with self.lock:
                    self.stop_accepted = True
            else:
                role, model = action.split(":", 1)
                services.run_model_override(
                    run_id=self.run.pk,
                    role=role,
                    category=CATEGORY,
                    complexity=COMPLEXITY,
                    model=model,
                    via="property test",
                )
                with self.lock:
                    self.overrides.append((timezone.now(), role, model))
        except IllegalTransition:
            kind = action if action in CONTROLS else "override"
            now = state_of(Run.objects.get(pk=self.run.pk))
            assert now in REFUSED_ONLY_IN[kind], f"{action} refused while the run is {now}"

    @rule(action=st.sampled_from(CONTROLS))
    def control(self, action: str) -> None:
        self._fire(action)

    @rule(role=st.sampled_from(["builder", "auditor"]), model=st.sampled_from(MODELS))
    def override(self, role: str, model: str) -> None:
        self._fire(f"{role}:{model}")

    @rule(
        actions=st.lists(
            st.sampled_from([*CONTROLS, "builder:gpt-5", "auditor:glm-4.6"]),
            min_size=2,
            max_size=4,
        )
    )
    def burst(self, actions: list[str]) -> None:
        """Several controls at the same instant, each on its own connection."""
        barrier = threading.Barrier(len(actions))
        failures: list[BaseException] = []

        def fire(action: str) -> None:
            try:
                barrier.wait(timeout=10)
                self._fire(action)
            except BaseException as exc:  # re-raised in the test thread below
                failures.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=fire, args=(a,)) for a in actions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        if failures:
            raise failures[0]

    @rule(seconds=st.sampled_from([0.05, 0.2, 0.5]))
    def let_it_work(self, seconds: float) -> None:
        time.sleep(seconds)

    @precondition(lambda self: self.last_state == RunState.PAUSED)
    @rule()
    def paused_run_stays_still(self) -> None:
        calls = len(self.sim.requests())
        time.sleep(0.3)
        run = Run.objects.get(pk=self.run.pk)
        if run.state == RunState.PAUSED:  # nobody resumed it meanwhile (no thread is left)
            assert len(self.sim.requests()) == calls

    # --- invariants, on one consistent snapshot -------------------------------------------

    @invariant()
    def state_machine_holds(self) -> None:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            run = Run.objects.get(pk=self.run.pk)
            phases = list(run.phases.order_by("position").values_list("position", "state"))
        state = run.state
        assert state in REACHABLE[self.last_state], f"{self.last_state} then {state}"
        self.last_state = RunState(state)
        in_flight = [(p, s) for p, s in phases if s in PHASE_IN_FLIGHT]
        complete = [p for p, s in phases if s == PhaseState.COMPLETE]
        assert len(in_flight) <= 1, phases
        assert complete == list(range(1, len(complete) + 1)), phases  # in order, no gaps
        assert run.completed_phases == len(complete)
        if state == RunState.RUNNING:
            assert len(in_flight) == 1, phases
        if state == RunState.PAUSE_REQUESTED:
            assert [s for _, s in in_flight] in (
                [PhaseState.BUILDING],
                [PhaseState.AUDITING],
            ), phases
        if state in (RunState.PAUSED, *RUN_TERMINAL):
            assert not in_flight, (state, phases)
        if state == RunState.COMPLETED:
            assert len(complete) == len(phases)
        if state in (RunState.STOPPED, RunState.FAILED):
            assert all(s in PHASE_TERMINAL for _, s in phases), phases
        if self.stop_accepted:
            assert state in (RunState.STOPPING, RunState.STOPPED), state

    # --- the end -----------------------------------------------------------------------------

    def teardown(self) -> None:
        def settled() -> bool:
            state = state_of(self.run)
            if state == RunState.PAUSED:
                services.run_resume(run_id=self.run.pk)
                return False
            return state in RUN_TERMINAL

        wait_for(settled, timeout=90, interval=0.2, what=f"run {self.run.pk} to finish")
        self.state_machine_holds()
        run = self.run
        if self.stop_accepted:
            assert run.state == RunState.STOPPED, run.state_reason
        if run.state == RunState.COMPLETED:
            assert_completed(run)
        elif run.state == RunState.FAILED:
            assert "was not approved after 4 attempts" in run.state_reason
        else:
            assert run.state == RunState.STOPPED
        assert_usage_equals_reported(run, self.sim, self.tag)
        assert_no_phase_ran_twice(run, self.sim, self.tag)
        self._check_models()

    def _check_models(self) -> None:
        """A phase keeps the model it started with, through all its attempts; a phase started
        after an override uses it."""
        for phase in self.run.phases.all():
            claimed = phase.events.filter(kind=PhaseEvent.Kind.CLAIMED).order_by("id").first()
            if claimed is None:
                continue
            for role in ("builder", "auditor"):
                models = set(
                    phase.routing_decisions.filter(role=role)
                    .exclude(reason__startswith="error fallback")
                    .values_list("model", flat=True)
                )
                assert len(models) <= 1, (phase.position, role, models)
                if not models:
                    continue
                before = [m for at, r, m in self.overrides if r == role and at < claimed.created_at]
                if before:
                    # An override committed after the claim may or may not have been read yet.
                    later = {
                        m for at, r, m in self.overrides if r == role and at >= claimed.created_at
                    }
                    assert models <= {before[-1], *later}, (phase.position, role, models)


def test_controls_fired_in_any_order_and_at_once_keep_the_run_legal(
    celery_worker: WorkerProcess, sim: Any
) -> None:
    sim.configure(delay=0.1, revise_rate=0.25)
    RunControls.sim = sim
    run_state_machine_as_test(
        RunControls,
        settings=settings(
            max_examples=int(os.environ.get("AUTOPACK_PROPERTY_EXAMPLES", "12")),
            stateful_step_count=10,
            deadline=None,
            database=None,
            # Each example is a real run on a real worker: shrinking would replay dozens.
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
            suppress_health_check=list(HealthCheck),
        ),
    )
    close_old_connections()
