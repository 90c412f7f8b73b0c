"""Test data for the surfaces of a run's change (issue 13): an attempt's change made with real
git through runs.workspace and recorded on the rows the way the executor records it, so the
progress page, admin, API and MCP can be tested apart from the engine. The end-to-end tests
run the real engine on a worker instead."""

from __future__ import annotations

import uuid
from typing import Any

from django.utils import timezone

from runs.edits import FileWrite
from runs.models import ChecksState, Phase, PhaseAttempt, Run
from runs.states import PhaseState
from runs.workspace import (
    workspace_apply,
    workspace_approve,
    workspace_commit,
    workspace_prepare,
    workspace_restore,
    workspace_savepoint,
)

PASSED_CHECK = {
    "command": "python -m pytest -q",
    "outcome": "passed",
    "exit_code": 0,
    "duration_s": 0.8,
    "output": "3 passed in 0.02s\n",
    "sandboxed": True,
    "reason": "",
}


def record_change(
    run: Run,
    phase: Phase,
    files: dict[str, str],
    *,
    number: int = 1,
    approve: bool = True,
    fail_phase: bool = False,
    checks: list[dict[str, Any]] | None = None,
    prompt: str = "Autopack-Role: builder\nAttempt: 1\n",
    reply: str = "",
    verdict: dict[str, Any] | None = None,
) -> PhaseAttempt:
    """Write `files` in the run's own git tree, commit them as one attempt of `phase` and record
    it on the attempt, phase and run rows; approved, the commit becomes the run's head. With
    fail_phase (and not approve) the phase fails with this attempt's change, as the engine
    records a phase out of attempts."""
    tree = workspace_prepare(run_id=run.pk, workspace=run.workspace, source=run.source)
    workspace_restore(tree=tree, to=workspace_savepoint(tree=tree))
    applied = workspace_apply(
        tree=tree, edits=[FileWrite(path=p, content=c) for p, c in files.items()]
    )
    commit = workspace_commit(
        tree=tree, applied=applied, phase=phase.name, attempt=number, model="sim-builder"
    )
    checks = [PASSED_CHECK] if checks is None else checks
    failed = any(c["outcome"] != "passed" for c in checks)
    checks_state = (
        ChecksState.NONE if not checks else ChecksState.FAILED if failed else ChecksState.PASSED
    )
    change = {
        "commit_sha": commit.sha,
        "files_changed": [f.path for f in commit.files],
        "lines_added": commit.added,
        "lines_removed": commit.removed,
        "checks_state": checks_state,
    }
    attempt = PhaseAttempt.objects.create(
        phase=phase,
        number=number,
        dispatch_token=uuid.uuid4().hex,
        outcome=PhaseAttempt.Outcome.APPROVED if approve else PhaseAttempt.Outcome.REVISE,
        builder_model="sim-builder",
        builder_output=reply,
        builder_prompt=prompt,
        auditor_model="sim-auditor",
        auditor_verdict=verdict
        or {"decision": "approve" if approve else "revise", "summary": "ok", "issues": []},
        diff=commit.diff,
        diff_truncated=commit.diff_shortened,
        checks=checks,
        finished_at=timezone.now(),
        **change,
    )
    Run.objects.filter(pk=run.pk).update(
        workspace_path=str(tree.path), branch=tree.branch, base_commit=tree.base
    )
    if approve:
        workspace_approve(tree=tree, commit=commit.sha)
        Phase.objects.filter(pk=phase.pk).update(
            state=PhaseState.COMPLETE, attempt_count=number, finished_at=timezone.now(), **change
        )
        Run.objects.filter(pk=run.pk).update(head_commit=commit.sha)
    elif fail_phase:
        Phase.objects.filter(pk=phase.pk).update(
            state=PhaseState.FAILED, attempt_count=number, finished_at=timezone.now(), **change
        )
    return attempt
