"""The provider registry: wire-protocol name → the provider object that speaks it.

A provider in config/models.yaml names its protocol (`protocol:`); without one, the table below
gives the protocol of the four providers Autopack ships with, and any other name is an
OpenAI-compatible server. This package is the only place in routing/, runs/ and usage/ that
knows a provider by its name; everything else goes through `provider_for(endpoint)`.
"""

from __future__ import annotations

from typing import Any

from .anthropic import AnthropicProvider
from .base import (
    ERROR_KINDS,
    RETRYABLE_KINDS,
    Endpoint,
    ModelResponse,
    Provider,
    ProviderCallError,
    ProviderNotConfigured,
    ProviderReply,
    StreamProgress,
)
from .gemini import GeminiProvider
from .openai import OPENAI, OPENAI_COMPATIBLE, ZAI, OpenAIProvider

PROVIDERS: dict[str, Provider] = {
    p.protocol: p
    for p in (
        OpenAIProvider(OPENAI),
        OpenAIProvider(OPENAI_COMPATIBLE),
        OpenAIProvider(ZAI),
        AnthropicProvider(),
        GeminiProvider(),
    )
}
PROTOCOLS = tuple(PROVIDERS)
# The protocol of a provider whose entry names none (DESIGN.md's provider names), so that a
# models.yaml written before `protocol:` existed keeps working. Any other name: compatible.
DEFAULT_PROTOCOLS = {
    "openai": "openai",
    "anthropic": "anthropic",
    "google_gemini": "gemini",
    "glm": "zai",
}
FALLBACK_PROTOCOL = "openai_compatible"


class UnknownProtocol(ValueError):
    pass


def default_protocol(name: str) -> str:
    return DEFAULT_PROTOCOLS.get(name, FALLBACK_PROTOCOL)


def make_endpoint(
    *, name: str, api_key_env: str, base_url: str, protocol: str = "", prices_id: str = ""
) -> Endpoint:
    """An Endpoint with the defaults filled in: the protocol from the table above, the prices id
    from the protocol (or the endpoint's own name). Raises UnknownProtocol."""
    protocol = protocol or default_protocol(name)
    provider = PROVIDERS.get(protocol)
    if provider is None:
        raise UnknownProtocol(f"unknown protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
    return Endpoint(
        name=name,
        protocol=protocol,
        api_key_env=api_key_env,
        base_url=base_url,
        prices_id=prices_id or provider.default_prices_id or name,
    )


def endpoint_from_row(row: Any) -> Endpoint:
    """The Endpoint of a stored routing.models.ProviderEndpoint. A protocol no module serves
    any more is kept as stored, so that loading the router never fails: a call to it fails
    instead, with the reason (provider_for)."""
    try:
        return make_endpoint(
            name=row.name,
            api_key_env=row.api_key_env,
            base_url=row.base_url,
            protocol=row.protocol,
            prices_id=row.prices_id,
        )
    except UnknownProtocol:
        return Endpoint(
            name=row.name,
            protocol=row.protocol,
            api_key_env=row.api_key_env,
            base_url=row.base_url,
            prices_id=row.prices_id or row.name,
        )


def provider_for(endpoint: Endpoint) -> Provider:
    try:
        return PROVIDERS[endpoint.protocol]
    except KeyError:
        raise UnknownProtocol(
            f"{endpoint.name}: unknown protocol {endpoint.protocol!r} "
            f"(one of {', '.join(PROTOCOLS)})"
        ) from None


def preload_all() -> None:
    """Import every protocol's SDK (a worker does this at start: see runs.tasks)."""
    for provider in PROVIDERS.values():
        provider.preload()


__all__ = [
    "DEFAULT_PROTOCOLS",
    "ERROR_KINDS",
    "PROTOCOLS",
    "PROVIDERS",
    "RETRYABLE_KINDS",
    "Endpoint",
    "ModelResponse",
    "Provider",
    "ProviderCallError",
    "ProviderNotConfigured",
    "ProviderReply",
    "StreamProgress",
    "UnknownProtocol",
    "default_protocol",
    "endpoint_from_row",
    "make_endpoint",
    "preload_all",
    "provider_for",
]
