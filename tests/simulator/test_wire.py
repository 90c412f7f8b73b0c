"""The simulated provider over raw HTTP: wire formats, auth, content, faults, control API."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from runs.edits import parse_edits
from simulator import simulated_provider_env
from tests.sim_fixtures import SimulatedProvider, SimulatorError

BUILDER = "Autopack-Role: builder\nAttempt: 1\nPhase 1: Add login\nCategory: backend\n"
AUDITOR = "Autopack-Role: auditor\nAttempt: {attempt}\nPhase 1: Add login\n\nBuilder's change:\n"
LONG = "Context line that repeats to make a long, cacheable prompt.\n" * 120
MODELS = {
    "openai": "gpt-4o",
    "glm": "glm-4.6",
    "anthropic": "claude-sonnet-4-5",
    "google_gemini": "gemini-2.5-flash",
}


def raw_call(
    sim: SimulatedProvider,
    provider: str,
    prompt: str,
    *,
    key: str | None = "sim-key-123456",
    stream: bool = False,
    model: str | None = None,
    key_in_query: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    """One request as the SDK would send it, without the SDK: (status, headers, body)."""
    model = model or MODELS[provider]
    headers = {"Content-Type": "application/json"}
    base = sim.base_url(provider).rstrip("/")
    if provider == "anthropic":
        url = f"{base}/v1/messages"
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": 2048,
            "system": "You are the builder.",
            "messages": [{"role": "user", "content": prompt}],
            "stream": stream,
        }
        if key:
            headers["x-api-key"] = key
    elif provider == "google_gemini":
        action = "streamGenerateContent?alt=sse" if stream else "generateContent"
        url = f"{base}/v1beta/models/{model}:{action}"
        if key and key_in_query:
            url += ("&" if "?" in url else "?") + f"key={key}"
        elif key:
            headers["x-goog-api-key"] = key
        body = {
            "contents": [{"role": "user", "parts": [{"text": prompt}]}],
            "systemInstruction": {"parts": [{"text": "You are the builder."}]},
            "generationConfig": {"maxOutputTokens": 2048},
        }
    else:
        url = f"{base}/chat/completions"
        body = {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are the builder."},
                {"role": "user", "content": prompt},
            ],
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if key:
            headers["Authorization"] = f"Bearer {key}"
    # Always an http:// URL to the local simulator.
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def sse_data(body: bytes) -> list[str]:
    return [
        line[len("data: ") :] for line in body.decode().splitlines() if line.startswith("data: ")
    ]


def reply_text(provider: str, body: bytes) -> str:
    data = json.loads(body)
    if provider == "anthropic":
        return "".join(b["text"] for b in data["content"] if b["type"] == "text")
    if provider == "google_gemini":
        return "".join(p["text"] for p in data["candidates"][0]["content"]["parts"])
    return data["choices"][0]["message"]["content"]


@pytest.mark.parametrize("provider", MODELS)
def test_a_request_without_an_api_key_gets_401_in_the_providers_format(
    sim: SimulatedProvider, provider: str
) -> None:
    status, _headers, body = raw_call(sim, provider, BUILDER, key=None)
    assert status == 401
    data = json.loads(body)
    if provider == "anthropic":
        assert data["type"] == "error" and data["error"]["type"] == "authentication_error"
    elif provider == "google_gemini":
        assert data["error"]["code"] == 401 and data["error"]["status"] == "UNAUTHENTICATED"
    elif provider == "glm":
        assert data["error"]["code"] == "1001"
    else:
        assert data["error"]["type"] == "invalid_request_error"
    assert sim.requests()[-1]["outcome"] == "unauthorized"


@pytest.mark.parametrize("provider", MODELS)
def test_a_key_starting_with_invalid_gets_401_and_is_never_logged(
    sim: SimulatedProvider, provider: str
) -> None:
    key = "invalid-secret-key-0042"
    status, _headers, body = raw_call(sim, provider, BUILDER, key=key, key_in_query=True)
    assert status == 401
    assert key.encode() not in body
    assert key not in json.dumps(sim.requests())


def test_gemini_accepts_the_key_as_a_query_parameter_and_keeps_it_out_of_the_log(
    sim: SimulatedProvider,
) -> None:
    status, _headers, _body = raw_call(
        sim, "google_gemini", BUILDER, key="query-key-98765", key_in_query=True
    )
    assert status == 200
    entry = sim.requests()[-1]
    assert entry["path"] == "/gemini/v1beta/models/gemini-2.5-flash:generateContent"
    assert "query-key-98765" not in json.dumps(entry)


def test_openai_reply_carries_request_id_header_and_full_usage(sim: SimulatedProvider) -> None:
    status, headers, body = raw_call(sim, "openai", BUILDER, model="gpt-5")
    assert status == 200
    data = json.loads(body)
    usage = data["usage"]
    assert headers["x-request-id"].startswith("req_")
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] > 0
    assert usage["completion_tokens"] > usage["completion_tokens_details"]["reasoning_tokens"]
    assert sim.requests()[-1]["usage"] == usage


def test_glm_usage_has_only_the_fields_glm_fills(sim: SimulatedProvider) -> None:
    _status, _headers, body = raw_call(sim, "glm", LONG + BUILDER)
    usage = json.loads(body)["usage"]
    assert set(usage) == {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_tokens_details",
    }
    assert 0 < usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


def test_anthropic_input_tokens_exclude_cache_reads_and_writes(sim: SimulatedProvider) -> None:
    status, headers, body = raw_call(sim, "anthropic", LONG + BUILDER)
    assert status == 200 and headers["request-id"].startswith("req_")
    usage = json.loads(body)["usage"]
    assert usage["cache_read_input_tokens"] > 0 and usage["cache_creation_input_tokens"] > 0
    logged_prompt = sim.requests()[-1]["prompt"]
    # input_tokens is only the uncached remainder of a prompt of ~len/4 tokens.
    whole = usage["input_tokens"] + usage["cache_read_input_tokens"]
    whole += usage["cache_creation_input_tokens"]
    assert usage["input_tokens"] < whole // 4
    assert whole >= len(LONG) // 4 and logged_prompt.startswith("Context line")


def test_short_prompts_are_not_cached(sim: SimulatedProvider) -> None:
    _status, _headers, body = raw_call(sim, "anthropic", BUILDER)
    usage = json.loads(body)["usage"]
    assert usage["cache_read_input_tokens"] == 0 and usage["cache_creation_input_tokens"] == 0


def test_gemini_candidates_exclude_thoughts_and_total_adds_them(sim: SimulatedProvider) -> None:
    _status, _headers, body = raw_call(sim, "google_gemini", LONG + BUILDER)
    meta = json.loads(body)["usageMetadata"]
    assert meta["thoughtsTokenCount"] > 0
    assert 0 < meta["cachedContentTokenCount"] < meta["promptTokenCount"]
    assert meta["totalTokenCount"] == (
        meta["promptTokenCount"] + meta["candidatesTokenCount"] + meta["thoughtsTokenCount"]
    )


def test_gemini_1_5_models_report_no_thoughts(sim: SimulatedProvider) -> None:
    _status, _headers, body = raw_call(sim, "google_gemini", BUILDER, model="gemini-1.5-pro")
    assert "thoughtsTokenCount" not in json.loads(body)["usageMetadata"]


def test_openai_stream_sends_usage_in_a_last_chunk_without_choices(
    sim: SimulatedProvider,
) -> None:
    _status, headers, body = raw_call(sim, "openai", BUILDER, stream=True)
    assert headers["Content-Type"].startswith("text/event-stream")
    events = sse_data(body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_anthropic_stream_follows_the_real_event_order(sim: SimulatedProvider) -> None:
    _status, _headers, body = raw_call(sim, "anthropic", LONG + BUILDER, stream=True)
    names = [ln[len("event: ") :] for ln in body.decode().splitlines() if ln.startswith("event: ")]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    data = [json.loads(d) for d in sse_data(body)]
    start_usage = data[0]["message"]["usage"]
    final_usage = data[-2]["usage"]
    assert start_usage["cache_creation_input_tokens"] > 0 and start_usage["output_tokens"] == 1
    assert final_usage["output_tokens"] == sim.requests()[-1]["usage"]["output_tokens"]


def test_gemini_stream_chunks_each_carry_usage_and_only_the_last_is_final(
    sim: SimulatedProvider,
) -> None:
    _status, _headers, body = raw_call(sim, "google_gemini", BUILDER, stream=True)
    chunks = [json.loads(d) for d in sse_data(body)]
    assert len(chunks) > 2 and all("usageMetadata" in c for c in chunks)
    assert [("finishReason" in c["candidates"][0]) for c in chunks] == [False] * (
        len(chunks) - 1
    ) + [True]
    assert chunks[-1]["usageMetadata"] == sim.requests()[-1]["usage"]


def test_same_request_and_seed_give_the_same_text_and_usage(sim: SimulatedProvider) -> None:
    first = json.loads(raw_call(sim, "openai", BUILDER)[2])
    second = json.loads(raw_call(sim, "openai", BUILDER)[2])
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert first["usage"] == second["usage"] and first["id"] != second["id"]


def test_builder_reply_describes_files_and_summary_without_echoing_markup(
    sim: SimulatedProvider,
) -> None:
    prompt = BUILDER.replace("Add login", "<script>alert('x')</script> login")
    text = reply_text("openai", raw_call(sim, "openai", prompt)[2])
    assert "Files touched:" in text and "Summary:" in text
    assert "<script>" not in text and "</script>" not in text and "'x'" not in text
    # The edit blocks carry the phase's name only as a file name and a docstring's words.
    assert "app/p01_scriptalert_x_script_login.py" in {e.path for e in parse_edits(text)}


def test_agent_roles_get_a_builder_style_reply(sim: SimulatedProvider) -> None:
    prompt = BUILDER.replace("Autopack-Role: builder", "Autopack-Role: agent:planner")
    text = reply_text("anthropic", raw_call(sim, "anthropic", prompt)[2])
    assert "Files touched:" in text
    assert sim.requests()[-1]["role"] == "agent:planner"


def test_auditor_always_asks_for_revision_on_attempt_1_when_revise_rate_is_1(
    sim: SimulatedProvider,
) -> None:
    sim.configure(revise_rate=1.0)
    verdict = json.loads(reply_text("glm", raw_call(sim, "glm", AUDITOR.format(attempt=1))[2]))
    assert verdict["verdict"] == "revise" and verdict["issues"]
    assert {i["severity"] for i in verdict["issues"]} <= {"minor", "major", "critical"}
    assert all(set(i) == {"severity", "title", "detail"} for i in verdict["issues"])


def test_auditor_approves_later_attempts_with_at_most_two_minor_issues(
    sim: SimulatedProvider,
) -> None:
    sim.configure(revise_rate=1.0)
    for attempt in range(2, 8):
        body = raw_call(sim, "openai", AUDITOR.format(attempt=attempt))[2]
        verdict = json.loads(reply_text("openai", body))
        assert verdict["verdict"] == "approve"
        assert len(verdict["issues"]) <= 2
        assert all(i["severity"] == "minor" for i in verdict["issues"])


def test_revise_rate_0_approves_every_first_attempt(sim: SimulatedProvider) -> None:
    sim.configure(revise_rate=0)
    for n in range(5):
        prompt = AUDITOR.format(attempt=1) + f"change {n}"
        verdict = json.loads(reply_text("openai", raw_call(sim, "openai", prompt)[2]))
        assert verdict["verdict"] == "approve"


def test_revise_share_follows_revise_rate(sim: SimulatedProvider) -> None:
    sim.configure(revise_rate=0.5)
    verdicts = [
        json.loads(
            reply_text("openai", raw_call(sim, "openai", AUDITOR.format(attempt=1) + str(n))[2])
        )["verdict"]
        for n in range(40)
    ]
    assert 8 <= verdicts.count("revise") <= 32


def test_a_script_rule_injects_arbitrary_text_for_the_matching_role_only(
    sim: SimulatedProvider,
) -> None:
    html = "<b>done</b><script>alert(1)</script>"
    sim.add_script(match="Add login", role="builder", text=html, count=1)
    auditor = reply_text("openai", raw_call(sim, "openai", AUDITOR.format(attempt=2))[2])
    assert "<script>" not in auditor
    assert reply_text("openai", raw_call(sim, "openai", BUILDER)[2]) == html
    assert "<script>" not in reply_text("openai", raw_call(sim, "openai", BUILDER)[2])
    assert [r["scripted"] for r in sim.requests()] == [False, True, False]


def test_a_script_rule_can_force_a_verdict(sim: SimulatedProvider) -> None:
    verdict = {"verdict": "revise", "summary": "no", "issues": []}
    sim.add_script(role="auditor", verdict=verdict, count=2)
    for _ in range(2):
        text = reply_text("anthropic", raw_call(sim, "anthropic", AUDITOR.format(attempt=3))[2])
        assert json.loads(text) == verdict


def test_a_fault_applies_only_to_matching_provider_and_body(sim: SimulatedProvider) -> None:
    sim.add_fault(kind="500", provider="anthropic", match="Phase 9", count=1)
    assert raw_call(sim, "openai", BUILDER + "Phase 9")[0] == 200
    assert raw_call(sim, "anthropic", BUILDER)[0] == 200
    status, _headers, body = raw_call(sim, "anthropic", BUILDER + "Phase 9")
    assert status == 500 and json.loads(body)["error"]["type"] == "api_error"
    assert raw_call(sim, "anthropic", BUILDER + "Phase 9")[0] == 200
    assert [r["outcome"] for r in sim.requests()] == ["ok", "ok", "500", "ok"]


def test_a_fault_with_count_minus_1_applies_until_reset(sim: SimulatedProvider) -> None:
    sim.add_fault(kind="500", count=-1)
    assert [raw_call(sim, "glm", BUILDER)[0] for _ in range(3)] == [500, 500, 500]
    sim.reset()
    assert raw_call(sim, "glm", BUILDER)[0] == 200


@pytest.mark.parametrize("provider", ["openai", "anthropic", "glm"])
def test_a_429_fault_sends_retry_after(sim: SimulatedProvider, provider: str) -> None:
    sim.add_fault(kind="429", retry_after=7)
    status, headers, _body = raw_call(sim, provider, BUILDER)
    assert status == 429 and headers["retry-after"] == "7"


def test_gemini_429_says_when_to_retry_in_retry_info(sim: SimulatedProvider) -> None:
    sim.add_fault(kind="429", retry_after=3)
    status, _headers, body = raw_call(sim, "google_gemini", BUILDER)
    details = json.loads(body)["error"]["details"]
    assert status == 429
    assert {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3s"} in details


def test_openai_insufficient_quota_is_a_429_with_its_own_code(sim: SimulatedProvider) -> None:
    sim.add_fault(kind="insufficient_quota")
    status, _headers, body = raw_call(sim, "openai", BUILDER)
    assert status == 429 and json.loads(body)["error"]["code"] == "insufficient_quota"


@pytest.mark.parametrize("provider", MODELS)
def test_a_malformed_fault_returns_200_with_a_body_that_is_not_json(
    sim: SimulatedProvider, provider: str
) -> None:
    sim.add_fault(kind="malformed")
    status, _headers, body = raw_call(sim, provider, BUILDER)
    assert status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)


@pytest.mark.parametrize("provider", MODELS)
def test_a_cut_stream_ends_before_the_final_usage_event(
    sim: SimulatedProvider, provider: str
) -> None:
    sim.add_fault(kind="cut_stream")
    with pytest.raises(Exception) as caught:  # the raw reader sees an incomplete chunked body
        raw_call(sim, provider, BUILDER, stream=True)
    assert "Incomplete" in type(caught.value).__name__ or isinstance(caught.value, OSError)
    assert sim.requests()[-1]["outcome"] == "cut_stream"


def test_a_hang_fault_delays_the_reply_by_hang_seconds(sim: SimulatedProvider) -> None:
    sim.add_fault(kind="hang", hang_seconds=0.5)
    started = time.monotonic()
    assert raw_call(sim, "openai", BUILDER)[0] == 200
    assert time.monotonic() - started >= 0.5


def test_delay_is_settable_at_runtime(sim: SimulatedProvider) -> None:
    sim.configure(delay=0.4)
    started = time.monotonic()
    raw_call(sim, "google_gemini", BUILDER, stream=True)
    assert time.monotonic() - started >= 0.35
    sim.configure(delay=0)
    started = time.monotonic()
    raw_call(sim, "google_gemini", BUILDER)
    assert time.monotonic() - started < 0.3


def test_the_request_log_records_each_call_without_secrets(sim: SimulatedProvider) -> None:
    raw_call(sim, "anthropic", LONG * 3 + BUILDER, stream=True, key="secret-key-abcdef")
    (entry,) = sim.requests()
    assert entry["provider"] == "anthropic" and entry["path"] == "/anthropic/v1/messages"
    assert entry["model"] == "claude-sonnet-4-5" and entry["stream"] is True
    assert entry["role"] == "builder" and entry["attempt"] == 1
    assert entry["outcome"] == "ok" and entry["status"] == 200
    assert len(entry["prompt"]) == 2000 and isinstance(entry["time"], float)
    assert "secret-key-abcdef" not in json.dumps(entry)


def test_reset_clears_rules_log_and_config(sim: SimulatedProvider) -> None:
    sim.configure(delay=1.5, revise_rate=0.9, seed=42, check_fail_rate=0.5)
    sim.add_fault(kind="500", count=5)
    sim.add_script(text="x", count=5)
    raw_call(sim, "openai", BUILDER)
    sim.reset()
    assert sim.requests() == []
    assert sim.control("GET", "/_sim/config") == {
        "delay": 0.0,
        "revise_rate": 0.2,
        "seed": 1,
        "edit_miss_rate": 0.0,
        "edit_malformed_rate": 0.0,
        "check_fail_rate": 0.0,
        "limits": {},
    }
    assert sim.control("GET", "/_sim/rules") == {"faults": [], "scripts": []}
    assert raw_call(sim, "openai", BUILDER)[0] == 200


def test_a_different_seed_changes_the_reply(sim: SimulatedProvider) -> None:
    first = json.loads(raw_call(sim, "openai", BUILDER)[2])
    sim.configure(seed=99)
    second = json.loads(raw_call(sim, "openai", BUILDER)[2])
    assert first["choices"][0]["message"]["content"] != second["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "rule",
    [{"kind": "teapot"}, {"kind": "500", "count": 0}, {"kind": "500", "provider": "mistral"}],
)
def test_the_control_api_refuses_bad_fault_rules(sim: SimulatedProvider, rule: dict) -> None:
    with pytest.raises(SimulatorError, match="400"):
        sim.add_fault(**rule)


def test_the_control_api_refuses_a_script_without_text_or_verdict(sim: SimulatedProvider) -> None:
    with pytest.raises(SimulatorError, match="400"):
        sim.add_script(match="x")


def test_the_simulator_serves_the_environment_that_points_each_provider_at_it(
    sim: SimulatedProvider,
) -> None:
    env = sim.control("GET", "/_sim/env")
    assert env == simulated_provider_env(sim.url)
    assert env["AUTOPACK_ANTHROPIC_BASE_URL"] == f"{sim.url}/anthropic"


def test_any_other_prefix_is_answered_by_the_protocol_its_path_speaks(
    sim: SimulatedProvider,
) -> None:
    body = {"model": "local-model", "messages": [{"role": "user", "content": BUILDER}]}
    request = urllib.request.Request(  # noqa: S310 - the local simulator
        f"{sim.url}/my-local-server/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer k-1"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        data = json.loads(response.read())
    assert data["object"] == "chat.completion" and data["model"] == "local-model"
    assert sim.requests()[-1]["provider"] == "openai"
