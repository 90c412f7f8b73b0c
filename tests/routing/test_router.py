from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from routing.mapping import MappingError, model_override_global, models_export
from routing.models import CatalogueModel, ModelChange, ModelRoute, RoutingPolicy
from routing.router import QuotaPolicyError, RoutingError, router, select_model
from routing.types import DecisionScope, RouteKey, RoutingContext
from tests.factories import legacy_caps_only
from usage.services import UsageRecord, provider_quota_upsert, record_usage
from usage.types import TokenUsage

pytestmark = pytest.mark.django_db
KEYS = {
    "OPENAI_API_KEY": "k1",
    "ANTHROPIC_API_KEY": "k2",
    "GEMINI_API_KEY": "k3",
    "GLM_API_KEY": "k4",
}


@pytest.fixture(autouse=True)
def fresh_router(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)
    router.invalidate()
    yield
    router.invalidate()


def use_tokens(provider: str, model: str, tokens: int) -> None:
    record_usage(
        record=UsageRecord(
            call_id=uuid.uuid4().hex,
            provider=provider,
            model=model,
            role="builder",
            usage=TokenUsage(prompt_tokens=tokens, completion_tokens=0),
        )
    )


def cap(provider: str, daily: int | None, *, soft: float = 0.8, share: float = 1.0) -> None:
    legacy_caps_only(provider)
    provider_quota_upsert(
        provider=provider,
        daily_cap_tokens=daily,
        weekly_cap_tokens=None,
        monthly_cap_tokens=None,
        autopack_share=share,
        soft_limit=soft,
    )
    router.invalidate()


def test_the_baseline_maps_complexity_and_category_overrides() -> None:
    low = select_model(role="builder", category="ui", complexity="low")
    assert (low.model, low.provider, low.reason) == ("gpt-6-luna", "openai", "baseline")
    assert low.scope == DecisionScope.BASELINE
    sec = select_model(role="builder", category="security_auth_change", complexity="high")
    assert (sec.model, sec.reason) == ("claude-opus-5-5", "category override")
    assert sec.scope == DecisionScope.CATEGORY_OVERRIDE


def test_an_unmapped_agent_role_uses_the_builder_mapping() -> None:
    d = select_model(role="agent:doc_writer", category="ui", complexity="low")
    assert d.model == "gpt-6-luna" and "builder mapping" in d.reason
    # The suffix is display text only: the scope is still the row's.
    assert d.scope == DecisionScope.BASELINE


def test_a_run_override_wins_over_everything() -> None:
    ctx = RoutingContext(overrides={RouteKey("auditor", "core_backend", "medium"): "glm-4.6"})
    d = select_model(role="auditor", category="core_backend", complexity="medium", run_context=ctx)
    assert (d.model, d.reason, d.scope) == ("glm-4.6", "run override", DecisionScope.RUN_OVERRIDE)
    other = select_model(role="auditor", category="core_backend", complexity="low", run_context=ctx)
    assert other.model == "gemini-3.8-flash"


def test_a_global_change_of_the_any_category_row_spares_categories_with_their_own() -> None:
    change = model_override_global(
        role="builder", category="*", complexity="low", model="glm-4.6", via="test"
    )
    router.invalidate()
    assert (change.category, change.old_model, change.new_model) == ("*", "gpt-6-luna", "glm-4.6")
    moved = select_model(role="builder", category="tests", complexity="low")
    assert (moved.model, moved.reason) == ("glm-4.6", "global override (any category)")
    assert moved.scope == DecisionScope.GLOBAL_OVERRIDE_ANY
    # security_auth_change:low has a category override in the baseline; it keeps it.
    own = select_model(role="builder", category="security_auth_change", complexity="low")
    assert (own.model, own.reason) == ("claude-sonnet-5-5", "category override")
    row = select_model(role="builder", category="", complexity="low")
    assert (row.model, row.scope) == ("glm-4.6", DecisionScope.GLOBAL_OVERRIDE_ANY)


def test_a_run_override_of_the_any_category_row_applies_where_that_row_did() -> None:
    ctx = RoutingContext(
        mapping=router.mapping_snapshot({("tests", "low"), ("security_auth_change", "low")}),
        overrides={RouteKey("builder", "", "low"): "gemini-2.5-flash"},
    )
    moved = select_model(role="builder", category="tests", complexity="low", run_context=ctx)
    assert (moved.model, moved.reason) == ("gemini-2.5-flash", "run override (any category)")
    assert moved.scope == DecisionScope.RUN_OVERRIDE_ANY
    # The any-category row itself shows the run's change of it (the run's mapping table).
    row = select_model(role="builder", category="", complexity="low", run_context=ctx)
    assert (row.model, row.scope) == ("gemini-2.5-flash", DecisionScope.RUN_OVERRIDE_ANY)
    own = select_model(
        role="builder", category="security_auth_change", complexity="low", run_context=ctx
    )
    assert own.model == "claude-sonnet-5-5"
    other = select_model(role="builder", category="tests", complexity="medium", run_context=ctx)
    assert other.model == "claude-sonnet-5-5"


def test_a_global_override_applies_to_new_snapshots_and_not_to_a_taken_one() -> None:
    before = RoutingContext(mapping=router.mapping_snapshot({("core_backend", "medium")}))
    change = model_override_global(
        role="builder",
        category="core_backend",
        complexity="medium",
        model="gemini-2.5-pro",
        via="test",
    )
    router.invalidate()
    assert (change.old_model, change.new_model, change.scope) == (
        "claude-sonnet-5-5",
        "gemini-2.5-pro",
        "global",
    )
    kept = select_model(
        role="builder", category="core_backend", complexity="medium", run_context=before
    )
    assert kept.model == "claude-sonnet-5-5"
    after = RoutingContext(mapping=router.mapping_snapshot({("core_backend", "medium")}))
    new = select_model(
        role="builder", category="core_backend", complexity="medium", run_context=after
    )
    assert (new.model, new.reason) == ("gemini-2.5-pro", "global override")
    assert new.scope == DecisionScope.GLOBAL_OVERRIDE


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "gpt-99"}, "not in the catalogue"),
        ({"role": "janitor"}, "unknown role"),
        ({"complexity": "huge"}, "complexity: one of"),
    ],
)
def test_a_bad_global_override_is_refused_and_changes_nothing(changes: dict, message: str) -> None:
    args = {"role": "builder", "category": "ui", "complexity": "low", "model": "glm-4.6", **changes}
    with pytest.raises(MappingError, match=message):
        model_override_global(**args)
    assert ModelChange.objects.count() == 0
    assert not ModelRoute.objects.filter(layer="global_override").exists()


def test_an_override_to_a_provider_without_a_key_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GLM_API_KEY")
    router.invalidate()
    with pytest.raises(MappingError, match="not configured"):
        model_override_global(role="builder", category="ui", complexity="low", model="glm-4.6")


def test_over_the_soft_limit_a_non_critical_category_falls_back() -> None:
    cap("openai", 1000)
    use_tokens("openai", "gpt-6-luna", 850)
    router.invalidate()
    d = select_model(role="builder", category="ui", complexity="low")
    assert (d.model, d.provider) == ("claude-haiku-5-5", "anthropic")
    assert d.reason.startswith("quota fallback: openai over soft limit")
    assert d.scope == DecisionScope.QUOTA_FALLBACK
    assert d.candidates[0] == "gpt-6-luna"


def test_the_autopack_share_shrinks_the_effective_cap() -> None:
    cap("openai", 2000, share=0.5)
    use_tokens("openai", "gpt-6-luna", 850)  # 85% of 1000
    router.invalidate()
    assert select_model(role="builder", category="ui", complexity="low").provider != "openai"


def test_a_critical_category_keeps_its_primary_with_keep_primary() -> None:
    cap("anthropic", 1000)
    use_tokens("anthropic", "claude-opus-5-5", 900)
    router.invalidate()
    d = select_model(role="builder", category="security_auth_change", complexity="high")
    assert d.model == "claude-opus-5-5" and "kept (critical, keep_primary)" in d.reason
    # The primary kept: where it came from is unchanged, the reason tells the rest.
    assert d.scope == DecisionScope.CATEGORY_OVERRIDE


def test_a_critical_category_fails_fast_with_fail_fast() -> None:
    RoutingPolicy.objects.filter(pk=1).update(quota_policy="fail_fast")
    cap("anthropic", 1000)
    use_tokens("anthropic", "claude-opus-5-5", 900)
    router.invalidate()
    with pytest.raises(QuotaPolicyError, match="fail_fast"):
        select_model(role="builder", category="security_auth_change", complexity="high")


def test_a_provider_at_its_cap_is_never_chosen_and_nothing_left_raises() -> None:
    for provider in ("openai", "anthropic", "google_gemini", "glm"):
        cap(provider, 100)
        use_tokens(provider, "x", 100)
    router.invalidate()
    with pytest.raises(RoutingError, match=r"openai day 100% \(resets ") as refused:
        select_model(role="builder", category="ui", complexity="low")
    # What the quota pause shows and waits for: each window spent, and the next UTC midnight.
    assert "openai day at 100%" in refused.value.blocked
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert refused.value.resume_at == midnight + timedelta(days=1)


def test_a_provider_without_a_key_is_treated_as_exhausted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    router.invalidate()
    d = select_model(role="builder", category="ui", complexity="low")
    assert d.provider == "anthropic" and "not configured" in d.reason
    assert d.scope == DecisionScope.QUOTA_FALLBACK


def test_export_then_import_changes_nothing(tmp_path: Path) -> None:
    model_override_global(role="auditor", category="ui", complexity="high", model="glm-4.6")
    first = tmp_path / "a.yaml"
    call_command("export_models", "-o", str(first), stdout=io.StringIO())
    call_command("import_models", str(first), stdout=io.StringIO())
    second = tmp_path / "b.yaml"
    call_command("export_models", "-o", str(second), stdout=io.StringIO())
    assert first.read_text() == second.read_text()
    data = yaml.safe_load(first.read_text())
    assert data["roles"]["auditor"]["category_overrides"]["ui"]["high"] == "glm-4.6"


def test_export_of_the_baseline_matches_the_committed_file_mapping() -> None:
    committed = yaml.safe_load(Path(settings.AUTOPACK_MODELS_FILE).read_text())
    exported = models_export()
    assert exported["models"] == committed["models"]
    assert exported["roles"] == committed["roles"]
    assert exported["fallbacks"] == committed["fallbacks"]
    assert (
        exported["providers"]["anthropic"]["weekly_cap_tokens"]
        == (committed["providers"]["anthropic"]["weekly_cap_tokens"])
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["models"].update({"mystery": "nobody"}), "models.mystery: unknown provider"),
        (
            lambda d: d["roles"]["builder"]["complexity_models"].update({"low": "gpt-99"}),
            "roles.builder.complexity_models.low: model 'gpt-99' is not in the models catalogue",
        ),
        (
            lambda d: d["roles"]["auditor"]["complexity_models"].pop("high"),
            "roles.auditor.complexity_models.high: missing",
        ),
        (
            lambda d: d["providers"]["openai"].update({"autopack_share": 1.5}),
            "providers.openai.autopack_share",
        ),
    ],
)
def test_a_bad_models_file_is_refused_whole(tmp_path: Path, mutate, message: str) -> None:
    data = yaml.safe_load(Path(settings.AUTOPACK_MODELS_FILE).read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    before = list(ModelRoute.objects.values_list("role", "category", "complexity", "model_id"))
    models_before = CatalogueModel.objects.count()
    with pytest.raises(CommandError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call_command("import_models", str(path), stdout=io.StringIO())
    after = list(ModelRoute.objects.values_list("role", "category", "complexity", "model_id"))
    assert before == after and CatalogueModel.objects.count() == models_before
