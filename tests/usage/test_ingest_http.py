"""Issue 17's "done when" for recording from outside: a script outside the workers (its own
process, the HTTP API only) records an agent's usage, and the usage panel shows it as the
agents' usage. Against a live server over real HTTP: a 50 MB body, a wrong token, a replayed
batch and two deliveries of one batch at the same moment, each storing nothing or counting
each call once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.core.cache import cache
from django.db.models import Sum
from django.test import Client
from rest_framework.authtoken.models import Token

from tests.sim_fixtures import SimulatedProvider
from usage.models import UsageEvent, UsageRollup

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_throttles() -> Iterator[None]:
    cache.clear()
    yield


@pytest.fixture
def agent_token(transactional_db: None) -> str:
    user = User.objects.create_user("planner-agent")  # not staff: the permission alone
    user.user_permissions.add(Permission.objects.get(codename="record_usage"))
    return Token.objects.create(user=user).key


def send(url: str, body: bytes, token: str) -> tuple[int, Any]:
    request = urllib.request.Request(  # noqa: S310 - the local live server
        f"{url}/usage/events",
        data=body,
        method="POST",
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def event(call_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "provider": "openai",
        "model": "gpt-5-mini",
        "role": "agent:reviewer",
        "call_id": call_id,
        "prompt_tokens": 100,
        "completion_tokens": 10,
        **fields,
    }


# The agent: its own process, its own SDK call to the (simulated) provider, and the HTTP API.
# It imports runs.metering without Django's settings, as a script outside Autopack would.
AGENT_SCRIPT = textwrap.dedent(
    """
    import json, sys, urllib.request

    import anthropic

    from runs.metering import event_from_response

    autopack, token, provider_url = sys.argv[1:4]
    client = anthropic.Anthropic(api_key="sim-key-1", base_url=provider_url, max_retries=0)
    reply = client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=200,
        messages=[{"role": "user", "content": "Plan the next tier of the run."}],
    )
    event = event_from_response(reply, role="agent:planner")
    request = urllib.request.Request(
        autopack + "/usage/events",
        data=json.dumps({"events": [event]}).encode(),
        method="POST",
        headers={"Authorization": "Token " + token, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        print(json.dumps({"status": response.status, "answer": json.loads(response.read()),
                          "event": event}))
    """
)


def test_a_script_outside_the_workers_records_an_agents_usage_and_the_panel_shows_it_as_agents(
    live_server: Any, agent_token: str, sim: SimulatedProvider, tmp_path: Path
) -> None:
    script = tmp_path / "agent.py"
    script.write_text(AGENT_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), live_server.url, agent_token, sim.base_url("anthropic")],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},  # no DJANGO_SETTINGS_MODULE
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    event = out["event"]
    assert out["status"] == 201
    assert out["answer"] == {"new": [event["call_id"]], "already_recorded": []}
    assert event["call_id"].startswith("anthropic:msg_")
    stored = UsageEvent.objects.get(call_id=event["call_id"])
    assert (stored.role, stored.provider, stored.prompt_tokens, stored.completion_tokens) == (
        "agent:planner",
        "anthropic",
        event["prompt_tokens"],
        event["completion_tokens"],
    )
    assert stored.reported_model == event["reported_model"] != ""

    staff = User.objects.create_user("operator", is_staff=True)
    page = Client()
    page.force_login(staff)
    panel = page.get("/dashboard/usage/partial?period=day")
    assert panel.status_code == 200
    text = panel.content.decode()
    tokens_in, tokens_out = event["prompt_tokens"], event["completion_tokens"]
    assert f"core 0 in / 0 out · agents {tokens_in:,} in / {tokens_out:,} out" in text
    summary = page.get("/dashboard/usage?period=day").json()
    anthropic = next(p for p in summary["providers"] if p["provider"] == "anthropic")
    assert (anthropic["aux_tokens_in"], anthropic["aux_tokens_out"]) == (tokens_in, tokens_out)
    assert (anthropic["core_tokens_in"], anthropic["core_tokens_out"]) == (0, 0)


def test_a_50_mb_body_is_a_413_in_json_and_stores_nothing(
    live_server: Any, agent_token: str
) -> None:
    body = json.dumps({"events": [event("x" * 200)]}).encode()
    body = body[:-2] + b" " * (50 * 1024 * 1024) + body[-2:]
    code, answer = send(live_server.url, body, agent_token)
    assert code == 413
    assert "over the limit of 8,000,000 bytes" in answer["detail"]
    assert UsageEvent.objects.count() == 0


def test_a_wrong_token_is_a_401_and_stores_nothing(live_server: Any, agent_token: str) -> None:
    code, answer = send(live_server.url, json.dumps(event("w")).encode(), "f" * 40)
    assert code == 401
    assert answer == {"detail": "Invalid token."}
    assert UsageEvent.objects.count() == 0


def test_a_replayed_batch_is_answered_as_recorded_and_counted_once(
    live_server: Any, agent_token: str
) -> None:
    body = json.dumps({"events": [event(f"r{i}") for i in range(50)]}).encode()
    assert send(live_server.url, body, agent_token)[0] == 201
    code, answer = send(live_server.url, body, agent_token)
    assert code == 200
    assert answer == {"new": [], "already_recorded": [f"r{i}" for i in range(50)]}
    assert UsageEvent.objects.count() == 50
    assert UsageRollup.objects.aggregate(n=Sum("calls"))["n"] == 50


def test_two_deliveries_of_one_batch_at_once_count_each_call_once_and_say_which_was_new(
    live_server: Any, agent_token: str
) -> None:
    ids = [uuid.uuid4().hex for _ in range(500)]
    body = json.dumps({"events": [event(i) for i in ids]}).encode()
    answers: list[tuple[int, Any]] = []
    start = threading.Barrier(2)

    def deliver() -> None:
        start.wait()
        answers.append(send(live_server.url, body, agent_token))

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [code for code, _ in answers if code not in (200, 201)] == []
    new = [call_id for _, answer in answers for call_id in answer["new"]]
    assert sorted(new) == sorted(ids)  # each call new in exactly one answer
    for _code, answer in answers:
        assert sorted(answer["new"] + answer["already_recorded"]) == sorted(ids)
    assert UsageEvent.objects.count() == 500
    assert UsageRollup.objects.aggregate(n=Sum("calls"))["n"] == 500
