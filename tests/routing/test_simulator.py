"""The simulated provider over raw HTTP: wire formats, auth, content, faults, control API."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from routing.clients import call_model
from runs.edits import EditError, parse_edits
from runs.plans import parse_plan_bytes
from runs.workspace import (
    Commit,
    RunTree,
    workspace_apply,
    workspace_approve,
    workspace_commit,
    workspace_files,
    workspace_prepare,
    workspace_restore,
)
from tests.runs.test_devstack import Devstack, _free_port
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


# --- the simulated builder grows a real project (issue 13) ---------------------------------

PLAN = Path(__file__).resolve().parents[2] / "examples" / "plan.yaml"
PROVIDER_CYCLE = [
    ("openai", "gpt-4o", False),
    ("anthropic", "claude-sonnet-4-5", True),
    ("google_gemini", "gemini-2.5-flash", False),
    ("glm", "glm-4.6", True),
]


def plan_phases() -> list[tuple[int, str, str]]:
    """(position, name, category) of the example plan's phases, in run order."""
    plan = yaml.safe_load(PLAN.read_text())
    phases = [p for tier in plan["tiers"] for p in tier["phases"]]
    return [(i, p["name"], p["category"]) for i, p in enumerate(phases, start=1)]


def builder_prompt(
    position: int,
    name: str,
    *,
    files: list[str],
    attempt: int = 1,
    refused: str = "",
    feedback: tuple[str, ...] = (),
    category: str = "core_backend",
) -> str:
    """A builder prompt laid out as the engine writes it (the issue 13 contract)."""
    lines = [
        "Autopack-Role: builder",
        f"Attempt: {attempt}",
        "Run: Team invitations feature",
        "Tier 1: Foundations",
        f"Phase {position}: {name}",
        f"Category: {category}  Complexity: medium",
        "",
        "Description:",
        f"Build {name}.",
        "",
        "Acceptance criteria:",
        "- It works",
        "",
        "Repository files:",
        *([f"- {path}" for path in files] or ["- (none yet)"]),
        "",
        "File contents:",
    ]
    for path in files[:2]:
        lines += [f"----- {path}", "(content)", f"----- end {path}"]
    if feedback:
        lines += ["", "The auditor asked for a revision. Address these issues:"]
        lines += [f"- [major] {title}: it matters" for title in feedback]
    if refused:
        lines += ["", "Your previous attempt was refused:"]
        lines += [f"| {line}" for line in refused.splitlines()]
    return "\n".join(lines)


@pytest.fixture
def tree(settings: Any, tmp_path: Path) -> RunTree:
    settings.AUTOPACK_WORKSPACE_ROOT = tmp_path / "workspaces"
    settings.AUTOPACK_MAX_EDIT_BYTES = 1_000_000
    settings.AUTOPACK_MAX_EDIT_FILES = 200
    return workspace_prepare(run_id=1, workspace="team-invitations")


def build(sim: SimulatedProvider, prompt: str, n: int = 0) -> str:
    """The builder's reply through a real SDK (a different provider per call)."""
    provider, model, stream = PROVIDER_CYCLE[n % len(PROVIDER_CYCLE)]
    return call_model(
        provider=sim.provider_config(provider),
        model=model,
        system="You are the builder.",
        prompt=prompt,
        stream=stream,
        timeout=10,
    ).text


def pytest_in(tree: RunTree) -> subprocess.CompletedProcess[str]:
    """The plan's check, `python -m pytest -q`, run in the tree with a clean environment."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q"],
        cwd=tree.path,
        env={"PATH": os.environ["PATH"], "HOME": str(tree.path), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def attempt(tree: RunTree, reply: str, *, phase: str, number: int) -> Commit:
    """Apply the reply as the engine does: parse, apply all or nothing, commit."""
    workspace_restore(tree=tree)
    applied = workspace_apply(tree=tree, edits=parse_edits(reply))
    return workspace_commit(
        tree=tree, applied=applied, phase=phase, attempt=number, model="simulated"
    )


def files_of(tree: RunTree) -> list[str]:
    return list(workspace_files(tree=tree).paths)


def build_phases(sim: SimulatedProvider, tree: RunTree, upto: int) -> None:
    for position, name, category in plan_phases()[:upto]:
        prompt = builder_prompt(position, name, files=files_of(tree), category=category)
        commit = attempt(tree, build(sim, prompt, position), phase=name, number=1)
        workspace_approve(tree=tree, commit=commit.sha)


def test_the_example_plan_runs_pytest_as_its_check_and_leaves_room_for_the_fixing_retry() -> None:
    plan = parse_plan_bytes(PLAN.read_bytes(), filename=PLAN.name)
    assert plan.checks == ["python -m pytest -q"]
    # The simulated builder's faults hit first tries only: two attempts always suffice.
    assert plan.max_attempts >= 2


def test_the_example_plans_nine_phases_build_a_project_whose_tests_pass_after_each(
    sim: SimulatedProvider, tree: RunTree
) -> None:
    phases = plan_phases()
    assert len(phases) == 9
    for position, name, category in phases:
        prompt = builder_prompt(position, name, files=files_of(tree), category=category)
        reply = build(sim, prompt, position)
        commit = attempt(tree, reply, phase=name, number=1)
        stem = f"p{position:02d}_"
        assert any(p.startswith(f"app/{stem}") for p in commit.paths), commit.paths
        assert any(p.startswith(f"tests/test_{stem}") for p in commit.paths)
        assert "app/__init__.py" in commit.paths and commit.added > 0
        result = pytest_in(tree)
        assert result.returncode == 0, result.stdout + result.stderr
        # One test per phase plus the registry's: each phase's test really ran.
        assert f"{position + 1} passed" in result.stdout
        workspace_approve(tree=tree, commit=commit.sha)
    registry = (tree.path / "app" / "__init__.py").read_text()
    assert registry.count('"app.p0') == 9
    log = git_log(tree)
    assert len(log) == 10 and log[-1].endswith("Autopack workspace team-invitations")


def git_log(tree: RunTree, *args: str) -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(tree.path), "log", "--oneline", *args],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"], "HOME": str(tree.path), "GIT_CONFIG_GLOBAL": os.devnull},
    ).stdout
    return out.splitlines()


def test_a_search_miss_is_refused_with_the_exact_error_and_the_revise_applies(
    sim: SimulatedProvider, tree: RunTree
) -> None:
    build_phases(sim, tree, 1)
    sim.configure(edit_miss_rate=1.0)
    position, name, _category = plan_phases()[1]
    first = builder_prompt(position, name, files=files_of(tree))
    with pytest.raises(EditError) as refused:
        attempt(tree, build(sim, first), phase=name, number=1)
    message = str(refused.value)
    assert "the search text was not found in app/__init__.py" in message
    assert "spaces and tabs were ignored" in message
    assert sim.requests()[-1]["edit_fault"] == "edit_miss"
    # Nothing was applied: the tree is still the savepoint.
    assert not (tree.path / "app" / f"p{position:02d}_signed_invitation_tokens.py").exists()
    revise = builder_prompt(position, name, files=files_of(tree), attempt=2, refused=message)
    attempt(tree, build(sim, revise, 1), phase=name, number=2)
    assert sim.requests()[-1]["edit_fault"] is None
    assert pytest_in(tree).returncode == 0


def test_a_search_miss_before_the_registry_exists_names_the_missing_file(
    sim: SimulatedProvider, tree: RunTree
) -> None:
    sim.configure(edit_miss_rate=1.0)
    with pytest.raises(EditError, match=r"app/__init__.py does not exist \(SEARCH edits"):
        attempt(
            tree, build(sim, builder_prompt(1, "Model", files=files_of(tree))), phase="M", number=1
        )


def test_a_malformed_block_is_refused_and_the_revise_is_well_formed(
    sim: SimulatedProvider, tree: RunTree
) -> None:
    sim.configure(edit_malformed_rate=1.0)
    prompt = builder_prompt(1, "Invitation model", files=files_of(tree))
    with pytest.raises(EditError) as refused:
        parse_edits(build(sim, prompt))
    assert "(WRITE app/p01_invitation_model.py, line" in str(refused.value)
    assert "'>>>>>>> REPLACE', which closes SEARCH blocks" in str(refused.value)
    revise = builder_prompt(
        1, "Invitation model", files=files_of(tree), attempt=2, refused=str(refused.value)
    )
    attempt(tree, build(sim, revise), phase="Invitation model", number=2)
    assert pytest_in(tree).returncode == 0


def test_a_change_that_fails_the_checks_is_fixed_on_the_revise(
    sim: SimulatedProvider, tree: RunTree
) -> None:
    build_phases(sim, tree, 2)
    sim.configure(check_fail_rate=1.0)
    position, name, _category = plan_phases()[2]
    first = builder_prompt(position, name, files=files_of(tree))
    attempt(tree, build(sim, first), phase=name, number=1)
    failed = pytest_in(tree)
    assert failed.returncode == 1
    assert "1 failed" in failed.stdout and "AssertionError" in failed.stdout
    assert sim.requests()[-1]["edit_fault"] == "check_fail"
    # The revise starts from the savepoint again and carries the check's output.
    revise = builder_prompt(
        position, name, files=files_of(tree), attempt=2, refused=failed.stdout[-2000:]
    )
    commit = attempt(tree, build(sim, revise), phase=name, number=2)
    fixed = pytest_in(tree)
    assert fixed.returncode == 0, fixed.stdout
    # The revise also adds an edge-case test.
    assert f"{position + 2} passed" in fixed.stdout
    assert "handles_the_edge_cases" in commit.diff


def test_faults_hit_only_first_tries_so_every_revise_is_clean(
    sim: SimulatedProvider, tree: RunTree
) -> None:
    sim.configure(check_fail_rate=1.0)
    files = files_of(tree)
    for prompt in (
        builder_prompt(1, "Model", files=files, attempt=2),
        builder_prompt(1, "Model", files=files, refused="block 1: unterminated"),
        builder_prompt(1, "Model", files=files, attempt=2, feedback=("Missing test",)),
    ):
        build(sim, prompt)
        assert sim.requests()[-1]["edit_fault"] is None
    build(sim, builder_prompt(1, "Model", files=files))
    assert sim.requests()[-1]["edit_fault"] == "check_fail"


def test_the_auditor_feedback_is_acknowledged_in_the_revise(sim: SimulatedProvider) -> None:
    prompt = builder_prompt(1, "Model", files=[], attempt=2, feedback=("Unvalidated input",))
    text = build(sim, prompt)
    assert "Auditor feedback addressed:\n- Unvalidated input: fixed" in text
    assert len(parse_edits(text)) == 5


def test_fault_shares_follow_the_rates(sim: SimulatedProvider) -> None:
    sim.configure(edit_miss_rate=0.2, edit_malformed_rate=0.2, check_fail_rate=0.2)
    for n in range(60):
        raw_call(sim, "openai", builder_prompt(n + 1, f"Phase number {n}", files=[]))
    faults = [r["edit_fault"] for r in sim.requests()]
    for kind in ("edit_miss", "edit_malformed", "check_fail"):
        assert 3 <= faults.count(kind) <= 24, faults
    assert 10 <= faults.count(None) <= 40


def test_the_same_builder_request_and_seed_give_the_same_edits(sim: SimulatedProvider) -> None:
    sim.configure(edit_miss_rate=0.3, edit_malformed_rate=0.3, check_fail_rate=0.3)
    prompts = [builder_prompt(n, f"Phase {n} work", files=[]) for n in range(1, 10)]
    first = [build(sim, p, n) for n, p in enumerate(prompts)]
    # Another provider, the same request: the same change.
    again = [build(sim, p, n + 1) for n, p in enumerate(prompts)]
    assert first == again
    sim.configure(seed=7)
    assert [build(sim, p, n) for n, p in enumerate(prompts)] != first


@pytest.mark.parametrize(
    "config",
    [
        {"edit_miss_rate": 1.5},
        {"check_fail_rate": -0.1},
        {"edit_miss_rate": 0.6, "edit_malformed_rate": 0.3, "check_fail_rate": 0.2},
        {"edit_miss_rate": "often"},
    ],
)
def test_the_control_api_refuses_fault_rates_that_are_not_shares(
    sim: SimulatedProvider, config: dict[str, Any]
) -> None:
    with pytest.raises(SimulatorError, match="400"):
        sim.configure(**config)


def test_the_server_refuses_fault_rate_flags_adding_up_to_more_than_1() -> None:
    flags = ["--port", "0", "--edit-miss-rate", "0.7", "--check-fail-rate", "0.7"]
    result = subprocess.run(
        [sys.executable, "-m", "routing.simulator", *flags],
        cwd=PLAN.parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "must add up to at most 1" in result.stderr


def test_the_auditor_approves_a_reviewed_diff_with_passing_checks(
    sim: SimulatedProvider,
) -> None:
    diff = build(sim, builder_prompt(1, "Model", files=[]))
    prompt = "\n".join(
        [
            "Autopack-Role: auditor",
            "Attempt: {attempt}",
            "Phase 1: Model",
            "Category: core_backend  Complexity: medium",
            "",
            "Acceptance criteria:",
            "- It works",
            "",
            "Diff:",
            *[f"+{line}" for line in diff.splitlines()],
            "",
            "Checks:",
            "- python -m pytest -q: passed (exit 0)",
            "  2 passed in 0.01s",
            "",
            "Builder's change:",
            "Implemented phase 1.",
        ]
    )
    sim.configure(revise_rate=0)
    first = json.loads(reply_text("openai", raw_call(sim, "openai", prompt.format(attempt=1))[2]))
    assert first["verdict"] == "approve"
    sim.configure(revise_rate=1)
    second = json.loads(reply_text("glm", raw_call(sim, "glm", prompt.format(attempt=2))[2]))
    assert second["verdict"] == "approve"
    assert [r["role"] for r in sim.requests()[-2:]] == ["auditor", "auditor"]


@pytest.mark.slow
def test_make_run_starts_the_simulator_with_the_demo_fault_rates_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOPACK_SIM_EDIT_MISS_RATE", "0.25")
    monkeypatch.delenv("AUTOPACK_SIM_EDIT_MALFORMED_RATE", raising=False)
    monkeypatch.delenv("AUTOPACK_SIM_CHECK_FAIL_RATE", raising=False)
    stack = Devstack(tmp_path, _free_port())
    try:
        stack.wait_up()
        url = re.search(r"simulated provider: (http://\S+)", stack.output)
        assert url, stack.output[-3000:]
        with urllib.request.urlopen(f"{url.group(1)}/_sim/config", timeout=10) as response:  # noqa: S310
            config = json.loads(response.read())
        assert config["edit_miss_rate"] == 0.25
        assert config["edit_malformed_rate"] == config["check_fail_rate"] == 0.1
    finally:
        stack.clean_up()
