"""Cost of one provider call, from the maintained `genai-prices` library.

genai-prices counts input the way our TokenUsage does: its `input_tokens` includes the cache
reads and cache writes (which it prices separately and subtracts from the uncached input), its
`cache_write_tokens` includes the 1-hour writes (`cache_write_1h_tokens`, priced at their own
rate where the model has one, and subtracted from the 5-minute writes), and `output_tokens`
includes reasoning. So our fields map one to one; nothing is added up here.

Pricing one call through `genai_prices.calc_price` costs ~90 µs (model matching, unit-registry
validation, usage decomposition). That is fine for one call but would dominate a bulk import, so
the per-token rates of each (model price, price tier) are probed once through genai-prices itself
and cached; a call is then six Decimal multiplications. The probes go through the same
`ModelPrice.calc_price`, so the cached rates are exactly genai-prices' own numbers (the test
suite checks fast path == `price_usd_reference`, which prices each call whole through the public
`calc_price`).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from genai_prices import Usage
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import TieredPrices

from .types import TokenUsage

# cost_usd is stored with this many decimal places: per-token prices go down to $0.01/MTok
# (1e-8 per token) and $x.xx75/MTok, so 12 places keep single calls exact.
COST_DECIMAL_PLACES = 12
_QUANTUM = Decimal(1).scaleb(-COST_DECIMAL_PLACES)


@dataclass(frozen=True, slots=True)
class _Rates:
    """USD per token for each part of TokenUsage, within one price tier."""

    uncached_input: Decimal
    cache_read: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    output: Decimal
    reasoning_extra: Decimal  # added on top of output for reasoning tokens (usually 0)


_lock = threading.Lock()
# Our provider name → genai-prices provider id, registered by routing from each endpoint's
# configuration (GLM's API is Z.ai's: "glm" → "zai"). Unregistered: the name is the id.
_prices_ids: dict[str, str] = {}
# (genai-prices provider id, model) → (Provider, ModelInfo) | None. Keyed by the id, not our
# provider name, so registering another id never leaves a stale entry behind.
_models: dict[tuple[str, str], Any] = {}
# id(ModelPrice) → (the ModelPrice, its tier starts, rates per tier). Holding the object pins
# its id(), so an id is never reused for another price while cached.
_tables: dict[int, tuple[Any, list[int], dict[int, _Rates]]] = {}
_MISSING = object()


def register_prices_id(provider: str, prices_id: str) -> None:
    """Price `provider`'s calls as genai-prices' provider `prices_id` (routing calls this with
    each endpoint's configured prices id)."""
    if not provider or not prices_id:
        raise ValueError("provider and prices_id must not be empty")
    with _lock:
        _prices_ids[provider] = prices_id


def genai_provider_id(provider: str) -> str:
    return _prices_ids.get(provider, provider)


def _find_model(provider: str, model: str) -> Any:
    key = (genai_provider_id(provider), model)
    found = _models.get(key, _MISSING)
    if found is _MISSING:
        try:
            found = get_snapshot().find_provider_model(model, None, key[0], None)
        except LookupError:
            found = None  # unknown provider or model: remembered, so it is not looked up again
        with _lock:
            _models[key] = found
    return found


def _tier_starts(model_price: Any) -> list[int]:
    starts = {
        tier.start
        for value in vars(model_price).values()
        if isinstance(value, TieredPrices)
        for tier in value.tiers
    }
    return sorted(starts)


def _probe_rates(model_price: Any, probe_input: int) -> _Rates:
    """Per-token rates at an input size inside one tier, measured through genai-prices."""

    def total(**tokens: int) -> Decimal:
        return Decimal(model_price.calc_price(Usage(**tokens))["total_price"])

    n = probe_input
    base = total(input_tokens=n)
    output = total(input_tokens=n, output_tokens=1) - base
    return _Rates(
        uncached_input=base / n,
        cache_read=total(input_tokens=n, cache_read_tokens=n) / n,
        cache_write_5m=total(input_tokens=n, cache_write_tokens=n, cache_write_5m_tokens=n) / n,
        cache_write_1h=total(input_tokens=n, cache_write_tokens=n, cache_write_1h_tokens=n) / n,
        output=output,
        reasoning_extra=total(input_tokens=n, output_tokens=1, output_reasoning_tokens=1)
        - base
        - output,
    )


def _rates_for(model_price: Any, prompt_tokens: int) -> _Rates:
    table = _tables.get(id(model_price))
    if table is None or table[0] is not model_price:
        table = (model_price, _tier_starts(model_price), {})
        with _lock:
            _tables[id(model_price)] = table
    _price, starts, by_tier = table
    # genai-prices applies a tier when total input > tier.start ("cliff" pricing).
    tier = bisect.bisect_left(starts, prompt_tokens) if starts else 0
    rates = by_tier.get(tier)
    if rates is None:
        rates = _probe_rates(model_price, starts[tier - 1] + 1 if tier else 1)
        with _lock:
            by_tier[tier] = rates
    return rates


def _counts_are_consistent(usage: TokenUsage) -> bool:
    return (
        min(
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_input_tokens,
            usage.cache_write_tokens,
            usage.cache_write_1h_tokens,
            usage.reasoning_tokens,
        )
        >= 0
        and usage.cached_input_tokens + usage.cache_write_tokens <= usage.prompt_tokens
        and usage.cache_write_1h_tokens <= usage.cache_write_tokens
        and usage.reasoning_tokens <= usage.completion_tokens
    )


def _find_priced_model(provider: str, model: str, reported_model: str) -> tuple[str, Any]:
    """The reported model where genai-prices knows it, else the catalogue model.

    The provider bills the model that answered: a catalogue alias can be served by a dated
    snapshot priced differently from the alias's current one (gpt-4o-2024-05-13 costs twice
    gpt-4o), and only the reported name tells which. Many reported names are not in
    genai-prices (a local server's, a brand-new snapshot), and then the catalogue model's price
    is the best there is."""
    if reported_model and reported_model != model:
        found = _find_model(provider, reported_model)
        if found is not None:
            return reported_model, found
    return model, _find_model(provider, model)


def price_usd(
    *,
    provider: str,
    model: str,
    usage: TokenUsage,
    at: datetime | None = None,
    reported_model: str = "",
) -> Decimal | None:
    """Cost of one call in USD, or None when genai-prices has no price for the model.

    `model` is the catalogue model, `reported_model` the one the provider said answered ("" if
    none); see _find_priced_model. Never raises for an unknown provider/model or for
    inconsistent counts: metering must not fail because a price is missing.
    """
    _name, found = _find_priced_model(provider, model, reported_model)
    if found is None or not _counts_are_consistent(usage):
        return None
    _provider, info = found
    try:
        model_price = info.get_prices(at or datetime.now(tz=UTC))
        rates = _rates_for(model_price, usage.prompt_tokens)
    except (ValueError, ArithmeticError, LookupError, TypeError):
        return None
    uncached = usage.prompt_tokens - usage.cached_input_tokens - usage.cache_write_tokens
    cost = (
        rates.uncached_input * uncached
        + rates.cache_read * usage.cached_input_tokens
        + rates.cache_write_5m * (usage.cache_write_tokens - usage.cache_write_1h_tokens)
        + rates.cache_write_1h * usage.cache_write_1h_tokens
        + rates.output * usage.completion_tokens
        + rates.reasoning_extra * usage.reasoning_tokens
    )
    return cost.quantize(_QUANTUM)


def price_usd_reference(
    *,
    provider: str,
    model: str,
    usage: TokenUsage,
    at: datetime | None = None,
    reported_model: str = "",
) -> Decimal | None:
    """The same cost through genai-prices' public `calc_price` (slow; for checks and tests).

    It shares nothing with the fast path but the choice of model: every part of the usage is
    handed to genai-prices separately (the 5-minute and the 1-hour cache writes each under its
    own name), and genai-prices decomposes and prices them itself. So a fast path that priced
    a part at another part's rate would differ from this.
    """
    from genai_prices import calc_price

    name, found = _find_priced_model(provider, model, reported_model)
    if found is None or not _counts_are_consistent(usage):
        return None
    try:
        result = calc_price(
            Usage(
                input_tokens=usage.prompt_tokens,
                cache_read_tokens=usage.cached_input_tokens,
                cache_write_tokens=usage.cache_write_tokens,
                cache_write_5m_tokens=usage.cache_write_tokens - usage.cache_write_1h_tokens,
                cache_write_1h_tokens=usage.cache_write_1h_tokens,
                output_tokens=usage.completion_tokens,
                output_reasoning_tokens=usage.reasoning_tokens,
            ),
            name,
            provider_id=genai_provider_id(provider),
            genai_request_timestamp=at,
        )
    except (LookupError, ValueError):
        return None
    return Decimal(result.total_price).quantize(_QUANTUM)


def clear_price_cache() -> None:
    with _lock:
        _models.clear()
        _tables.clear()


def load_price_data() -> None:
    """Load genai-prices' data (about 5 MB) now rather than inside the first priced call: a
    worker calls this when it starts (runs.tasks), so its first phase neither waits for it
    nor shows it as memory the worker grew by."""
    get_snapshot()
