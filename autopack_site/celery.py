from __future__ import annotations

import os

from celery import Celery
from celery.signals import task_postrun, task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "autopack_site.settings")

app = Celery("autopack_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
@task_postrun.connect
def close_old_connections(**_: object) -> None:
    """Around every task, what Django does around every request: close a database connection
    that is broken or older than CONN_MAX_AGE, keep the others (health-checked on first use).

    Celery's own Django fix-up would otherwise close every connection before and after each
    task (settings.CELERY_DB_REUSE_MAX turns that off), so each phase paid for a new
    PostgreSQL connection: about 10 ms of the per-phase overhead (docs/benchmarks.md).
    """
    from django.db import close_old_connections as django_close_old_connections

    django_close_old_connections()
