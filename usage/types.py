"""Value types shared by the provider clients (routing) and the meter (usage)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens one provider call billed, normalised across providers.

    prompt_tokens counts every billed input token, cache reads and cache writes included;
    completion_tokens counts every billed output token, reasoning/thinking included. The parts
    are repeated separately so nothing is lost in the normalisation.
    """

    prompt_tokens: int
    completion_tokens: int
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0  # every cache write, whatever its lifetime
    reasoning_tokens: int = 0
    # The part of cache_write_tokens written to a 1-hour cache (Anthropic's
    # ephemeral_1h_input_tokens), priced at its own higher rate; the rest is 5-minute writes.
    cache_write_1h_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
