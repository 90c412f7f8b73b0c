"""ModelRouter: the one place a model is chosen for a call (DESIGN.md step 2).

Order: per-run override → the run's mapping snapshot (taken at run start from: global override →
category override → complexity_models) → live mapping (same order) → quota check.

The mapping and the providers' quota state are kept in memory per process and reloaded when
`RoutingPolicy.version` moves (checked at most every AUTOPACK_ROUTER_REFRESH_SECONDS) or the
quota state is older than AUTOPACK_QUOTA_REFRESH_SECONDS, so a decision on the hot path reads no
database.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

OK, SOFT, HARD, UNCONFIGURED = "ok", "soft", "hard", "unconfigured"
# How the API, the dashboard and ModelChange name the any-category (complexity_models) row;
# ModelRoute stores it as category "".
ANY_CATEGORY = "*"
GLOBAL_ANY_REASON = "global override (any category)"
ANY_ROW_REASONS = frozenset({"baseline", GLOBAL_ANY_REASON})


class RoutingError(Exception):
    """No model may serve this call now (hard caps, no keys): the run pauses with this reason."""


class QuotaPolicyError(RoutingError):
    """A critical category's primary is over its soft limit and the policy is fail_fast."""


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    role: str
    category: str
    complexity: str
    model: str
    provider: str
    reason: str
    candidates: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    api_key_env: str
    base_url: str

    @property
    def effective_base_url(self) -> str:
        # Read at call time so `make run` and the tests can point a provider at the simulated
        # provider without editing the mapping.
        return os.environ.get(f"AUTOPACK_{self.name.upper()}_BASE_URL") or self.base_url

    @property
    def api_key_configured(self) -> bool:
        return bool(os.environ.get(self.api_key_env))


@dataclass
class RouterState:
    version: int
    providers: dict[str, Endpoint]
    catalogue: dict[str, str]  # model → provider
    # (layer, role, category, complexity) → model; category "" is the complexity_models row
    routes: dict[tuple[str, str, str, str], str]
    fallbacks: dict[str, tuple[str, ...]]
    critical: frozenset[str]
    quota_policy: str
    roles: frozenset[str] = field(default_factory=frozenset)

    def resolve(self, role: str, category: str, complexity: str) -> tuple[str, str]:
        mapped_role = role if role in self.roles else "builder"
        suffix = "" if mapped_role == role else f" ({role} uses the builder mapping)"
        for layer, cat, reason in (
            ("global_override", category, "global override"),
            ("baseline", category, "category override"),
            # A global change of the any-category row yields to a category's own override,
            # exactly as the complexity_models row it replaces does.
            ("global_override", "", GLOBAL_ANY_REASON),
            ("baseline", "", "baseline"),
        ):
            model = self.routes.get((layer, mapped_role, cat, complexity))
            if model:
                return model, reason + suffix
        raise RoutingError(f"no model is mapped for {role} {category}:{complexity}")


class ModelRouter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: RouterState | None = None
        self._checked_at = 0.0
        self._quota: dict[str, str] = {}
        self._quota_at = 0.0

    # --- caches ---

    def invalidate(self) -> None:
        with self._lock:
            self._state, self._checked_at, self._quota_at = None, 0.0, 0.0

    def state(self) -> RouterState:
        now = time.monotonic()
        state = self._state
        if state is not None and now - self._checked_at < settings.AUTOPACK_ROUTER_REFRESH_SECONDS:
            return state
        from .models import RoutingPolicy

        version = RoutingPolicy.objects.filter(pk=1).values_list("version", flat=True).first()
        with self._lock:
            if self._state is None or self._state.version != version:
                self._state = load_router_state()
            self._checked_at = now
            return self._state

    def quota_status(self) -> dict[str, str]:
        now = time.monotonic()
        if now - self._quota_at >= settings.AUTOPACK_QUOTA_REFRESH_SECONDS:
            status = provider_quota_status()
            with self._lock:
                self._quota, self._quota_at = status, now
        return self._quota

    def provider_status(self, provider: str) -> str:
        endpoint = self.state().providers.get(provider)
        if endpoint is None or not endpoint.api_key_configured:
            return UNCONFIGURED
        return self.quota_status().get(provider, OK)

    # --- the decision ---

    def select_model(
        self,
        *,
        role: str,
        category: str,
        complexity: str,
        run_context: dict[str, Any] | None = None,
        with_quota: bool = True,
    ) -> RoutingDecision:
        state = self.state()
        key = f"{category}:{complexity}"
        context = run_context or {}
        overrides = context.get("model_overrides", {}).get(role, {})
        override = overrides.get(key)
        snapshot = context.get("mapping", {}).get(role, {}).get(key)
        if override and override in state.catalogue:
            model, reason = override, "run override"
        else:
            if snapshot and snapshot[0] in state.catalogue:
                model, reason = snapshot[0], snapshot[1]
            else:
                model, reason = state.resolve(role, category, complexity)
            # A run override of the any-category row ("*") replaces what that row gave, and
            # leaves categories with an override of their own alone, as a global change does.
            generic = overrides.get(f"{ANY_CATEGORY}:{complexity}")
            if generic and generic in state.catalogue and _from_any_row(reason):
                model, reason = generic, "run override (any category)"
        if not with_quota:
            return RoutingDecision(
                role, category, complexity, model, state.catalogue[model], reason, (model,)
            )
        return self._apply_quota(state, role, category, complexity, model, reason)

    def _apply_quota(
        self,
        state: RouterState,
        role: str,
        category: str,
        complexity: str,
        model: str,
        reason: str,
    ) -> RoutingDecision:
        candidates = (model, *state.fallbacks.get(model, ()))
        quota = self.quota_status()

        def status_of(candidate: str) -> str:
            # provider_status() without re-checking the state's age for every candidate.
            provider = state.catalogue[candidate]
            endpoint = state.providers.get(provider)
            if endpoint is None or not endpoint.api_key_configured:
                return UNCONFIGURED
            return quota.get(provider, OK)

        primary = status_of(model)
        if primary == OK:
            # The common case, on the path of every call: the fallbacks' states are not needed.
            return RoutingDecision(
                role, category, complexity, model, state.catalogue[model], reason, candidates
            )
        statuses = {m: status_of(m) for m in candidates}

        def decide(chosen: str, why: str) -> RoutingDecision:
            return RoutingDecision(
                role=role,
                category=category,
                complexity=complexity,
                model=chosen,
                provider=state.catalogue[chosen],
                reason=why,
                candidates=candidates,
            )

        provider = state.catalogue[model]
        critical = category in state.critical
        if primary == SOFT and critical:
            if state.quota_policy == "fail_fast":
                raise QuotaPolicyError(
                    f"{provider} is over its soft limit and {category} is critical "
                    f"(quota_policy fail_fast): {model} not called"
                )
            return decide(
                model, f"{reason}; {provider} over soft limit, kept (critical, keep_primary)"
            )
        for alt in candidates[1:]:
            if statuses[alt] == OK:
                return decide(alt, f"quota fallback: {provider} {_words(primary)}; {model} → {alt}")
        if primary == SOFT:
            return decide(
                model, f"{reason}; {provider} over soft limit, no fallback under its own soft limit"
            )
        for alt in candidates[1:]:
            if statuses[alt] == SOFT and not critical:
                return decide(
                    alt,
                    f"quota fallback: {provider} {_words(primary)}; "
                    f"{model} → {alt} (itself over soft limit)",
                )
        raise RoutingError(
            f"no model can serve {role} {category}:{complexity}: "
            + ", ".join(f"{state.catalogue[m]} {_words(statuses[m])}" for m in candidates)
        )

    def mapping_snapshot(self, pairs: set[tuple[str, str]]) -> dict[str, dict[str, list[str]]]:
        """The resolved mapping for a run's (category, complexity) pairs, kept in its
        run_context so a global change made later leaves the run alone."""
        state = self.state()
        roles = sorted(state.roles | {"builder", "auditor"})
        return {
            role: {f"{c}:{x}": list(state.resolve(role, c, x)) for c, x in sorted(pairs)}
            for role in roles
        }


def _from_any_row(reason: str) -> bool:
    # Agent roles append " (agent:x uses the builder mapping)" to the reason.
    return any(reason == r or reason.startswith(f"{r} (") for r in ANY_ROW_REASONS)


def _words(status: str) -> str:
    return {
        SOFT: "over soft limit",
        HARD: "at its cap",
        UNCONFIGURED: "not configured (no API key)",
    }.get(status, status)


def load_router_state() -> RouterState:
    from .models import CatalogueModel, Fallback, ModelRoute, ProviderEndpoint, RoutingPolicy

    policy = RoutingPolicy.objects.filter(pk=1).first()
    routes = {
        (layer, role, cat, cx): model
        for layer, role, cat, cx, model in ModelRoute.objects.values_list(
            "layer", "role", "category", "complexity", "model__name"
        )
    }
    fallbacks: dict[str, list[str]] = {}
    for model, alt in Fallback.objects.order_by("model_id", "position").values_list(
        "model__name", "alternative__name"
    ):
        fallbacks.setdefault(model, []).append(alt)
    return RouterState(
        version=policy.version if policy else 0,
        providers={
            e.name: Endpoint(e.name, e.api_key_env, e.base_url)
            for e in ProviderEndpoint.objects.all()
        },
        catalogue=dict(CatalogueModel.objects.values_list("name", "provider")),
        routes=routes,
        fallbacks={k: tuple(v) for k, v in fallbacks.items()},
        critical=frozenset(policy.critical_categories if policy else ()),
        quota_policy=policy.quota_policy if policy else "keep_primary",
        roles=frozenset(r for (_, r, _, _) in routes),
    )


def provider_quota_status() -> dict[str, str]:
    """ok / soft / hard per provider, over the day, week and month periods."""
    from usage.selectors import get_provider_usage_summary

    status: dict[str, str] = {}
    rank = {OK: 0, SOFT: 1, HARD: 2}
    for period in ("day", "week", "month"):
        for row in get_provider_usage_summary(period=period):
            level = HARD if row["over_hard_limit"] else SOFT if row["over_soft_limit"] else OK
            if rank[level] > rank[status.get(row["provider"], OK)]:
                status[row["provider"]] = level
    return status


router = ModelRouter()


def select_model(
    *,
    role: str,
    category: str,
    complexity: str,
    run_context: dict[str, Any] | None = None,
    with_quota: bool = True,
) -> RoutingDecision:
    return router.select_model(
        role=role,
        category=category,
        complexity=complexity,
        run_context=run_context,
        with_quota=with_quota,
    )
