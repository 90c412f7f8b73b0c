"""Real builds (issue 13): a phase's change is applied to the run's git tree and committed, the
plan's checks run in the sandbox, and a refused change or a failing check goes back to the
builder without an auditor call. Real worker processes, PostgreSQL, Redis, git and bubblewrap;
the builder's replies are scripted on the simulated provider where exact content matters."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runs import services
from runs.edits import FileDelete, TextReplace
from runs.models import ChecksState, Phase, PhaseAttempt, Run
from runs.plans import parse_plan_bytes
from runs.sandbox import sandbox_status
from runs.states import PhaseState, RunState
from tests.conftest import WorkerProcess, wait_for
from tests.sim_fixtures import edit_reply, write_reply
from usage.models import UsageEvent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.needs_broker]

sandboxed = pytest.mark.skipif(
    not sandbox_status().available, reason="bubblewrap cannot make a sandbox here"
)

GREET = "def greet(name: str) -> str:\n    return f'Hello, {name}!'\n"
GREET_TEST = (
    "from app.greet import greet\n\n\ndef test_greet():\n    assert greet('Ada') == 'Hello, Ada!'\n"
)
WRONG_TEST = GREET_TEST.replace("Hello, Ada!", "Goodbye, Ada!")


APPROVE = {"verdict": "approve", "summary": "fine", "issues": []}


def start(raw: str, sim: Any, *, builder: str | None = None) -> Run:
    """Start the plan with the auditor approving every change it is shown (and the builder
    replying `builder` to every call, when given)."""
    sim.add_script(role="auditor", verdict=APPROVE, count=-1)
    if builder is not None:
        sim.add_script(role="builder", text=builder, count=-1)
    run = services.run_create(plan=parse_plan_bytes(raw.encode()))
    services.run_start(run_id=run.pk)
    return run


def finished(run: Run, timeout: float = 120) -> Run:
    def done() -> bool:
        run.refresh_from_db()
        return run.state in (RunState.COMPLETED, RunState.FAILED, RunState.STOPPED)

    wait_for(done, timeout=timeout, what=f"run {run.pk} to finish")
    return run


def git(tree: str, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", tree, *args], capture_output=True, text=True, check=True
    ).stdout


def auditor_calls(phase: Phase) -> int:
    return UsageEvent.objects.filter(phase_id=phase.pk, role="auditor").count()


def workspace_root(worker_env: dict[str, str]) -> Path:
    return Path(worker_env["AUTOPACK_STATE_DIR"]) / "workspaces"


@sandboxed
def test_a_phases_change_lands_as_a_commit_with_its_numbers_and_passing_checks(
    celery_worker: WorkerProcess, sim: Any
) -> None:
    sim.add_script(
        role="builder",
        match="Phase 1: Greeting",
        text=write_reply(
            {"app/__init__.py": "", "app/greet.py": GREET, "tests/test_greet.py": GREET_TEST}
        ),
        count=1,
    )
    run = start(
        "name: Build\nworkspace: hello\nchecks: ['python -m pytest -q']\ntiers:\n"
        "  - name: One\n    phases:\n"
        "      - {name: Greeting, category: core_backend, complexity: low,"
        " description: Write app/greet.py, checks: ['python -c \"import app.greet\"']}\n",
        sim,
    )
    finished(run)
    assert run.state == RunState.COMPLETED, run.state_reason
    phase = run.phases.get()
    attempt = phase.attempts.get()
    assert attempt.outcome == PhaseAttempt.Outcome.APPROVED
    # the run's own tree, branch and commits, as stored
    assert run.workspace_path.endswith(f"/.runs/run-{run.pk}") and Path(run.workspace_path).is_dir()
    assert run.branch == f"autopack/run-{run.pk}"
    assert run.head_commit == phase.commit_sha == attempt.commit_sha != run.base_commit
    log = git(run.workspace_path, "log", "--format=%H %s", f"{run.base_commit}..{run.branch}")
    assert log.splitlines() == [
        f"{attempt.commit_sha} Autopack run {run.pk}, phase Greeting: attempt 1 by "
        f"{attempt.builder_model}"
    ]
    numstat = git(run.workspace_path, "show", "--numstat", "--format=", attempt.commit_sha)
    assert sorted(numstat.split()) == sorted(
        ["0", "0", "app/__init__.py", "2", "0", "app/greet.py", "5", "0", "tests/test_greet.py"]
    )
    assert sorted(phase.files_changed) == ["app/__init__.py", "app/greet.py", "tests/test_greet.py"]
    assert (phase.lines_added, phase.lines_removed) == (7, 0)
    assert "+    return f'Hello, {name}!'" in attempt.diff and not attempt.diff_truncated
    # the plan's check, then the phase's, both passed in the sandbox
    assert phase.checks_state == attempt.checks_state == ChecksState.PASSED
    assert [(c["command"], c["outcome"], c["sandboxed"]) for c in attempt.checks] == [
        ("python -m pytest -q", "passed", True),
        ('python -c "import app.greet"', "passed", True),
    ]
    assert "1 passed" in attempt.checks[0]["output"]
    # the builder was shown the file list and the file the phase names (none yet here)
    assert "Repository files:" in attempt.builder_prompt
    auditor = [r for r in sim.requests() if r.get("role") == "auditor"]
    assert "Diff:" in auditor[-1]["prompt"] and "+def greet(name: str)" in auditor[-1]["prompt"]
    assert "`python -m pytest -q`: passed" in auditor[-1]["prompt"]


BAD_EDITS: list[tuple[str, Callable[[], str], str]] = [
    (
        "Search miss",
        lambda: edit_reply(TextReplace(path="README.md", search="no such line\n", replace="x\n")),
        "the search text was not found in README.md",
    ),
    (
        "Dot dot",
        lambda: "<<<<<<< WRITE ../escape.py\nx = 1\n>>>>>>> END\n",
        "the path contains '..'",
    ),
    (
        "Symlink out",
        lambda: write_reply({"out/evil.py": "x = 1\n"}),
        "out is a symlink that leads out of the workspace",
    ),
    (
        "Git dir",
        lambda: "<<<<<<< WRITE .git/config\n[core]\n>>>>>>> END\n",
        "the path is inside .git/",
    ),
    (
        "Protected",
        lambda: write_reply({"secrets/key.txt": "stolen\n"}),
        "secrets/key.txt is protected by the plan (protected_paths: 'secrets/**')",
    ),
    (
        "Binary",
        lambda: edit_reply(TextReplace(path="blob.bin", search="x\n", replace="y\n")),
        "blob.bin is not UTF-8 text",
    ),
    (
        "Oversized",
        lambda: write_reply({"big.txt": "x" * 99 + "\n"} | {"a.txt": "a\n"}),
        "the limit is 50 (AUTOPACK_MAX_EDIT_BYTES)",
    ),
    (
        # 10,000 files do not fit in a reply of the 2,048 tokens a call asks for (routing's
        # default); the same refusal at a limit a reply can pass (test_workspace has 10,000).
        "Too many files",
        lambda: edit_reply(*(FileDelete(path=f"f/{i}.py") for i in range(30))),
        "the change touches 30 files; the limit is 5",
    ),
]


def test_every_refused_change_goes_back_as_a_revise_without_an_auditor_call_and_nothing_applied(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str], sim: Any, tmp_path: Path
) -> None:
    # The workspace exists before the run: Autopack makes it a repository with these files.
    ws = workspace_root(worker_env) / "hostile"
    ws.mkdir(parents=True)
    (ws / "README.md").write_text("# Hostile\n")
    (ws / "blob.bin").write_bytes(b"\x00\xff\xfe binary\n")
    (ws / "secrets").mkdir()
    (ws / "secrets" / "key.txt").write_text("keep\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, ws / "out")
    worker_env["AUTOPACK_MAX_EDIT_BYTES"] = "50"
    worker_env["AUTOPACK_MAX_EDIT_FILES"] = "5"
    start_worker("main")
    phases = []
    for position, (name, bad, _error) in enumerate(BAD_EDITS, start=1):
        sim.add_script(role="builder", match=f"Phase {position}: {name}", text=bad(), count=1)
        fixed_reply = write_reply({f"done/{position}.txt": f"{name}\n"})
        sim.add_script(role="builder", match=f"Phase {position}: {name}", text=fixed_reply, count=1)
        phases.append(f"      - {{name: {name}, category: core_backend, complexity: low}}")
    run = start(
        "name: Hostile edits\nworkspace: hostile\nmax_attempts: 2\n"
        "protected_paths: ['secrets/**']\ntiers:\n  - name: One\n    phases:\n"
        + "\n".join(phases)
        + "\n",
        sim,
    )
    finished(run, timeout=240)
    assert run.state == RunState.COMPLETED, run.state_reason
    for phase, (name, _bad, error) in zip(run.phases.order_by("position"), BAD_EDITS, strict=True):
        refused, fixed = phase.attempts.order_by("number")
        assert refused.outcome == PhaseAttempt.Outcome.REVISE, name
        assert error in refused.edit_error, (name, refused.edit_error)
        assert refused.commit_sha == "" and refused.checks == [], name
        assert auditor_calls(phase) == 1, name  # the fixed attempt's only
        assert "Your previous attempt was refused:" in fixed.builder_prompt, name
        assert error.split("(")[0].strip() in fixed.builder_prompt, name
        assert fixed.outcome == PhaseAttempt.Outcome.APPROVED, name
    tree = Path(run.workspace_path)
    assert sorted(p.name for p in (tree / "done").iterdir()) == [
        f"{i}.txt" for i in sorted(range(1, len(BAD_EDITS) + 1), key=str)
    ]
    assert list(outside.iterdir()) == []
    assert (tree / "secrets" / "key.txt").read_text() == "keep\n"
    assert not (tree / "big.txt").exists() and not (tree.parent / "escape.py").exists()
    assert (tree / "README.md").read_text() == "# Hostile\n"
    # one commit per applied attempt; refused ones made none
    commits = git(run.workspace_path, "rev-list", f"{run.base_commit}..{run.branch}").split()
    assert len(commits) == len(BAD_EDITS)


@sandboxed
def test_a_failing_check_sends_its_output_back_and_the_fixed_attempt_passes(
    celery_worker: WorkerProcess, sim: Any
) -> None:
    files = {"app/__init__.py": "", "app/greet.py": GREET}
    sim.add_script(
        role="builder", text=write_reply({**files, "tests/test_greet.py": WRONG_TEST}), count=1
    )
    sim.add_script(
        role="builder", text=write_reply({**files, "tests/test_greet.py": GREET_TEST}), count=1
    )
    run = start(
        "name: Checked\nchecks: ['python -m pytest -q']\ntiers:\n  - name: One\n    phases:\n"
        "      - {name: Greeting, category: core_backend, complexity: low}\n",
        sim,
    )
    finished(run)
    assert run.state == RunState.COMPLETED, run.state_reason
    phase = run.phases.get()
    failed, passed = phase.attempts.order_by("number")
    assert failed.outcome == PhaseAttempt.Outcome.REVISE
    assert failed.checks_state == ChecksState.FAILED and failed.commit_sha
    (check,) = failed.checks
    assert (check["outcome"], check["exit_code"]) == ("failed", 1)
    assert "Goodbye, Ada!" in check["output"]
    assert auditor_calls(phase) == 1
    # the builder saw the check's output, quoted, and the files it touched
    prompt = passed.builder_prompt
    assert "Your previous attempt was refused:" in prompt
    assert "| Check `python -m pytest -q` failed (exit 1)" in prompt
    assert "----- tests/test_greet.py" not in prompt  # restored: the file is gone again
    assert passed.checks_state == phase.checks_state == ChecksState.PASSED
    assert run.head_commit == passed.commit_sha
    # the branch keeps the approved commit; the failed one stays reachable as an attempt ref
    branch = git(run.workspace_path, "rev-list", f"{run.base_commit}..{run.branch}").split()
    assert branch == [passed.commit_sha]
    everything = git(run.workspace_path, "log", "--all", "--format=%H").split()
    assert failed.commit_sha in everything


@sandboxed
def test_a_check_that_never_ends_is_killed_at_the_timeout_and_fails_the_phase(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str], sim: Any
) -> None:
    worker_env["AUTOPACK_CHECK_TIMEOUT_SECONDS"] = "2"
    start_worker("main")
    run = start(
        "name: Endless\nmax_attempts: 1\ntiers:\n  - name: One\n    phases:\n"
        "      - {name: Forever, category: core_backend, complexity: low,"
        " checks: ['sleep 6003']}\n",
        sim,
        builder=write_reply({"x.txt": "x\n"}),
    )
    finished(run)
    assert run.state == RunState.FAILED
    phase = run.phases.get()
    (check,) = phase.attempts.get().checks
    assert check["outcome"] == "timed_out" and "timed out after 2 s" in check["reason"]
    assert check["duration_s"] < 30
    assert "its checks failed: sleep 6003 timed out" in phase.failure_reason
    assert auditor_calls(phase) == 0
    wait_for(lambda: not _processes_with("6003"), timeout=10, what="the check's processes gone")


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"sleep {marker}".encode() in cmdline.replace(b"\0", b" "):
            found.append(int(entry.name))
    return found


@sandboxed
def test_stop_during_a_check_ends_its_whole_process_tree(
    celery_worker: WorkerProcess, sim: Any
) -> None:
    # The check starts a child that starts another, then waits: a stop must end all of them.
    run = start(
        "name: Stopped check\ntiers:\n  - name: One\n    phases:\n"
        "      - {name: Slow, category: core_backend, complexity: low,"
        " checks: ['(sh -c \"sleep 6004\" &); touch started; sleep 6004']}\n",
        sim,
        builder=write_reply({"x.txt": "x\n"}),
    )

    def check_running() -> bool:
        run.refresh_from_db()
        return bool(run.workspace_path) and (Path(run.workspace_path) / "started").exists()

    wait_for(check_running, timeout=60, what="the check to start")
    assert len(_processes_with("6004")) >= 2
    services.run_stop(run_id=run.pk)
    finished(run, timeout=30)
    assert run.state == RunState.STOPPED
    wait_for(lambda: not _processes_with("6004"), timeout=10, what="the check's processes gone")
    phase = run.phases.get()
    assert phase.state == PhaseState.CANCELLED
    attempt = phase.attempts.get()
    assert attempt.outcome == PhaseAttempt.Outcome.CANCELLED
    assert [c["outcome"] for c in attempt.checks] == ["cancelled"]
    assert auditor_calls(phase) == 0


def test_checks_that_cannot_run_fail_the_phase_with_the_reason_and_no_revise(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str], sim: Any
) -> None:
    worker_env["AUTOPACK_CHECK_BWRAP"] = "/nonexistent/bwrap"
    worker_env["AUTOPACK_ALLOW_UNSANDBOXED_CHECKS"] = "false"
    worker = start_worker("main")
    run = start(
        "name: No sandbox\nchecks: ['true']\ntiers:\n  - name: One\n    phases:\n"
        "      - {name: Any, category: core_backend, complexity: low}\n",
        sim,
        builder=write_reply({"x.txt": "x\n"}),
    )
    finished(run)
    assert run.state == RunState.FAILED
    assert "its checks could not run: not run: bubblewrap is not installed" in run.state_reason
    phase = run.phases.get()
    attempt = phase.attempts.get()  # the builder was not asked again: it cannot fix this
    assert attempt.outcome == PhaseAttempt.Outcome.FAILED
    assert phase.checks_state == attempt.checks_state == ChecksState.NOT_RUN
    assert attempt.commit_sha and phase.commit_sha == attempt.commit_sha
    assert auditor_calls(phase) == 0
    assert "checks are not run: bubblewrap is not installed" in worker.log()
