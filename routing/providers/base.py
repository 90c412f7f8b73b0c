"""The provider contract (docs/providers.md): one endpoint type, one reply type, one error type,
and the `Provider` every wire-protocol module implements.

A provider module knows one wire protocol: how to build its SDK client, how to make one call
(plain or streamed), how to read the usage it reports into `TokenUsage`, and how to turn every
SDK exception into a `ProviderCallError` with a stable `kind`. Everything else (keys from the
environment, timing, retries, backoff) is generic and lives in routing/calls.py.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

from usage.types import TokenUsage

from ..text import storable
from .limits import RateLimits

try:  # the transport under all three SDKs; imported only to classify its errors
    import httpx2 as _httpx2
except ImportError:  # pragma: no cover - older SDK releases ride on httpx
    _httpx2 = None  # type: ignore[assignment]

ERROR_KINDS = (
    "rate_limited",
    "server_error",
    "timeout",
    "connection",
    "auth",
    "insufficient_quota",
    "bad_request",
    "malformed",
)
RETRYABLE_KINDS = frozenset({"rate_limited", "server_error", "timeout", "connection", "malformed"})
MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Everything needed to reach one configured provider (config/models.yaml `providers.<name>`,
    stored as routing.models.ProviderEndpoint). Never holds a key: only the env var's name."""

    name: str  # the provider name used everywhere else: caps, usage, the catalogue
    protocol: str  # a key of routing.providers.PROVIDERS: which wire module calls it
    api_key_env: str
    base_url: str
    prices_id: str  # genai-prices' provider id for pricing its calls

    @property
    def effective_base_url(self) -> str:
        # Read at call time so `make run` and the tests can point a provider at the simulated
        # provider without editing the mapping.
        return os.environ.get(f"AUTOPACK_{self.name.upper()}_BASE_URL") or self.base_url

    @property
    def api_key_configured(self) -> bool:
        return bool(os.environ.get(self.api_key_env, "").strip())


@dataclass(frozen=True, slots=True)
class ProviderReply:
    """What a provider module returns from one successful call."""

    text: str
    usage: TokenUsage
    provider_request_id: str
    reported_model: str  # the model the provider says answered ("" if it said none)
    limits: RateLimits | None = None  # what the response's rate-limit headers said


@dataclass(frozen=True, slots=True)
class ModelResponse:
    text: str
    usage: TokenUsage
    provider_request_id: str
    model: str  # the catalogue model Autopack asked for
    latency_ms: int
    # What the provider says answered (a dated snapshot such as claude-sonnet-4-5-20250929,
    # Gemini's modelVersion); "" when it said none.
    reported_model: str = ""
    limits: RateLimits | None = None  # the response's rate-limit headers (limits.py)


class ProviderCallError(Exception):
    """One failed provider call, classified. `message` is the provider's own wording with any
    key scrubbed; it is safe to store and show.

    `partial_usage` is what the provider had reported before a stream was cut (Anthropic's
    message_start, Gemini's last usageMetadata, an OpenAI usage chunk): it billed that much
    although the call failed. `stream_cut` says the failure ended a stream that had started
    (HTTP 200 and the first events arrived), so the provider did work even if it reported no
    usage yet; routing.services meters such an attempt as estimated either way.

    `limits` is what the error response's rate-limit headers said (limits.py), None when it
    carried none; `retry_after` the seconds Retry-After (or Gemini's retryDelay) asked for."""

    def __init__(
        self,
        *,
        provider: str,
        kind: str,
        message: str,
        status_code: int | None = None,
        retry_after: float | None = None,
        retryable: bool | None = None,
        partial_usage: TokenUsage | None = None,
        reported_model: str = "",
        stream_cut: bool = False,
        limits: RateLimits | None = None,
    ) -> None:
        self.provider = provider
        self.limits = limits
        # Set by call_with_retries: a retryable error raised at once for the fallback to take
        # the call (an exhausted provider that announced its reset).
        self.left_for_fallback = False
        # The instant the error was seen: retry_after counts from here.
        self.seen_at = datetime.now(UTC)
        self.kind = kind
        # The provider's own words end up in phase events and failure reasons (PostgreSQL).
        message = storable(message)
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after
        self.retryable = kind in RETRYABLE_KINDS if retryable is None else retryable
        self.partial_usage = partial_usage
        self.reported_model = storable(reported_model)
        self.stream_cut = stream_cut
        status = f" {status_code}" if status_code is not None else ""
        super().__init__(f"{provider}: {kind}{status}: {message}")

    @property
    def spends_limit(self) -> bool:
        """The provider refused for a spent limit or balance (429, 402, insufficient_quota,
        a usage-limit error): it is cooled down (routing.services)."""
        return self.kind in ("rate_limited", "insufficient_quota") or self.status_code in (
            402,
            429,
        )

    @property
    def announced_reset(self) -> datetime | None:
        """When the provider said the limit comes back (Retry-After / retryDelay, else the
        reset header of the spent limit); None for a bare error that said nothing."""
        if self.retry_after is not None:
            return self.seen_at + timedelta(seconds=self.retry_after)
        return self.limits.announced_reset if self.limits is not None else None


class ProviderNotConfigured(ProviderCallError):
    """The provider's key env var is unset or empty: no call was made."""

    def __init__(self, *, provider: str, api_key_env: str) -> None:
        super().__init__(
            provider=provider,
            kind="auth",
            message=f"no API key: environment variable {api_key_env} is not set",
            retryable=False,
        )


class StreamProgress:
    """What a streamed call has seen so far, kept by the provider module as events arrive so
    that a cut (a missing final event, a reset connection) still knows what was billed."""

    def __init__(self) -> None:
        self.started = False  # the stream's response arrived (HTTP 200)
        self.usage: TokenUsage | None = None  # the latest usage the provider reported
        self.reported_model = ""

    def attach_to(self, error: ProviderCallError) -> ProviderCallError:
        if self.started:
            error.stream_cut = True
            if error.partial_usage is None:
                error.partial_usage = self.usage
            if not error.reported_model:
                error.reported_model = storable(self.reported_model)
        return error


class Provider(ABC):
    """One wire protocol. Stateless apart from its SDK client cache: one object serves every
    endpoint of its protocol."""

    protocol: str
    # genai-prices' provider id when an endpoint names none ("" = the endpoint's own name).
    default_prices_id: str = ""

    @abstractmethod
    def client(self, endpoint: Endpoint, key: str, timeout: float) -> Any:
        """The SDK client for this endpoint and key (cached; SDK retries off)."""

    @abstractmethod
    def call(
        self,
        endpoint: Endpoint,
        key: str,
        *,
        model: str,
        system: str,
        prompt: str,
        max_tokens: int,
        stream: bool,
        timeout: float,
        progress: StreamProgress,
    ) -> ProviderReply:
        """Exactly one HTTP attempt. Raises ProviderCallError for a response it cannot use, any
        SDK exception otherwise (classify() turns it into one). A stream keeps `progress` up to
        date with every usage and model it reports."""

    @abstractmethod
    def classify(self, endpoint: Endpoint, exc: BaseException, key: str) -> ProviderCallError:
        """The SDK's exception as a ProviderCallError (the key scrubbed from its message)."""

    @abstractmethod
    def preload(self) -> None:
        """Import the SDK now (a worker calls this at start, not inside its first phase)."""


# --- helpers shared by the provider modules ----------------------------------------------------

_clients: dict[tuple[str, ...], Any] = {}
_clients_lock = threading.Lock()
_MAX_CACHED_CLIENTS = 64


def key_fingerprint(key: str) -> str:
    # The cache is keyed by a digest so that a rotated key gets a fresh client while the key
    # itself is never a dict key anyone could print.
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def cached_client(cache_key: tuple[str, ...], build: Callable[[], Any]) -> Any:
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            if len(_clients) >= _MAX_CACHED_CLIENTS:
                _clients.clear()
            client = _clients[cache_key] = build()
        return client


def clear_client_cache() -> None:
    with _clients_lock:
        _clients.clear()


def cached_client_keys() -> list[tuple[str, ...]]:
    """The cache's keys (digests, never keys): for tests and diagnostics."""
    with _clients_lock:
        return list(_clients)


def as_int(value: Any) -> int:
    """A token count from a usage field: a missing, null or non-numeric field counts 0."""
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def scrub(message: Any, key: str | None) -> str:
    text = str(message or "").strip() or "no message"
    if key and len(key) >= 8:  # shorter "keys" are test stubs and would mangle the words
        text = text.replace(key, "[redacted]")
    return text[:MAX_MESSAGE_CHARS]


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds a Retry-After (or OpenAI's retry-after-ms) header asks for; None if none."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def kind_for_status(status: int) -> str:
    if status in (401, 403):
        return "auth"
    if status == 402:
        return "insufficient_quota"
    if status == 408:
        return "timeout"
    if status == 429:
        return "rate_limited"
    if status == 409 or status >= 500:
        return "server_error"
    return "bad_request"


def transport_error(provider: str, exc: BaseException) -> ProviderCallError | None:
    """Errors the transport raises outside the SDKs' own wrappers (google-genai, streams)."""
    if _httpx2 is not None:
        if isinstance(exc, _httpx2.TimeoutException):
            return ProviderCallError(provider=provider, kind="timeout", message="request timed out")
        if isinstance(exc, _httpx2.TransportError):
            return ProviderCallError(
                provider=provider, kind="connection", message=f"{type(exc).__name__}: {exc}"
            )
    if isinstance(exc, TimeoutError):
        return ProviderCallError(provider=provider, kind="timeout", message="request timed out")
    if isinstance(exc, ConnectionError):
        return ProviderCallError(provider=provider, kind="connection", message=str(exc))
    return None


def malformed(provider: str, detail: str) -> ProviderCallError:
    return ProviderCallError(provider=provider, kind="malformed", message=detail)
