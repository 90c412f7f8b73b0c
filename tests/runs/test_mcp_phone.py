"""Issue 15's "Done when" for MCP: the three sentences a person says to an assistant on a
phone, done through the MCP tools and checked by what they did.

- "What is the status of the current run?"
- "For this run, downgrade low-complexity UI phases to Haiku."
- "Stop the run if Anthropic exceeds 80% of its weekly cap."

Everything is real: the MCP server is `manage.py mcp_server --user admin` started as the README
says, with only the environment the README tells a person to set (database, broker, secret key,
state folder: no provider key, as an MCP server started by hand has none); a Celery worker
process with the keys runs the run against the simulated provider over HTTP. The run is held
on its first builder call (the simulator answers it only when released), so both changes land
before the phase they concern is claimed, whatever the machine's speed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import Sum
from mcp import StdioServerParameters
from mcp.client.stdio import stdio_client

from routing.models import ModelChange, WorkerProviderReport
from routing.types import DecisionScope
from runs import services
from runs.models import BudgetGuard, GuardFiring, Phase, PhaseRoutingDecision, Run
from runs.plans import validate_plan
from runs.states import PhaseState, RunState
from tests.conftest import ROOT, WorkerProcess, wait_for
from tests.factories import legacy_caps_only
from tests.runs.test_mcp import SyncClient, connected
from usage.models import UsageEvent
from usage.services import provider_quota_upsert

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.needs_broker]

HAIKU = "claude-haiku-5-5"
# Tier 1's phase is built and audited on other providers than Anthropic (builder tests:low →
# gpt-6-luna, auditor low → gemini-3.8-flash), so Anthropic's week is untouched until the UI
# phase, which the baseline gives to gpt-6-luna too, until the run's own change says Haiku.
PLAN = {
    "name": "Phone check",
    "max_attempts": 2,
    "tiers": [
        {
            "name": "Foundations",
            "phases": [
                {"name": "Invitation service tests", "category": "tests", "complexity": "low"}
            ],
        },
        {
            "name": "Product surface",
            "phases": [
                {"name": "Accept-invitation page", "category": "ui", "complexity": "low"},
                {"name": "Admin guide for invitations", "category": "docs", "complexity": "low"},
            ],
        },
    ],
}
# A week's cap that the UI phase's first Haiku call alone passes 80% of.
ANTHROPIC_WEEKLY_CAP = 100


def readme_env(worker_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """What the README ("Settings", "Production") tells a person to set for a process of
    theirs: the database, the broker, the secret key and the state folder. No provider key or
    base URL; the SDK's stdio client adds only PATH, HOME and such (get_default_environment)."""
    return {
        "DATABASE_URL": worker_env["DATABASE_URL"],
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "DJANGO_SECRET_KEY": "phone-test-secret-key-0123456789-0123456789-0123456789",
        "AUTOPACK_STATE_DIR": str(tmp_path / "mcp-state"),
    }


@pytest.fixture
def phone(
    worker_env: dict[str, str], tmp_path: Path, transactional_db: None
) -> Iterator[SyncClient]:
    User.objects.create_superuser("admin", "admin@example.com", "pw")
    env = readme_env(worker_env, tmp_path)
    assert not any(name.endswith("_API_KEY") for name in env)
    assert not any(name.startswith("AUTOPACK_") and name.endswith("_BASE_URL") for name in env)
    params = StdioServerParameters(
        command=sys.executable,
        args=["manage.py", "mcp_server", "--user", "admin"],
        env=env,
        cwd=ROOT,
    )
    with (
        (tmp_path / "mcp-server.log").open("w+") as log,
        connected(stdio_client(params, errlog=log)) as client,
    ):
        yield client


@pytest.fixture
def worker(
    worker_env: dict[str, str], start_worker: Callable[..., WorkerProcess], sim: Any
) -> WorkerProcess:
    # The worker sees the cap and the run's change within a fraction of a second; the held
    # builder call below must outlast the slowest machine, so its timeout is long.
    worker_env["AUTOPACK_QUOTA_REFRESH_SECONDS"] = "0.2"
    worker_env["AUTOPACK_ROUTER_REFRESH_SECONDS"] = "0.2"
    worker_env["AUTOPACK_PROVIDER_TIMEOUT_SECONDS"] = "300"
    return start_worker("phone", beat=False)


def builder_calls(sim: Any) -> list[dict[str, Any]]:
    return [r for r in sim.requests() if r.get("role") == "builder"]


def refreshed(run: Run) -> Run:
    run.refresh_from_db()
    return run


def test_the_three_phone_sentences_through_mcp_on_a_real_run(
    phone: SyncClient, worker: WorkerProcess, sim: Any
) -> None:
    legacy_caps_only("anthropic")  # its week: the legacy weekly cap below, in UTC
    provider_quota_upsert(
        provider="anthropic",
        daily_cap_tokens=None,
        weekly_cap_tokens=ANTHROPIC_WEEKLY_CAP,
        monthly_cap_tokens=None,
        autopack_share="1",
        # The router stays on Anthropic up to the cap itself: the guard, not a fallback, acts.
        soft_limit="1",
    )
    # Every call waits until released: the run's first builder call is held open.
    sim.configure(delay=240.0, revise_rate=0)
    run = services.run_create(plan=validate_plan(PLAN))
    other = services.run_create(plan=validate_plan({**PLAN, "name": "Another run"}))
    services.run_start(run_id=run.pk)
    wait_for(lambda: builder_calls(sim), timeout=60, what="phase 1's builder call")
    first, ui, docs = run.phases.order_by("position")
    assert refreshed(run).state == RunState.RUNNING
    assert Phase.objects.get(pk=ui.pk).state == PhaseState.PENDING
    # The MCP server holds no key: a provider is usable because the worker says it can call it.
    assert "anthropic" in WorkerProviderReport.objects.get().providers

    # a. "What is the status of the current run?"
    listed = phone.text("list_runs", active_only=True)
    status = phone.text("run_status", run_id=run.pk).splitlines()
    assert listed == (
        f"#{run.pk} Phone check · Running · "
        "Working on phase 1 of 3 · tier 1 of 2 · 0 of 3 phases done"
    )
    assert status[:2] == [
        f"#{run.pk} Phone check · Running",
        'Working on phase 1 of 3 ("Invitation service tests") · tier 1 of 2 ("Foundations") · '
        "0 of 3 phases done (0%)",
    ]
    assert "Change: " in status[-1]

    # b. "For this run, downgrade low-complexity UI phases to Haiku."
    changed = phone.text(
        "override_model_for_run",
        run_id=run.pk,
        role="builder",
        category="ui",
        complexity="low",
        model=HAIKU,
    )
    assert changed == f"run {run.pk}: builder ui:low → {HAIKU} (run override)"
    mapping = phone.text("current_mapping", run_id=run.pk).splitlines()
    assert f"builder ui:low → {HAIKU} (run)" in mapping

    # c. "Stop the run if Anthropic exceeds 80% of its weekly cap."
    added = phone.text(
        "add_budget_guard",
        run_id=run.pk,
        provider="anthropic",
        period="week",
        threshold_percent=80,
        action="stop",
    )
    guard = BudgetGuard.objects.get()
    assert added == f"guard {guard.pk} added for run {run.pk}: anthropic > 80% week → stop"
    assert (guard.run_id, guard.provider, guard.period, guard.action) == (
        run.pk,
        "anthropic",
        "week",
        "stop",
    )

    # Let the run go: phase 1 ends, the UI phase is claimed with the run's change in force.
    sim.configure(delay=0)
    sim.release()
    wait_for(
        lambda: refreshed(run).state in (RunState.STOPPED, RunState.COMPLETED, RunState.FAILED),
        timeout=120,
        what=f"run {run.pk} to end",
    )

    # b's effect: the UI phase was routed to Haiku by the run's own change, and called it.
    assert Phase.objects.get(pk=first.pk).state == PhaseState.COMPLETE
    decision = PhaseRoutingDecision.objects.filter(phase=ui, role="builder").first()
    assert decision is not None
    assert (decision.model, decision.provider, decision.scope) == (
        HAIKU,
        "anthropic",
        DecisionScope.RUN_OVERRIDE,
    )
    assert UsageEvent.objects.filter(phase_id=ui.pk, role="builder", model=HAIKU).exists()
    assert not PhaseRoutingDecision.objects.filter(phase=first, model=HAIKU).exists()
    # Other runs and the global mapping are untouched.
    assert ModelChange.objects.get().run_id == run.pk
    assert not refreshed(other).run_context.get("model_overrides")
    assert "builder *:low → gpt-6-luna (baseline)" in phone.text("current_mapping").splitlines()

    # c's effect: past 80% of the week's cap the run stopped, with the guard's reason.
    firing = GuardFiring.objects.get(guard=guard, run=run)
    assert run.state == RunState.STOPPED
    assert run.state_reason == firing.message
    assert firing.message.startswith(
        "budget guard 'anthropic > 80% week → stop' fired: anthropic is at "
    )
    assert firing.message.endswith("% of its week window")
    assert firing.percent_of_cap >= 80
    anthropic = UsageEvent.objects.filter(provider="anthropic").aggregate(
        t=Sum("prompt_tokens") + Sum("completion_tokens")
    )["t"]
    assert anthropic >= 0.8 * ANTHROPIC_WEEKLY_CAP
    # The docs phase was never begun, and the phone reads where the run stopped, and why.
    assert Phase.objects.get(pk=docs.pk).attempt_count == 0
    final = phone.text("run_status", run_id=run.pk).splitlines()
    assert final[0].startswith(f'#{run.pk} Phone check · Stopped · reason: "budget guard ')
    assert final[1].startswith(
        'Stopped during phase 2 of 3 ("Accept-invitation page") · tier 2 of 2 ("Product surface")'
    )
    assert "1 of 3 phases done" in final[1]
    assert phone.text("list_budget_guards", run_id=run.pk) == (
        f"guard {guard.pk}: anthropic > 80% week → stop (run {run.pk}) · fired"
    )
