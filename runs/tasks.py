"""Celery tasks: thin callers of `runs.executor` and `runs.services` (STYLE.md §5)."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.signals import worker_init

from . import executor, services

logger = logging.getLogger(__name__)


@worker_init.connect
def preload_provider_sdks(**_: object) -> None:
    """Import the provider SDKs and load the price data when a worker starts, not inside its
    first phases: they are most of a worker's memory and take a second or more to load, which
    would otherwise land on the first call to each provider (and read as the worker growing
    with its history)."""
    from routing.providers import preload_all
    from usage.prices import load_price_data

    preload_all()
    load_price_data()


@worker_init.connect
def report_sandbox(**_: object) -> None:
    """Say at start whether this worker can run a plan's checks, and how (runs.sandbox): a
    missing bubblewrap shows here, not first as a failed phase."""
    from .sandbox import sandbox_status

    status = sandbox_status()
    (logger.info if status.available else logger.warning)("Autopack: %s", status.describe())


@shared_task(name="runs.tasks.execute_phase", acks_late=True, reject_on_worker_lost=True)
def execute_phase(phase_id: int, token: str) -> str:
    # A duplicate or stale delivery finds the phase claimed or re-dispatched and returns.
    return executor.execute_phase(phase_id=phase_id, token=token)


@shared_task(name="runs.tasks.sweep_expired_leases", ignore_result=True)
def sweep_expired_leases() -> int:
    handed_on = services.phases_sweep_expired()
    services.runs_resume_after_quota()
    return handed_on
