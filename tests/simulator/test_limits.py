"""The simulator's rate limits over raw HTTP: headers in step with its counters per protocol,
limits set through /_sim/config, a provider told to exhaust (429 with Retry-After and reset
headers until the announced reset), a window spent by its own counters."""

from __future__ import annotations

import json
import time

import pytest

from tests.sim_fixtures import SimulatedProvider, SimulatorError

from .test_wire import BUILDER, raw_call

LIMITS = {"tokens": 100000, "requests": 50, "window_seconds": 300}


def test_openai_and_glm_send_x_ratelimit_headers_counting_each_request(
    sim: SimulatedProvider,
) -> None:
    sim.configure(limits={"openai": LIMITS, "glm": LIMITS})
    for provider in ("openai", "glm"):
        raw_call(sim, provider, BUILDER)
        status, headers, _ = raw_call(sim, provider, BUILDER, stream=True)
        counted = sim.requests()[-1]["limits"]
        h = {k.lower(): v for k, v in headers.items()}
        assert status == 200
        assert h["x-ratelimit-limit-requests"] == "50"
        assert h["x-ratelimit-remaining-requests"] == "48" == str(counted["requests_remaining"])
        assert h["x-ratelimit-limit-tokens"] == "100000"
        assert h["x-ratelimit-remaining-tokens"] == str(counted["tokens_remaining"])
        assert int(h["x-ratelimit-remaining-tokens"]) < 100000
        assert h["x-ratelimit-reset-tokens"].endswith("s")  # a duration, e.g. "4m59s"


def test_anthropic_sends_its_ratelimit_headers_with_rfc3339_resets(sim: SimulatedProvider) -> None:
    sim.configure(limits={"anthropic": LIMITS})
    _, headers, _ = raw_call(sim, "anthropic", BUILDER)
    h = {k.lower(): v for k, v in headers.items()}
    counted = sim.requests()[-1]["limits"]
    assert h["anthropic-ratelimit-requests-remaining"] == "49"
    assert h["anthropic-ratelimit-tokens-remaining"] == str(counted["tokens_remaining"])
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(counted["reset_at"]))
    assert h["anthropic-ratelimit-tokens-reset"] == reset
    assert h["anthropic-ratelimit-input-tokens-limit"] == "100000"


def test_gemini_sends_no_rate_limit_headers(sim: SimulatedProvider) -> None:
    _, headers, _ = raw_call(sim, "google_gemini", BUILDER)
    assert not [k for k in headers if "ratelimit" in k.lower()]


@pytest.mark.parametrize("provider", ["openai", "glm", "anthropic", "google_gemini"])
def test_an_exhausted_provider_answers_429_with_its_reset_until_then(
    sim: SimulatedProvider, provider: str
) -> None:
    answer = sim.control("POST", "/_sim/exhaust", {"provider": provider, "seconds": 120})
    assert answer["limits"]["exhausted"] is True

    status, headers, body = raw_call(sim, provider, BUILDER)

    assert status == 429
    h = {k.lower(): v for k, v in headers.items()}
    entry = sim.requests()[-1]
    assert entry["outcome"] == "exhausted"
    if provider == "google_gemini":
        details = json.loads(body)["error"]["details"]
        delays = [d["retryDelay"] for d in details if "retryDelay" in d]
        assert delays and 115 <= float(delays[0][:-1]) <= 120
    else:
        assert 115 <= float(h["retry-after"]) <= 120
    if provider in ("openai", "glm"):
        assert h["x-ratelimit-remaining-tokens"] == "0"
        assert h["x-ratelimit-reset-tokens"].startswith(("1m", "2m"))
    if provider == "anthropic":
        assert h["anthropic-ratelimit-tokens-remaining"] == "0"
        assert "anthropic-ratelimit-tokens-reset" in h


def test_a_window_spent_by_its_own_counters_is_refused_until_its_reset(
    sim: SimulatedProvider,
) -> None:
    sim.configure(limits={"openai": {"requests": 2, "window_seconds": 600}})
    assert raw_call(sim, "openai", BUILDER)[0] == 200
    assert raw_call(sim, "openai", BUILDER)[0] == 200
    status, headers, _ = raw_call(sim, "openai", BUILDER)
    assert status == 429
    assert float({k.lower(): v for k, v in headers.items()}["retry-after"]) > 590
    # Other providers are counted on their own.
    assert raw_call(sim, "anthropic", BUILDER)[0] == 200


def test_a_bare_429_fault_says_nothing_of_its_reset(sim: SimulatedProvider) -> None:
    sim.add_fault(kind="429", provider="anthropic", retry_after=None)
    status, headers, _ = raw_call(sim, "anthropic", BUILDER)
    assert status == 429
    assert "retry-after" not in {k.lower() for k in headers}


@pytest.mark.parametrize(
    "body",
    [
        {"limits": {"nobody": {"tokens": 5}}},
        {"limits": {"openai": {"tokens": 0}}},
        {"limits": {"openai": {"pace": 1}}},
        {"limits": []},
    ],
)
def test_bad_limits_are_refused(sim: SimulatedProvider, body: dict[str, object]) -> None:
    with pytest.raises(SimulatorError, match="400"):
        sim.control("POST", "/_sim/config", body)


def test_exhaust_refuses_an_unknown_provider(sim: SimulatedProvider) -> None:
    with pytest.raises(SimulatorError, match="400"):
        sim.control("POST", "/_sim/exhaust", {"provider": "nobody", "seconds": 5})
