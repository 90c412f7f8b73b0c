"""Apply and commit a builder's 50-file change (issue 13), beside git doing the same directly."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from django.test import override_settings

from runs.edits import FileDelete, FileWrite, TextReplace, format_edits, parse_edits
from runs.workspace import (
    _ENV,
    Commit,
    RunTree,
    workspace_apply,
    workspace_approve,
    workspace_commit,
    workspace_prepare,
    workspace_restore,
)

from .core import Figure, Size, log, median

EDITED, CREATED, DELETED = 40, 8, 2  # 50 files
LINES = 200  # lines of each existing file


def _module(i: int) -> str:
    return "".join(f"def f{i}_{j}(x):\n    return x + {j}\n\n" for j in range(LINES // 3))


def _reply() -> str:
    """The builder's reply: a SEARCH/REPLACE in each of 40 modules, 8 new ones, 2 deleted."""
    edits: list[FileWrite | TextReplace | FileDelete] = [
        TextReplace(
            path=f"pkg/mod{i:02}.py",
            search=f"def f{i}_10(x):\n    return x + 10\n",
            replace=f"def f{i}_10(x: int) -> int:\n    # changed\n    return x * 10\n",
        )
        for i in range(EDITED)
    ]
    edits += [FileWrite(path=f"pkg/new/n{i}.py", content=_module(100 + i)) for i in range(CREATED)]
    edits += [FileDelete(path=f"pkg/old{i}.py") for i in range(DELETED)]
    return format_edits(edits)


def _git(tree: Path, *args: str, stdin: bytes | None = None) -> None:
    subprocess.run(
        ["git", "-C", str(tree), *args], input=stdin, env=_ENV, check=True, capture_output=True
    )


def bench_apply_commit(size: Size) -> Figure:
    rounds = 30 if size.name == "full" else 3
    with (
        tempfile.TemporaryDirectory(prefix="autopack-bench-") as tmp,
        override_settings(AUTOPACK_WORKSPACE_ROOT=Path(tmp)),
    ):
        return _measure(rounds)


def _measure(rounds: int) -> Figure:
    tree = workspace_prepare(run_id=1, workspace="bench")
    seed = [FileWrite(path=f"pkg/mod{i:02}.py", content=_module(i)) for i in range(EDITED)]
    seed += [FileWrite(path=f"pkg/old{i}.py", content=_module(50 + i)) for i in range(DELETED)]
    seeded = workspace_commit(
        tree=tree,
        applied=workspace_apply(tree=tree, edits=seed),
        phase="seed",
        attempt=1,
        model="bench",
    )
    workspace_approve(tree=tree, commit=seeded.sha)
    reply = _reply()

    # The floor's patch is our own change's diff, so both sides make the same commit.
    first = _apply_commit(tree, reply, attempt=0)
    patch = _git_out(tree, "diff", "--binary", seeded.sha, first.sha)
    floor_tree = workspace_prepare(run_id=2, workspace="bench").path
    _git(floor_tree, "reset", "-q", "--hard", seeded.sha)

    ours: list[float] = []
    floor: list[float] = []
    stats = (first.added, first.removed, len(first.files))
    for attempt in range(1, rounds + 1):
        workspace_restore(tree=tree)
        t0 = time.perf_counter()
        commit = _apply_commit(tree, reply, attempt=attempt)
        ours.append(time.perf_counter() - t0)
        assert (commit.added, commit.removed, len(commit.files)) == stats

        _git(floor_tree, "reset", "-q", "--hard", seeded.sha)
        t0 = time.perf_counter()
        _git(floor_tree, "apply", "--index", "-", stdin=patch)
        _git(floor_tree, "commit", "-q", "--no-verify", "-m", f"floor {attempt}")
        floor.append(time.perf_counter() - t0)

    value, floor_ms = median(ours) * 1e3, median(floor) * 1e3
    log(f"apply+commit {value:.1f} ms (floor {floor_ms:.1f} ms)")
    return Figure(
        key="apply_commit",
        label="apply and commit a builder's 50-file change (parse, validate, write, commit)",
        value=value,
        unit="ms",
        floor=floor_ms,
        floor_label="git apply --index and git commit of the same patch",
        target="≤ 150 ms",
        met=value <= 150,
        notes=[
            f"median of {rounds} rounds, alternating with the floor; {EDITED} SEARCH/REPLACE "
            f"edits in {LINES}-line modules, {CREATED} new modules, {DELETED} deletions "
            f"(+{stats[0]} −{stats[1]} lines); p-max {max(ours) * 1e3:.1f} ms "
            f"(floor {max(floor) * 1e3:.1f} ms)",
            "ours also computes numstat and the bounded diff the phase keeps, and keeps the "
            "attempt under refs/autopack/: six git processes against the floor's two",
        ],
    )


def _apply_commit(tree: RunTree, reply: str, *, attempt: int) -> Commit:
    applied = workspace_apply(tree=tree, edits=parse_edits(reply))
    return workspace_commit(
        tree=tree, applied=applied, phase="bench", attempt=attempt, model="bench"
    )


def _git_out(tree: RunTree, *args: str) -> bytes:
    return subprocess.run(
        ["git", "-C", str(tree.path), *args], env=_ENV, check=True, capture_output=True
    ).stdout
