from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _seed_mapping(sender: AppConfig, **kwargs: Any) -> None:
    from django.conf import settings

    from .mapping import mapping_seed_if_empty

    mapping_seed_if_empty(path=settings.AUTOPACK_MODELS_FILE)


def register_baseline_prices_ids() -> None:
    """Tell the meter how genai-prices names each provider of the baseline file, before any
    call is priced: a process that meters calls without ever routing one (the web process
    taking agents' usage) has not loaded the router state, which registers the stored ids
    (routing.router) and so overrides these. Reading the file only (no database in ready());
    a missing or broken file is reported by the mapping seed, not here."""
    from django.conf import settings

    from usage.prices import register_prices_id

    from .config import ModelsConfigError, parse_models_config
    from .mapping import load_yaml

    try:
        config = parse_models_config(load_yaml(settings.AUTOPACK_MODELS_FILE))
    except ModelsConfigError:
        return
    for provider in config.providers.values():
        register_prices_id(provider.name, provider.endpoint.prices_id)


class RoutingConfig(AppConfig):
    name = "routing"
    verbose_name = "Model routing"

    def ready(self) -> None:
        # A fresh database (and a test database after each flush) gets the committed baseline
        # mapping, so the router always has one; `import_models` replaces it on purpose.
        post_migrate.connect(_seed_mapping, sender=self, dispatch_uid="routing-seed-mapping")
        register_baseline_prices_ids()
