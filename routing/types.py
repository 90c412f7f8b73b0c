"""The router's data as types (STYLE.md: a value that means something gets a type, not a string
built in one module and split in another).

- `RouteKey`: what a model is mapped by (role × category × complexity).
- `DecisionScope`: where a routing decision came from (baseline, an override, a fallback).
- `RoutingContext`: a run's own routing data: its mapping snapshot and its run overrides.

Text forms exist only at the edges: `RouteKey.text` / `RouteKey.from_text` for the API's JSON
and the run's stored `run_context` document, `DecisionScope.label` for what a person reads.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

# How the API, the dashboard and ModelChange write the any-category (complexity_models) row.
# In a RouteKey (and in ModelRoute) that row's category is "".
ANY_CATEGORY = "*"


@dataclass(frozen=True, slots=True)
class RouteKey:
    role: str
    category: str  # "" = the any-category row
    complexity: str

    @classmethod
    def from_text(cls, role: str, text: str) -> RouteKey:
        """From "category:complexity" ("*" for the any-category row), as stored and sent."""
        category, sep, complexity = text.rpartition(":")
        if not sep or not category or not complexity:
            raise ValueError(f"a mapping key is category:complexity, not {text!r}")
        return cls(role, "" if category == ANY_CATEGORY else category, complexity)

    @classmethod
    def from_api(cls, *, role: str, category: str, complexity: str) -> RouteKey:
        """From the API's separate fields, where "*" names the any-category row."""
        return cls(role, "" if category == ANY_CATEGORY else category, complexity)

    @property
    def text(self) -> str:
        """ "category:complexity", the form `from_text` reads (no role: it is stored per role)."""
        return f"{self.api_category}:{self.complexity}"

    @property
    def api_category(self) -> str:
        return self.category or ANY_CATEGORY

    @property
    def is_any_category(self) -> bool:
        return not self.category

    def any_category(self) -> RouteKey:
        """The any-category row of this key's role and complexity."""
        return replace(self, category="")

    def __str__(self) -> str:
        return f"{self.role} {self.text}"


class DecisionScope(enum.StrEnum):
    """Where a routing decision's model came from. Stored on every RoutingDecision (and in a
    run's mapping snapshot); the decision's `reason` is the display text made from it."""

    BASELINE = "baseline"  # models.yaml's complexity_models row
    CATEGORY_OVERRIDE = "category_override"  # models.yaml's category_overrides
    GLOBAL_OVERRIDE = "global_override"  # a person's global change of a category's row
    GLOBAL_OVERRIDE_ANY = "global_override_any"  # … of the any-category row
    RUN_OVERRIDE = "run_override"  # a person's change for this run of a category's row
    RUN_OVERRIDE_ANY = "run_override_any"  # … of the any-category row
    QUOTA_FALLBACK = "quota_fallback"  # the primary's provider is over its cap or soft limit
    ERROR_FALLBACK = "error_fallback"  # the primary's call failed for good

    @property
    def label(self) -> str:
        return _LABELS[self]

    @property
    def from_any_row(self) -> bool:
        """The model is the any-category row's: an override of that row replaces it, while a
        category with a row of its own keeps it."""
        return self in (DecisionScope.BASELINE, DecisionScope.GLOBAL_OVERRIDE_ANY)

    @property
    def change_scope(self) -> str:
        """Which kind of change put this model there, as the mapping API's `scope` column
        says it: baseline (models.yaml), global, run, or fallback."""
        return _CHANGE_SCOPES.get(self, "baseline")


_LABELS = {
    DecisionScope.BASELINE: "baseline",
    DecisionScope.CATEGORY_OVERRIDE: "category override",
    DecisionScope.GLOBAL_OVERRIDE: "global override",
    DecisionScope.GLOBAL_OVERRIDE_ANY: "global override (any category)",
    DecisionScope.RUN_OVERRIDE: "run override",
    DecisionScope.RUN_OVERRIDE_ANY: "run override (any category)",
    DecisionScope.QUOTA_FALLBACK: "quota fallback",
    DecisionScope.ERROR_FALLBACK: "error fallback",
}
_CHANGE_SCOPES = {
    DecisionScope.GLOBAL_OVERRIDE: "global",
    DecisionScope.GLOBAL_OVERRIDE_ANY: "global",
    DecisionScope.RUN_OVERRIDE: "run",
    DecisionScope.RUN_OVERRIDE_ANY: "run",
    DecisionScope.QUOTA_FALLBACK: "fallback",
    DecisionScope.ERROR_FALLBACK: "fallback",
}


@dataclass(frozen=True, slots=True)
class MappedModel:
    """One entry of a run's mapping snapshot: the model and where it came from."""

    model: str
    scope: DecisionScope


@dataclass(frozen=True)
class RoutingContext:
    """A run's own routing data, read by the router for each of its calls.

    mapping: the mapping in force when the run started, for its phases' keys (a global change
    made later leaves the run alone). overrides: this run's own changes.

    Stored in `Run.run_context` as JSON: `{"mapping": {role: {"category:complexity":
    {"model", "scope"}}}, "model_overrides": {role: {"category:complexity": model}}}`;
    `from_json` / `to_json` are the only places that read or write that shape.
    """

    mapping: Mapping[RouteKey, MappedModel] = field(default_factory=dict)
    overrides: Mapping[RouteKey, str] = field(default_factory=dict)

    def with_override(self, key: RouteKey, model: str) -> RoutingContext:
        return replace(self, overrides={**self.overrides, key: model})

    def route_keys(self) -> set[RouteKey]:
        return set(self.mapping) | set(self.overrides)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> RoutingContext:
        data = data or {}
        mapping = {
            RouteKey.from_text(role, text): _mapped_from_json(entry)
            for role, per in (data.get("mapping") or {}).items()
            for text, entry in per.items()
        }
        overrides = {
            RouteKey.from_text(role, text): str(model)
            for role, per in (data.get("model_overrides") or {}).items()
            for text, model in per.items()
        }
        return cls(mapping=mapping, overrides=overrides)

    def to_json(self) -> dict[str, Any]:
        """The two keys of run_context this type owns (absent when empty)."""
        out: dict[str, Any] = {}
        if self.mapping:
            mapping: dict[str, dict[str, dict[str, str]]] = {}
            for key, entry in sorted(self.mapping.items(), key=lambda kv: _order(kv[0])):
                mapping.setdefault(key.role, {})[key.text] = {
                    "model": entry.model,
                    "scope": entry.scope.value,
                }
            out["mapping"] = mapping
        if self.overrides:
            overrides: dict[str, dict[str, str]] = {}
            for key, model in sorted(self.overrides.items(), key=lambda kv: _order(kv[0])):
                overrides.setdefault(key.role, {})[key.text] = model
            out["model_overrides"] = overrides
        return out


def _order(key: RouteKey) -> tuple[str, str, str]:
    return (key.role, key.category, key.complexity)


_SCOPE_BY_LABEL = {scope.label: scope for scope in DecisionScope}


def _mapped_from_json(entry: Any) -> MappedModel:
    if isinstance(entry, dict):
        return MappedModel(str(entry["model"]), DecisionScope(entry["scope"]))
    # A snapshot taken before scopes were stored: [model, reason], whose reason was exactly a
    # scope's label (a snapshot's roles are all mapped ones, so no suffix). Read once, here.
    model, reason = entry
    return MappedModel(str(model), _SCOPE_BY_LABEL.get(reason, DecisionScope.BASELINE))
