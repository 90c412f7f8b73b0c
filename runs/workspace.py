"""A run's git working tree: prepared per run, restored to its savepoint, changed only by
validated edits, committed once per attempt (issue 13; the layout is in docs/edits.md).

Layout. Each run gets its own linked working tree (`git worktree`) at
`AUTOPACK_WORKSPACE_ROOT/.runs/run-<id>`, on branch `autopack/run-<id>`, added to one of:

- a plan's `workspace`: the repository `AUTOPACK_WORKSPACE_ROOT/<workspace>` (created, `git
  init`ed and given a first commit when new; a folder that is not a repository yet becomes one
  with its files in that commit). Two runs of one plan share its history, never a tree;
- a plan's `source`: a local git repository under one of `AUTOPACK_SOURCE_ROOTS`. Its own
  working tree is never touched; it gains the run's branch, refs and worktree entry.

Why a worktree and not a clone: a linked tree keeps its git directory (index, HEAD) and the
repository's config outside the tree. The checks run model-written code with the tree
writable; with a clone they could write `.git/config` (`core.fsmonitor`, `core.pager`...) and
the next git command Autopack runs outside the sandbox would execute it. Here every git call
names the git directory explicitly (`--git-dir`, `--work-tree`), so a `.git` planted in the tree
is never read. And why plain `git` and not GitPython: GitPython shells out to the same binary
for everything but object reads, and adds no control over its environment or config.

Refs per run (beside the branch): `refs/autopack/run-<id>/base` (where it started),
`.../savepoint` (the last approved commit: where each attempt starts) and
`.../attempts/<sha>` (every attempt's commit, kept when a rejected attempt is rolled back off
the branch). So the branch holds the approved history; `git log --all` shows every attempt.

Every git call runs with an environment built from scratch (no Autopack secret reaches git or
anything it could start), no system or global config, hooks off (`core.hooksPath=/dev/null`:
the content is model-written), a fixed Autopack identity, and no network protocol allowed.

Errors: EditError (runs.edits) when the builder's edits are refused — nothing was applied,
send the message back as a revise; WorkspaceError for everything else (configuration, git).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from .edits import Edit, EditError, FileDelete, FileWrite, TextReplace, path_problem, where

RUNS_DIR = ".runs"  # under AUTOPACK_WORKSPACE_ROOT; a workspace cannot be named so
AUTHOR_NAME = "Autopack"
AUTHOR_EMAIL = "autopack@localhost"
GIT_TIMEOUT_SECONDS = 120.0
DIFF_LIMIT = 200_000  # characters of diff kept per attempt (the patch download has it all)
FILE_LIST_LIMIT = 2_000  # paths of the repository listed in the builder's prompt
READ_BUDGET = 60_000  # characters of file content in the builder's prompt
READ_FILE_LIMIT = 20_000  # characters of one file in it
_TMP_SUFFIX = ".autopack-tmp"

# Passed to every git call, overriding whatever a repository's config says.
_GIT_CONFIG = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.untrackedCache=false",
    # How git tells a changed file from an unchanged one (workspace_restore relies on it):
    # git's defaults, whatever a source repository's config says.
    "core.trustctime=true",
    "core.checkStat=default",
    "core.ignoreStat=false",
    "core.autocrlf=false",
    "core.quotePath=false",
    "core.pager=cat",
    "commit.gpgSign=false",
    "tag.gpgSign=false",
    "gc.auto=0",  # no repacking inside a phase's apply; `git gc` is the operator's call
    "maintenance.auto=false",
    "protocol.allow=never",
    "advice.detachedHead=false",
    f"user.name={AUTHOR_NAME}",
    f"user.email={AUTHOR_EMAIL}",
)


class WorkspaceError(RuntimeError):
    """The workspace could not be prepared, read or written (configuration, git, disk)."""


@dataclass(frozen=True)
class RunTree:
    """A run's working tree, as prepared; everything else in this module takes one."""

    run_id: int
    path: Path  # the working tree really used (show this one)
    branch: str
    base: str  # the commit the run started from
    repository: Path  # the repository holding the branch (workspace or source)
    git_dir: Path  # the tree's own git directory (outside `path`)
    # The savepoint ref's commit when it was read while preparing ("" when not read): lets a
    # restore to that same commit skip rewriting the ref. A reading, not part of the identity.
    savepoint: str = field(default="", compare=False)

    @property
    def ref_prefix(self) -> str:
        return f"refs/autopack/run-{self.run_id}"


@dataclass(frozen=True)
class Applied:
    """What workspace_apply wrote: the paths written or deleted, in order."""

    paths: tuple[str, ...]


@dataclass(frozen=True)
class FileStat:
    path: str
    added: int
    removed: int


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str
    files: tuple[FileStat, ...]
    added: int
    removed: int
    diff: str  # unified diff, at most DIFF_LIMIT characters plus a note when shortened
    diff_shortened: bool

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(f.path for f in self.files)


@dataclass(frozen=True)
class FileList:
    paths: tuple[str, ...]
    total: int

    @property
    def shortened(self) -> bool:
        return len(self.paths) < self.total


@dataclass(frozen=True)
class Begun:
    """What workspace_begin leaves: the commit the tree is at, and its files."""

    commit: str
    files: FileList


@dataclass(frozen=True)
class FileText:
    path: str
    text: str  # what is shown ("" when skipped)
    note: str = ""  # why shortened or skipped, for the prompt


@dataclass(frozen=True)
class ProtectedPaths:
    """The plan's `protected_paths` globs, compiled. A pattern is matched against the path
    relative to the repository root: `*` and `?` stay within one folder name, `**` spans
    folders, `[...]` is a class; a pattern without '/' matches at any depth (as in .gitignore),
    a leading '/' anchors it at the root, and a pattern that matches a folder protects all
    below it."""

    patterns: tuple[str, ...] = ()
    _regexes: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> ProtectedPaths:
        patterns = tuple(patterns)
        return cls(patterns=patterns, _regexes=tuple(_glob_regex(p) for p in patterns))

    def match(self, path: str) -> str | None:
        """The first pattern protecting `path`, or None."""
        for pattern, regex in zip(self.patterns, self._regexes, strict=True):
            if regex.fullmatch(path):
                return pattern
        return None


def _glob_regex(pattern: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern.strip("/"):
        raise ValueError(f"protected path pattern {pattern!r} is empty")
    if ".." in pattern.split("/"):
        raise ValueError(f"protected path pattern {pattern!r} contains '..'")
    anchored = pattern.startswith("/") or "/" in pattern.rstrip("/")
    parts = [p for p in pattern.strip("/").split("/") if p not in ("", ".")]
    out = [] if anchored else ["(?:[^/]+/)*"]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
        else:
            out.append(_glob_part(part) + ("" if last else "/"))
    return re.compile("".join(out) + "(?:/.*)?", re.DOTALL)


def _glob_part(part: str) -> str:
    out, i = [], 0
    while i < len(part):
        ch = part[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[" and (end := part.find("]", i + 2)) != -1:
            body = part[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\").replace("/", "") + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


# --- git ------------------------------------------------------------------------------------


def _git_env() -> dict[str, str]:
    # Built from nothing: provider keys, DJANGO_SECRET_KEY, DATABASE_URL and the rest of the
    # worker's environment never reach git, nor a filter or helper it could start.
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "LC_ALL": "C",
        "TZ": "UTC",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_SYSTEM": os.devnull,
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_OPTIONAL_LOCKS": "0",
        "GIT_LITERAL_PATHSPECS": "1",  # a path named '*' or ':(top)' is that file, nothing more
        "GIT_AUTHOR_NAME": AUTHOR_NAME,
        "GIT_AUTHOR_EMAIL": AUTHOR_EMAIL,
        "GIT_COMMITTER_NAME": AUTHOR_NAME,
        "GIT_COMMITTER_EMAIL": AUTHOR_EMAIL,
    }


_ENV = _git_env()


def _git_argv(args: Sequence[str], *, tree: RunTree | None, cwd: Path | None) -> list[str]:
    argv = ["git"]
    for item in _GIT_CONFIG:
        argv += ["-c", item]
    if tree is not None:
        argv += [f"--git-dir={tree.git_dir}", f"--work-tree={tree.path}"]
    elif cwd is not None:
        argv += ["-C", str(cwd)]
    return argv + list(args)


def _git(
    *args: str,
    tree: RunTree | None = None,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    env = _ENV
    if tree is None and cwd is not None:
        # Discovery must stop at `cwd`: a workspace folder that is not a repository yet must
        # never be taken for part of a repository above it (e.g. Autopack's own checkout).
        env = {**_ENV, "GIT_CEILING_DIRECTORIES": str(cwd.parent)}
    try:
        done = subprocess.run(
            _git_argv(args, tree=tree, cwd=cwd),
            input=stdin,
            capture_output=True,
            env=env,
            cwd=str(tree.path if tree is not None else cwd or "/"),
            timeout=GIT_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WorkspaceError(f"git {args[0]}: {exc}") from exc
    if check and done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise WorkspaceError(
            f"git {args[0]} failed (exit {done.returncode}): " + " / ".join(message[-3:])
        )
    return done


def _out(*args: str, tree: RunTree | None = None, cwd: Path | None = None) -> str:
    return _git(*args, tree=tree, cwd=cwd).stdout.decode("utf-8", "replace").strip()


def _ref_exists(repo: Path, ref: str) -> str | None:
    done = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", cwd=repo, check=False)
    return done.stdout.decode().strip() if done.returncode == 0 else None


# --- preparing ------------------------------------------------------------------------------


def _root() -> Path:
    root = Path(settings.AUTOPACK_WORKSPACE_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def source_roots() -> list[Path]:
    raw = str(getattr(settings, "AUTOPACK_SOURCE_ROOTS", "") or "")
    return [Path(p).resolve() for p in re.split(r"[:,]", raw) if p.strip()]


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _workspace_folder(root: Path, workspace: str) -> Path:
    """The workspace's folder (created), checked without git; _workspace_init makes it a
    repository."""
    if problem := path_problem(workspace):
        raise WorkspaceError(f"workspace {workspace!r}: {problem}")
    name = _workspace_name(workspace)
    if name.split("/")[0] == RUNS_DIR:
        raise WorkspaceError(f"workspace {workspace!r}: {RUNS_DIR}/ holds the runs' own trees")
    path = root / name
    # Resolved again: a symlink under the root must not lead the repository elsewhere.
    if path.exists() and not _inside(path.resolve(), root):
        raise WorkspaceError(f"workspace {workspace!r} leads outside AUTOPACK_WORKSPACE_ROOT")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def _workspace_name(workspace: str) -> str:
    return "/".join(p for p in workspace.split("/") if p not in ("", "."))


def _workspace_init(path: Path, workspace: str) -> None:
    """Makes the workspace's folder a repository with a first commit, unless it is one."""
    if not (path / ".git").exists():
        _git("init", "-q", "-b", "main", cwd=path)
        # Autopack's own files there (the notes folder) are not the project's.
        exclude = path / ".git" / "info" / "exclude"
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with exclude.open("a", encoding="utf-8") as fh:
            fh.write("\n/.autopack/\n")
    elif not (path / ".git").is_dir() and _out("rev-parse", "--show-toplevel", cwd=path) != str(
        path
    ):
        # A `.git` folder makes `path` the top of its repository; a `.git` file may point
        # anywhere, so git is asked.
        raise WorkspaceError(f"workspace {workspace!r} is not the top of its git repository")
    if _ref_exists(path, "HEAD") is None:
        _git("add", "-A", cwd=path)
        _git(
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            f"Autopack workspace {_workspace_name(workspace)}",
            cwd=path,
        )


def _source_folder(source: str) -> Path:
    """The source's folder, checked without git; _source_check asks git about it."""
    roots = source_roots()
    if not roots:
        raise WorkspaceError(
            f"source {source!r}: no local repositories are allowed; set AUTOPACK_SOURCE_ROOTS "
            "to the folders that may hold them"
        )
    given = Path(source).expanduser()
    if not given.is_absolute():
        raise WorkspaceError(f"source {source!r}: must be an absolute path")
    path = given.resolve()
    if not any(_inside(path, root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise WorkspaceError(
            f"source {source!r} is not under an allowed root (AUTOPACK_SOURCE_ROOTS: {allowed})"
        )
    if not path.is_dir():
        raise WorkspaceError(f"source {source!r} is not a folder")
    return path


def _source_check(path: Path, source: str) -> None:
    done = _git("rev-parse", "--show-toplevel", cwd=path, check=False)
    top = done.stdout.decode("utf-8", "replace").strip()
    if done.returncode != 0 or Path(top) != path:
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise WorkspaceError(
            f"source {source!r} is not the top folder of a git repository"
            + (f" ({detail[-1]})" if detail else "")
        )


def _worktrees(repo: Path) -> dict[Path, str]:
    """Registered linked trees of `repo`: path → branch ref ('' when detached)."""
    found: dict[Path, str] = {}
    current: Path | None = None
    for line in _out("worktree", "list", "--porcelain", cwd=repo).splitlines():
        if line.startswith("worktree "):
            current = Path(line[len("worktree ") :])
            found[current] = ""
        elif line.startswith("branch ") and current is not None:
            found[current] = line[len("branch ") :]
    return found


@contextlib.contextmanager
def _prepare_lock(root: Path) -> Iterator[None]:
    # Two runs of a new workspace may be claimed at once: one initialises it, the other waits.
    (root / RUNS_DIR).mkdir(exist_ok=True)
    with open(root / RUNS_DIR / ".prepare.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def workspace_prepare(
    *, run_id: int, workspace: str = "", source: str = "", source_ref: str = "HEAD"
) -> RunTree:
    """The run's own working tree, created on first call; later calls (each claim of a phase)
    return the same tree, so this is safe to call again after a worker died anywhere in it.
    `workspace` defaults to `run-<id>`; `source` (a local repository) takes precedence."""
    if run_id <= 0:
        raise WorkspaceError(f"run id {run_id} is not a run")
    root = _root()
    branch = f"autopack/run-{run_id}"
    prefix = f"refs/autopack/run-{run_id}"
    workspace = workspace or f"run-{run_id}"
    with _prepare_lock(root):
        repo = _source_folder(source) if source else _workspace_folder(root, workspace)
        path = root / RUNS_DIR / f"run-{run_id}"
        # Every claim of a phase comes here: a tree already prepared is recognised with one git
        # call, which also answers the repository checks below (the per-phase benchmark in
        # docs/benchmarks.md).
        ready = _already_prepared(run_id=run_id, repo=repo, path=path, branch=branch)
        if ready is not None:
            return ready
        if source:
            _source_check(repo, source)
        else:
            _workspace_init(repo, workspace)
        # Order matters for a retry after a crash: the base ref first (its existence says the
        # run was prepared here), then the branch, then the tree.
        base = _ref_exists(repo, f"{prefix}/base")
        if base is None:
            if _ref_exists(repo, f"refs/heads/{branch}") is not None:
                raise WorkspaceError(
                    f"branch {branch} already exists in {repo} and was not made for this run"
                )
            start = _ref_exists(repo, source_ref)
            if start is None:
                raise WorkspaceError(f"{source_ref!r} is not a commit in {repo}")
            _git("update-ref", f"{prefix}/base", start, "", cwd=repo)
            base = start
        if _ref_exists(repo, f"{prefix}/savepoint") is None:
            _git("update-ref", f"{prefix}/savepoint", base, cwd=repo)
        if _ref_exists(repo, f"refs/heads/{branch}") is None:
            _git("branch", branch, base, cwd=repo)
        trees = _worktrees(repo)
        if path in trees:
            if trees[path] != f"refs/heads/{branch}":
                raise WorkspaceError(f"{path} is a tree of {repo} but not on {branch}")
            if not path.is_dir():
                _git("worktree", "prune", cwd=repo)
                _git("worktree", "add", "-q", str(path), branch, cwd=repo)
        else:
            if path.exists() or path.is_symlink():
                raise WorkspaceError(
                    f"{path} already exists and is not this run's tree (is "
                    "AUTOPACK_WORKSPACE_ROOT shared by two databases?)"
                )
            _git("worktree", "prune", cwd=repo)
            _git("worktree", "add", "-q", str(path), branch, cwd=repo)
        git_dir = _tree_git_dir(repo, path)
    return RunTree(
        run_id=run_id, path=path, branch=branch, base=base, repository=repo, git_dir=git_dir
    )


def _already_prepared(*, run_id: int, repo: Path, path: Path, branch: str) -> RunTree | None:
    """The run's tree when everything the full preparation makes is in place: `repo` the top
    of its repository, the base, savepoint and branch refs, and the tree registered in the
    repository on its branch. None sends the caller down the full preparation, which checks
    the repository and repairs whatever is missing."""
    prefix = f"refs/autopack/run-{run_id}"
    done = _git(
        "rev-parse",
        "--path-format=absolute",
        "--git-common-dir",
        "--show-toplevel",
        f"{prefix}/base^{{commit}}",
        f"{prefix}/savepoint^{{commit}}",
        f"refs/heads/{branch}^{{commit}}",
        cwd=repo,
        check=False,
    )
    lines = done.stdout.decode("utf-8", "replace").splitlines()
    if done.returncode != 0 or len(lines) != 5 or Path(lines[1]) != repo:
        return None
    git_dir = Path(lines[0]).resolve() / "worktrees" / path.name
    try:
        registered = (git_dir / "gitdir").read_text().strip() == str(path / ".git")
        on_branch = (git_dir / "HEAD").read_text().strip() == f"ref: refs/heads/{branch}"
    except OSError:
        return None
    if not (registered and on_branch and path.is_dir() and not path.is_symlink()):
        return None
    return RunTree(
        run_id=run_id,
        path=path,
        branch=branch,
        base=lines[2],
        repository=repo,
        git_dir=git_dir,
        savepoint=lines[3],
    )


def _tree_git_dir(repo: Path, path: Path) -> Path:
    # Found from the repository's side, never from the tree's `.git` file, which the checks
    # can rewrite.
    common = Path(
        _out("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=repo)
    ).resolve()
    expected = str(path / ".git")
    candidates = [common / "worktrees" / path.name, *sorted((common / "worktrees").glob("*"))]
    for candidate in candidates:
        with contextlib.suppress(OSError):
            if (candidate / "gitdir").read_text().strip() == expected:
                return candidate
    raise WorkspaceError(f"{path}: its git directory is missing from {common}")


def workspace_discard(*, tree: RunTree) -> None:
    """Remove the run's tree (its branch, refs and commits stay in the repository)."""
    _git("worktree", "remove", "--force", str(tree.path), cwd=tree.repository)


# --- savepoint and restore ------------------------------------------------------------------


def workspace_savepoint(*, tree: RunTree) -> str:
    """The last approved commit (the base until a phase is approved)."""
    sha = _ref_exists(tree.repository, f"{tree.ref_prefix}/savepoint")
    return sha or tree.base


def workspace_approve(*, tree: RunTree, commit: str) -> None:
    """`commit` becomes the savepoint: later attempts start from it. Idempotent."""
    _git("update-ref", f"{tree.ref_prefix}/savepoint", commit, cwd=tree.repository)


def workspace_restore(*, tree: RunTree, to: str | None = None) -> str:
    """Leave the tree exactly at `to` (default: the savepoint): branch, index and files, with
    untracked and ignored files removed. Called at the start of every attempt, so a change
    half-applied by a worker killed mid-write is gone. Returns the commit.

    A tree already there (the common case: the phase after an approved one whose checks left
    nothing) is recognised with one `git status` and left alone; anything it lists sends the
    tree through `reset --hard` and `clean`. The one thing status cannot see is an empty
    folder (git tracks no folders), which then stays: it holds no file, git shows none, and
    an edit writing a file at its path replaces it (_write), as on a tree git had cleaned."""
    target = to or workspace_savepoint(tree=tree)
    _restore(tree, target, given=to is not None)
    return target


def workspace_begin(*, tree: RunTree, to: str | None = None, limit: int = FILE_LIST_LIMIT) -> Begun:
    """As an attempt begins: workspace_restore, and the commit's files as workspace_files
    lists them once the tree is restored. The list is read from the commit (`git ls-tree`),
    not from the tree, so it is read while the restore looks at the tree: one git process
    less on the way to the builder's call (docs/benchmarks.md)."""
    target = to or workspace_savepoint(tree=tree)
    argv = _git_argv(
        ["ls-tree", "-r", "-z", "--name-only", "--full-tree", target], tree=tree, cwd=None
    )
    try:
        listing = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_ENV, cwd=tree.path
        )
    except OSError as exc:
        raise WorkspaceError(f"git ls-tree: {exc}") from exc
    with listing:
        try:
            _restore(tree, target, given=to is not None)
            raw, err = listing.communicate(timeout=GIT_TIMEOUT_SECONDS)
        except BaseException:
            listing.kill()
            raise
    if listing.returncode != 0:
        message = err.decode("utf-8", "replace").strip().splitlines()
        raise WorkspaceError(
            f"git ls-tree failed (exit {listing.returncode}): " + " / ".join(message[-3:])
        )
    return Begun(commit=target, files=_file_list(raw, limit))


def _restore(tree: RunTree, target: str, *, given: bool) -> None:
    _clear_stale_locks(tree)
    _repair_dot_git(tree)
    if not _clean_at(tree, target):
        _git("reset", "-q", "--hard", target, tree=tree)
        _git("clean", "-q", "-ffdx", tree=tree)
    if given and target != tree.savepoint:
        # The executor passes the approved commit it stored; the ref follows it (the two are
        # written in different places and a worker can die between them).
        workspace_approve(tree=tree, commit=target)


def _clean_at(tree: RunTree, target: str) -> bool:
    """Whether the tree is on its branch at `target` with the index and files as committed
    and no untracked or ignored path: every status entry (changed, untracked `?`, ignored
    `!`) says no. The stat-based comparison is git's own, the one `reset --hard` uses to pick
    the files it rewrites (its settings pinned in _GIT_CONFIG)."""
    done = _git(
        "status",
        "--porcelain=v2",
        "--branch",
        "-z",
        "--untracked-files=normal",  # an untracked folder is one entry: any entry is enough
        "--ignored=matching",  # an ignored folder likewise, not every file in it
        "--ignore-submodules=none",
        tree=tree,
        check=False,
    )
    if done.returncode != 0:
        return False
    oid = head = ""
    for entry in done.stdout.split(b"\0"):
        if entry.startswith(b"# branch.oid "):
            oid = entry[len(b"# branch.oid ") :].decode("ascii", "replace")
        elif entry.startswith(b"# branch.head "):
            head = entry[len(b"# branch.head ") :].decode("utf-8", "replace")
        elif entry and not entry.startswith(b"# "):
            return False
    return oid == target and head == tree.branch


def _clear_stale_locks(tree: RunTree) -> None:
    # Only the phase's holder ever runs git in this tree, so a lock file here was left by a
    # holder that died (SIGKILL mid-commit) and would fail every git command after it.
    common = (tree.git_dir / (tree.git_dir / "commondir").read_text().strip()).resolve()
    for lock in (
        tree.git_dir / "index.lock",
        tree.git_dir / "HEAD.lock",
        common / "refs" / "heads" / f"{tree.branch}.lock",
    ):
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _repair_dot_git(tree: RunTree) -> None:
    dot_git = tree.path / ".git"
    expected = f"gitdir: {tree.git_dir}\n"
    with contextlib.suppress(OSError):
        if dot_git.is_file() and not dot_git.is_symlink() and dot_git.read_text() == expected:
            return
    if dot_git.is_dir() and not dot_git.is_symlink():
        shutil.rmtree(dot_git)
    else:
        with contextlib.suppress(FileNotFoundError):
            dot_git.unlink()
    dot_git.write_text(expected)


# --- applying edits -------------------------------------------------------------------------


def workspace_apply(
    *,
    tree: RunTree,
    edits: Sequence[Edit],
    protected: ProtectedPaths | None = None,
    max_bytes: int | None = None,
    max_files: int | None = None,
) -> Applied:
    """Apply `edits` all or nothing. Everything is validated before the first write; a
    refusal raises EditError and leaves the tree as it was. A write that fails midway (disk
    full) restores the tree to HEAD and raises WorkspaceError. The tree must be clean at HEAD
    (workspace_restore at the start of the attempt)."""
    max_bytes = settings.AUTOPACK_MAX_EDIT_BYTES if max_bytes is None else max_bytes
    max_files = settings.AUTOPACK_MAX_EDIT_FILES if max_files is None else max_files
    protected = protected or ProtectedPaths()
    paths = list(dict.fromkeys(e.path for e in edits))
    if len(paths) > max_files:
        raise EditError(
            f"the change touches {len(paths):,} files; the limit is {max_files:,} "
            "(AUTOPACK_MAX_EDIT_FILES): split it into smaller phases"
        )
    root = tree.path
    new: dict[str, bytes | None] = {}
    current: dict[str, str] = {}
    for edit in edits:
        if problem := path_problem(edit.path):
            raise EditError(f"{where(edit)}: {problem}")
        if pattern := protected.match(edit.path):
            raise EditError(
                f"{where(edit)}: {edit.path} is protected by the plan "
                f"(protected_paths: {pattern!r})"
            )
        existing = _check_on_disk(root, edit)
        if isinstance(edit, FileDelete):
            if existing is None:
                raise EditError(f"{where(edit)}: {edit.path} does not exist")
            new[edit.path] = None
        elif isinstance(edit, FileWrite):
            new[edit.path] = _text_bytes(edit, edit.content, max_bytes)
        else:
            if edit.path not in current:
                if existing is None:
                    raise EditError(
                        f"{where(edit)}: {edit.path} does not exist (SEARCH edits an existing "
                        "file; WRITE creates one)"
                    )
                current[edit.path] = _read_text(edit, root / edit.path, existing, max_bytes)
            current[edit.path] = _replaced(edit, current[edit.path])
            new[edit.path] = _text_bytes(edit, current[edit.path], max_bytes)
    try:
        for path, content in new.items():
            if content is None:
                _delete(root, path)
            else:
                _write(root, path, content)
    except OSError as exc:
        _git("reset", "-q", "--hard", "HEAD", tree=tree)
        _git("clean", "-q", "-ffdx", tree=tree)
        raise WorkspaceError(f"writing the change failed, nothing kept: {exc}") from exc
    return Applied(paths=tuple(new))


def _check_on_disk(root: Path, edit: Edit) -> os.stat_result | None:
    """The file's stat when it exists. Refuses a path through a symlink (wherever it leads:
    an edit names the real file) or through a file, and a target that is not a regular file."""
    parts = edit.path.split("/")
    here = root
    for depth, part in enumerate(parts):
        here = here / part
        so_far = "/".join(parts[: depth + 1])
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EditError(f"{where(edit)}: {so_far} cannot be read ({exc.strerror})") from exc
        if stat.S_ISLNK(st.st_mode):
            target = os.path.realpath(here)
            if not _inside(Path(target), root):
                raise EditError(
                    f"{where(edit)}: {so_far} is a symlink that leads out of the workspace"
                )
            raise EditError(
                f"{where(edit)}: {so_far} is a symlink (to "
                f"{os.path.relpath(target, root)}); edits do not follow symlinks, name the real "
                "path"
            )
        last = depth == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            raise EditError(f"{where(edit)}: {so_far} is a file, not a folder")
        if last:
            if stat.S_ISDIR(st.st_mode) and _holds_no_file(here):
                return None  # git tracks no folders: to git this path is free (see _write)
            if stat.S_ISDIR(st.st_mode):
                raise EditError(f"{where(edit)}: {edit.path} is a folder, not a file")
            if not stat.S_ISREG(st.st_mode):
                raise EditError(f"{where(edit)}: {edit.path} is not a regular file")
            return st
    return None


def _text_bytes(edit: Edit, text: str, max_bytes: int) -> bytes:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EditError(
            f"{where(edit)}: the new content is not valid UTF-8 text (binary content is refused)"
        ) from exc
    if len(data) > max_bytes:
        raise EditError(
            f"{where(edit)}: the new content of {edit.path} is {len(data):,} bytes; the limit "
            f"is {max_bytes:,} (AUTOPACK_MAX_EDIT_BYTES)"
        )
    if b"\x00" in data:
        raise EditError(
            f"{where(edit)}: the new content contains a NUL byte; binary content is refused"
        )
    return data


def _read_text(edit: Edit, path: Path, st: os.stat_result, max_bytes: int) -> str:
    if st.st_size > max_bytes:
        raise EditError(
            f"{where(edit)}: {edit.path} is {st.st_size:,} bytes, over the "
            f"{max_bytes:,} that can be edited (AUTOPACK_MAX_EDIT_BYTES)"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EditError(
            f"{where(edit)}: {edit.path} is not UTF-8 text; it can only be written whole or deleted"
        ) from exc
    if "\x00" in text:
        raise EditError(f"{where(edit)}: {edit.path} is binary; it can only be deleted")
    return text


def _replaced(edit: TextReplace, text: str) -> str:
    # Whole lines only: the search text starts a line. A file without a final newline is
    # matched as if it had one, and keeps not having one.
    missing_newline = bool(text) and not text.endswith("\n")
    haystack = "\n" + text + ("\n" if missing_newline else "")
    needle = "\n" + edit.search
    first = haystack.find(needle)
    first_line = edit.search.split("\n", 1)[0]
    if first == -1:
        hint = ""
        if _loose(edit.search) in _loose(haystack):
            hint = " (it would match if spaces and tabs were ignored: copy the lines exactly)"
        raise EditError(
            f"{where(edit)}: the search text was not found in {edit.path}; its first line is "
            f"{first_line!r}{hint}"
        )
    second = haystack.find(needle, first + 1)
    if second != -1:
        count = haystack.count(needle)
        raise EditError(
            f"{where(edit)}: the search text occurs {max(count, 2)} times in {edit.path} (first "
            f"line {first_line!r}); include more lines so it occurs exactly once"
        )
    result = haystack[: first + 1] + edit.replace + haystack[first + len(needle) :]
    result = result[1:]
    if missing_newline and result.endswith("\n"):
        result = result[:-1]
    return result


def _loose(text: str) -> str:
    return "\n".join(line.strip() for line in text.split("\n"))


def _holds_no_file(folder: Path) -> bool:
    """Whether `folder` holds nothing but (empty) folders: what git cannot see, so what a
    restore that found the tree clean may leave behind (workspace_restore)."""
    for here, folders, files in os.walk(folder):
        if files or any((Path(here) / f).is_symlink() for f in folders):
            return False
    return True


def _remove_empty_folders(folder: Path) -> None:
    for here, _folders, _files in os.walk(folder, topdown=False):
        os.rmdir(here)  # fails on anything but an empty folder, as it should


def _write(root: Path, path: str, content: bytes) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and not target.is_symlink():  # only empty ones pass _check_on_disk
        _remove_empty_folders(target)
    mode = 0o644
    with contextlib.suppress(FileNotFoundError):
        mode = stat.S_IMODE(os.lstat(target).st_mode)
    tmp = target.with_name(target.name[: 255 - len(_TMP_SUFFIX) - 1] + _TMP_SUFFIX)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    # O_NOFOLLOW and O_EXCL: nothing on disk can turn this write into one elsewhere.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _delete(root: Path, path: str) -> None:
    target = root / path
    target.unlink()
    # Git does not track folders: leave none empty behind.
    parent = target.parent
    while parent != root:
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


# --- committing -----------------------------------------------------------------------------


def _message_part(text: str, limit: int) -> str:
    flat = " ".join(str(text).split())
    flat = "".join(ch for ch in flat if ch.isprintable())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def workspace_commit(
    *, tree: RunTree, applied: Applied, phase: str, attempt: int, model: str
) -> Commit:
    """One commit for the attempt (also when it changed nothing, so every attempt has one),
    kept under refs/autopack/run-<id>/attempts/ so a later rollback of the branch loses it
    from the branch only. Returns the numbers the phase keeps and the (bounded) diff."""
    if applied.paths:
        _git(
            "add",
            "-A",
            "-f",
            "--pathspec-from-file=-",
            "--pathspec-file-nul",
            tree=tree,
            stdin=b"\0".join(p.encode() for p in applied.paths),
        )
    subject = (
        f"Autopack run {tree.run_id}, phase {_message_part(phase, 120)}: attempt {attempt} "
        f"by {_message_part(model, 80)}"
    )
    body = (
        f"Autopack-Run: {tree.run_id}\nAutopack-Phase: {_message_part(phase, 200)}\n"
        f"Autopack-Attempt: {attempt}\nAutopack-Model: {_message_part(model, 200)}\n"
    )
    _git(
        "commit",
        "-q",
        "--no-verify",
        "--allow-empty",
        "-F",
        "-",
        tree=tree,
        stdin=f"{subject}\n\n{body}".encode(),
    )
    # Every commit here has a parent (a workspace starts with one): one call for both.
    sha, parent = _out("rev-parse", "HEAD", "HEAD^", tree=tree).split()
    _git("update-ref", f"{tree.ref_prefix}/attempts/{sha}", sha, tree=tree)
    files = _numstat(tree, parent, sha)
    diff, shortened = _diff(tree, parent, sha, limit=DIFF_LIMIT)
    return Commit(
        sha=sha,
        parent=parent,
        files=files,
        added=sum(f.added for f in files),
        removed=sum(f.removed for f in files),
        diff=diff,
        diff_shortened=shortened,
    )


def _numstat(tree: RunTree, old: str, new: str) -> tuple[FileStat, ...]:
    raw = _git("diff", "--numstat", "-z", "--no-renames", old, new, tree=tree).stdout
    stats = []
    for entry in raw.split(b"\0"):
        if not entry:
            continue
        added, removed, path = entry.split(b"\t", 2)
        # '-' is git's count for a binary file (only ever an existing one, deleted).
        stats.append(
            FileStat(
                path=path.decode("utf-8", "replace"),
                added=int(added) if added != b"-" else 0,
                removed=int(removed) if removed != b"-" else 0,
            )
        )
    return tuple(stats)


def _diff(tree: RunTree, old: str, new: str, *, limit: int) -> tuple[str, bool]:
    argv = _git_argv(
        ["diff", "--no-color", "--no-ext-diff", "--no-textconv", "--no-renames", old, new],
        tree=tree,
        cwd=None,
    )
    # Read no more than the limit: a 200-file change of 1 MB each is not held in memory.
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_ENV, cwd=tree.path
    ) as proc:
        assert proc.stdout is not None
        data = proc.stdout.read(limit + 1)
        more = len(data) > limit
        if more:
            proc.kill()
        else:
            proc.stdout.read()
        proc.wait(timeout=GIT_TIMEOUT_SECONDS)
    if not more:
        return data.decode("utf-8", "replace"), False
    cut = data[:limit]
    cut = cut[: cut.rfind(b"\n") + 1] or cut
    text = cut.decode("utf-8", "ignore")
    note = (
        f"\n… diff shortened: the first {len(cut):,} bytes are shown; the patch download has "
        "the whole change\n"
    )
    return text + note, True


# --- reading for the builder and the patch series -------------------------------------------


def workspace_patch(*, tree: RunTree, head: str | None = None) -> str:
    """The run's change as a patch series (`git format-patch` mbox), base..head (default the
    savepoint: the approved work). `git am` applies it to the base."""
    upto = head or workspace_savepoint(tree=tree)
    return _out_raw(
        "format-patch",
        "--stdout",
        "--no-signature",
        "--no-renames",
        f"{tree.base}..{upto}",
        tree=tree,
    )


def workspace_patch_files(*, tree: RunTree, out_dir: Path, head: str | None = None) -> list[Path]:
    """The same series as one file per commit in `out_dir` (created)."""
    upto = head or workspace_savepoint(tree=tree)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _out(
        "format-patch",
        "--no-signature",
        "--no-renames",
        "-o",
        str(out_dir.resolve()),
        f"{tree.base}..{upto}",
        tree=tree,
    )
    return [Path(n) for n in names.splitlines() if n]


def _out_raw(*args: str, tree: RunTree) -> str:
    return _git(*args, tree=tree).stdout.decode("utf-8", "replace")


def workspace_files(*, tree: RunTree, limit: int = FILE_LIST_LIMIT) -> FileList:
    """The tracked files (git ls-files), at most `limit` of them, and how many there are."""
    return _file_list(_git("ls-files", "-z", tree=tree).stdout, limit)


def _file_list(raw: bytes, limit: int) -> FileList:
    paths = [p.decode("utf-8", "replace") for p in raw.split(b"\0") if p]
    return FileList(paths=tuple(paths[:limit]), total=len(paths))


def workspace_read(
    *,
    tree: RunTree,
    paths: Iterable[str],
    budget: int = READ_BUDGET,
    per_file: int = READ_FILE_LIMIT,
) -> list[FileText]:
    """The text of the named files for the builder's prompt, within `budget` characters in
    all and `per_file` each; a file that cannot be shown (missing, binary, outside, a
    symlink) is listed with the reason. The names come from the plan and earlier replies:
    they are checked like an edit's paths."""
    out: list[FileText] = []
    left = budget
    for raw in dict.fromkeys(paths):
        if problem := path_problem(raw):
            out.append(FileText(path=raw, text="", note=problem))
            continue
        path = "/".join(p for p in raw.split("/") if p not in ("", "."))
        try:
            st = _check_on_disk(tree.path, FileDelete(path=path))
        except EditError as exc:
            out.append(FileText(path=path, text="", note=str(exc).split(": ", 1)[-1]))
            continue
        if st is None:
            out.append(FileText(path=path, text="", note="does not exist"))
            continue
        if left <= 0:
            out.append(FileText(path=path, text="", note="not shown: the size budget is spent"))
            continue
        limit = min(per_file, left)
        with open(tree.path / path, "rb") as fh:
            data = fh.read(limit * 4 + 4)  # a character is at most 4 bytes of UTF-8
        if b"\0" in data:
            out.append(FileText(path=path, text="", note="binary"))
            continue
        text = data.decode("utf-8", "replace")
        note = ""
        if len(text) > limit or st.st_size > len(data):
            text = text[:limit]
            text = text[: text.rfind("\n") + 1] or text
            note = f"shortened: the first {len(text):,} characters of {st.st_size:,} bytes"
        left -= len(text)
        out.append(FileText(path=path, text=text, note=note))
    return out
