from __future__ import annotations

import random
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usage.prices import price_usd, price_usd_reference, register_prices_id
from usage.types import TokenUsage

from .conftest import NOW

MODELS = [
    ("openai", "gpt-5"),
    ("openai", "gpt-5-mini"),
    ("anthropic", "claude-sonnet-4-5"),  # tiered: all tokens cost more above 200k input
    ("anthropic", "claude-opus-4-1"),  # 1-hour cache writes at their own rate
    ("anthropic", "claude-haiku-4-5"),
    ("google_gemini", "gemini-2.5-pro"),  # tiered
    ("google_gemini", "gemini-2.5-flash"),
    ("glm", "glm-4.6"),
]
# Reported names as providers return them: dated snapshots, Gemini's modelVersion, and one
# genai-prices does not know (priced as the catalogue model).
REPORTED = ["", "claude-sonnet-4-5-20250929", "gpt-5-2025-08-07", "gemini-2.5-pro", "nobody-knows"]
PER_MTOK = Decimal(1_000_000)


@st.composite
def usages(draw: st.DrawFn) -> TokenUsage:
    prompt = draw(st.sampled_from([0, 1, 200_000, 200_001]) | st.integers(0, 400_000))
    cached = draw(st.integers(0, prompt))
    cache_write = draw(st.integers(0, prompt - cached))
    completion = draw(st.integers(0, 40_000))
    return TokenUsage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_input_tokens=cached,
        cache_write_tokens=cache_write,
        reasoning_tokens=draw(st.integers(0, completion)),
        cache_write_1h_tokens=draw(st.sampled_from([0, cache_write]) | st.integers(0, cache_write)),
    )


@settings(max_examples=600, deadline=None)
@given(model=st.sampled_from(MODELS), reported=st.sampled_from(REPORTED), usage=usages())
def test_the_cached_rates_give_exactly_what_genai_prices_gives_for_the_parts_passed_one_by_one(
    model: tuple[str, str], reported: str, usage: TokenUsage
) -> None:
    provider, name = model
    fast = price_usd(provider=provider, model=name, usage=usage, at=NOW, reported_model=reported)
    assert fast is not None
    reference = price_usd_reference(
        provider=provider, model=name, usage=usage, at=NOW, reported_model=reported
    )
    assert fast == reference


def test_the_same_over_a_fixed_grid_of_every_model_and_cache_split() -> None:
    # A deterministic companion to the property test: every model, every kind of cache write.
    rnd = random.Random(7)
    for provider, model in MODELS:
        for prompt in (1, 128_000, 200_000, 200_001, 380_000):
            cached = rnd.randint(0, prompt // 2)
            cache_write = rnd.randint(0, prompt - cached)
            for write_1h in (0, cache_write // 3, cache_write):
                usage = TokenUsage(prompt, 5_000, cached, cache_write, 1_000, write_1h)
                fast = price_usd(provider=provider, model=model, usage=usage, at=NOW)
                assert fast is not None
                assert fast == price_usd_reference(
                    provider=provider, model=model, usage=usage, at=NOW
                ), (provider, model, usage)


def test_a_1_hour_cache_write_on_opus_costs_the_published_1_hour_rate() -> None:
    # claude-opus-4-1 in genai-prices (Anthropic's published rates), USD per million tokens:
    # $15 input, $18.75 5-minute write, $30 1-hour write, $1.50 cache read, $75 output.
    usage = TokenUsage(
        prompt_tokens=150_000,  # 10,000 uncached + 20,000 read + 40,000 5m + 80,000 1h writes
        completion_tokens=2_000,
        cached_input_tokens=20_000,
        cache_write_tokens=120_000,
        cache_write_1h_tokens=80_000,
    )
    by_hand = (
        10_000 * Decimal("15")
        + 20_000 * Decimal("1.50")
        + 40_000 * Decimal("18.75")
        + 80_000 * Decimal("30")
        + 2_000 * Decimal("75")
    ) / PER_MTOK
    assert by_hand == Decimal("3.48")
    fast = price_usd(provider="anthropic", model="claude-opus-4-1", usage=usage, at=NOW)
    assert fast == by_hand
    assert price_usd_reference(
        provider="anthropic", model="claude-opus-4-1", usage=usage, at=NOW
    ) == (by_hand)
    # Every write priced at the 5-minute rate (the old fast path) would come out $0.90 cheaper.
    all_5m = TokenUsage(150_000, 2_000, 20_000, 120_000)
    assert price_usd(provider="anthropic", model="claude-opus-4-1", usage=all_5m, at=NOW) == (
        by_hand - 80_000 * (Decimal("30") - Decimal("18.75")) / PER_MTOK
    )


def test_a_model_without_a_1_hour_rate_prices_1_hour_writes_like_the_others() -> None:
    # gpt-5 has no cache-write price at all: writes are input to it, whatever their lifetime.
    with_1h = TokenUsage(10_000, 100, 0, 4_000, 0, 4_000)
    without = TokenUsage(10_000, 100, 0, 4_000)
    assert price_usd(provider="openai", model="gpt-5", usage=with_1h, at=NOW) == price_usd(
        provider="openai", model="gpt-5", usage=without, at=NOW
    )


def test_the_reported_model_is_priced_where_genai_prices_knows_it() -> None:
    usage = TokenUsage(1_000_000, 0)
    # gpt-4o-2024-05-13 is priced at $5/MTok input, the gpt-4o alias at $2.50 today.
    assert price_usd(provider="openai", model="gpt-4o", usage=usage, at=NOW) == Decimal("2.5")
    assert price_usd(
        provider="openai", model="gpt-4o", usage=usage, at=NOW, reported_model="gpt-4o-2024-05-13"
    ) == Decimal("5")
    # A dated snapshot genai-prices matches to its model: the same price (100k input: below
    # the 200k tier).
    assert price_usd(
        provider="anthropic",
        model="claude-sonnet-4-5",
        usage=TokenUsage(100_000, 0),
        at=NOW,
        reported_model="claude-sonnet-4-5-20250929",
    ) == Decimal("0.3")
    # A name genai-prices does not know: the catalogue model's price.
    assert price_usd(
        provider="openai", model="gpt-4o", usage=usage, at=NOW, reported_model="gpt-4o-local-ft"
    ) == Decimal("2.5")


def test_a_provider_is_priced_under_the_prices_id_registered_for_it() -> None:
    usage = TokenUsage(1_000_000, 0)
    # Unregistered, a provider's name is its genai-prices id: "zai_coding" is none.
    assert price_usd(provider="zai_coding", model="glm-4.6", usage=usage, at=NOW) is None
    register_prices_id("zai_coding", "zai")
    assert price_usd(provider="zai_coding", model="glm-4.6", usage=usage, at=NOW) == Decimal("0.6")
    with pytest.raises(ValueError, match="must not be empty"):
        register_prices_id("zai_coding", "")


def test_unknown_providers_models_and_impossible_counts_have_no_price() -> None:
    usage = TokenUsage(100, 10)
    assert price_usd(provider="openai", model="no-such-model", usage=usage) is None
    assert price_usd(provider="local", model="llama", usage=usage) is None
    assert price_usd(provider="openai", model="gpt-5", usage=TokenUsage(10, 1, 20)) is None
    assert price_usd(provider="openai", model="gpt-5", usage=TokenUsage(-1, 1)) is None
    # More 1-hour writes than writes.
    assert price_usd(provider="openai", model="gpt-5", usage=TokenUsage(10, 1, 0, 2, 0, 3)) is None
