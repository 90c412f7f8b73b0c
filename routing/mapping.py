"""Writes to the model mapping: import/export of models.yaml and global overrides.

Every write bumps `RoutingPolicy.version` in the same transaction, which is how each process's
in-memory router learns to reload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from django.db import transaction
from django.db.models import F

from usage.models import ProviderQuota
from usage.services import provider_quota_upsert, provider_windows_set
from usage.vocabulary import COMPLEXITIES

from .config import ModelsConfig, ModelsConfigError, parse_models_config
from .models import (
    CatalogueModel,
    Fallback,
    ModelChange,
    ModelRoute,
    ProviderEndpoint,
    RoutingPolicy,
    Scope,
)
from .router import router
from .text import is_category, name_problem
from .types import RouteKey


class MappingError(ValueError):
    """A mapping change is refused; nothing was written."""


def _bump_version() -> None:
    RoutingPolicy.objects.get_or_create(pk=1)
    RoutingPolicy.objects.filter(pk=1).update(version=F("version") + 1)
    transaction.on_commit(router.invalidate)


@transaction.atomic
def caps_changed() -> None:
    """A provider's caps or cap windows were saved or deleted (admin, import, services): every
    router re-reads its quota state (routing.apps connects this to their post_save/delete)."""
    _bump_version()


@transaction.atomic
def models_import(*, data: Any) -> ModelsConfig:
    """Replace the whole mapping with a models.yaml document; refused whole on any error."""
    config = parse_models_config(data)
    ModelRoute.objects.all().delete()
    Fallback.objects.all().delete()
    CatalogueModel.objects.exclude(name__in=list(config.models)).delete()
    ProviderEndpoint.objects.exclude(name__in=list(config.providers)).delete()
    for provider in config.providers.values():
        endpoint = provider.endpoint
        ProviderEndpoint.objects.update_or_create(
            name=endpoint.name,
            defaults={
                "protocol": endpoint.protocol,
                "api_key_env": endpoint.api_key_env,
                "base_url": endpoint.base_url,
                "prices_id": endpoint.prices_id,
            },
        )
        provider_quota_upsert(
            provider=provider.name,
            daily_cap_tokens=provider.daily_cap_tokens,
            weekly_cap_tokens=provider.weekly_cap_tokens,
            monthly_cap_tokens=provider.monthly_cap_tokens,
            autopack_share=provider.autopack_share,
            soft_limit=provider.soft_limit,
        )
        ProviderQuota.objects.filter(provider=provider.name).update(
            pace=provider.pace, outside_usage=provider.outside_usage
        )
        provider_windows_set(provider=provider.name, windows=provider.windows)
    catalogue = {}
    for name, provider_name in config.models.items():
        catalogue[name], _ = CatalogueModel.objects.update_or_create(
            name=name, defaults={"provider": provider_name}
        )
    routes = []
    for role, mapping in config.roles.items():
        for complexity, model in mapping.complexity_models.items():
            routes.append(
                ModelRoute(role=role, category="", complexity=complexity, model=catalogue[model])
            )
        for category, per in mapping.category_overrides.items():
            for complexity, model in per.items():
                routes.append(
                    ModelRoute(
                        role=role, category=category, complexity=complexity, model=catalogue[model]
                    )
                )
    ModelRoute.objects.bulk_create(routes)
    Fallback.objects.bulk_create(
        Fallback(model=catalogue[model], position=i, alternative=catalogue[alt])
        for model, alts in config.fallbacks.items()
        for i, alt in enumerate(alts)
    )
    RoutingPolicy.objects.update_or_create(
        pk=1,
        defaults={
            "critical_categories": list(config.critical_categories),
            "quota_policy": config.quota_policy,
        },
    )
    _bump_version()
    return config


@transaction.atomic
def provider_endpoint_set(*, name: str, protocol: str, prices_id: str) -> ProviderEndpoint:
    """Change how a provider is called (its wire protocol) and priced (its genai-prices id);
    every process's router reloads, which registers the prices id (router._endpoints)."""
    from .providers import PROTOCOLS

    if protocol not in PROTOCOLS:
        raise MappingError(f"protocol: one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if prices_id:
        _check_text(prices_id=prices_id)
    endpoint = ProviderEndpoint.objects.select_for_update().get(name=name)
    endpoint.protocol, endpoint.prices_id = protocol, prices_id.strip()
    endpoint.save(update_fields=["protocol", "prices_id"])
    _bump_version()
    return endpoint


def models_export() -> dict[str, Any]:
    """The current mapping as a models.yaml document (global overrides folded into
    category_overrides), valid input for models_import."""
    from usage.models import ProviderWindow
    from usage.windows import window_to_config

    caps = {q.provider: q for q in ProviderQuota.objects.all()}
    windows: dict[str, list[dict[str, Any]]] = {}
    for row in ProviderWindow.objects.order_by("provider", "name"):
        windows.setdefault(row.provider, []).append(window_to_config(row.spec()))
    providers: dict[str, Any] = {}
    for endpoint in ProviderEndpoint.objects.order_by("name"):
        entry: dict[str, Any] = {
            "protocol": endpoint.protocol,
            "api_key_env": endpoint.api_key_env,
            "base_url": endpoint.base_url,
        }
        if endpoint.prices_id:
            entry["prices_id"] = endpoint.prices_id
        quota = caps.get(endpoint.name)
        if quota is not None:
            entry.update(
                daily_cap_tokens=quota.daily_cap_tokens,
                weekly_cap_tokens=quota.weekly_cap_tokens,
                monthly_cap_tokens=quota.monthly_cap_tokens,
                autopack_share=float(quota.autopack_share),
                soft_limit=float(quota.soft_limit),
                pace=quota.pace,
                outside_usage=quota.outside_usage,
            )
        if endpoint.name in windows:
            entry["windows"] = windows[endpoint.name]
        providers[endpoint.name] = entry
    roles: dict[str, Any] = {}
    rows = ModelRoute.objects.select_related("model").order_by("layer")  # overrides win
    for route in rows:
        role = roles.setdefault(route.role, {"complexity_models": {}, "category_overrides": {}})
        if route.category:
            role["category_overrides"].setdefault(route.category, {})[route.complexity] = (
                route.model.name
            )
        else:
            role["complexity_models"][route.complexity] = route.model.name
    for role in roles.values():
        role["complexity_models"] = {
            c: role["complexity_models"][c] for c in COMPLEXITIES if c in role["complexity_models"]
        }
        role["category_overrides"] = {
            cat: {c: per[c] for c in COMPLEXITIES if c in per}
            for cat, per in sorted(role["category_overrides"].items())
        }
    fallbacks: dict[str, list[str]] = {}
    for fb in Fallback.objects.select_related("model", "alternative").order_by(
        "model__name", "position"
    ):
        fallbacks.setdefault(fb.model.name, []).append(fb.alternative.name)
    policy = RoutingPolicy.objects.filter(pk=1).first()
    return {
        "providers": providers,
        "models": dict(
            CatalogueModel.objects.order_by("provider", "name").values_list("name", "provider")
        ),
        "roles": dict(sorted(roles.items())),
        "critical_categories": list(policy.critical_categories) if policy else [],
        "fallbacks": fallbacks,
        "quota_policy": policy.quota_policy if policy else "keep_primary",
    }


def _check_text(**fields: str) -> None:
    # Before any query: PostgreSQL refuses a NUL even as a query parameter, and a mapping key
    # is a name shown on every page (no bidi or zero-width characters either).
    for field, value in fields.items():
        if not isinstance(value, str):
            raise MappingError(f"{field}: expected text")
        if problem := name_problem(value):
            raise MappingError(f"{field}: {problem}")


def _check_key(*, role: str, category: str, complexity: str, model: str) -> CatalogueModel:
    _check_text(role=role, category=category, complexity=complexity, model=model)
    known_roles = set(ModelRoute.objects.values_list("role", flat=True).distinct())
    if role not in known_roles:
        raise MappingError(f"role: unknown role {role!r} (one of {', '.join(sorted(known_roles))})")
    if complexity not in COMPLEXITIES:
        raise MappingError(f"complexity: one of {', '.join(COMPLEXITIES)}")
    if not category or len(category) > 64:
        raise MappingError("category: required")
    try:
        entry = CatalogueModel.objects.get(name=model)
    except CatalogueModel.DoesNotExist:
        raise MappingError(f"model: {model!r} is not in the catalogue") from None
    # Told by the workers that make the calls, not by this process's environment (issue 15).
    if problem := router.provider_problem(entry.provider):
        raise MappingError(f"model: {model!r} is served by {entry.provider}, but {problem}")
    return entry


@transaction.atomic
def model_override_global(
    *,
    role: str,
    category: str,
    complexity: str,
    model: str,
    changed_by: Any = None,
    via: str = "",
) -> ModelChange:
    """Change the default for runs started from now on; running runs keep their snapshot."""
    entry = _check_key(role=role, category=category, complexity=complexity, model=model)
    key = RouteKey.from_api(role=role, category=category, complexity=complexity)
    old = router.state().resolve(key).model
    ModelRoute.objects.update_or_create(
        layer=ModelRoute.Layer.GLOBAL_OVERRIDE,
        role=key.role,
        category=key.category,
        complexity=key.complexity,
        defaults={"model": entry},
    )
    _bump_version()
    return ModelChange.objects.create(
        changed_by=changed_by,
        scope=Scope.GLOBAL,
        role=key.role,
        category=key.api_category,
        complexity=key.complexity,
        old_model=old,
        new_model=model,
        via=via,
    )


def model_change_check(*, role: str, category: str, complexity: str, model: str) -> None:
    """Validate a run-scoped change (the runs app writes it into the run's context)."""
    _check_key(role=role, category=category, complexity=complexity, model=model)


def model_change_record(
    *,
    run_id: int,
    key: RouteKey,
    old_model: str,
    new_model: str,
    changed_by: Any = None,
    via: str = "",
) -> ModelChange:
    return ModelChange.objects.create(
        changed_by=changed_by,
        scope=Scope.RUN,
        run_id=run_id,
        role=key.role,
        category=key.api_category,
        complexity=key.complexity,
        old_model=old_model,
        new_model=new_model,
        via=via,
    )


def mapping_seed_if_empty(*, path: Path) -> bool:
    """Load the baseline file when the database has no mapping yet (fresh install, a test
    database after a flush). A broken baseline file raises: it must not go unnoticed."""
    if ModelRoute.objects.exists():
        return False
    models_import(data=load_yaml(path))
    return True


def load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ModelsConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ModelsConfigError(f"{path}: not valid YAML ({exc})") from exc


@transaction.atomic
def model_route_set(
    *, route_id: int, model: str, changed_by: Any = None, via: str = "admin"
) -> ModelChange | None:
    """Edit one mapping row in place (the admin's list editor); a global-scope change."""
    route = ModelRoute.objects.select_for_update().select_related("model").get(pk=route_id)
    if route.model.name == model:
        return None
    key = RouteKey(route.role, route.category, route.complexity)
    entry = _check_key(
        role=key.role, category=key.api_category, complexity=key.complexity, model=model
    )
    old = route.model.name
    route.model = entry
    route.save(update_fields=["model", "updated_at"])
    _bump_version()
    return ModelChange.objects.create(
        changed_by=changed_by,
        scope=Scope.GLOBAL,
        role=key.role,
        category=key.api_category,
        complexity=key.complexity,
        old_model=old,
        new_model=model,
        via=via,
    )


def critical_categories_problem(value: Any) -> str | None:
    """Why this is not a list of category names, or None (the admin form asks too)."""
    if not isinstance(value, list) or not all(is_category(c) for c in value):
        return "a list of lower-case category names such as security_auth_change"
    return None


@transaction.atomic
def routing_policy_set(*, critical_categories: list[str], quota_policy: str) -> RoutingPolicy:
    if quota_policy not in RoutingPolicy.QuotaPolicy.values:
        raise MappingError(f"quota_policy: one of {', '.join(RoutingPolicy.QuotaPolicy.values)}")
    if problem := critical_categories_problem(critical_categories):
        raise MappingError(f"critical_categories: {problem}")
    policy, _ = RoutingPolicy.objects.get_or_create(pk=1)
    policy.critical_categories = sorted(set(critical_categories))
    policy.quota_policy = quota_policy
    policy.save(update_fields=["critical_categories", "quota_policy", "updated_at"])
    _bump_version()
    return policy
