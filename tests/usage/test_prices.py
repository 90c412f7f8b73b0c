from __future__ import annotations

import random

from usage.prices import price_usd, price_usd_reference
from usage.types import TokenUsage

from .conftest import NOW

MODELS = [
    ("openai", "gpt-5"),
    ("openai", "gpt-5-mini"),
    ("anthropic", "claude-sonnet-4-5"),  # tiered: all tokens cost more above 200k input
    ("anthropic", "claude-opus-4-1"),
    ("google_gemini", "gemini-2.5-pro"),  # tiered
    ("google_gemini", "gemini-2.5-flash"),
    ("glm", "glm-4.6"),
]


def test_the_cached_rates_give_exactly_genai_prices_own_result() -> None:
    rnd = random.Random(7)
    for _ in range(400):
        provider, model = rnd.choice(MODELS)
        prompt = rnd.choice([0, 1, 128_000, 200_000, 200_001, rnd.randint(0, 400_000)])
        cached = rnd.randint(0, prompt)
        cache_write = rnd.randint(0, prompt - cached)
        completion = rnd.randint(0, 30_000)
        usage = TokenUsage(prompt, completion, cached, cache_write, rnd.randint(0, completion))
        fast = price_usd(provider=provider, model=model, usage=usage, at=NOW)
        assert fast is not None
        assert fast == price_usd_reference(provider=provider, model=model, usage=usage, at=NOW)


def test_unknown_providers_models_and_impossible_counts_have_no_price() -> None:
    usage = TokenUsage(100, 10)
    assert price_usd(provider="openai", model="no-such-model", usage=usage) is None
    assert price_usd(provider="local", model="llama", usage=usage) is None
    assert price_usd(provider="openai", model="gpt-5", usage=TokenUsage(10, 1, 20)) is None
    assert price_usd(provider="openai", model="gpt-5", usage=TokenUsage(-1, 1)) is None
