"""ModelRouter: the one place a model is chosen for a call (DESIGN.md step 2).

Order: per-run override → the run's mapping snapshot (taken at run start from: global override →
category override → complexity_models) → live mapping (same order) → quota check.

The mapping and the providers' quota state are kept in memory per process and reloaded when
`RoutingPolicy.version` moves (checked at most every AUTOPACK_ROUTER_REFRESH_SECONDS; every write
of the mapping, a provider's caps or its cap windows moves it) or the quota state is older than
AUTOPACK_QUOTA_REFRESH_SECONDS, so a decision on the hot path reads no database.

The quota state is per provider over every cap window it has (usage.selectors.window_usage):
at 100% of ANY window it is HARD (not called), past any window's soft limit SOFT; the window
that decides it, its percent and its reset are kept for the decision's reason and for the
quota pause (RoutingError.resume_at: when a refused call may be served again).

Pacing (ProviderQuota.pace, usage.forecast): a paced provider under every soft limit whose
forecast says some window's cap is reached before its reset at the last hour's pace is SOFT
with `paced` set, for non-critical categories only (a critical one sees it OK); worked out at the
quota-state refresh, never per decision.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.utils import timezone

from usage.vocabulary import FIXED_ROLES, Role

from .providers import Endpoint, endpoint_from_row
from .providers.limits import Cooldown
from .types import DecisionScope, MappedModel, RouteKey, RoutingContext

if TYPE_CHECKING:
    from .models import ProviderEndpoint

OK, SOFT, HARD, UNCONFIGURED = "ok", "soft", "hard", "unconfigured"
# Refused for a spent limit until the reset it announced (ProviderLimits.cooled_until): treated
# exactly as HARD (not called; its fallbacks serve), with the reason naming the reset.
COOLED = "cooled"


class RoutingError(Exception):
    """No model may serve this call now (hard caps, no keys): the run pauses with this reason.

    `blocked`: per refused provider, what refuses it ("anthropic session at 100%"), for the
    pause's reason; `resume_at`: the earliest instant one of the candidates may be called again
    (a window's reset, a cooldown's end), None when no clock frees any (no key, no reset);
    `version`: the mapping version of the state that refused (its quota state was read after
    that version was), so a pause can tell a change of caps made after the refusal."""

    def __init__(
        self,
        message: str,
        *,
        blocked: tuple[str, ...] = (),
        resume_at: datetime | None = None,
        version: int | None = None,
    ) -> None:
        super().__init__(message)
        self.blocked = blocked
        self.resume_at = resume_at
        self.version = version


class QuotaPolicyError(RoutingError):
    """A critical category's primary is over its soft limit and the policy is fail_fast."""


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    key: RouteKey
    model: str
    provider: str
    # Where the model came from; `reason` is the text a person reads (the scope's label, with
    # the details of a fallback or of a kept primary), never parsed back.
    scope: DecisionScope
    reason: str
    candidates: tuple[str, ...] = ()

    @property
    def role(self) -> str:
        return self.key.role

    @property
    def category(self) -> str:
        return self.key.category

    @property
    def complexity(self) -> str:
        return self.key.complexity


@dataclass(frozen=True, slots=True)
class ProviderQuotaState:
    """A provider's quota over all its windows: its level (OK, SOFT or HARD), the window that
    decides it (the highest percent among the windows at that level) and `until`, when the
    level clears: the latest reset of the windows at that level (None: one has no reset)."""

    level: str
    window: str = ""
    percent: float = 0.0
    reset: datetime | None = None
    until: datetime | None = None
    # "session 100% (resets 14:20)": written once when the state is read, not per decision
    # (formatting the reset costs more than the rest of a decision).
    words: str = ""
    # SOFT only because the provider is paced and `window` runs out before its reset at the
    # last hour's pace (words: "paced: at this pace its week cap is reached …"): non-critical
    # categories treat it as past its soft limit, critical ones as OK.
    paced: bool = False


@dataclass(frozen=True)
class QuotaSnapshot:
    """The quota state a decision reads: every provider's level and its cooldowns."""

    levels: dict[str, str]
    states: dict[str, ProviderQuotaState]
    cooldowns: dict[str, Cooldown]


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

    def resolve(self, key: RouteKey) -> MappedModel:
        """The live mapping's model for `key` (no run, no quota). A role without rows of its
        own (an agent) uses the builder's."""
        role = key.role if key.role in self.roles else Role.BUILDER
        layers = [
            # A global change of the any-category row yields to a category's own override,
            # exactly as the complexity_models row it replaces does.
            ("global_override", "", DecisionScope.GLOBAL_OVERRIDE_ANY),
            ("baseline", "", DecisionScope.BASELINE),
        ]
        if key.category:
            layers[:0] = [
                ("global_override", key.category, DecisionScope.GLOBAL_OVERRIDE),
                ("baseline", key.category, DecisionScope.CATEGORY_OVERRIDE),
            ]
        for layer, category, scope in layers:
            model = self.routes.get((layer, role, category, key.complexity))
            if model:
                return MappedModel(model, scope)
        raise RoutingError(f"no model is mapped for {key}")

    def reason(self, key: RouteKey, scope: DecisionScope) -> str:
        if key.role in self.roles:
            return scope.label
        return f"{scope.label} ({key.role} uses the builder mapping)"


class ModelRouter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: RouterState | None = None
        self._checked_at = 0.0
        self._quota: dict[str, str] = {}
        self._quota_states: dict[str, ProviderQuotaState] = {}
        self._quota_at = 0.0
        self._cooldowns: dict[str, Cooldown] = {}

    # --- caches ---

    def _after_fork_in_child(self) -> None:
        # The child of a fork has only the forking thread, so no one can hold the lock in it;
        # the caches it guards were assigned whole or not at all (see `router` below).
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        with self._lock:
            self._state, self._checked_at, self._quota_at = None, 0.0, 0.0
            self._cooldowns = {}

    def state(self) -> RouterState:
        now = time.monotonic()
        state = self._state
        if state is not None and now - self._checked_at < settings.AUTOPACK_ROUTER_REFRESH_SECONDS:
            return state
        from .models import RoutingPolicy

        version = RoutingPolicy.objects.filter(pk=1).values_list("version", flat=True).first()
        with self._lock:
            if self._state is None or self._state.version != version:
                # A moved version may be a cap or a window changed: re-read the quota too.
                self._state, self._quota_at = load_router_state(), 0.0
            self._checked_at = now
            return self._state

    def quota_status(self) -> dict[str, str]:
        now = time.monotonic()
        if now - self._quota_at >= settings.AUTOPACK_QUOTA_REFRESH_SECONDS:
            snapshot = quota_snapshot()
            with self._lock:
                self._quota, self._quota_states = snapshot.levels, snapshot.states
                self._cooldowns, self._quota_at = snapshot.cooldowns, now
        return self._quota

    def quota_states(self) -> dict[str, ProviderQuotaState]:
        """Per provider: its level and the window that decides it (refreshed with the quota)."""
        self.quota_status()
        return self._quota_states

    def cooldowns(self) -> dict[str, Cooldown]:
        """Every provider's latest cooldown (ended ones too: compare with now), refreshed
        with the quota state."""
        self.quota_status()
        return self._cooldowns

    def note_cooldown(self, provider: str, cooldown: Cooldown) -> None:
        """A cooldown this process just stored: its next decision sees it, without waiting
        for the quota refresh (other processes see it at theirs)."""
        with self._lock:
            self._cooldowns = {**self._cooldowns, provider: cooldown}

    def provider_status(self, provider: str, *, now: datetime | None = None) -> str:
        endpoint = self.state().providers.get(provider)
        if endpoint is None or not endpoint.api_key_configured:
            return UNCONFIGURED
        status = self.quota_status().get(provider, OK)
        cooldown = self._cooldowns.get(provider)
        if status != HARD and cooldown is not None and cooldown.active(now or _now()):
            return COOLED
        return status

    def provider_problem(self, provider: str) -> str | None:
        """Why a change may not name `provider`, for a process that makes no calls itself
        (web, API, MCP): usable when this process holds its key or a live worker reports it
        (routing.reach). None when usable. The decision for a call stays provider_status(),
        on the calling worker's own environment."""
        from .reach import provider_reach

        endpoint = self.state().providers.get(provider)
        if endpoint is None:
            return f"{provider} has no endpoint configured"
        return provider_reach().problem(provider, key_here=endpoint.api_key_configured)

    # --- the decision ---

    def select(
        self,
        key: RouteKey,
        context: RoutingContext | None = None,
        *,
        with_quota: bool = True,
        now: datetime | None = None,
        quota: QuotaSnapshot | None = None,
    ) -> RoutingDecision:
        """`quota`: decide on this quota state (quota_snapshot(now=…)) instead of the cached
        one, as the quota pause's resume check does at the instant it is given."""
        state = self.state()
        context = context or NO_CONTEXT
        override = context.overrides.get(key)
        if override and override in state.catalogue:
            mapped = MappedModel(
                override,
                DecisionScope.RUN_OVERRIDE_ANY
                if key.is_any_category
                else DecisionScope.RUN_OVERRIDE,
            )
        else:
            snapshot = context.mapping.get(key)
            if snapshot and snapshot.model in state.catalogue:
                mapped = snapshot
            else:
                mapped = state.resolve(key)
            # A run override of the any-category row ("*") replaces what that row gave, and
            # leaves categories with an override of their own alone, as a global change does.
            generic = context.overrides.get(key.any_category())
            if generic and generic in state.catalogue and mapped.scope.from_any_row:
                mapped = MappedModel(generic, DecisionScope.RUN_OVERRIDE_ANY)
        model, scope = mapped.model, mapped.scope
        reason = state.reason(key, scope)
        if not with_quota:
            return RoutingDecision(key, model, state.catalogue[model], scope, reason, (model,))
        return self._apply_quota(state, key, model, scope, reason, now, quota)

    def _apply_quota(
        self,
        state: RouterState,
        key: RouteKey,
        model: str,
        scope: DecisionScope,
        reason: str,
        now: datetime | None = None,
        snapshot: QuotaSnapshot | None = None,
    ) -> RoutingDecision:
        category = key.category
        candidates = (model, *state.fallbacks.get(model, ()))
        if snapshot is None:
            quota = self.quota_status()
            cooldowns = self._cooldowns
        else:
            quota, cooldowns = snapshot.levels, snapshot.cooldowns
        if cooldowns and now is None:
            now = _now()  # read only when some provider has a cooldown to compare with

        def status_of(candidate: str) -> str:
            # provider_status() without re-checking the state's age for every candidate.
            provider = state.catalogue[candidate]
            endpoint = state.providers.get(provider)
            if endpoint is None or not endpoint.api_key_configured:
                return UNCONFIGURED
            status = quota.get(provider, OK)
            if status == SOFT and category in state.critical:
                states = snapshot.states if snapshot is not None else self._quota_states
                paced = states.get(provider)
                if paced is not None and paced.paced:  # pacing spares critical categories
                    status = OK
            if status != HARD and cooldowns:
                cooldown = cooldowns.get(provider)
                if cooldown is not None and now is not None and cooldown.active(now):
                    return COOLED
            return status

        primary = status_of(model)
        if primary == OK:
            # The common case, on the path of every call: the fallbacks' states are not needed.
            return RoutingDecision(key, model, state.catalogue[model], scope, reason, candidates)
        statuses = {m: status_of(m) for m in candidates}
        windows = snapshot.states if snapshot is not None else self._quota_states

        def words(candidate: str, status: str) -> str:
            provider = state.catalogue[candidate]
            return _words(status, cooldowns.get(provider), windows.get(provider))

        def decide(
            chosen: str, why: str, scope: DecisionScope = DecisionScope.QUOTA_FALLBACK
        ) -> RoutingDecision:
            return RoutingDecision(
                key=key,
                model=chosen,
                provider=state.catalogue[chosen],
                scope=scope,
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
                model,
                f"{reason}; {provider} over soft limit, kept (critical, keep_primary)",
                scope,
            )
        for alt in candidates[1:]:
            if statuses[alt] == OK:
                return decide(
                    alt, f"quota fallback: {provider} {words(model, primary)}; {model} → {alt}"
                )
        if primary == SOFT:
            return decide(
                model,
                f"{reason}; {provider} {_soft_words(windows.get(provider))}, "
                "no fallback under its own soft limit",
                scope,
            )
        for alt in candidates[1:]:
            if statuses[alt] == SOFT and not critical:
                return decide(
                    alt,
                    f"quota fallback: {provider} {words(model, primary)}; "
                    f"{model} → {alt} (itself over soft limit)",
                )
        blocked: dict[str, str] = {}
        frees: list[datetime] = []
        for m in candidates:
            name = state.catalogue[m]
            if name in blocked:
                continue
            window = windows.get(name)
            blocked[name] = _pause_words(name, statuses[m], cooldowns.get(name), window)
            free = _free_at(statuses[m], cooldowns.get(name), window)
            if free is not None:
                frees.append(free)
        raise RoutingError(
            f"no model can serve {key}: "
            + ", ".join(f"{state.catalogue[m]} {words(m, statuses[m])}" for m in candidates),
            blocked=tuple(blocked.values()),
            resume_at=min(frees) if frees else None,
            version=state.version,
        )

    def mapping_snapshot(self, pairs: set[tuple[str, str]]) -> dict[RouteKey, MappedModel]:
        """The resolved mapping for a run's (category, complexity) pairs, kept in its
        run_context so a global change made later leaves the run alone."""
        state = self.state()
        return {
            key: state.resolve(key)
            for role in sorted(state.roles | set(FIXED_ROLES))
            for key in (RouteKey(role, c, x) for c, x in sorted(pairs))
        }


NO_CONTEXT = RoutingContext()


def _now() -> datetime:
    return datetime.now(UTC)


def reset_words(at: datetime, *, now: datetime | None = None) -> str:
    """A reset in the server's time zone: "14:20" within a day, "Thu 18:00" further."""
    local = timezone.localtime(at)
    if at - (now or _now()) < timedelta(hours=23):
        return local.strftime("%H:%M")
    return local.strftime("%a %H:%M")


def _words(
    status: str, cooldown: Cooldown | None = None, window: ProviderQuotaState | None = None
) -> str:
    """What refuses (or spares) a provider, after its name in a decision's reason."""
    if status == COOLED and cooldown is not None:
        until = timezone.localtime(cooldown.until).strftime("%H:%M")
        return f"cooled down until {until} ({cooldown.reason})"
    if status == HARD and window is not None and window.words:
        return window.words
    if status == SOFT and window is not None and window.paced:
        return window.words  # "paced: at this pace its week cap is reached …"
    if status == SOFT and window is not None and window.words:
        return f"over soft limit: {window.words}"
    return {
        SOFT: "over soft limit",
        HARD: "at its cap",
        UNCONFIGURED: "not configured (no API key)",
    }.get(status, status)


def _soft_words(window: ProviderQuotaState | None) -> str:
    """A SOFT provider kept: "over soft limit", or a paced one's "paced: at this pace …"."""
    return window.words if window is not None and window.paced else "over soft limit"


def _pause_words(
    provider: str, status: str, cooldown: Cooldown | None, window: ProviderQuotaState | None
) -> str:
    """One refused provider in a quota pause's reason: "anthropic session at 100%"."""
    if status in (HARD, SOFT) and window is not None and window.window:
        return f"{provider} {window.window} at {window.percent:.0f}%"
    if status == COOLED and cooldown is not None:
        return f"{provider} cooled down ({cooldown.reason})"
    return f"{provider} {_words(status)}"


def _free_at(
    status: str, cooldown: Cooldown | None, window: ProviderQuotaState | None
) -> datetime | None:
    """When a refused provider may be called again by the clock alone (None: not by it)."""
    if status == UNCONFIGURED:
        return None
    ends: list[datetime | None] = []
    if status in (HARD, SOFT):
        ends.append(window.until if window is not None else None)
    if cooldown is not None and status in (COOLED, HARD):
        ends.append(cooldown.until)
    if not ends or any(end is None for end in ends):
        return None
    return max(end for end in ends if end is not None)


def _endpoints(rows: Iterable[ProviderEndpoint]) -> dict[str, Endpoint]:
    """The stored endpoints, each provider's prices id registered for pricing its calls: every
    process that routes or meters a call loads this state first."""
    from usage.prices import register_prices_id

    endpoints = {e.name: endpoint_from_row(e) for e in rows}
    for endpoint in endpoints.values():
        register_prices_id(endpoint.name, endpoint.prices_id)
    return endpoints


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
        providers=_endpoints(ProviderEndpoint.objects.all()),
        catalogue=dict(CatalogueModel.objects.values_list("name", "provider")),
        routes=routes,
        fallbacks={k: tuple(v) for k, v in fallbacks.items()},
        critical=frozenset(policy.critical_categories if policy else ()),
        quota_policy=policy.quota_policy if policy else "keep_primary",
        roles=frozenset(r for (_, r, _, _) in routes),
    )


def provider_quota_states(*, now: datetime | None = None) -> dict[str, ProviderQuotaState]:
    """Per provider with a cap window: its level over ALL its windows (usage.forecast.
    forecast_usage: window_usage's rows with their forecasts, three statements, and the paced
    providers, one), the window that decides it and when the level clears. A paced provider
    under every soft limit is SOFT (paced) while a window runs out before its reset."""
    from usage.forecast import forecast_usage, paced_providers

    at = now if now is not None else _now()
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in forecast_usage(now=at):
        rows.setdefault(row["provider"], []).append(row)
    paced = paced_providers()
    states: dict[str, ProviderQuotaState] = {}
    for provider, windows in rows.items():
        hard = [r for r in windows if r["over_hard"]]
        at_level = hard or [r for r in windows if r["over_soft"]]
        if not at_level:
            pacing = _pace_state(windows, now=at) if provider in paced else None
            states[provider] = pacing or ProviderQuotaState(OK)
            continue
        top = max(at_level, key=lambda r: (r["percent"] or 0.0, r["window"]))
        # window_usage counts a rolling window over (now − N h, now]: at its reset (its oldest
        # usage + N h) that usage has left it, as a calendar or anchored window has reset.
        resets = [r["reset"] for r in at_level]
        percent = float(top["percent"] or 0.0)
        words = f"{top['window']} {percent:.0f}%"
        if top["reset"] is not None:
            words += f" (resets {reset_words(top['reset'], now=now)})"
        states[provider] = ProviderQuotaState(
            level=HARD if hard else SOFT,
            window=top["window"],
            percent=percent,
            reset=top["reset"],
            until=None if None in resets else max(resets),
            words=words,
        )
    return states


def _pace_state(windows: list[dict[str, Any]], *, now: datetime) -> ProviderQuotaState | None:
    """A paced provider's state when some window's cap is reached before its reset at the last
    hour's pace (the one reached first decides), else None."""
    from usage.display import forecast_text

    running_out = [r for r in windows if r["forecast"].runs_out]
    if not running_out:
        return None
    top = min(running_out, key=lambda r: (r["forecast"].reached_at, r["window"]))
    forecast = top["forecast"]
    text = forecast_text(forecast, now=now, subject=f"its {top['window']} cap")
    return ProviderQuotaState(
        level=SOFT,
        window=top["window"],
        percent=float(top["percent"] or 0.0),
        reset=top["reset"],
        # Pacing ends at the reset at the latest (a rolling window's: when its oldest usage
        # leaves); sooner when the pace slows, at a refresh.
        until=top["reset"],
        words=f"paced: {text}",
        paced=True,
    )


def provider_quota_status(*, now: datetime | None = None) -> dict[str, str]:
    """ok / soft / hard per provider, over every cap window it has."""
    return {p: s.level for p, s in provider_quota_states(now=now).items()}


def quota_snapshot(*, now: datetime | None = None) -> QuotaSnapshot:
    """The quota state at `now` (the present: None), read from the database: five statements
    (provider_quota_states' four, the cooldowns one)."""
    states = provider_quota_states(now=now)
    return QuotaSnapshot(
        levels={p: s.level for p, s in states.items()},
        states=states,
        cooldowns=provider_cooldowns(),
    )


def provider_cooldowns() -> dict[str, Cooldown]:
    """Every provider's stored cooldown (one query, with the quota refresh)."""
    from .models import ProviderLimits

    rows = ProviderLimits.objects.filter(cooled_until__isnull=False).values_list(
        "provider", "cooled_until", "reason"
    )
    return {provider: Cooldown(until, reason) for provider, until, reason in rows if until}


router = ModelRouter()
# A Celery worker's prefork pool forks its children while the worker's provider-report thread
# (runs.tasks.ProviderReporter) may be inside router.state(), holding the lock: a child would
# inherit it held and wait forever on its first routing decision (the many-runs benchmark of
# issue 18 caught three of eight pool processes so). Each child starts with it free.
if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=router._after_fork_in_child)


def select_model(
    *,
    role: str,
    category: str,
    complexity: str,
    run_context: RoutingContext | None = None,
    with_quota: bool = True,
    now: datetime | None = None,
) -> RoutingDecision:
    """DESIGN.md step 2: the model for one call, and where it came from. run_context: the
    run's own routing data (its snapshot and overrides); None routes by the live mapping."""
    return router.select(
        RouteKey(role, category, complexity), run_context, with_quota=with_quota, now=now
    )
