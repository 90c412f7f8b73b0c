from __future__ import annotations

from django.apps import AppConfig


class RunsConfig(AppConfig):
    name = "runs"
    verbose_name = "Runs"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        from . import pollcache

        # After this process writes, its cached API reads first catch up with PostgreSQL's
        # notifications (runs/pollcache.py).
        connection_created.connect(pollcache.install, dispatch_uid="runs.pollcache.install")
