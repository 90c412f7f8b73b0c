"""Loading and validating `config/models.yaml` (keys in DESIGN.md "Contracts")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from usage.vocabulary import COMPLEXITIES, FIXED_ROLES, is_valid_role
from usage.windows import WindowConfigError, WindowSpec, windows_from_config

from .providers import PROTOCOLS, Endpoint, UnknownProtocol, make_endpoint

QUOTA_POLICIES = ("keep_primary", "fail_fast")
# `outside_usage:` (usage.models.OutsideUsage, which holds the same values): share — the cap
# windows count Autopack's usage against cap × autopack_share, outside tools' usage left out;
# whole_cap — everything seen, outside tools' usage too, against the whole cap.
OUTSIDE_USAGE_MODES = ("share", "whole_cap")


class ModelsConfigError(ValueError):
    """The models file is refused whole; the message names the offending key."""


@dataclass(frozen=True)
class ProviderSettings:
    """One `providers.<name>` entry: where and how it is reached, and what a person pays for."""

    endpoint: Endpoint
    daily_cap_tokens: int | None = None
    weekly_cap_tokens: int | None = None
    monthly_cap_tokens: int | None = None
    autopack_share: float = 1.0
    soft_limit: float = 0.8
    # `pace:` (usage.forecast): past the soft limit for non-critical categories while a window
    # would run out before its reset at the last hour's pace.
    pace: bool = False
    # `outside_usage:` (OUTSIDE_USAGE_MODES): what the provider's cap windows count.
    outside_usage: str = "share"
    # `windows:` (usage.windows): the plan's cap windows, besides the legacy caps above.
    windows: tuple[WindowSpec, ...] = ()

    @property
    def name(self) -> str:
        return self.endpoint.name


@dataclass(frozen=True)
class RoleMapping:
    complexity_models: dict[str, str]
    category_overrides: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelsConfig:
    providers: dict[str, ProviderSettings]
    models: dict[str, str]
    roles: dict[str, RoleMapping]
    critical_categories: tuple[str, ...] = ()
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    quota_policy: str = "keep_primary"

    def provider_of(self, model: str) -> ProviderSettings:
        return self.providers[self.models[model]]


def _require_mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ModelsConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _cap(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelsConfigError(f"{where}: expected a whole number of tokens >= 0, got {value!r}")
    return value


def _fraction(value: Any, where: str, *, default: float, allow_zero: bool) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelsConfigError(f"{where}: expected a number between 0 and 1, got {value!r}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        raise ModelsConfigError(f"{where}: must be between 0 and 1, got {value!r}")
    return float(value)


def _flag(value: Any, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ModelsConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _outside_usage(value: Any, where: str) -> str:
    if value is None:
        return OUTSIDE_USAGE_MODES[0]
    if value not in OUTSIDE_USAGE_MODES:
        modes = ", ".join(OUTSIDE_USAGE_MODES)
        raise ModelsConfigError(f"{where}: one of {modes}, got {value!r}")
    return str(value)


def _optional_name(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise ModelsConfigError(f"{where}: expected a non-empty name, got {value!r}")
    return value.strip()


def _windows(value: Any, provider: str, where: str) -> tuple[WindowSpec, ...]:
    try:
        return windows_from_config(value, provider=provider, where=where)
    except WindowConfigError as exc:
        raise ModelsConfigError(str(exc)) from None


def _endpoint(name: str, key_env: str, base_url: str, raw: dict[str, Any], where: str) -> Endpoint:
    protocol = _optional_name(raw.get("protocol"), f"{where}.protocol")
    try:
        return make_endpoint(
            name=str(name),
            api_key_env=key_env,
            base_url=base_url,
            protocol=protocol,
            prices_id=_optional_name(raw.get("prices_id"), f"{where}.prices_id"),
        )
    except UnknownProtocol:
        raise ModelsConfigError(
            f"{where}.protocol: unknown protocol {protocol!r} (one of {', '.join(PROTOCOLS)})"
        ) from None


def parse_models_config(data: Any) -> ModelsConfig:
    root = _require_mapping(data, "models.yaml")
    providers: dict[str, ProviderSettings] = {}
    for name, raw in _require_mapping(root.get("providers"), "providers").items():
        where = f"providers.{name}"
        raw = _require_mapping(raw, where)
        key_env, base_url = raw.get("api_key_env"), raw.get("base_url")
        if not isinstance(key_env, str) or not key_env:
            raise ModelsConfigError(f"{where}.api_key_env: required (the env var holding the key)")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ModelsConfigError(f"{where}.base_url: required, an http(s) URL")
        providers[name] = ProviderSettings(
            endpoint=_endpoint(name, key_env, base_url, raw, where),
            daily_cap_tokens=_cap(raw.get("daily_cap_tokens"), f"{where}.daily_cap_tokens"),
            weekly_cap_tokens=_cap(raw.get("weekly_cap_tokens"), f"{where}.weekly_cap_tokens"),
            monthly_cap_tokens=_cap(raw.get("monthly_cap_tokens"), f"{where}.monthly_cap_tokens"),
            autopack_share=_fraction(
                raw.get("autopack_share"), f"{where}.autopack_share", default=1.0, allow_zero=True
            ),
            soft_limit=_fraction(
                raw.get("soft_limit"), f"{where}.soft_limit", default=0.8, allow_zero=False
            ),
            pace=_flag(raw.get("pace"), f"{where}.pace"),
            outside_usage=_outside_usage(raw.get("outside_usage"), f"{where}.outside_usage"),
            windows=_windows(raw.get("windows"), str(name), f"{where}.windows"),
        )

    models: dict[str, str] = {}
    for model, provider in _require_mapping(root.get("models"), "models").items():
        if provider not in providers:
            raise ModelsConfigError(f"models.{model}: unknown provider {provider!r}")
        models[str(model)] = provider

    def known_model(model: Any, where: str) -> str:
        if model not in models:
            raise ModelsConfigError(f"{where}: model {model!r} is not in the models catalogue")
        return model

    roles: dict[str, RoleMapping] = {}
    for role, raw in _require_mapping(root.get("roles"), "roles").items():
        where = f"roles.{role}"
        if not is_valid_role(str(role)):
            raise ModelsConfigError(f"{where}: a role is builder, auditor or agent:<name>")
        raw = _require_mapping(raw, where)
        cm = _require_mapping(raw.get("complexity_models"), f"{where}.complexity_models")
        for complexity in COMPLEXITIES:
            if complexity not in cm:
                raise ModelsConfigError(f"{where}.complexity_models.{complexity}: missing")
        for complexity in cm:
            if complexity not in COMPLEXITIES:
                raise ModelsConfigError(
                    f"{where}.complexity_models.{complexity}: unknown complexity "
                    f"(one of {', '.join(COMPLEXITIES)})"
                )
        complexity_models = {
            c: known_model(cm[c], f"{where}.complexity_models.{c}") for c in COMPLEXITIES
        }
        overrides: dict[str, dict[str, str]] = {}
        raw_over = raw.get("category_overrides") or {}
        for category, per in _require_mapping(raw_over, f"{where}.category_overrides").items():
            per = _require_mapping(per, f"{where}.category_overrides.{category}")
            for complexity, model in per.items():
                w = f"{where}.category_overrides.{category}.{complexity}"
                if complexity not in COMPLEXITIES:
                    raise ModelsConfigError(f"{w}: unknown complexity")
                overrides.setdefault(str(category), {})[complexity] = known_model(model, w)
        roles[str(role)] = RoleMapping(complexity_models, overrides)
    for role in FIXED_ROLES:
        if role not in roles:
            raise ModelsConfigError(f"roles.{role}: missing")

    critical = root.get("critical_categories") or []
    if not isinstance(critical, list) or not all(isinstance(c, str) for c in critical):
        raise ModelsConfigError("critical_categories: expected a list of category names")

    fallbacks: dict[str, tuple[str, ...]] = {}
    for model, alts in _require_mapping(root.get("fallbacks") or {}, "fallbacks").items():
        known_model(model, f"fallbacks.{model}")
        if not isinstance(alts, list):
            raise ModelsConfigError(f"fallbacks.{model}: expected a list of models")
        fallbacks[model] = tuple(
            known_model(alt, f"fallbacks.{model}[{i}]") for i, alt in enumerate(alts)
        )

    policy = root.get("quota_policy", "keep_primary")
    if policy not in QUOTA_POLICIES:
        raise ModelsConfigError(f"quota_policy: one of {', '.join(QUOTA_POLICIES)}, got {policy!r}")

    return ModelsConfig(
        providers=providers,
        models=models,
        roles=roles,
        critical_categories=tuple(critical),
        fallbacks=fallbacks,
        quota_policy=policy,
    )
