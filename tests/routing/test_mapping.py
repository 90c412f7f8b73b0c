"""routing.mapping through its public services: what each write changes, what it refuses, and
that every write moves the mapping version (how each process's router learns to reload).

Import/export through the commands, the window round trip and the override's routing effects
are pinned in test_router.py and tests/usage/test_windows.py; these pin the services themselves.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User

from routing.config import ModelsConfigError
from routing.mapping import (
    MappingError,
    caps_changed,
    load_yaml,
    mapping_seed_if_empty,
    model_override_global,
    model_route_set,
    models_export,
    models_import,
    routing_policy_set,
)
from routing.models import CatalogueModel, ModelChange, ModelRoute, RoutingPolicy
from routing.router import router, select_model
from tests.factories import set_provider_keys

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    set_provider_keys(monkeypatch)
    yield
    router.invalidate()


def committed() -> Any:
    return load_yaml(Path(settings.AUTOPACK_MODELS_FILE))


def version() -> int:
    return RoutingPolicy.objects.get(pk=1).version


def mapping_state() -> tuple[Any, ...]:
    return (
        sorted(ModelRoute.objects.values_list("layer", "role", "category", "complexity", "model")),
        sorted(CatalogueModel.objects.values_list("name", "provider")),
        models_export(),
        ModelChange.objects.count(),
        version(),
    )


def test_import_of_the_export_is_a_round_trip_and_each_import_moves_the_version() -> None:
    data = committed()
    start = version()
    config = models_import(data=data)
    assert set(config.models) == set(data["models"])
    assert config.critical_categories == ("security_auth_change",)
    # At least once: the caps and windows it writes move it too (routing.apps signals).
    imported = version()
    assert imported > start
    exported = models_export()
    assert exported["models"] == data["models"]
    assert exported["roles"] == data["roles"]
    assert exported["fallbacks"] == data["fallbacks"]
    assert exported["critical_categories"] == data["critical_categories"]
    assert exported["quota_policy"] == data["quota_policy"]
    models_import(data=copy.deepcopy(exported))
    assert models_export() == exported
    assert version() > imported


def test_import_replaces_the_whole_mapping_overrides_and_dropped_models_included() -> None:
    model_override_global(role="builder", category="ui", complexity="low", model="glm-4.6")
    assert ModelRoute.objects.filter(layer=ModelRoute.Layer.GLOBAL_OVERRIDE).exists()
    data = committed()
    del data["models"]["gpt-5"], data["fallbacks"]["gpt-5"]
    models_import(data=data)
    assert not ModelRoute.objects.filter(layer=ModelRoute.Layer.GLOBAL_OVERRIDE).exists()
    assert not CatalogueModel.objects.filter(name="gpt-5").exists()
    assert "gpt-5" not in models_export()["models"]
    assert "ui" not in models_export()["roles"]["builder"]["category_overrides"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(quota_policy="panic"), "quota_policy"),
        (lambda d: d["fallbacks"].update({"gpt-5": ["gpt-99"]}), "fallbacks.gpt-5"),
        (lambda d: d["providers"]["glm"].update(daily_cap_tokens=-1), "providers.glm.daily_cap"),
    ],
)
def test_a_bad_document_is_refused_naming_the_key_and_nothing_changes(
    mutate: Any, message: str
) -> None:
    data = committed()
    mutate(data)
    before = mapping_state()
    with pytest.raises(ModelsConfigError, match=message):
        models_import(data=data)
    assert mapping_state() == before


def test_load_yaml_refuses_a_missing_or_broken_file_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ModelsConfigError, match=r"nope\.yaml: cannot read"):
        load_yaml(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("roles: [unclosed\n")
    with pytest.raises(ModelsConfigError, match=r"broken\.yaml: not valid YAML"):
        load_yaml(broken)


def test_a_global_override_is_recorded_moves_the_version_and_reaches_the_router_on_commit(
    django_capture_on_commit_callbacks: Any, settings: Any
) -> None:
    settings.AUTOPACK_ROUTER_REFRESH_SECONDS = 3600.0  # only the commit's invalidation reloads
    operator = User.objects.create_user("op")
    select_model(role="builder", category="tests", complexity="medium")  # router state loaded
    start = version()
    with django_capture_on_commit_callbacks(execute=True):
        change = model_override_global(
            role="builder",
            category="tests",
            complexity="medium",
            model="gemini-2.5-pro",
            changed_by=operator,
            via="mcp",
        )
    assert version() == start + 1
    stored = ModelChange.objects.get()
    assert stored.pk == change.pk
    assert (stored.scope, stored.role, stored.category, stored.complexity) == (
        "global",
        "builder",
        "tests",
        "medium",
    )
    assert (stored.old_model, stored.new_model, stored.via) == (
        "claude-sonnet-5-5",
        "gemini-2.5-pro",
        "mcp",
    )
    assert stored.changed_by == operator and stored.run_id is None
    # No manual invalidate: the commit told this process's router.
    assert select_model(role="builder", category="tests", complexity="medium").model == (
        "gemini-2.5-pro"
    )
    # A second change of the same key replaces the override; its old model is the first's.
    with django_capture_on_commit_callbacks(execute=True):
        again = model_override_global(
            role="builder", category="tests", complexity="medium", model="glm-4.6"
        )
    assert (again.old_model, again.new_model) == ("gemini-2.5-pro", "glm-4.6")
    overrides = ModelRoute.objects.filter(layer=ModelRoute.Layer.GLOBAL_OVERRIDE)
    assert list(overrides.values_list("category", "complexity", "model__name")) == [
        ("tests", "medium", "glm-4.6")
    ]
    assert version() == start + 2


def test_a_route_set_edits_the_row_in_place_as_a_recorded_global_change() -> None:
    route = ModelRoute.objects.get(layer="baseline", role="auditor", category="", complexity="low")
    start = version()
    change = model_route_set(route_id=route.pk, model="glm-5.3-flash")
    assert change is not None
    assert (change.scope, change.role, change.category, change.complexity) == (
        "global",
        "auditor",
        "*",
        "low",
    )
    assert (change.old_model, change.new_model, change.via) == (
        "gemini-3.8-flash",
        "glm-5.3-flash",
        "admin",
    )
    route.refresh_from_db()
    assert (route.layer, route.model.name) == ("baseline", "glm-5.3-flash")
    assert ModelRoute.objects.filter(role="auditor", complexity="low", category="").count() == 1
    assert version() == start + 1


def test_a_route_set_to_the_model_it_already_has_changes_nothing() -> None:
    route = ModelRoute.objects.get(layer="baseline", role="builder", category="", complexity="high")
    before = mapping_state()
    assert model_route_set(route_id=route.pk, model=route.model.name) is None
    assert mapping_state() == before


def test_a_bad_route_set_is_refused_naming_the_field_and_nothing_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    route = ModelRoute.objects.get(layer="baseline", role="builder", category="", complexity="low")
    before = mapping_state()
    with pytest.raises(MappingError, match=r"^model: 'gpt-99' is not in the catalogue"):
        model_route_set(route_id=route.pk, model="gpt-99")
    monkeypatch.delenv("GLM_API_KEY")
    router.invalidate()
    with pytest.raises(MappingError, match=r"^model: 'glm-4\.6' is served by glm, but "):
        model_route_set(route_id=route.pk, model="glm-4.6")
    assert mapping_state() == before


def test_the_routing_policy_is_set_sorted_once_each_and_shows_in_the_export() -> None:
    start = version()
    policy = routing_policy_set(
        critical_categories=["payments", "security_auth_change", "payments"],
        quota_policy="fail_fast",
    )
    assert policy.critical_categories == ["payments", "security_auth_change"]
    stored = RoutingPolicy.objects.get(pk=1)
    assert (stored.critical_categories, stored.quota_policy) == (
        ["payments", "security_auth_change"],
        "fail_fast",
    )
    assert stored.version == start + 1
    exported = models_export()
    assert exported["critical_categories"] == ["payments", "security_auth_change"]
    assert exported["quota_policy"] == "fail_fast"
    routing_policy_set(critical_categories=[], quota_policy="keep_primary")
    assert RoutingPolicy.objects.get(pk=1).critical_categories == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"critical_categories": "security_auth_change"}, "^critical_categories: "),
        ({"critical_categories": ["Security"]}, "^critical_categories: "),
        ({"critical_categories": ["ok", 7]}, "^critical_categories: "),
        ({"critical_categories": ["ui\x00"]}, "^critical_categories: "),
        ({"quota_policy": "panic"}, "^quota_policy: one of keep_primary, fail_fast"),
    ],
)
def test_a_bad_routing_policy_is_refused_naming_the_field_and_nothing_changes(
    args: dict[str, Any], message: str
) -> None:
    before = RoutingPolicy.objects.values().get(pk=1)
    with pytest.raises(MappingError, match=message):
        routing_policy_set(
            **{"critical_categories": ["ui"], "quota_policy": "keep_primary", **args}
        )
    assert RoutingPolicy.objects.values().get(pk=1) == before


def test_the_seed_loads_the_baseline_only_into_an_empty_mapping() -> None:
    path = Path(settings.AUTOPACK_MODELS_FILE)
    seeded = mapping_state()  # the test database was seeded after migrate
    assert mapping_seed_if_empty(path=path) is False
    assert mapping_state() == seeded
    ModelRoute.objects.all().delete()
    assert mapping_seed_if_empty(path=path) is True
    assert models_export() == seeded[2]
    after = version()
    assert mapping_seed_if_empty(path=path) is False
    assert version() == after


def test_the_seed_of_an_empty_mapping_raises_on_a_broken_file(tmp_path: Path) -> None:
    ModelRoute.objects.all().delete()
    broken = tmp_path / "models.yaml"
    broken.write_text("providers: {}\n")
    with pytest.raises(ModelsConfigError):
        mapping_seed_if_empty(path=broken)
    assert not ModelRoute.objects.exists()


def test_caps_changed_moves_the_version_and_so_does_a_cap_saved_or_deleted() -> None:
    from usage.models import ProviderQuota

    start = version()
    caps_changed()
    assert version() == start + 1
    quota = ProviderQuota.objects.get(provider="glm")
    quota.daily_cap_tokens = 1_000
    quota.save()
    assert version() == start + 2
    quota.delete()
    assert version() == start + 3
