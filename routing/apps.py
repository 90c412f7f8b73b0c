from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_delete, post_migrate, post_save


def _seed_mapping(sender: AppConfig, **kwargs: Any) -> None:
    from django.conf import settings

    from .mapping import mapping_seed_if_empty

    mapping_seed_if_empty(path=settings.AUTOPACK_MODELS_FILE)


def _caps_changed(sender: type, **kwargs: Any) -> None:
    # A provider's caps or cap windows are written in usage, which knows nothing of the router
    # (runs → routing → usage): moving the mapping version here makes every process's router
    # re-read its quota state at its next version check, as a mapping change does.
    from .mapping import caps_changed

    caps_changed()


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
        from usage.models import ProviderQuota, ProviderWindow

        for model in (ProviderQuota, ProviderWindow):
            for signal in (post_save, post_delete):
                signal.connect(
                    _caps_changed, sender=model, dispatch_uid=f"routing-caps-{model.__name__}"
                )
        register_baseline_prices_ids()
