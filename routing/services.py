"""Calling a chosen model and metering the call (DESIGN.md steps 3 and 4)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings

from usage.services import UsageRecord, record_usage

from .clients import ModelResponse, ProviderCallError, ProviderConfig, call_with_retries
from .router import RoutingDecision, router


@dataclass(frozen=True)
class InvokeResult:
    response: ModelResponse
    usage_event_id: int


def provider_config(name: str) -> ProviderConfig:
    endpoint = router.state().providers[name]
    return ProviderConfig(
        name=name, api_key_env=endpoint.api_key_env, base_url=endpoint.effective_base_url
    )


def model_invoke(
    *,
    decision: RoutingDecision,
    system: str,
    prompt: str,
    run_id: int | None = None,
    phase_id: int | None = None,
    call_key: str,
    on_failure: Callable[[ProviderCallError, int], None] | None = None,
    stream: bool = False,
) -> InvokeResult:
    """Call the decided model (retrying transient errors) and record the usage it reports.

    call_key identifies this call for idempotent metering: recording the same call twice
    (e.g. a task retried after it recorded but before it committed) never counts twice.
    """
    response = call_with_retries(
        provider=provider_config(decision.provider),
        model=decision.model,
        system=system,
        prompt=prompt,
        stream=stream,
        timeout=settings.AUTOPACK_PROVIDER_TIMEOUT_SECONDS,
        max_retries=settings.AUTOPACK_PROVIDER_MAX_RETRIES,
        backoff_seconds=settings.AUTOPACK_PROVIDER_BACKOFF_SECONDS,
        on_failure=on_failure,
    )
    call_id = (
        f"{decision.provider}:{response.provider_request_id}"
        if response.provider_request_id
        else call_key
    )
    event, _created = record_usage(
        record=UsageRecord(
            call_id=call_id,
            provider=decision.provider,
            model=decision.model,
            role=decision.role,
            usage=response.usage,
            run_id=run_id,
            phase_id=phase_id,
            provider_request_id=response.provider_request_id,
            latency_ms=response.latency_ms,
        )
    )
    return InvokeResult(response=response, usage_event_id=event.pk)
