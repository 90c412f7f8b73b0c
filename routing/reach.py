"""Which providers can be called, told by the processes that call them (issue 15, item 1).

Calls are made by workers, and only a worker's environment holds the keys that count: the web,
API and MCP processes may be started without them (an MCP server started as the README says
has none of the keys `make run` gives its worker). So each worker reports, at its start and on
each heartbeat (runs.tasks), the names of the providers whose key variable is set in its own
environment; a process deciding whether a provider is usable for a change (routing.mapping)
counts a provider as configured when this process holds its key or a live worker (a report
newer than AUTOPACK_WORKER_LOST_AFTER_SECONDS) reports it. A worker choosing a model for a call
keeps reading its own environment (ModelRouter.provider_status).

What the surfaces show as a provider's "configured" (GET /dashboard/models, the admin's provider
and cap lists) is the workers' word alone (ProviderReach.reach): a key in the web process's
environment calls nothing, and "no worker has reported" is told apart from "the workers report
no key for it".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .models import WorkerProviderReport
from .providers import Endpoint

# A row nobody has refreshed for this many lost-after periods belongs to a worker long gone:
# each report deletes such rows, so the table holds about one row per running worker.
FORGET_AFTER_LOST_PERIODS = 100


def providers_with_keys(endpoints: Iterable[Endpoint]) -> list[str]:
    """The names of the providers whose key variable is set in this process (never a key)."""
    return sorted(e.name for e in endpoints if e.api_key_configured)


@transaction.atomic
def worker_providers_report(*, worker: str, providers: Iterable[str]) -> None:
    now = timezone.now()
    WorkerProviderReport.objects.update_or_create(
        worker=worker, defaults={"providers": sorted(providers), "reported_at": now}
    )
    forget = timedelta(
        seconds=settings.AUTOPACK_WORKER_LOST_AFTER_SECONDS * FORGET_AFTER_LOST_PERIODS
    )
    WorkerProviderReport.objects.filter(reported_at__lt=now - forget).delete()


def worker_providers_withdraw(*, worker: str) -> None:
    """A worker stopping cleanly says so at once instead of being found lost later."""
    WorkerProviderReport.objects.filter(worker=worker).delete()


class Reach(StrEnum):
    """Whether the workers can call a provider, as they report it."""

    # A live worker reports the provider's key set in its environment: calls can be made.
    REPORTED = "reported"
    # No live worker has reported at all (none running, or all lost): nobody can tell.
    NO_WORKER = "no_worker"
    # Live workers have reported, and none of them has this provider's key.
    NO_KEY = "no_key"

    @property
    def configured(self) -> bool:
        return self is Reach.REPORTED

    @property
    def label(self) -> str:
        return REACH_LABELS[self]


REACH_LABELS = {
    Reach.REPORTED: "a running worker has its key",
    Reach.NO_WORKER: "no worker has reported",
    Reach.NO_KEY: "running workers report no key",
}


@dataclass(frozen=True, slots=True)
class ProviderReach:
    """What the live workers report: how many there are and the providers they can call."""

    live_workers: int
    reported: frozenset[str]

    def reach(self, provider: str) -> Reach:
        """Whether the workers can call `provider`, on their word alone (not this process's
        environment): what every surface shows as the provider being configured."""
        if provider in self.reported:
            return Reach.REPORTED
        return Reach.NO_KEY if self.live_workers else Reach.NO_WORKER

    def problem(self, provider: str, *, key_here: bool) -> str | None:
        """Why `provider` cannot be called, in words for a person; None when it can."""
        if key_here or provider in self.reported:
            return None
        if not self.live_workers:
            return (
                f"{provider} is not configured in this process, and no worker is running to "
                "tell which providers are configured"
            )
        return (
            f"{provider} is not configured on any running worker (no API key in their environment)"
        )


def provider_reach() -> ProviderReach:
    since = timezone.now() - timedelta(seconds=settings.AUTOPACK_WORKER_LOST_AFTER_SECONDS)
    rows = list(
        WorkerProviderReport.objects.filter(reported_at__gte=since).values_list(
            "providers", flat=True
        )
    )
    return ProviderReach(
        live_workers=len(rows),
        reported=frozenset(name for providers in rows for name in providers),
    )
