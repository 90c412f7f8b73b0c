"""Calling a chosen model and metering the call (DESIGN.md steps 3 and 4)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection

from usage.models import UsageEvent
from usage.services import (
    UsageRecord,
    estimate_prompt_tokens,
    in_flight_call_close,
    in_flight_call_open,
    record_usage,
)
from usage.types import TokenUsage

from .calls import ModelResponse, ProviderCallError, call_with_retries, exhausted
from .models import ProviderLimits
from .providers.limits import Cooldown, RateLimits, cooldown_after_reply
from .router import COOLED, HARD, UNCONFIGURED, RoutingDecision, router
from .types import DecisionScope

logger = logging.getLogger(__name__)
# How long a worker holding a provider's answer waits for the database to come back before it
# gives up on metering the call (the phase is then retried by the lease sweeper).
USAGE_RECORD_RETRY_SECONDS = 120.0


@dataclass(frozen=True)
class InvokeResult:
    response: ModelResponse
    usage_event_id: int


def model_invoke(
    *,
    decision: RoutingDecision,
    system: str,
    prompt: str,
    run_id: int | None = None,
    phase_id: int | None = None,
    call_key: str,
    attempt: int | None = None,
    on_failure: Callable[[ProviderCallError, int], None] | None = None,
    stream: bool = False,
    max_tokens: int | None = None,
) -> InvokeResult:
    """Call the decided model (retrying transient errors) and record the usage it reports.

    call_key identifies this call for idempotent metering: recording the same call twice
    (e.g. a task retried after it recorded but before it committed) never counts twice. The
    call is recorded as in flight before it is sent (usage.models.InFlightCall), so one whose
    worker dies waiting is metered as a lost call; the answer's usage closes it, and so does an
    error (no usage). Retries of a transient error are the same call, in flight throughout.

    A stream cut after it started was billed for what the provider had done: each such attempt
    is recorded at once as its own estimated event (`<call_key>:partial:<attempt>`, so a task
    that replays the call records it once), with the usage the provider had reported before the
    cut, or the prompt estimate when it had reported none (never a silent zero). A retry that
    succeeds is recorded as usual, so every attempt counts once.
    """
    in_flight_call_open(
        call_key=call_key,
        provider=decision.provider,
        model=decision.model,
        role=decision.role,
        system=system,
        prompt=prompt,
        run_id=run_id,
        phase_id=phase_id,
        attempt=attempt,
    )

    def attempt_failed(error: ProviderCallError, n: int) -> None:
        # A refusal that says when the limit comes back cools the provider down at once (a
        # bare 429 only when the call fails for good, below: its retry may well succeed).
        _note_limits(
            provider=decision.provider,
            limits=error.limits,
            cooldown=cooldown_after_error(error) if exhausted(error) else None,
        )
        if error.stream_cut or error.partial_usage is not None:
            _record_usage_until_stored(
                UsageRecord(
                    call_id=f"{call_key}:partial:{n}",
                    provider=decision.provider,
                    model=decision.model,
                    role=decision.role,
                    usage=error.partial_usage
                    or TokenUsage(
                        prompt_tokens=estimate_prompt_tokens(system=system, prompt=prompt),
                        completion_tokens=0,
                    ),
                    reported_model=error.reported_model,
                    run_id=run_id,
                    phase_id=phase_id,
                    estimated=True,
                )
            )
        if on_failure is not None:
            on_failure(error, n)

    try:
        response = call_with_retries(
            endpoint=router.state().providers[decision.provider],
            model=decision.model,
            system=system,
            prompt=prompt,
            stream=stream,
            max_tokens=max_tokens or settings.AUTOPACK_MAX_OUTPUT_TOKENS,
            timeout=settings.AUTOPACK_PROVIDER_TIMEOUT_SECONDS,
            max_retries=settings.AUTOPACK_PROVIDER_MAX_RETRIES,
            backoff_seconds=settings.AUTOPACK_PROVIDER_BACKOFF_SECONDS,
            on_failure=attempt_failed,
            fallback_available=_fallback_available(decision),
        )
    except ProviderCallError as error:
        if error.spends_limit and not exhausted(error):
            _note_limits(
                provider=decision.provider, limits=None, cooldown=cooldown_after_error(error)
            )
        _close_failed_call(call_key)
        raise
    _note_limits(
        provider=decision.provider,
        limits=response.limits,
        cooldown=cooldown_after_reply(
            decision.provider,
            response.limits,
            # The next call of this phase carries at least this prompt again.
            needed_tokens=estimate_prompt_tokens(system=system, prompt=prompt),
            default_seconds=settings.AUTOPACK_COOLDOWN_DEFAULT_SECONDS,
        ),
    )
    call_id = (
        f"{decision.provider}:{response.provider_request_id}"
        if response.provider_request_id
        else call_key
    )
    event = _record_usage_until_stored(
        UsageRecord(
            call_id=call_id,
            provider=decision.provider,
            model=decision.model,
            role=decision.role,
            usage=response.usage,
            reported_model=response.reported_model,
            run_id=run_id,
            phase_id=phase_id,
            provider_request_id=response.provider_request_id,
            latency_ms=response.latency_ms,
            in_flight_key=call_key,
        )
    )
    return InvokeResult(response=response, usage_event_id=event.pk)


_LIMIT_FIELDS = [
    "observed_at",
    "requests_limit",
    "requests_remaining",
    "requests_reset_at",
    "tokens_limit",
    "tokens_remaining",
    "tokens_reset_at",
    "retry_after_until",
    "headers",
]


def provider_limits_record(
    *,
    provider: str,
    limits: RateLimits | None,
    cooldown: Cooldown | None,
    now: datetime | None = None,
) -> None:
    """Keep the latest limits `provider` announced, and its cooldown if any: ONE statement
    (INSERT … ON CONFLICT (provider) DO UPDATE), as it runs after every call. A reply without
    a cooldown leaves a cooldown in force alone (a call that started before another worker's
    429 must not lift it); a cooldown ends by itself at its `until`. A cooldown is seen at once
    by this process's router, by the others at their next quota refresh."""
    if limits is None and cooldown is None:
        return
    now = now or datetime.now(UTC)
    row = ProviderLimits(provider=provider, observed_at=now)
    update_fields: list[str] = []
    if limits is not None:
        row.requests_limit = limits.requests_limit
        row.requests_remaining = limits.requests_remaining
        row.requests_reset_at = limits.requests_reset_at
        row.tokens_limit = limits.tokens_limit
        row.tokens_remaining = limits.tokens_remaining
        row.tokens_reset_at = limits.tokens_reset_at
        row.retry_after_until = limits.retry_after_until
        row.headers = dict(limits.headers)
        update_fields += _LIMIT_FIELDS
    if cooldown is not None:
        row.cooled_until, row.reason = cooldown.until, cooldown.reason[:200]
        update_fields += ["cooled_until", "reason"]
    ProviderLimits.objects.bulk_create(
        [row], update_conflicts=True, unique_fields=["provider"], update_fields=update_fields
    )
    if cooldown is not None:
        router.note_cooldown(provider, cooldown)


def _note_limits(*, provider: str, limits: RateLimits | None, cooldown: Cooldown | None) -> None:
    # The limits are advice: a database that is down must not turn the provider's answer (or
    # its error, which the caller acts on) into a failure of its own.
    try:
        provider_limits_record(provider=provider, limits=limits, cooldown=cooldown)
    except (OperationalError, InterfaceError):
        logger.warning("database unreachable recording the limits of %s", provider)
        if cooldown is not None:
            router.note_cooldown(provider, cooldown)


def cooldown_after_error(error: ProviderCallError, *, now: datetime | None = None) -> Cooldown:
    """How long a provider that refused for a spent limit is left alone: until the reset it
    announced, else AUTOPACK_COOLDOWN_DEFAULT_SECONDS from now."""
    now = now or datetime.now(UTC)
    until = error.announced_reset
    if until is None or until <= now:
        until = now + timedelta(seconds=settings.AUTOPACK_COOLDOWN_DEFAULT_SECONDS)
    status = error.status_code or error.kind
    what = error.kind if error.kind == "insufficient_quota" else str(status)
    return Cooldown(until, f"{what} from {error.provider}")


def _fallback_available(decision: RoutingDecision) -> bool:
    """Whether another provider could take this call now (fallback_after_error would find
    one): only then is an exhausted provider left at once instead of retried."""
    state = router.state()
    for alt in decision.candidates:
        provider = state.catalogue.get(alt)
        if provider is None or provider == decision.provider:
            continue
        if router.provider_status(provider) not in (HARD, UNCONFIGURED, COOLED):
            return True
    return False


def _close_failed_call(call_key: str) -> None:
    """Close a call that failed for good with a provider error: it billed nothing. A database
    error here must not hide the provider's, which the caller acts on (fallback, failing the
    phase); the row then stays open and is metered as lost only if the attempt is abandoned."""
    try:
        in_flight_call_close(call_key=call_key)
    except (OperationalError, InterfaceError):
        logger.warning("database unreachable closing the failed call %s", call_key)


def _record_usage_until_stored(record: UsageRecord) -> UsageEvent:
    """record_usage, retried while the database is unreachable (restart, failover).

    The provider has billed this call already: giving up would lose its tokens for good, and
    a retry cannot count them twice (record_usage is idempotent per call_id, so a commit whose
    acknowledgement was lost is found, not repeated)."""
    deadline = time.monotonic() + USAGE_RECORD_RETRY_SECONDS
    pause = 0.2
    while True:
        try:
            return record_usage(record=record)[0]
        except (OperationalError, InterfaceError):
            if connection.in_atomic_block or time.monotonic() + pause > deadline:
                raise
            logger.warning("database unreachable recording usage of %s; retrying", record.call_id)
            connection.close()  # broken for good; the next attempt opens a new one
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def fallback_after_error(
    *, decision: RoutingDecision, failed_providers: Collection[str], error: ProviderCallError
) -> RoutingDecision | None:
    """The router's next candidate once a call to `decision` failed for good (retries spent,
    or an error retrying cannot cure): the first of the decision's candidates on a provider
    that has not failed this call and is neither at its cap nor unconfigured. None: no model
    is left and the call fails with every failure's reason."""
    state = router.state()
    for alt in decision.candidates:
        provider = state.catalogue.get(alt)
        if provider is None or provider in failed_providers:
            continue
        if router.provider_status(provider) in (HARD, UNCONFIGURED, COOLED):
            continue
        return RoutingDecision(
            key=decision.key,
            model=alt,
            provider=provider,
            scope=DecisionScope.ERROR_FALLBACK,
            reason=f"error fallback: {decision.provider} {error.kind}; {decision.model} → {alt}",
            candidates=decision.candidates,
        )
    return None
