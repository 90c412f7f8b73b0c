"""A run's git working tree (runs/workspace.py) with real git in temporary folders: every bad
edit of issue 13 is refused with its exact message and leaves the tree as it was; a good one
is committed with the right numbers; restore brings back the savepoint, also after a worker
was killed mid-apply."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runs.edits import EditError, FileDelete, FileWrite, TextReplace, parse_edits
from runs.workspace import (
    Commit,
    ProtectedPaths,
    RunTree,
    WorkspaceError,
    workspace_apply,
    workspace_approve,
    workspace_begin,
    workspace_commit,
    workspace_files,
    workspace_patch,
    workspace_patch_files,
    workspace_prepare,
    workspace_read,
    workspace_restore,
    workspace_savepoint,
)
from tests.conftest import ROOT, wait_for

SEED = {
    "app/greet.py": "def greet(name):\n    return 'hi ' + name\n\n\nVALUE = 1\n",
    "app/__init__.py": "",
    "docs/guide.md": "# Guide\n\none\ntwo\nthree\n",
    "migrations/0001_initial.py": "operations = []\n",
    "twice.txt": "same\nline\nsame\nline\n",
}


def git(path: Path, *args: str) -> str:
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "GIT_CONFIG_GLOBAL": os.devnull}
    return subprocess.run(
        ["git", "-C", str(path), *args], capture_output=True, text=True, check=True, env=env
    ).stdout


@pytest.fixture
def roots(settings, tmp_path: Path) -> Path:
    settings.AUTOPACK_WORKSPACE_ROOT = tmp_path / "workspaces"
    settings.AUTOPACK_SOURCE_ROOTS = f"{tmp_path / 'sources'},{tmp_path / 'more'}"
    settings.AUTOPACK_MAX_EDIT_BYTES = 1_000_000
    settings.AUTOPACK_MAX_EDIT_FILES = 200
    return tmp_path


def commit_edits(tree: RunTree, edits: list, *, attempt: int = 1) -> Commit:
    applied = workspace_apply(tree=tree, edits=edits)
    return workspace_commit(
        tree=tree, applied=applied, phase="Seed", attempt=attempt, model="sim-model"
    )


@pytest.fixture
def tree(roots: Path) -> RunTree:
    tree = workspace_prepare(run_id=7, workspace="proj")
    seed = commit_edits(tree, [FileWrite(path=p, content=c) for p, c in SEED.items()])
    workspace_approve(tree=tree, commit=seed.sha)
    return tree


def head(tree: RunTree) -> str:
    return git(tree.path, "rev-parse", "HEAD").strip()


def assert_untouched(tree: RunTree, before: str) -> None:
    assert head(tree) == before
    assert git(tree.path, "status", "--porcelain", "--ignored", "--untracked-files=all") == ""


def refused(tree: RunTree, reply: str, **kwargs) -> str:
    before = head(tree)
    with pytest.raises(EditError) as caught:
        workspace_apply(tree=tree, edits=parse_edits(reply), **kwargs)
    assert_untouched(tree, before)
    return str(caught.value)


# --- preparing ------------------------------------------------------------------------------


def test_a_new_workspace_is_initialised_and_the_run_gets_its_own_tree_and_branch(
    roots: Path,
) -> None:
    tree = workspace_prepare(run_id=3, workspace="team-invitations")
    assert tree.path == (roots / "workspaces" / ".runs" / "run-3").resolve()
    assert tree.repository == (roots / "workspaces" / "team-invitations").resolve()
    assert tree.branch == "autopack/run-3"
    assert git(tree.path, "branch", "--show-current").strip() == "autopack/run-3"
    assert head(tree) == tree.base == workspace_savepoint(tree=tree)
    assert git(tree.repository, "log", "--format=%an <%ae> %s").strip() == (
        "Autopack <autopack@localhost> Autopack workspace team-invitations"
    )
    # The git directory is outside the tree: the checks, which may write the tree, cannot
    # reach the config or the index.
    assert tree.path not in tree.git_dir.parents


def test_preparing_again_returns_the_same_tree_with_its_work(tree: RunTree) -> None:
    again = workspace_prepare(run_id=7, workspace="proj")
    assert again == tree
    assert (again.path / "app" / "greet.py").read_text() == SEED["app/greet.py"]


def test_two_runs_of_one_workspace_get_separate_trees_and_branches(tree: RunTree) -> None:
    other = workspace_prepare(run_id=8, workspace="proj")
    assert other.path != tree.path and other.branch == "autopack/run-8"
    assert other.repository == tree.repository
    # Run 8 starts from the workspace's history, not from run 7's unmerged work.
    assert not (other.path / "app").exists()
    commit_edits(other, [FileWrite(path="eight.txt", content="8\n")])
    assert not (tree.path / "eight.txt").exists()
    assert git(tree.path, "branch", "--show-current").strip() == "autopack/run-7"
    assert git(other.path, "branch", "--show-current").strip() == "autopack/run-8"


def test_a_folder_that_is_not_a_repository_yet_becomes_one_with_its_files(roots: Path) -> None:
    folder = roots / "workspaces" / "existing"
    (folder / ".autopack").mkdir(parents=True)
    (folder / "notes.md").write_text("kept\n")
    (folder / ".autopack" / "human_notes.md").write_text("Autopack's, not the project's\n")
    tree = workspace_prepare(run_id=4, workspace="existing")
    assert (tree.path / "notes.md").read_text() == "kept\n"
    assert not (tree.path / ".autopack").exists()


def test_a_source_repository_under_an_allowed_root_gets_a_run_tree_and_stays_untouched(
    roots: Path,
) -> None:
    source = roots / "more" / "project"
    source.mkdir(parents=True)
    git(source, "init", "-q", "-b", "trunk")
    (source / "main.py").write_text("print('hi')\n")
    git(source, "add", "main.py")
    git(source, "-c", "user.name=P", "-c", "user.email=p@x", "commit", "-q", "-m", "first")
    (source / "wip.py").write_text("uncommitted\n")
    tree = workspace_prepare(run_id=5, source=str(source))
    assert tree.repository == source.resolve()
    assert (tree.path / "main.py").read_text() == "print('hi')\n"
    assert not (tree.path / "wip.py").exists()
    commit_edits(tree, [FileWrite(path="main.py", content="print('hello')\n")])
    assert git(source, "branch", "--show-current").strip() == "trunk"
    assert git(source, "status", "--porcelain") == "?? wip.py\n"
    assert (source / "main.py").read_text() == "print('hi')\n"
    assert "autopack/run-5" in git(source, "branch", "--list", "autopack/*")


def test_a_source_outside_the_allowed_roots_is_refused(roots: Path) -> None:
    elsewhere = roots / "elsewhere"
    elsewhere.mkdir()
    git(elsewhere, "init", "-q")
    with pytest.raises(WorkspaceError) as caught:
        workspace_prepare(run_id=6, source=str(elsewhere))
    assert str(caught.value) == (
        f"source {str(elsewhere)!r} is not under an allowed root (AUTOPACK_SOURCE_ROOTS: "
        f"{roots / 'sources'}, {roots / 'more'})"
    )
    # Nor through a symlink placed under an allowed root.
    (roots / "sources").mkdir()
    (roots / "sources" / "link").symlink_to(elsewhere)
    with pytest.raises(WorkspaceError, match="is not under an allowed root"):
        workspace_prepare(run_id=6, source=str(roots / "sources" / "link"))
    assert not (roots / "workspaces" / ".runs" / "run-6").exists()


def test_no_source_is_allowed_until_source_roots_are_configured(roots: Path, settings) -> None:
    settings.AUTOPACK_SOURCE_ROOTS = ""
    with pytest.raises(WorkspaceError) as caught:
        workspace_prepare(run_id=6, source=str(roots))
    assert str(caught.value) == (
        f"source {str(roots)!r}: no local repositories are allowed; set AUTOPACK_SOURCE_ROOTS "
        "to the folders that may hold them"
    )


# --- bad edits: refused with the exact message, nothing applied -----------------------------


def test_a_symlink_that_leads_out_of_the_workspace_is_refused(tree: RunTree, roots: Path) -> None:
    outside = roots / "outside"
    outside.mkdir()
    (tree.path / "out").symlink_to(outside)
    git(tree.path, "add", "out")
    git(tree.path, "-c", "user.name=P", "-c", "user.email=p@x", "commit", "-q", "-m", "link")
    assert refused(tree, "<<<<<<< WRITE out/evil.py\nx\n>>>>>>> END\n") == (
        "block 1 (WRITE out/evil.py, line 1): out is a symlink that leads out of the workspace"
    )
    assert list(outside.iterdir()) == []


def test_a_symlink_inside_the_workspace_is_not_followed_either(tree: RunTree) -> None:
    (tree.path / "alias.py").symlink_to("app/greet.py")
    git(tree.path, "add", "alias.py")
    git(tree.path, "-c", "user.name=P", "-c", "user.email=p@x", "commit", "-q", "-m", "link")
    assert refused(tree, "<<<<<<< WRITE alias.py\nx\n>>>>>>> END\n") == (
        "block 1 (WRITE alias.py, line 1): alias.py is a symlink (to app/greet.py); edits do "
        "not follow symlinks, name the real path"
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            FileWrite(path="/etc/cron.d/x", content="x\n"),
            "WRITE /etc/cron.d/x: the path is absolute; paths are relative to the workspace root",
        ),
        (
            FileDelete(path="../proj/README"),
            "DELETE ../proj/README: the path contains '..'; it must stay inside the workspace",
        ),
        (
            FileWrite(path=".git/hooks/pre-commit", content="#!/bin/sh\n"),
            "WRITE .git/hooks/pre-commit: the path is inside .git/; git's own files cannot be "
            "edited",
        ),
    ],
)
def test_edits_built_in_code_are_checked_again_when_applied(
    tree: RunTree, edit: FileWrite | FileDelete, message: str
) -> None:
    before = head(tree)
    with pytest.raises(EditError) as caught:
        workspace_apply(tree=tree, edits=[edit])
    assert str(caught.value) == message
    assert_untouched(tree, before)


def test_the_plans_protected_paths_are_refused(tree: RunTree) -> None:
    protected = ProtectedPaths.compile(["migrations/**", "*.lock", "/docs/"])
    assert refused(tree, "<<<<<<< DELETE migrations/0001_initial.py\n", protected=protected) == (
        "block 1 (DELETE migrations/0001_initial.py, line 1): migrations/0001_initial.py is "
        "protected by the plan (protected_paths: 'migrations/**')"
    )
    assert refused(
        tree, "<<<<<<< WRITE app/deps/poetry.lock\nx\n>>>>>>> END\n", protected=protected
    ) == (
        "block 1 (WRITE app/deps/poetry.lock, line 1): app/deps/poetry.lock is protected by "
        "the plan (protected_paths: '*.lock')"
    )
    assert "(protected_paths: '/docs/')" in refused(
        tree,
        "<<<<<<< SEARCH docs/guide.md\none\n=======\n1\n>>>>>>> REPLACE\n",
        protected=protected,
    )
    # Not protected: app/migrations (the pattern is anchored), nor lockfile.txt.
    workspace_apply(
        tree=tree,
        edits=[
            FileWrite(path="app/migrations/x.py", content=""),
            FileWrite(path="lockfile.txt", content=""),
        ],
        protected=protected,
    )


def test_a_50_mb_file_is_refused(tree: RunTree) -> None:
    line = "a" * 99 + "\n"
    reply = "<<<<<<< WRITE big.txt\n" + line * 524_288 + ">>>>>>> END\n"
    assert refused(tree, reply) == (
        "block 1 (WRITE big.txt, line 1): the new content of big.txt is 52,428,800 bytes; the "
        "limit is 1,000,000 (AUTOPACK_MAX_EDIT_BYTES)"
    )


def test_10000_files_in_one_reply_are_refused(tree: RunTree) -> None:
    reply = "".join(f"<<<<<<< WRITE many/f{i}.txt\n{i}\n>>>>>>> END\n" for i in range(10_000))
    assert refused(tree, reply) == (
        "the change touches 10,000 files; the limit is 200 (AUTOPACK_MAX_EDIT_FILES): split it "
        "into smaller phases"
    )
    assert not (tree.path / "many").exists()


def test_binary_content_is_refused(tree: RunTree) -> None:
    assert refused(tree, "<<<<<<< WRITE blob.bin\nELF\x00\x01\n>>>>>>> END\n") == (
        "block 1 (WRITE blob.bin, line 1): the new content contains a NUL byte; binary content "
        "is refused"
    )
    assert refused(tree, "<<<<<<< WRITE bad.txt\n\udcff\n>>>>>>> END\n") == (
        "block 1 (WRITE bad.txt, line 1): the new content is not valid UTF-8 text (binary "
        "content is refused)"
    )


def test_a_search_in_a_file_that_is_not_utf8_text_is_refused(tree: RunTree) -> None:
    (tree.path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    git(tree.path, "add", "latin.txt")
    git(tree.path, "-c", "user.name=P", "-c", "user.email=p@x", "commit", "-q", "-m", "latin")
    assert refused(tree, "<<<<<<< SEARCH latin.txt\ncaf\n=======\nx\n>>>>>>> REPLACE\n") == (
        "block 1 (SEARCH latin.txt, line 1): latin.txt is not UTF-8 text; it can only be "
        "written whole or deleted"
    )


def test_a_search_text_that_is_not_found_is_refused_naming_its_first_line(tree: RunTree) -> None:
    reply = "<<<<<<< SEARCH app/greet.py\ndef greet(who):\n=======\nx\n>>>>>>> REPLACE\n"
    assert refused(tree, reply) == (
        "block 1 (SEARCH app/greet.py, line 1): the search text was not found in app/greet.py; "
        "its first line is 'def greet(who):'"
    )
    # Matching is by whole lines: part of a line is not found either.
    assert "was not found" in refused(
        tree, "<<<<<<< SEARCH app/greet.py\nreet(name):\n=======\nx\n>>>>>>> REPLACE\n"
    )


def test_a_search_text_off_by_indentation_says_so(tree: RunTree) -> None:
    reply = "<<<<<<< SEARCH app/greet.py\nreturn 'hi ' + name\n=======\nx\n>>>>>>> REPLACE\n"
    assert refused(tree, reply) == (
        "block 1 (SEARCH app/greet.py, line 1): the search text was not found in app/greet.py; "
        "its first line is \"return 'hi ' + name\" (it would match if spaces and tabs were "
        "ignored: copy the lines exactly)"
    )


def test_a_search_text_found_several_times_is_refused(tree: RunTree) -> None:
    reply = "<<<<<<< SEARCH twice.txt\nsame\nline\n=======\nx\n>>>>>>> REPLACE\n"
    assert refused(tree, reply) == (
        "block 1 (SEARCH twice.txt, line 1): the search text occurs 2 times in twice.txt (first "
        "line 'same'); include more lines so it occurs exactly once"
    )


def test_a_search_in_a_missing_file_and_a_delete_of_one_are_refused(tree: RunTree) -> None:
    assert refused(tree, "<<<<<<< SEARCH nope.py\nx\n=======\ny\n>>>>>>> REPLACE\n") == (
        "block 1 (SEARCH nope.py, line 1): nope.py does not exist (SEARCH edits an existing "
        "file; WRITE creates one)"
    )
    assert refused(tree, "<<<<<<< DELETE nope.py\n") == (
        "block 1 (DELETE nope.py, line 1): nope.py does not exist"
    )


def test_a_write_through_a_file_or_onto_a_folder_is_refused(tree: RunTree) -> None:
    assert refused(tree, "<<<<<<< WRITE app/greet.py/x.py\nx\n>>>>>>> END\n") == (
        "block 1 (WRITE app/greet.py/x.py, line 1): app/greet.py is a file, not a folder"
    )
    assert refused(tree, "<<<<<<< WRITE app\nx\n>>>>>>> END\n") == (
        "block 1 (WRITE app, line 1): app is a folder, not a file"
    )


@pytest.mark.parametrize(
    "reply",
    [
        "<<<<<<< WRITE app/new.py\nx = 1\n",  # unterminated
        "<<<<<<< WRITE app/new.py\nx\n=======\ny\n>>>>>>> REPLACE\n",  # malformed
    ],
)
def test_a_malformed_reply_applies_nothing(tree: RunTree, reply: str) -> None:
    before = head(tree)
    with pytest.raises(EditError):
        workspace_apply(tree=tree, edits=parse_edits(reply))
    assert_untouched(tree, before)


def test_one_bad_edit_after_good_ones_applies_none_of_them(tree: RunTree) -> None:
    reply = (
        "<<<<<<< WRITE app/new.py\nx = 1\n>>>>>>> END\n"
        "<<<<<<< SEARCH app/greet.py\nVALUE = 1\n=======\nVALUE = 2\n>>>>>>> REPLACE\n"
        "<<<<<<< DELETE docs/guide.md\n"
        "<<<<<<< SEARCH app/greet.py\nVALUE = 1\n=======\nVALUE = 3\n>>>>>>> REPLACE\n"
    )
    # The second search looks for what the first one replaced: edits apply in order.
    assert refused(tree, reply) == (
        "block 4 (SEARCH app/greet.py, line 10): the search text was not found in app/greet.py; "
        "its first line is 'VALUE = 1'"
    )


def test_a_write_that_fails_midway_leaves_the_tree_at_head(
    tree: RunTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = head(tree)
    real_replace = os.replace
    done: list[str] = []

    def failing_replace(src, dst):
        if len(done) == 2:
            raise OSError(28, "No space left on device")
        done.append(str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    edits = [FileWrite(path=f"new/f{i}.txt", content=f"{i}\n") for i in range(4)]
    edits.append(FileWrite(path="app/greet.py", content="changed\n"))
    with pytest.raises(WorkspaceError) as caught:
        workspace_apply(tree=tree, edits=edits)
    assert str(caught.value) == (
        "writing the change failed, nothing kept: [Errno 28] No space left on device"
    )
    assert len(done) == 2
    assert_untouched(tree, before)


# --- good changes ---------------------------------------------------------------------------


def test_a_good_change_is_committed_with_its_files_and_line_counts(
    tree: RunTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker's own git identity and secrets must not matter (nor reach git).
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Someone Else")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "else@example.com")
    before = head(tree)
    reply = (
        "<<<<<<< SEARCH app/greet.py\n"
        "def greet(name):\n    return 'hi ' + name\n"
        "=======\n"
        "def greet(name: str) -> str:\n    greeting = 'Hello'\n    return f'{greeting}, {name}!'\n"
        ">>>>>>> REPLACE\n"
        "<<<<<<< WRITE tests/test_greet.py\n"
        "from app.greet import greet\n\n\ndef test_greet():\n    assert greet('A') == 'Hello, A!'\n"
        ">>>>>>> END\n"
        "<<<<<<< DELETE docs/guide.md\n"
    )
    applied = workspace_apply(tree=tree, edits=parse_edits(reply))
    assert applied.paths == ("app/greet.py", "tests/test_greet.py", "docs/guide.md")
    commit = workspace_commit(
        tree=tree, applied=applied, phase="Greet politely", attempt=2, model="claude-sonnet-4-5"
    )
    assert commit.parent == before and commit.sha == head(tree)
    assert {(f.path, f.added, f.removed) for f in commit.files} == {
        ("app/greet.py", 3, 2),
        ("tests/test_greet.py", 5, 0),
        ("docs/guide.md", 0, 5),
    }
    assert (commit.added, commit.removed) == (8, 7)
    assert "+    return f'{greeting}, {name}!'" in commit.diff and not commit.diff_shortened
    assert git(tree.path, "log", "-1", "--format=%an <%ae>|%cn <%ce>|%s").strip() == (
        "Autopack <autopack@localhost>|Autopack <autopack@localhost>|"
        "Autopack run 7, phase Greet politely: attempt 2 by claude-sonnet-4-5"
    )
    assert "Autopack-Attempt: 2\nAutopack-Model: claude-sonnet-4-5" in git(
        tree.path, "log", "-1", "--format=%b"
    )
    assert git(tree.path, "status", "--porcelain", "--ignored") == ""
    assert not (tree.path / "docs").exists()


def test_a_file_without_a_final_newline_keeps_it_that_way_after_a_search(
    tree: RunTree,
) -> None:
    commit_edits(tree, [FileWrite(path="end.txt", content="a\nb\n")])
    (tree.path / "end.txt").write_text("a\nb")
    workspace_apply(tree=tree, edits=[TextReplace(path="end.txt", search="b\n", replace="c\n")])
    assert (tree.path / "end.txt").read_text() == "a\nc"


def test_a_large_diff_is_shortened_with_a_note(tree: RunTree, monkeypatch) -> None:
    monkeypatch.setattr("runs.workspace.DIFF_LIMIT", 1_000)
    commit = commit_edits(tree, [FileWrite(path="long.txt", content="line\n" * 1_000)])
    assert commit.diff_shortened and commit.added == 1_000
    assert commit.diff.endswith(
        "\n… diff shortened: the first 995 bytes are shown; the patch download has the whole "
        "change\n"
    )


def test_hooks_of_the_repository_never_run(tree: RunTree, roots: Path) -> None:
    marker = roots / "hook-ran"
    hooks = tree.repository / ".git" / "hooks"
    for name in ("pre-commit", "commit-msg", "post-commit", "post-checkout"):
        (hooks / name).write_text(f"#!/bin/sh\ntouch {marker}\n")
        (hooks / name).chmod(0o755)
    commit_edits(tree, [FileWrite(path="h.txt", content="h\n")])
    workspace_restore(tree=tree)
    assert not marker.exists()


def test_git_gets_none_of_the_workers_secrets(
    tree: RunTree, roots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A clean filter from the repository's own config runs inside `git add` with git's
    # environment: what it sees is what anything git starts would see.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("DJANGO_SECRET_KEY", "django-secret")
    dump = roots / "git-env"
    git(tree.repository, "config", "filter.dump.clean", f"env > {dump}; cat")
    commit_edits(
        tree,
        [
            FileWrite(path=".gitattributes", content="*.txt filter=dump\n"),
            FileWrite(path="x.txt", content="x\n"),
        ],
    )
    seen = dump.read_text()
    assert "GIT_AUTHOR_NAME=Autopack" in seen
    assert "sk-secret" not in seen and "django-secret" not in seen
    assert "DATABASE_URL" not in seen


# --- savepoint and restore ------------------------------------------------------------------


def _tree_files(tree: RunTree) -> dict[str, str]:
    return {
        str(p.relative_to(tree.path)): p.read_text()
        for p in sorted(tree.path.rglob("*"))
        if p.is_file() and p.name != ".git"
    }


def test_restore_after_a_simulated_crash_gives_back_the_savepoint_tree(tree: RunTree) -> None:
    savepoint = workspace_savepoint(tree=tree)
    expected = _tree_files(tree)
    # Half of a change written by a worker that then died: files changed and created, a
    # temporary file, and the index lock of a commit it was in.
    (tree.path / "app" / "greet.py").write_text("half-written")
    (tree.path / "new").mkdir()
    (tree.path / "new" / "a.py").write_text("x\n")
    (tree.path / "app" / ".b.py.autopack-tmp").write_text("partial")
    (tree.path / "__pycache__").mkdir()
    (tree.path / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (tree.git_dir / "index.lock").write_text("")
    assert workspace_restore(tree=tree) == savepoint
    assert _tree_files(tree) == expected
    assert_untouched(tree, savepoint)


def _write(tree: RunTree, path: str, text: str) -> None:
    (tree.path / path).parent.mkdir(parents=True, exist_ok=True)
    (tree.path / path).write_text(text)


def _staged(tree: RunTree) -> None:
    # Staged but not committed, the tree's files as staged: a holder killed inside its commit.
    (tree.path / "app" / "greet.py").write_text("staged\n")
    (tree.path / "app" / "new.py").write_text("staged too\n")
    git(tree.path, "add", "-A")


def _head_moved(tree: RunTree) -> None:
    # A commit the savepoint does not have, its files clean: an attempt that was not approved.
    commit_edits(tree, [FileWrite(path="attempt.py", content="x = 1\n")], attempt=2)


DIRT = {
    "a modified tracked file": lambda t: (t.path / "app" / "greet.py").write_text("changed\n"),
    "a deleted tracked file": lambda t: (t.path / "docs" / "guide.md").unlink(),
    "a file made executable": lambda t: (t.path / "twice.txt").chmod(0o755),
    "an untracked file": lambda t: (t.path / "left.txt").write_text("left\n"),
    "an untracked file in a new folder": lambda t: _write(t, "out/deep/x.json", "{}"),
    "an ignored file": lambda t: _write(t, "app/greet.pyc", "\0"),
    "an ignored folder": lambda t: _write(t, "app/__pycache__/greet.cpython-311.pyc", "\0"),
    "a nested repository": lambda t: git(t.path / "app", "init", "-q", "vendored"),
    "a staged change": _staged,
    "HEAD moved": _head_moved,
}


@pytest.fixture
def ignoring(tree: RunTree) -> RunTree:
    ignore = commit_edits(tree, [FileWrite(path=".gitignore", content="*.pyc\n__pycache__/\n")])
    workspace_approve(tree=tree, commit=ignore.sha)
    return tree


@pytest.mark.parametrize("dirt", DIRT.values(), ids=DIRT.keys())
@pytest.mark.parametrize("begin", [False, True], ids=["restore", "begin"])
def test_whatever_an_attempt_or_a_check_left_in_the_tree_is_gone_after_a_restore(
    ignoring: RunTree, dirt, begin: bool
) -> None:
    tree = ignoring
    savepoint = workspace_savepoint(tree=tree)
    expected = _tree_files(tree)
    modes = {p: os.stat(tree.path / p).st_mode for p in expected}
    dirt(tree)
    if begin:
        begun = workspace_begin(tree=tree, to=savepoint)
        assert begun.commit == savepoint
        assert begun.files == workspace_files(tree=tree)
    else:
        assert workspace_restore(tree=tree, to=savepoint) == savepoint
    assert _tree_files(tree) == expected
    assert {p: os.stat(tree.path / p).st_mode for p in expected} == modes
    assert_untouched(tree, savepoint)
    assert git(tree.path, "branch", "--show-current").strip() == "autopack/run-7"


def test_a_tree_already_at_its_savepoint_is_left_as_it_is(ignoring: RunTree) -> None:
    # The common case, the phase after an approved one: one `git status` finds nothing, and
    # neither `reset --hard` (which writes the index anew) nor `clean` runs.
    tree = ignoring
    savepoint = workspace_savepoint(tree=tree)
    index = os.stat(tree.git_dir / "index")
    begun = workspace_begin(tree=tree, to=savepoint)
    assert os.stat(tree.git_dir / "index").st_ino == index.st_ino
    assert begun.commit == savepoint and begun.files == workspace_files(tree=tree)
    assert_untouched(tree, savepoint)
    # Dirt is seen by the same look, and the index written anew by the restore.
    (tree.path / "app" / "greet.pyc").write_bytes(b"\0")
    workspace_begin(tree=tree, to=savepoint)
    assert os.stat(tree.git_dir / "index").st_ino != index.st_ino
    assert_untouched(tree, savepoint)


def test_an_empty_folder_a_clean_looking_tree_kept_does_not_block_a_file_at_its_path(
    ignoring: RunTree,
) -> None:
    # Git cannot see empty folders, so a restore that finds the tree clean keeps them; to the
    # edits the path is free, as after a `git clean`. A folder holding a file still is not.
    tree = ignoring
    savepoint = workspace_savepoint(tree=tree)
    (tree.path / "out" / "deep").mkdir(parents=True)
    workspace_begin(tree=tree, to=savepoint)
    assert (tree.path / "out" / "deep").is_dir()
    commit = commit_edits(tree, [FileWrite(path="out", content="a file now\n")])
    assert (tree.path / "out").read_text() == "a file now\n"
    assert "out" in git(tree.path, "ls-tree", "--name-only", commit.sha).split()
    assert refused(tree, "<<<<<<< WRITE app\nx\n>>>>>>> END\n") == (
        "block 1 (WRITE app, line 1): app is a folder, not a file"
    )


def test_the_file_list_at_the_start_of_an_attempt_is_the_commits_in_gits_order(
    tree: RunTree,
) -> None:
    names = ["a.b", "a/c", "a-b", "a0", "ünï code.txt", "sp ace/x", "z/a/b/c.txt"]
    commit = commit_edits(tree, [FileWrite(path=n, content="x\n") for n in names])
    workspace_approve(tree=tree, commit=commit.sha)
    (tree.path / "untracked.txt").write_text("not listed\n")
    begun = workspace_begin(tree=tree, to=commit.sha, limit=4)
    full = workspace_files(tree=tree)
    assert set(full.paths) == {*SEED, *names}
    assert begun.files == workspace_files(tree=tree, limit=4)
    assert begun.files.total == full.total and begun.files.paths == full.paths[:4]
    # A commit that is not there is refused, as the restore refuses it.
    with pytest.raises(WorkspaceError):
        workspace_begin(tree=tree, to="0" * 40)


def test_a_rejected_attempt_is_rolled_off_the_branch_but_kept_as_a_ref(tree: RunTree) -> None:
    savepoint = workspace_savepoint(tree=tree)
    attempt = commit_edits(tree, [FileWrite(path="bad.py", content="oops\n")], attempt=1)
    workspace_restore(tree=tree)
    assert_untouched(tree, savepoint)
    assert not (tree.path / "bad.py").exists()
    refs = git(tree.path, "for-each-ref", "--format=%(refname)", "refs/autopack/run-7/attempts")
    assert f"refs/autopack/run-7/attempts/{attempt.sha}\n" in refs
    # The approved one becomes the savepoint, and a restore to it (the executor passes the
    # commit it stored) moves the savepoint ref along.
    good = commit_edits(tree, [FileWrite(path="good.py", content="ok\n")], attempt=2)
    workspace_restore(tree=tree, to=good.sha)
    assert workspace_savepoint(tree=tree) == good.sha
    assert (tree.path / "good.py").read_text() == "ok\n"


def test_a_git_folder_planted_in_the_tree_is_never_read_and_is_removed(
    tree: RunTree, roots: Path
) -> None:
    # A check (model-written code, tree writable) replaces the tree's .git file by a folder
    # whose config would run a command on the next `git status`.
    marker = roots / "planted-ran"
    (tree.path / ".git").unlink()
    git(tree.path, "init", "-q")
    git(tree.path, "config", "core.fsmonitor", f"touch {marker}; false")
    commit_edits(tree, [FileWrite(path="after.txt", content="x\n")])
    workspace_restore(tree=tree)
    assert not marker.exists()
    assert (tree.path / ".git").read_text() == f"gitdir: {tree.git_dir}\n"
    assert git(tree.path, "branch", "--show-current").strip() == "autopack/run-7"


def test_a_worker_killed_while_applying_leaves_nothing_after_restore(
    tree: RunTree, roots: Path
) -> None:
    savepoint = workspace_savepoint(tree=tree)
    expected = _tree_files(tree)
    script = textwrap.dedent(
        """
        import django, os
        django.setup()
        from runs.edits import FileWrite
        from runs.workspace import workspace_apply, workspace_prepare
        tree = workspace_prepare(run_id=7, workspace="proj")
        content = "y" * 400_000 + "\\n"
        edits = [FileWrite(path=f"slow/f{i:03}.txt", content=content) for i in range(200)]
        workspace_apply(tree=tree, edits=edits, max_files=200)
        """
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "autopack_site.settings",
        "AUTOPACK_WORKSPACE_ROOT": str(roots / "workspaces"),
    }
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env)
    try:
        wait_for(
            lambda: (tree.path / "slow").is_dir() and any((tree.path / "slow").iterdir()),
            timeout=60,
            interval=0.005,
            what="the first files of the change on disk",
        )
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(list((tree.path / "slow").iterdir())) < 200  # killed midway
    workspace_restore(tree=tree)
    assert _tree_files(tree) == expected
    assert_untouched(tree, savepoint)


# --- what the builder and the person see ----------------------------------------------------


def test_the_patch_series_holds_each_approved_commit(tree: RunTree, roots: Path) -> None:
    first = commit_edits(tree, [FileWrite(path="one.txt", content="1\n")])
    workspace_approve(tree=tree, commit=first.sha)
    second = commit_edits(tree, [FileWrite(path="two.txt", content="2\n")], attempt=1)
    workspace_approve(tree=tree, commit=second.sha)
    commit_edits(tree, [FileWrite(path="unapproved.txt", content="?\n")])
    patch = workspace_patch(tree=tree)
    assert patch.count("\nSubject: [PATCH ") == 3  # seed, one, two
    assert "+++ b/two.txt" in patch and "unapproved" not in patch
    files = workspace_patch_files(tree=tree, out_dir=roots / "series")
    assert [p.name[:4] for p in files] == ["0001", "0002", "0003"]
    # It applies to the base in a fresh copy of the workspace.
    copy = roots / "copy"
    git(roots, "clone", "-q", str(tree.repository), str(copy))
    subprocess.run(
        ["git", "-C", str(copy), "-c", "user.name=P", "-c", "user.email=p@x", "am", "-q"],
        input=patch,
        text=True,
        check=True,
    )
    assert (copy / "two.txt").read_text() == "2\n"


def test_the_file_list_and_the_file_reading_are_bounded(tree: RunTree) -> None:
    listed = workspace_files(tree=tree, limit=3)
    assert listed.total == len(SEED) and len(listed.paths) == 3 and listed.shortened
    assert set(workspace_files(tree=tree).paths) == set(SEED)
    read = workspace_read(
        tree=tree,
        paths=["docs/guide.md", "app/greet.py", "../etc/passwd", "missing.py", "twice.txt"],
        budget=28,
        per_file=15,
    )
    assert [(f.path, f.text, f.note) for f in read] == [
        ("docs/guide.md", "# Guide\n\none\n", "shortened: the first 13 characters of 23 bytes"),
        ("app/greet.py", "def greet(name)", "shortened: the first 15 characters of 53 bytes"),
        ("../etc/passwd", "", "the path contains '..'; it must stay inside the workspace"),
        ("missing.py", "", "does not exist"),
        ("twice.txt", "", "not shown: the size budget is spent"),
    ]


@pytest.mark.django_db(transaction=True)
def test_a_worker_without_the_runs_repository_fails_the_phase_saying_why(
    roots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose AUTOPACK_WORKSPACE_ROOT is not the folder the run began in (another
    machine's, say) would make a new, empty repository: it fails the phase, naming the
    setting, instead of building on the wrong tree."""
    from runs import services
    from runs.executor import execute_phase
    from runs.models import Phase, Run
    from runs.plans import parse_plan_bytes
    from tests.factories import set_provider_keys

    set_provider_keys(monkeypatch)
    run = services.run_create(plan=parse_plan_bytes((ROOT / "examples" / "plan.yaml").read_bytes()))
    services.run_start(run_id=run.pk)
    # As the run's first worker, on another machine, recorded it.
    services.run_tree_record(
        run_id=run.pk, workspace_path="/elsewhere/.runs/run-1", branch="b", base_commit="f" * 40
    )
    phase = Phase.objects.get(run=run, position=1)
    assert execute_phase(phase_id=phase.pk, token=phase.dispatch_token) == "failed"
    phase.refresh_from_db()
    assert "does not hold the commit the run started from (ffffffffffff)" in phase.failure_reason
    assert "AUTOPACK_WORKSPACE_ROOT" in phase.failure_reason
    assert Run.objects.get(pk=run.pk).state == "failed"
