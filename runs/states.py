"""The one transition table for runs and phases (DESIGN.md "States").

Every state change in the project goes through `require_run_transition` /
`require_phase_transition`; an illegal one raises `IllegalTransition`, which the API maps to 409.
"""

from __future__ import annotations

from django.db import models


class RunState(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    PAUSE_REQUESTED = "pause_requested", "Pause requested"
    PAUSED = "paused", "Paused"
    STOPPING = "stopping", "Stopping"
    STOPPED = "stopped", "Stopped"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"


class PhaseState(models.TextChoices):
    PENDING = "pending", "Pending"
    QUEUED = "queued", "Queued"
    BUILDING = "building", "Building"
    AUDITING = "auditing", "Auditing"
    COMPLETE = "complete", "Complete"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"
    SKIPPED = "skipped", "Skipped"


RUN_TRANSITIONS: dict[str, frozenset[str]] = {
    RunState.PENDING: frozenset({RunState.RUNNING, RunState.STOPPED, RunState.FAILED}),
    RunState.RUNNING: frozenset(
        {
            RunState.PAUSE_REQUESTED,
            # A hard quota limit pauses at once: no phase is in flight when the router refuses.
            RunState.PAUSED,
            RunState.STOPPING,
            RunState.COMPLETED,
            RunState.FAILED,
        }
    ),
    RunState.PAUSE_REQUESTED: frozenset(
        {
            RunState.PAUSED,
            RunState.RUNNING,  # resume before the pause took effect withdraws the request
            RunState.STOPPING,
            RunState.COMPLETED,
            RunState.FAILED,
        }
    ),
    RunState.PAUSED: frozenset({RunState.RUNNING, RunState.STOPPED, RunState.FAILED}),
    RunState.STOPPING: frozenset({RunState.STOPPED, RunState.FAILED}),
    RunState.STOPPED: frozenset(),
    RunState.COMPLETED: frozenset(),
    RunState.FAILED: frozenset(),
}

PHASE_TRANSITIONS: dict[str, frozenset[str]] = {
    PhaseState.PENDING: frozenset({PhaseState.QUEUED, PhaseState.CANCELLED, PhaseState.SKIPPED}),
    PhaseState.QUEUED: frozenset(
        {
            PhaseState.BUILDING,
            PhaseState.QUEUED,  # re-dispatch of a message the broker lost
            PhaseState.PENDING,  # the run paused before a worker claimed it
            PhaseState.CANCELLED,
            PhaseState.SKIPPED,
        }
    ),
    PhaseState.BUILDING: frozenset(
        {
            PhaseState.AUDITING,
            # the next attempt: the change could not be applied or failed a check, and goes
            # back to the builder without an audit
            PhaseState.BUILDING,
            PhaseState.QUEUED,  # worker lost: lease expired, handed to another worker
            PhaseState.FAILED,
            PhaseState.CANCELLED,
            PhaseState.PENDING,  # run paused for quota before the builder call
        }
    ),
    PhaseState.AUDITING: frozenset(
        {
            PhaseState.BUILDING,  # auditor asked for a revision
            PhaseState.COMPLETE,
            PhaseState.QUEUED,
            PhaseState.FAILED,
            PhaseState.CANCELLED,
            PhaseState.PENDING,
        }
    ),
    PhaseState.COMPLETE: frozenset(),
    PhaseState.FAILED: frozenset(),
    PhaseState.CANCELLED: frozenset(),
    PhaseState.SKIPPED: frozenset(),
}

RUN_TERMINAL = frozenset({RunState.STOPPED, RunState.COMPLETED, RunState.FAILED})
RUN_ACTIVE = frozenset(
    {RunState.RUNNING, RunState.PAUSE_REQUESTED, RunState.PAUSED, RunState.STOPPING}
)
PHASE_TERMINAL = frozenset(
    {PhaseState.COMPLETE, PhaseState.FAILED, PhaseState.CANCELLED, PhaseState.SKIPPED}
)
PHASE_IN_FLIGHT = frozenset({PhaseState.QUEUED, PhaseState.BUILDING, PhaseState.AUDITING})


class IllegalTransition(Exception):
    """A state change the table does not allow; carries the current state for a 409 reply."""

    def __init__(
        self, entity: str, entity_id: object, current: str, target: str, *, message: str = ""
    ) -> None:
        self.entity, self.entity_id, self.current, self.target = entity, entity_id, current, target
        self.explained = bool(message)  # already a sentence for a person: shown as it is
        # `message`: what the refusal means to a person, where the target is not a state (a
        # model change for a run that has finished) and the table's wording would read oddly.
        super().__init__(message or f"{entity} {entity_id} is {current}; it cannot become {target}")


def require_run_transition(run_id: object, current: str, target: str) -> None:
    if target not in RUN_TRANSITIONS[current]:
        raise IllegalTransition("run", run_id, current, target)


def require_phase_transition(phase_id: object, current: str, target: str) -> None:
    if target not in PHASE_TRANSITIONS[current]:
        raise IllegalTransition("phase", phase_id, current, target)
