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


@dataclass
class Config:
    delay: float
    revise_rate: float
    seed: int
    # Shares of the builder's first tries that carry an edit fault (project.py); 0 in tests.
    edit_miss_rate: float = 0.0
    edit_malformed_rate: float = 0.0
    check_fail_rate: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "delay": self.delay,
            "revise_rate": self.revise_rate,
            "seed": self.seed,
            "edit_miss_rate": self.edit_miss_rate,
            "edit_malformed_rate": self.edit_malformed_rate,
            "check_fail_rate": self.check_fail_rate,
        }

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
        retry_after=_number(data, "retry_after", 1.0),
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
    _next_id: int = 1

    def __post_init__(self) -> None:
        self.config = Config(**self.startup.as_dict())

    def configure(self, data: dict[str, Any]) -> Config:
        unknown = set(data) - {"delay", "revise_rate", "seed", *RATE_KEYS}
        if unknown:
            raise RuleError(f"unknown config keys: {', '.join(sorted(unknown))}")
        with self.lock:
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
            self.config = Config(delay=delay, revise_rate=rate, seed=seed, **rates)
            return self.config

    def snapshot(self) -> Config:
        with self.lock:
            return Config(**self.config.as_dict())

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
