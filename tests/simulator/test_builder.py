"""The simulated builder grows a real project (issue 13), through the real SDKs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from routing.calls import call_model
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
from tests.sim_fixtures import SimulatedProvider, SimulatorError
from tests.simulator.test_wire import raw_call, reply_text

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
        endpoint=sim.provider_config(provider),
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
        [sys.executable, "-m", "simulator", *flags],
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
