"""Runs one phase on a worker (DESIGN.md "One phase"): restore the run's tree to its savepoint,
builder, checkpoint, apply and commit the builder's edits, the checks (sandboxed), auditor,
verdict. A change that cannot be applied, or fails a check, goes back to the builder without an
auditor call.

The slow work — provider calls, git, the checks — happens outside any transaction; each step
that changes state is one service call in `runs.services`. A heartbeat thread renews the
phase's lease while the worker is alive, so the sweeper re-dispatches the phase only when the
worker is really gone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from types import TracebackType
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection

from routing.calls import ModelResponse, ProviderCallError
from routing.router import QuotaPolicyError, RoutingDecision, RoutingError, router
from routing.services import fallback_after_error, model_invoke
from routing.text import storable
from routing.types import RouteKey
from usage.vocabulary import Role

from . import services
from .edits import EditError, parse_edits
from .guards import guards_evaluate
from .models import Phase, PhaseEvent, Run
from .notes import run_notes_text
from .prompts import (
    AUDITOR_SYSTEM,
    BUILDER_SYSTEM,
    VerdictError,
    auditor_prompt,
    builder_prompt,
    named_paths,
    parse_verdict,
)
from .sandbox import CheckResult, run_check
from .services import AttemptTicket, LeaseLost
from .states import RunState
from .workspace import (
    Commit,
    FileList,
    ProtectedPaths,
    RunTree,
    WorkspaceError,
    workspace_apply,
    workspace_approve,
    workspace_begin,
    workspace_commit,
    workspace_prepare,
    workspace_read,
)

logger = logging.getLogger(__name__)
# An auditor reply that is not a verdict is asked for again this many times before the
# phase fails with the reason.
VERDICT_RETRIES = 2
# How often a running check looks whether its run is being stopped (one indexed read).
STOP_POLL_SECONDS = 0.5


class LeaseKeeper:
    """Renews the phase's lease, and writes its holder's heartbeat, until closed."""

    def __init__(self, *, phase_id: int, token: str) -> None:
        self.phase_id, self.token = phase_id, token
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lease-keeper")

    def _beat(self) -> None:
        # Each renewal is also the holder's heartbeat (runs.holders), which must come more
        # often than a third of the lease for a dead holder elsewhere to be found in seconds.
        interval = max(
            min(
                settings.AUTOPACK_PHASE_LEASE_SECONDS / 3,
                settings.AUTOPACK_WORKER_HEARTBEAT_SECONDS,
            ),
            0.2,
        )
        try:
            while not self._stop.wait(interval):
                try:
                    if not services.phase_lease_renew(phase_id=self.phase_id, token=self.token):
                        self.lost.set()
                        return
                except Exception:  # a database blip: try again at the next beat
                    logger.exception("lease renewal failed for phase %s", self.phase_id)
        finally:
            connection.close()

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _route(ticket: AttemptTicket, phase: Phase, role: str) -> RoutingDecision:
    # The claim's routing context, not the run's current one: a run override made while
    # this phase is in flight must not switch its model between attempts.
    decision = router.select(
        RouteKey(role, phase.category, phase.complexity), ticket.routing_context
    )
    services.phase_routing_record(ticket=ticket, decision=decision)
    return decision


class CallFailed(Exception):
    """A model call failed on every candidate the router offered; the message names each
    model tried, its error and how many attempts it got."""


def _failure_reporter(phase_id: int, role: str, model: str, attempts: list[int]):  # type: ignore[no-untyped-def]
    def report(error: ProviderCallError, attempt: int) -> None:
        attempts[0] = attempt
        services.phase_event_record(
            phase_id=phase_id,
            kind=PhaseEvent.Kind.PROVIDER_ERROR,
            message=f"{role} call {attempt} to {error.provider}/{model}: {error.kind}"
            f"{' (will retry)' if error.retryable and not error.left_for_fallback else ''}"
            f": {error.message}",
        )

    return report


def _call(
    ticket: AttemptTicket, decision: RoutingDecision, system: str, prompt: str, step: str
) -> tuple[ModelResponse, RoutingDecision]:
    """One model call: retried by the client, then handed to the router's next candidate
    (recorded as a routing decision), until one answers or none is left (CallFailed). Returns
    the response and the decision that produced it."""
    failures: list[str] = []
    failed_providers: set[str] = set()
    while True:
        attempts = [0]
        # The first model keeps the plain key; a fallback is another call, with its own key.
        suffix = f":{decision.model}" if failures else ""
        try:
            result = model_invoke(
                decision=decision,
                system=system,
                prompt=prompt,
                run_id=ticket.run_id,
                phase_id=ticket.phase_id,
                call_key=f"{ticket.token}:{ticket.attempt_number}:{step}{suffix}",
                attempt=ticket.attempt_number,
                # A builder writes whole files: its reply must not be cut at a chat's length.
                max_tokens=settings.AUTOPACK_BUILDER_MAX_OUTPUT_TOKENS
                if decision.role == Role.BUILDER
                else None,
                on_failure=_failure_reporter(
                    ticket.phase_id, decision.role, decision.model, attempts
                ),
            )
        except ProviderCallError as exc:
            failed_providers.add(decision.provider)
            tries = "1 attempt" if attempts[0] <= 1 else f"{attempts[0]} attempts"
            failures.append(
                f"{decision.provider}/{decision.model} {exc.kind} after {tries}: {exc.message}"
            )
            fallback = fallback_after_error(
                decision=decision, failed_providers=failed_providers, error=exc
            )
            if fallback is None:
                raise CallFailed("; ".join(failures)) from None
            services.phase_routing_record(ticket=ticket, decision=fallback)
            decision = fallback
            continue
        # Guards act through pause/stop, which this worker meets at its next checkpoint.
        guards_evaluate()
        return result.response, decision


def execute_phase(*, phase_id: int, token: str) -> str:
    """Run a queued phase to its end (or to a checkpoint that stops it). Returns the outcome."""
    ticket = services.phase_claim(phase_id=phase_id, token=token)
    if ticket is None:
        return "not claimed"
    with LeaseKeeper(phase_id=phase_id, token=token) as lease:
        try:
            return _attempts(ticket, lease)
        except LeaseLost:
            logger.warning("phase %s: lease lost; another worker has it", phase_id)
            return "lease lost"
        finally:
            close_old_connections()


def _prepare(ticket: AttemptTicket) -> RunTree:
    """The run's tree (made at its first claim; the same one at every claim after)."""
    run = ticket.phase.run
    tree = workspace_prepare(run_id=run.pk, workspace=run.workspace, source=run.source)
    if run.base_commit and tree.base != run.base_commit:
        # Another repository than the one the run began in: this worker does not see the
        # folder the run's first worker used (README: workers on several machines).
        raise WorkspaceError(
            f"this worker's repository for the run ({tree.repository}) does not hold the "
            f"commit the run started from ({run.base_commit[:12]}): is AUTOPACK_WORKSPACE_ROOT "
            "the same shared folder on every worker?"
        )
    if run.workspace_path != str(tree.path):
        services.run_tree_record(
            run_id=run.pk, workspace_path=str(tree.path), branch=tree.branch, base_commit=tree.base
        )
        run.workspace_path, run.branch, run.base_commit = str(tree.path), tree.branch, tree.base
    return tree


def _builder_prompt(ticket: AttemptTicket, tree: RunTree, files: FileList) -> str:
    phase = ticket.phase
    wanted = [*named_paths(phase, files.paths), *ticket.previous_files]
    contents = workspace_read(tree=tree, paths=wanted) if wanted else []
    return builder_prompt(
        phase=phase,
        attempt=ticket.attempt_number,
        feedback=ticket.feedback,
        human_notes=run_notes_text(run_id=phase.run_id) if ticket.run_has_notes else "",
        files=files.paths,
        files_total=files.total,
        contents=contents,
        refusal=ticket.refusal,
    )


def _change(commit: Commit) -> services.ChangeRecord:
    return services.ChangeRecord(
        sha=commit.sha,
        files=list(commit.paths),
        added=commit.added,
        removed=commit.removed,
        diff=storable(commit.diff),
        diff_truncated=commit.diff_shortened,
    )


class _StopWatch:
    """should_cancel for a running check: true once the run is stopping (a stop ends the
    check's whole process tree) or this worker lost the phase. The lease itself is renewed by
    the LeaseKeeper thread all along; this reads the run's state at most every STOP_POLL s."""

    def __init__(self, ticket: AttemptTicket, lease: LeaseKeeper) -> None:
        self.run_id, self.lease = ticket.run_id, lease
        self.next_read = 0.0

    def __call__(self) -> bool:
        if self.lease.lost.is_set():
            return True
        now = time.monotonic()
        if now < self.next_read:
            return False
        self.next_read = now + STOP_POLL_SECONDS
        state = Run.objects.filter(pk=self.run_id).values_list("state", flat=True).first()
        return state in (RunState.STOPPING, RunState.STOPPED, None)


def _check_dict(result: CheckResult) -> dict[str, Any]:
    return {
        "command": result.command,
        "outcome": str(result.outcome),
        "exit_code": result.exit_code,
        "duration_s": round(result.duration_s, 3),
        "output": storable(result.output),
        "sandboxed": result.sandboxed,
        "reason": result.reason,
    }


def _run_checks(ticket: AttemptTicket, tree: RunTree, lease: LeaseKeeper) -> list[dict[str, Any]]:
    """The plan's checks, then the phase's, in order; the first that does not pass ends the
    list (a failing check is what the builder must fix first, and a check that timed out
    already took its whole budget)."""
    phase = ticket.phase
    commands = [*phase.run.check_commands, *phase.check_commands]
    results: list[dict[str, Any]] = []
    watch = _StopWatch(ticket, lease)
    for command in commands:
        result = run_check(command=command, workspace=tree.path, should_cancel=watch)
        results.append(_check_dict(result))
        if not result.passed:
            break
    return results


def _attempts(ticket: AttemptTicket, lease: LeaseKeeper) -> str:
    phase = ticket.phase
    run = phase.run
    try:
        tree = _prepare(ticket)
    except WorkspaceError as exc:
        services.phase_fail(ticket=ticket, reason=f"the run's workspace: {exc}")
        return "failed"
    protected = ProtectedPaths.compile(run.protected_paths)
    while True:
        try:
            # Every attempt starts from the savepoint: a refused, failed or abandoned attempt
            # (a worker killed mid-apply too) leaves nothing behind.
            begun = workspace_begin(tree=tree, to=run.head_commit or tree.base)
            prompt = _builder_prompt(ticket, tree, begun.files)
        except WorkspaceError as exc:
            services.phase_fail(ticket=ticket, reason=f"the run's workspace: {exc}")
            return "failed"
        try:
            # The claim routed the first builder call in its own transaction when it could.
            builder = ticket.builder_route or _route(ticket, phase, Role.BUILDER)
            built, builder = _call(ticket, builder, BUILDER_SYSTEM, prompt, "builder")
        except QuotaPolicyError as exc:
            services.phase_fail(ticket=ticket, reason=str(exc))
            return "failed"
        except RoutingError as exc:
            services.phase_pause_for_quota(ticket=ticket, error=exc)
            return "paused"
        except CallFailed as exc:
            services.phase_fail(ticket=ticket, reason=f"builder call failed: {exc}")
            return "failed"
        if lease.lost.is_set():
            raise LeaseLost("lease lost during the builder call")
        if not services.phase_builder_done(
            ticket=ticket, model=builder.model, output=built.text, prompt=prompt
        ):
            return "stopped"

        # Apply and commit: git and the disk, outside any transaction.
        try:
            applied = workspace_apply(tree=tree, edits=parse_edits(built.text), protected=protected)
        except EditError as exc:
            result = services.phase_change_refuse(ticket=ticket, error=str(exc))
            if result.outcome != "revise" or result.next_ticket is None:
                return result.outcome
            ticket = result.next_ticket
            continue
        except WorkspaceError as exc:
            services.phase_fail(ticket=ticket, reason=f"applying the change: {exc}")
            return "failed"
        try:
            commit = workspace_commit(
                tree=tree,
                applied=applied,
                phase=phase.name,
                attempt=ticket.attempt_number,
                model=builder.model,
            )
        except WorkspaceError as exc:
            services.phase_fail(ticket=ticket, reason=f"committing the change: {exc}")
            return "failed"
        services.phase_change_record(ticket=ticket, change=_change(commit))

        checks = _run_checks(ticket, tree, lease)
        if lease.lost.is_set():
            raise LeaseLost("lease lost during the checks")
        checked = services.phase_checks_record(ticket=ticket, checks=checks)
        if checked.outcome == "revise" and checked.next_ticket is not None:
            ticket = checked.next_ticket
            continue
        if checked.outcome != "audit":
            return checked.outcome

        try:
            auditor = _route(ticket, phase, Role.AUDITOR)
            verdict = None
            for ask in range(VERDICT_RETRIES + 1):
                reply, auditor = _call(
                    ticket,
                    auditor,
                    AUDITOR_SYSTEM,
                    auditor_prompt(
                        phase=phase,
                        attempt=ticket.attempt_number,
                        builder_output=built.text,
                        diff=commit.diff,
                        diff_shortened=commit.diff_shortened,
                        checks=checks,
                    ),
                    f"auditor{ask}",
                )
                try:
                    verdict = parse_verdict(reply.text)
                    break
                except VerdictError as exc:
                    services.phase_event_record(
                        phase_id=ticket.phase_id,
                        kind=PhaseEvent.Kind.PROVIDER_ERROR,
                        message=f"auditor reply {ask + 1} unusable: {exc}",
                    )
            if verdict is None:
                services.phase_fail(ticket=ticket, reason="the auditor gave no usable verdict")
                return "failed"
        except QuotaPolicyError as exc:
            services.phase_fail(ticket=ticket, reason=str(exc))
            return "failed"
        except RoutingError as exc:
            services.phase_pause_for_quota(ticket=ticket, error=exc)
            return "paused"
        except CallFailed as exc:
            services.phase_fail(ticket=ticket, reason=f"auditor call failed: {exc}")
            return "failed"
        if lease.lost.is_set():
            raise LeaseLost("lease lost during the auditor call")
        result = services.phase_verdict_record(ticket=ticket, model=auditor.model, verdict=verdict)
        if result.outcome == "complete":
            # The database already names this commit the run's head (the next phase restores
            # to it and moves the ref then, should this worker die first).
            with contextlib.suppress(WorkspaceError):
                workspace_approve(tree=tree, commit=commit.sha)
        if result.outcome != "revise" or result.next_ticket is None:
            return result.outcome
        ticket = result.next_ticket
