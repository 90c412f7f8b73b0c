"""Celery tasks of the usage app: thin callers of usage.services (STYLE.md §5)."""

from __future__ import annotations

from celery import shared_task

from . import provider_usage, services


@shared_task(name="usage.tasks.fold_usage", ignore_result=True)
def fold_usage() -> int:
    # Beat sends this every AUTOPACK_USAGE_FOLD_SECONDS; a late or doubled one folds nothing.
    return services.usage_fold()


@shared_task(name="usage.tasks.fetch_provider_usage", ignore_result=True)
def fetch_provider_usage() -> int:
    # Beat sends this every AUTOPACK_PROVIDER_USAGE_SECONDS; providers without an admin key are
    # skipped, and a doubled send re-reads the same buckets (an upsert: nothing counts twice).
    return sum(result.stored for result in provider_usage.provider_usage_fetch_all())
