"""Celery tasks of the usage app: thin callers of usage.services (STYLE.md §5)."""

from __future__ import annotations

from celery import shared_task

from . import services


@shared_task(name="usage.tasks.fold_usage", ignore_result=True)
def fold_usage() -> int:
    # Beat sends this every AUTOPACK_USAGE_FOLD_SECONDS; a late or doubled one folds nothing.
    return services.usage_fold()
