"""The router's data as types: keys, scopes and a run's routing context, and their text forms
at the edges (the stored run_context JSON, the API's fields)."""

from __future__ import annotations

import json

import pytest

from routing.types import (
    ANY_CATEGORY,
    DecisionScope,
    MappedModel,
    RouteKey,
    RoutingContext,
)


@pytest.mark.parametrize(
    ("key", "text"),
    [
        (RouteKey("builder", "core_backend", "medium"), "core_backend:medium"),
        (RouteKey("auditor", "", "low"), "*:low"),
        (RouteKey("agent:doc_writer", "ui", "high"), "ui:high"),
    ],
)
def test_a_route_key_goes_to_text_and_back_unchanged(key: RouteKey, text: str) -> None:
    assert key.text == text
    assert RouteKey.from_text(key.role, text) == key


def test_the_any_category_row_is_star_at_the_edge_and_empty_inside() -> None:
    key = RouteKey.from_api(role="builder", category=ANY_CATEGORY, complexity="low")
    assert key == RouteKey("builder", "", "low")
    assert key.is_any_category and key.api_category == "*"
    assert RouteKey("builder", "ui", "low").any_category() == key
    assert str(key) == "builder *:low"


@pytest.mark.parametrize("text", ["core_backend", ":low", "ui:", ""])
def test_a_key_text_without_both_parts_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="category:complexity"):
        RouteKey.from_text("builder", text)


@pytest.mark.parametrize(
    ("scope", "change_scope", "label"),
    [
        (DecisionScope.BASELINE, "baseline", "baseline"),
        (DecisionScope.CATEGORY_OVERRIDE, "baseline", "category override"),
        (DecisionScope.GLOBAL_OVERRIDE, "global", "global override"),
        (DecisionScope.GLOBAL_OVERRIDE_ANY, "global", "global override (any category)"),
        (DecisionScope.RUN_OVERRIDE, "run", "run override"),
        (DecisionScope.RUN_OVERRIDE_ANY, "run", "run override (any category)"),
        (DecisionScope.QUOTA_FALLBACK, "fallback", "quota fallback"),
        (DecisionScope.ERROR_FALLBACK, "fallback", "error fallback"),
    ],
)
def test_each_scope_has_its_label_and_the_kind_of_change_the_api_shows(
    scope: DecisionScope, change_scope: str, label: str
) -> None:
    assert (scope.change_scope, scope.label) == (change_scope, label)


def test_only_the_any_category_rows_scopes_yield_to_a_run_change_of_that_row() -> None:
    assert {s for s in DecisionScope if s.from_any_row} == {
        DecisionScope.BASELINE,
        DecisionScope.GLOBAL_OVERRIDE_ANY,
    }


def test_a_routing_context_survives_its_json_round_trip() -> None:
    context = RoutingContext(
        mapping={
            RouteKey("builder", "ui", "low"): MappedModel("gpt-5-mini", DecisionScope.BASELINE),
            RouteKey("auditor", "ui", "low"): MappedModel(
                "glm-4.6", DecisionScope.GLOBAL_OVERRIDE_ANY
            ),
        },
        overrides={
            RouteKey("auditor", "core_backend", "medium"): "glm-4.6",
            RouteKey("builder", "", "low"): "gemini-2.5-flash",
        },
    )
    stored = json.loads(json.dumps(context.to_json()))  # as the JSONField gives it back
    assert stored == {
        "mapping": {
            "auditor": {"ui:low": {"model": "glm-4.6", "scope": "global_override_any"}},
            "builder": {"ui:low": {"model": "gpt-5-mini", "scope": "baseline"}},
        },
        "model_overrides": {
            "auditor": {"core_backend:medium": "glm-4.6"},
            "builder": {"*:low": "gemini-2.5-flash"},
        },
    }
    assert RoutingContext.from_json(stored) == context


def test_an_empty_context_is_an_empty_document() -> None:
    assert RoutingContext().to_json() == {}
    assert RoutingContext.from_json(None) == RoutingContext()
    assert RoutingContext.from_json({}) == RoutingContext()


def test_a_snapshot_stored_before_scopes_is_read_with_its_scope() -> None:
    # Runs started before scopes were stored keep [model, reason] entries.
    stored = {
        "mapping": {
            "builder": {
                "ui:low": ["glm-4.6", "global override (any category)"],
                "security_auth_change:high": ["claude-opus-4-1", "category override"],
            }
        }
    }
    context = RoutingContext.from_json(stored)
    assert context.mapping == {
        RouteKey("builder", "ui", "low"): MappedModel("glm-4.6", DecisionScope.GLOBAL_OVERRIDE_ANY),
        RouteKey("builder", "security_auth_change", "high"): MappedModel(
            "claude-opus-4-1", DecisionScope.CATEGORY_OVERRIDE
        ),
    }
