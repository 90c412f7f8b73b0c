"""Celery tasks: thin callers of `runs.executor` and `runs.services` (STYLE.md §5)."""

from __future__ import annotations

import logging
import threading

from celery import shared_task
from celery.signals import worker_init, worker_shutdown
from django.conf import settings
from django.db import connection

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


class ProviderReporter:
    """Reports, at the worker's start and on every heartbeat, which providers this worker can
    call (routing.reach): the web, API and MCP processes may lack the keys and read this."""

    def __init__(self) -> None:
        from .holders import holder_this_process

        holder = holder_this_process()
        self.worker = f"{holder.host} pid {holder.pid} started {holder.started}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="provider-report")

    def _report(self) -> None:
        from routing.reach import providers_with_keys, worker_providers_report
        from routing.router import router

        try:
            names = providers_with_keys(router.state().providers.values())
            worker_providers_report(worker=self.worker, providers=names)
        except Exception:  # a database blip: the next beat reports again
            logger.exception("could not report this worker's providers")

    def _beat(self) -> None:
        # All database work on this thread: a connection opened in the worker's main process
        # before a prefork pool forks would be shared with its children.
        try:
            self._report()
            while not self._stop.wait(settings.AUTOPACK_WORKER_HEARTBEAT_SECONDS):
                self._report()
        finally:
            connection.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        from routing.reach import worker_providers_withdraw

        try:
            worker_providers_withdraw(worker=self.worker)
        except Exception:  # the row then ages out after AUTOPACK_WORKER_LOST_AFTER_SECONDS
            logger.exception("could not withdraw this worker's provider report")
        finally:
            connection.close()


_reporter: ProviderReporter | None = None


@worker_init.connect
def start_provider_reports(**_: object) -> None:
    global _reporter
    _reporter = ProviderReporter()
    _reporter.start()


@worker_shutdown.connect
def stop_provider_reports(**_: object) -> None:
    if _reporter is not None:
        _reporter.stop()


@shared_task(name="runs.tasks.execute_phase", acks_late=True, reject_on_worker_lost=True)
def execute_phase(phase_id: int, token: str) -> str:
    # A duplicate or stale delivery finds the phase claimed or re-dispatched and returns.
    return executor.execute_phase(phase_id=phase_id, token=token)


@shared_task(name="runs.tasks.sweep_expired_leases", ignore_result=True)
def sweep_expired_leases() -> int:
    handed_on = services.phases_sweep_expired()
    services.runs_resume_after_quota()
    return handed_on
