"""Mutable state of a running simulated provider: config, queued rules, request log.

Handler threads share one SimState; every access goes through its lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from .project import FaultRates

FAULT_KINDS = (
    "429",
    "500",
    "hang",
    "malformed",
    "cut_stream",
    "insufficient_quota",
    "auth",
    "bad_request",
)
CACHE_TTLS = ("5m", "1h")
LOG_LIMIT = 5000  # requests kept; a long `make run` must not grow without bound
PROMPT_LOG_CHARS = 2000


class RuleError(ValueError):
    """A control request the simulator refuses (answered with 400)."""


RATE_KEYS = ("edit_miss_rate", "edit_malformed_rate", "check_fail_rate")
# A provider's rate limits when /_sim/config sets none: generous, so that nothing but a test
# that asks for it is ever refused; the headers still count every call.
DEFAULT_LIMITS = {"requests": 10_000, "tokens": 30_000_000, "window_seconds": 60}
LIMIT_KEYS = tuple(DEFAULT_LIMITS)


@dataclass(frozen=True)
class LimitView:
    """One provider's rate-limit counters as one response reports them (the wire module
    turns this into the protocol's headers). `reset_at` is a Unix time."""

    requests_limit: int
    requests_remaining: int
    tokens_limit: int
    tokens_remaining: int
    reset_at: float
    exhausted: bool = False  # refused: answer 429 until reset_at

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Window:
    """A fixed window of one provider's counters, from its first request."""

    start: float
    requests: int = 0
    tokens: int = 0
    exhausted_until: float = 0.0


@dataclass
class Config:
    delay: float
    revise_rate: float
    seed: int
    # Shares of the builder's first tries that carry an edit fault (project.py); 0 in tests.
    edit_miss_rate: float = 0.0
    edit_malformed_rate: float = 0.0
    check_fail_rate: float = 0.0
    # provider → {requests, tokens, window_seconds}: the limits its headers announce.
    limits: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "delay": self.delay,
            "revise_rate": self.revise_rate,
            "seed": self.seed,
            "edit_miss_rate": self.edit_miss_rate,
            "edit_malformed_rate": self.edit_malformed_rate,
            "check_fail_rate": self.check_fail_rate,
            "limits": {p: dict(v) for p, v in self.limits.items()},
        }

    def limits_of(self, provider: str) -> dict[str, float]:
        return {**DEFAULT_LIMITS, **self.limits.get(provider, {})}

    def faults(self) -> FaultRates:
        return FaultRates(
            edit_miss=self.edit_miss_rate,
            edit_malformed=self.edit_malformed_rate,
            check_fail=self.check_fail_rate,
        )


def rates_problem(rates: dict[str, float]) -> str | None:
    """Why these fault rates are refused, or None (each is a share, and so is their sum:
    one roll picks at most one fault)."""
    for key, value in rates.items():
        if not 0 <= value <= 1:
            return f"{key}: must be between 0 and 1"
    if sum(rates.values()) > 1:
        return f"{' + '.join(rates)}: must add up to at most 1"
    return None


@dataclass
class Rule:
    """A queued fault or content rule. count < 0 means it applies until reset."""

    kind: str  # a fault kind, or "script"
    count: int
    provider: str | None = None
    match: str | None = None
    role: str | None = None
    retry_after: float = 1.0
    hang_seconds: float = 30.0
    # An error fault's message in place of the provider's usual wording (e.g. one carrying a
    # NUL, to check that the client stores provider text safely).
    message: str | None = None
    text: str | None = None
    verdict: dict[str, Any] | None = None
    # A script's cache TTL ("5m" | "1h"): where the protocol's cache writes go (Anthropic).
    cache_ttl: str | None = None
    # A cut_stream fault's content frames sent before the cut (None: half of them).
    after: int | None = None
    used: int = 0

    def applies(self, *, provider: str, role: str | None, haystacks: tuple[str, ...]) -> bool:
        if self.count == 0:
            return False
        if self.provider and self.provider != provider:
            return False
        if self.role and self.role != role:
            return False
        return not self.match or any(self.match in h for h in haystacks)

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if v is not None}
        if self.kind == "script":
            data.pop("retry_after")
            data.pop("hang_seconds")
        return data


def _number(data: dict[str, Any], key: str, default: float, *, low: float = 0) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
        raise RuleError(f"{key}: expected a number >= {low:g}, got {value!r}")
    return float(value)


def _count(data: dict[str, Any]) -> int:
    value = data.get("count", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value == 0:
        raise RuleError(f"count: expected a whole number >= 1 (or -1 for always), got {value!r}")
    return value


def _optional_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise RuleError(f"{key}: expected a string, got {value!r}")
    return value or None


def _optional_count(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise RuleError(f"{key}: expected a whole number >= 0, got {value!r}")
    return value


def _provider(data: dict[str, Any], providers: Collection[str]) -> str | None:
    provider = _optional_str(data, "provider")
    if provider and provider not in providers:
        raise RuleError(f"provider: one of {', '.join(providers)}, got {provider!r}")
    return provider


def parse_fault(data: dict[str, Any], *, providers: Collection[str]) -> Rule:
    kind = str(data.get("kind", ""))
    if kind not in FAULT_KINDS:
        raise RuleError(f"kind: one of {', '.join(FAULT_KINDS)}, got {data.get('kind')!r}")
    provider = _provider(data, providers)
    return Rule(
        kind=kind,
        count=_count(data),
        provider=provider,
        match=_optional_str(data, "match"),
        role=_optional_str(data, "role"),
        # null: a bare 429 that says nothing of its reset (no Retry-After, no RetryInfo).
        retry_after=-1.0
        if data.get("retry_after", 1.0) is None
        else _number(data, "retry_after", 1.0),
        hang_seconds=_number(data, "hang_seconds", 30.0),
        message=_optional_str(data, "message"),
        after=_optional_count(data, "after"),
    )


def parse_script(data: dict[str, Any], *, providers: Collection[str]) -> Rule:
    text, verdict = data.get("text"), data.get("verdict")
    cache_ttl = _optional_str(data, "cache_ttl")
    if cache_ttl not in (None, *CACHE_TTLS):
        raise RuleError(f"cache_ttl: one of {', '.join(CACHE_TTLS)}, got {cache_ttl!r}")
    if text is not None and verdict is not None:
        raise RuleError("give at most one of text (a string) or verdict (an object)")
    if text is None and verdict is None and cache_ttl is None:
        raise RuleError("give text (a string), verdict (an object) or cache_ttl")
    if text is not None and not isinstance(text, str):
        raise RuleError("text: expected a string")
    if verdict is not None and not isinstance(verdict, dict):
        raise RuleError("verdict: expected an object")
    provider = _provider(data, providers)
    return Rule(
        kind="script",
        count=_count(data),
        provider=provider,
        match=_optional_str(data, "match"),
        role=_optional_str(data, "role"),
        text=text,
        verdict=verdict,
        cache_ttl=cache_ttl,
    )


def parse_limits(
    data: Any, *, providers: Collection[str], current: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """`limits: {anthropic: {tokens: 100000, requests: 50, window_seconds: 300}}` merged
    into the current limits (a provider set to null goes back to the defaults)."""
    if not isinstance(data, dict):
        raise RuleError("limits: expected an object {provider: {requests, tokens, window_seconds}}")
    merged = {p: dict(v) for p, v in current.items()}
    for provider, values in data.items():
        if provider not in providers:
            raise RuleError(f"limits: provider one of {', '.join(providers)}, got {provider!r}")
        if values is None:
            merged.pop(provider, None)
            continue
        if not isinstance(values, dict) or set(values) - set(LIMIT_KEYS):
            raise RuleError(f"limits.{provider}: expected keys among {', '.join(LIMIT_KEYS)}")
        merged[provider] = {
            key: _number(values, key, merged.get(provider, DEFAULT_LIMITS).get(key, default), low=1)
            for key, default in DEFAULT_LIMITS.items()
        }
    return merged


@dataclass
class SimState:
    startup: Config
    config: Config = field(init=False)
    faults: list[Rule] = field(default_factory=list)
    scripts: list[Rule] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Set on reset so that responses sleeping out a delay or a hang end at once instead of
    # leaking into the next test.
    wake: threading.Event = field(default_factory=threading.Event)
    windows: dict[str, Window] = field(default_factory=dict)
    _next_id: int = 1

    def __post_init__(self) -> None:
        self.config = Config(**self.startup.as_dict())

    def configure(self, data: dict[str, Any], *, providers: Collection[str] = ()) -> Config:
        unknown = set(data) - {"delay", "revise_rate", "seed", "limits", *RATE_KEYS}
        if unknown:
            raise RuleError(f"unknown config keys: {', '.join(sorted(unknown))}")
        with self.lock:
            limits = self.config.limits
            if "limits" in data:
                limits = parse_limits(data["limits"], providers=providers, current=limits)
                # New limits start a new window (the counters of the old one do not apply).
                for provider in data["limits"]:
                    self.windows.pop(provider, None)
            delay = _number(data, "delay", self.config.delay)
            rate = _number(data, "revise_rate", self.config.revise_rate)
            if rate > 1:
                raise RuleError("revise_rate: must be between 0 and 1")
            seed = data.get("seed", self.config.seed)
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise RuleError(f"seed: expected a whole number, got {seed!r}")
            rates = {key: _number(data, key, getattr(self.config, key)) for key in RATE_KEYS}
            if problem := rates_problem(rates):
                raise RuleError(problem)
            self.config = Config(delay=delay, revise_rate=rate, seed=seed, limits=limits, **rates)
            return self.config

    def snapshot(self) -> Config:
        with self.lock:
            return Config(**self.config.as_dict())

    # --- rate limits ----------------------------------------------------------------------

    def _window(self, provider: str, now: float) -> tuple[Window, dict[str, float]]:
        limits = self.config.limits_of(provider)
        window = self.windows.get(provider)
        if window is None or (
            now >= window.start + limits["window_seconds"] and now >= window.exhausted_until
        ):
            window = self.windows[provider] = Window(start=now)
        return window, limits

    def _view(self, window: Window, limits: dict[str, float], *, exhausted: bool) -> LimitView:
        requests, tokens = int(limits["requests"]), int(limits["tokens"])
        reset_at = window.start + limits["window_seconds"]
        if exhausted:
            reset_at = max(reset_at, window.exhausted_until)
        return LimitView(
            requests_limit=requests,
            requests_remaining=0 if exhausted else max(0, requests - window.requests),
            tokens_limit=tokens,
            tokens_remaining=0 if exhausted else max(0, tokens - window.tokens),
            reset_at=reset_at,
            exhausted=exhausted,
        )

    def limit_check(self, provider: str, *, now: float | None = None) -> LimitView | None:
        """The refusal's view if `provider` is spent now (told to exhaust, or its window's
        requests or tokens used up), else None: the call goes ahead."""
        now = time.time() if now is None else now
        with self.lock:
            window, limits = self._window(provider, now)
            spent = window.requests >= limits["requests"] or window.tokens >= limits["tokens"]
            if window.exhausted_until > now or spent:
                return self._view(window, limits, exhausted=True)
            return None

    def limit_consume(self, provider: str, *, tokens: int, now: float | None = None) -> LimitView:
        """Count one answered request of `tokens` tokens; the counters after it."""
        now = time.time() if now is None else now
        with self.lock:
            window, limits = self._window(provider, now)
            window.requests += 1
            window.tokens += tokens
            return self._view(window, limits, exhausted=False)

    def exhaust(self, provider: str, seconds: float, *, now: float | None = None) -> LimitView:
        """Spend `provider` now: every call is answered 429 (Retry-After and reset headers)
        until `seconds` from now."""
        now = time.time() if now is None else now
        with self.lock:
            window, limits = self._window(provider, now)
            window.exhausted_until = now + seconds
            return self._view(window, limits, exhausted=True)

    def add(self, rule: Rule) -> None:
        with self.lock:
            (self.scripts if rule.kind == "script" else self.faults).append(rule)

    def take(
        self, rules: str, *, provider: str, role: str | None, haystacks: tuple[str, ...]
    ) -> Rule | None:
        """The first queued rule that applies, with one use consumed (rules apply in order)."""
        with self.lock:
            queue = self.scripts if rules == "script" else self.faults
            for rule in queue:
                if rule.applies(provider=provider, role=role, haystacks=haystacks):
                    rule.used += 1
                    if rule.count > 0:
                        rule.count -= 1
                    if rule.count == 0:
                        queue.remove(rule)
                    return rule
            return None

    def take_for_role(self, *, provider: str, role: str) -> Rule | None:
        """The first queued fault rule naming exactly `role` (and this provider, or none),
        with one use consumed. Rules without a role are left for the model calls: a route
        that is not a model call (the usage APIs) is hit only by the rules meant for it."""
        with self.lock:
            for rule in self.faults:
                if rule.count == 0 or rule.role != role:
                    continue
                if rule.provider and rule.provider != provider:
                    continue
                rule.used += 1
                if rule.count > 0:
                    rule.count -= 1
                if rule.count == 0:
                    self.faults.remove(rule)
                return rule
            return None

    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            entry = {"seq": self._next_id, "time": time.time(), **entry}
            self._next_id += 1
            self.log.append(entry)
            del self.log[:-LOG_LIMIT]
            return entry

    def requests(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(e) for e in self.log]

    def reset(self) -> None:
        with self.lock:
            self.config = Config(**self.startup.as_dict())
            self.faults.clear()
            self.scripts.clear()
            self.log.clear()
            self.windows.clear()
            self._next_id = 1
            old, self.wake = self.wake, threading.Event()
        old.set()

    def release(self) -> None:
        """Answer every response sleeping out its delay or a hang now; later ones sleep as
        configured. A test holds a call open with a long delay and ends it when the event it
        waits for has happened, instead of guessing how long that takes."""
        with self.lock:
            old, self.wake = self.wake, threading.Event()
        old.set()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.wake.wait(seconds)

    def pending(self) -> dict[str, list[dict[str, Any]]]:
        with self.lock:
            return {
                "faults": [r.as_dict() for r in self.faults],
                "scripts": [r.as_dict() for r in self.scripts],
            }
