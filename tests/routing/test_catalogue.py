"""The catalogue is current (issue 14): the committed config/models.yaml names today's Claude,
GPT, Gemini and GLM models that genai-prices (the installed version) prices, keeps the earlier
ones that runs and stored overrides may still name, maps the defaults to today's models, and
gives every model fallbacks on other providers; a call to each model through the simulator,
over real HTTP and the real SDKs, is metered with the reported model and a cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from genai_prices.data_snapshot import get_snapshot

from routing.config import ModelsConfig, parse_models_config
from routing.mapping import load_yaml
from routing.router import RoutingDecision
from routing.services import model_invoke
from routing.types import DecisionScope, RouteKey
from usage.models import UsageEvent
from usage.prices import genai_provider_id, price_usd, price_usd_reference, register_prices_id
from usage.types import TokenUsage

CURRENT = {
    "claude-opus-5-5": "anthropic",
    "claude-sonnet-5-5": "anthropic",
    "claude-haiku-5-5": "anthropic",
    "claude-fable-5-2": "anthropic",
    "gpt-6.2-astra": "openai",
    "gpt-6.1-sol": "openai",
    "gpt-6-luna": "openai",
    "gemini-4-carbon": "google_gemini",
    "gemini-4-hydrogen": "google_gemini",
    "gemini-3.8-flash": "google_gemini",
    "glm-5.3": "glm",
    "glm-5.3-flash": "glm",
}
EARLIER = {
    "gpt-5": "openai",
    "gpt-5-mini": "openai",
    "claude-sonnet-4-5": "anthropic",
    "claude-opus-4-1": "anthropic",
    "claude-haiku-4-5": "anthropic",
    "gemini-2.5-pro": "google_gemini",
    "gemini-2.5-flash": "google_gemini",
    "glm-4.6": "glm",
}
ALL = {**CURRENT, **EARLIER}
# Every model of these providers in the catalogue spends hidden reasoning tokens (the simulator
# does as the real APIs do); Anthropic's only when thinking is asked for, GLM reports none.
REASONING_PROVIDERS = {"openai", "google_gemini"}


def committed() -> ModelsConfig:
    config = parse_models_config(load_yaml(Path(settings.BASE_DIR) / "config" / "models.yaml"))
    # As routing does for the baseline file: how genai-prices names each provider.
    for provider in config.providers.values():
        register_prices_id(provider.name, provider.endpoint.prices_id)
    return config


def test_the_catalogue_lists_todays_models_and_keeps_the_earlier_ones() -> None:
    models = committed().models
    assert {m: models.get(m) for m in ALL} == ALL


@pytest.mark.parametrize("model", sorted(ALL))
def test_every_catalogue_model_is_priced_by_genai_prices_under_its_name_as_written(
    model: str,
) -> None:
    config = committed()
    provider = config.models[model]
    # Matched as written, not through a prefix that another model shares: the model
    # genai-prices finds is this one (Z.ai's ids are "GLM-5.3", matched by "glm-5.3" too).
    _provider, info = get_snapshot().find_provider_model(
        model, None, genai_provider_id(provider), None
    )
    assert info.id.lower() == model
    usage = TokenUsage(prompt_tokens=20_000, completion_tokens=3_000, cached_input_tokens=5_000)
    cost = price_usd(provider=provider, model=model, usage=usage)
    assert cost is not None and cost > 0
    assert cost == price_usd_reference(provider=provider, model=model, usage=usage)


def test_the_default_mapping_picks_only_todays_models() -> None:
    picks = {
        (role, category, complexity): model
        for role, mapping in committed().roles.items()
        for category, row in {"*": mapping.complexity_models, **mapping.category_overrides}.items()
        for complexity, model in row.items()
    }
    assert picks and {key: m for key, m in picks.items() if m not in CURRENT} == {}
    assert picks[("builder", "*", "low")] == "gpt-6-luna"
    assert picks[("builder", "*", "high")] == "claude-opus-5-5"
    assert picks[("auditor", "*", "high")] == "gpt-6.2-astra"
    assert picks[("auditor", "security_auth_change", "high")] == "claude-opus-5-5"


@pytest.mark.parametrize("model", sorted(ALL))
def test_every_model_falls_back_to_todays_models_on_other_providers(model: str) -> None:
    config = committed()
    alternatives = config.fallbacks.get(model, ())
    providers = [config.models[alt] for alt in alternatives]
    assert alternatives, f"{model} has no fallbacks"
    # One per provider, none on the model's own: the fallback is for when that one is over
    # its soft limit, and a second model there would not help.
    assert config.models[model] not in providers
    assert len(set(providers)) == len(providers)
    current = [alt in CURRENT for alt in alternatives]
    assert current[0] and current == sorted(current, reverse=True)  # today's models first


@pytest.mark.django_db
@pytest.mark.parametrize("model", sorted(ALL))
def test_a_call_to_each_catalogue_model_is_metered_with_the_reported_model_and_its_cost(
    sim: Any, model: str
) -> None:
    provider = committed().models[model]
    decision = RoutingDecision(
        key=RouteKey("builder", "core_backend", "medium"),
        model=model,
        provider=provider,
        scope=DecisionScope.BASELINE,
        reason="test",
        candidates=(model,),
    )
    result = model_invoke(
        decision=decision,
        system="You are the builder.",
        prompt="Autopack-Role: builder\nAttempt: 1\nPhase 1: Add export\n",
        call_key=f"catalogue:{model}",
    )

    event = UsageEvent.objects.get(pk=result.usage_event_id)
    reported = sim.requests()[-1]["reported_model"]
    assert (event.model, event.reported_model) == (model, reported)
    # Today's models have no dated snapshot the simulator could know: the reply echoes the name.
    if model in CURRENT:
        assert reported == model
    assert (event.reasoning_tokens > 0) == (provider in REASONING_PROVIDERS)
    usage = TokenUsage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        cached_input_tokens=event.cached_input_tokens,
        cache_write_tokens=event.cache_write_tokens,
        reasoning_tokens=event.reasoning_tokens,
        cache_write_1h_tokens=event.cache_write_1h_tokens,
    )
    expected = price_usd_reference(
        provider=provider, model=model, usage=usage, at=event.created_at, reported_model=reported
    )
    assert expected is not None and expected > 0
    assert event.cost_usd == expected
