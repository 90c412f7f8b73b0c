from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _seed_mapping(sender: AppConfig, **kwargs: Any) -> None:
    from django.conf import settings

    from .mapping import mapping_seed_if_empty

    mapping_seed_if_empty(path=settings.AUTOPACK_MODELS_FILE)


class RoutingConfig(AppConfig):
    name = "routing"
    verbose_name = "Model routing"

    def ready(self) -> None:
        # A fresh database (and a test database after each flush) gets the committed baseline
        # mapping, so the router always has one; `import_models` replaces it on purpose.
        post_migrate.connect(_seed_mapping, sender=self, dispatch_uid="routing-seed-mapping")
