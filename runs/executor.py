"""Runs one phase on a worker: builder, checkpoint, auditor, verdict (DESIGN.md "One phase").

The slow provider calls happen outside any transaction; each step that changes state is one
service call in `runs.services`. A heartbeat thread renews the phase's lease while the worker
is alive, so the sweeper re-dispatches the phase only when the worker is really gone.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from django.conf import settings
from django.db import close_old_connections, connection

from routing.clients import ModelResponse, ProviderCallError
from routing.router import QuotaPolicyError, RoutingDecision, RoutingError, select_model
from routing.services import fallback_after_error, model_invoke

from . import services
from .guards import guards_evaluate
from .models import Phase, PhaseEvent
from .notes import run_notes_text
from .prompts import (
    AUDITOR_SYSTEM,
    BUILDER_SYSTEM,
    VerdictError,
    auditor_prompt,
    builder_prompt,
    parse_verdict,
)
from .services import AttemptTicket, LeaseLost

logger = logging.getLogger(__name__)
# An auditor reply that is not a verdict is asked for again this many times before the
# phase fails with the reason.
VERDICT_RETRIES = 2


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
    decision = select_model(
        role=role,
        category=phase.category,
        complexity=phase.complexity,
        run_context=ticket.routing_context,
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
            f"{' (will retry)' if error.retryable else ''}: {error.message}",
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


def _attempts(ticket: AttemptTicket, lease: LeaseKeeper) -> str:
    phase = ticket.phase
    run = phase.run
    while True:
        try:
            # The claim routed the first builder call in its own transaction when it could.
            builder = ticket.builder_route or _route(ticket, phase, "builder")
            prompt = builder_prompt(
                phase=phase,
                attempt=ticket.attempt_number,
                feedback=ticket.feedback,
                human_notes=run_notes_text(run_id=run.pk) if ticket.run_has_notes else "",
            )
            built, builder = _call(ticket, builder, BUILDER_SYSTEM, prompt, "builder")
        except QuotaPolicyError as exc:
            services.phase_fail(ticket=ticket, reason=str(exc))
            return "failed"
        except RoutingError as exc:
            services.phase_pause_for_quota(ticket=ticket, reason=str(exc))
            return "paused"
        except CallFailed as exc:
            services.phase_fail(ticket=ticket, reason=f"builder call failed: {exc}")
            return "failed"
        if lease.lost.is_set():
            raise LeaseLost("lease lost during the builder call")
        if not services.phase_builder_done(ticket=ticket, model=builder.model, output=built.text):
            return "stopped"

        try:
            auditor = _route(ticket, phase, "auditor")
            verdict = None
            for ask in range(VERDICT_RETRIES + 1):
                reply, auditor = _call(
                    ticket,
                    auditor,
                    AUDITOR_SYSTEM,
                    auditor_prompt(
                        phase=phase, attempt=ticket.attempt_number, builder_output=built.text
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
            services.phase_pause_for_quota(ticket=ticket, reason=str(exc))
            return "paused"
        except CallFailed as exc:
            services.phase_fail(ticket=ticket, reason=f"auditor call failed: {exc}")
            return "failed"
        if lease.lost.is_set():
            raise LeaseLost("lease lost during the auditor call")
        result = services.phase_verdict_record(ticket=ticket, model=auditor.model, verdict=verdict)
        if result.outcome != "revise" or result.next_ticket is None:
            return result.outcome
        ticket = result.next_ticket
