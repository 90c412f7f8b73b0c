"""Run one check command of a plan (e.g. `python -m pytest -q`) in a run's workspace, sandboxed.

A check runs code a model wrote, so it runs in a bubblewrap sandbox (`bwrap`, Debian's
`bubblewrap`):

- no network: a network namespace of its own with only a loopback (PostgreSQL and Redis on the
  host's 127.0.0.1 are not there);
- the workspace is the only writable host directory, mounted at `/workspace`; `/usr` and the
  Python that runs Autopack are mounted read-only, `/` itself is read-only, `/tmp` (and `HOME`
  under it) is a private tmpfs. Not mounted at all: `/root` and `/home` (so `~/.ssh`), the
  Autopack project directory and its `.autopack/` state (the secret key file, the embedded
  database), `/etc` beyond the few files programs need (`_ETC`, so no `/etc/shadow` or ssh host
  keys), `/sys`, `/run`, `/var`;
- a clean environment built from nothing (`_environment`): none of the worker's variables, so
  never a provider key, `DJANGO_SECRET_KEY` or `DATABASE_URL`;
- no capabilities, no user namespaces inside, its own PID namespace: when the check's first
  process ends, or the worker kills the sandbox (timeout, stop) or dies itself
  (`--die-with-parent`), the kernel ends every process the check started;
- limits: `AUTOPACK_CHECK_TIMEOUT_SECONDS`, and memory and processes
  (`AUTOPACK_CHECK_MEMORY_MB`, `AUTOPACK_CHECK_MAX_PROCESSES`) from a cgroup of its own
  (runs.cgroups), with RLIMITs as a second line.

Python inside: the interpreter that runs Autopack — `sys.prefix` (the virtualenv) and
`sys.base_prefix` (the installation it was made from, e.g. `/root/.pyenv/versions/3.11.7`) —
mounted read-only at their own paths, first on `PATH`. So `python -m pytest` finds pytest and
the other packages of Autopack's virtualenv, and nothing can be installed (read-only, offline).
Only those two trees are mounted, not the home directory that holds them.

Where bubblewrap is missing or cannot make a sandbox, checks are not run and count as not
passed (`CheckOutcome.NOT_RUN`, with the reason and the fix): running model-written code with
the worker's rights is a choice a person makes, with `AUTOPACK_ALLOW_UNSANDBOXED_CHECKS=true`.
Then the command runs directly, with the same clean environment (a fresh private `HOME` and
`TMPDIR`), cgroup and RLIMIT limits, timeout and process-group kill — but with the worker's view
of the file system and network.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from .cgroups import CheckCgroup, cgroup_support

OUTPUT_LIMIT = 64 * 1024  # bytes of a check's output kept: the last part, where failures show
SANDBOX_WORKSPACE = "/workspace"
# The sandbox's own tmpfs, not the host's /tmp.
SANDBOX_TMP = "/tmp"  # noqa: S108
SANDBOX_HOME = "/tmp/home"  # noqa: S108
INSTALL_HINT = (
    "install it with apt-get install bubblewrap, or set AUTOPACK_ALLOW_UNSANDBOXED_CHECKS=true "
    "to run checks without a sandbox"
)
# What of /etc a check may read: the dynamic linker's cache, user and group names, time zone,
# host names (for localhost), TLS roots, Debian's alternatives symlinks. Not the rest: as the
# host's uid 0 the check could read root-only files such as /etc/shadow or ssh host keys.
_ETC = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "localtime",
    "timezone",
    "ssl/certs",  # not /etc/ssl/private
    "ssl/openssl.cnf",
    "ca-certificates",
    "ca-certificates.conf",
)
# Grace for the last output and the kernel's tear-down after the check's processes are killed.
_DRAIN_SECONDS = 5.0
# The wrapper that puts the check into its cgroup(s) before anything of it runs: writing `$$`
# moves the shell itself, and every process exec'd or forked after it inherits the cgroup.
# (Moving the check from the parent after it started would race with its first fork.)
_JOIN = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


class CheckOutcome(enum.StrEnum):
    PASSED = "passed"
    FAILED = "failed"  # exited non-zero (or was killed by a limit)
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"  # the caller asked to stop (a run's stop)
    NOT_RUN = "not_run"  # no sandbox and unsandboxed checks not allowed


@dataclass(frozen=True)
class CheckResult:
    command: str
    outcome: CheckOutcome
    exit_code: int | None  # None when not run, timed out or cancelled
    duration_s: float
    output: str  # the last OUTPUT_LIMIT bytes of stdout and stderr together, with a note if cut
    sandboxed: bool
    reason: str = ""  # why it did not pass other than its exit code: not run, time, limits

    @property
    def passed(self) -> bool:
        return self.outcome is CheckOutcome.PASSED

    @property
    def timed_out(self) -> bool:
        return self.outcome is CheckOutcome.TIMED_OUT

    @property
    def cancelled(self) -> bool:
        return self.outcome is CheckOutcome.CANCELLED


@dataclass(frozen=True)
class SandboxStatus:
    available: bool  # checks run in bubblewrap
    allow_unsandboxed: bool  # AUTOPACK_ALLOW_UNSANDBOXED_CHECKS
    bwrap: str | None  # the binary used
    reason: str  # why not available (empty when available)
    limits: str  # how memory and process limits are enforced here

    @property
    def checks_run(self) -> bool:
        return self.available or self.allow_unsandboxed

    def describe(self) -> str:
        """One line for the run's page and the worker's start."""
        if self.available:
            return f"checks run sandboxed ({self.bwrap}; limits: {self.limits})"
        if self.allow_unsandboxed:
            return (
                f"checks run WITHOUT a sandbox (AUTOPACK_ALLOW_UNSANDBOXED_CHECKS=true): "
                f"{self.reason}; limits: {self.limits}"
            )
        return f"checks are not run: {self.reason}"


def sandbox_status() -> SandboxStatus:
    """Whether checks can run sandboxed here, found once per process and bwrap setting."""
    probe = _probe(settings.AUTOPACK_CHECK_BWRAP)
    return SandboxStatus(
        available=probe.works,
        allow_unsandboxed=settings.AUTOPACK_ALLOW_UNSANDBOXED_CHECKS,
        bwrap=probe.bwrap,
        reason=probe.reason,
        limits=cgroup_support().describe(),
    )


@dataclass(frozen=True)
class _Probe:
    works: bool
    bwrap: str | None
    reason: str
    features: frozenset[str] = frozenset()  # options of newer bwraps used when present


@functools.lru_cache(maxsize=8)
def _probe(configured: str) -> _Probe:
    """Find bwrap and start one real sandbox with it: an installed bwrap may still fail (no
    user namespaces in a container, say), and then checks must not count as sandboxed."""
    found = shutil.which(configured) or (
        "/usr/bin/bwrap" if configured == "bwrap" and os.access("/usr/bin/bwrap", os.X_OK) else None
    )
    if found is None:
        return _Probe(False, None, f"bubblewrap is not installed ({INSTALL_HINT})")
    try:
        help_text = subprocess.run(
            [found, "--help"], capture_output=True, text=True, timeout=10
        ).stdout
        features = frozenset(f for f in ("--disable-userns", "--size") if f in help_text)
        with tempfile.TemporaryDirectory(prefix="autopack-probe-") as tmp:
            argv = _bwrap_argv(found, features, Path(tmp), "true", memory_bytes=1 << 26)
            done = subprocess.run(
                argv, env={}, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
            )
        problem = "" if done.returncode == 0 else (done.stderr or f"exit {done.returncode}")
    except (OSError, subprocess.SubprocessError) as exc:
        problem = str(exc)
    if problem:
        last = problem.strip().splitlines()[-1]
        return _Probe(
            False,
            found,
            f"bubblewrap ({found}) cannot make a sandbox here: {last} (set "
            "AUTOPACK_ALLOW_UNSANDBOXED_CHECKS=true to run checks without a sandbox)",
        )
    return _Probe(True, found, "", features)


def python_paths() -> list[str]:
    """The interpreter trees a check sees read-only: Autopack's virtualenv and its base."""
    paths: list[str] = []
    for prefix in (sys.prefix, sys.base_prefix):
        if prefix not in paths and not _covered(prefix):
            paths.append(prefix)
    return paths


def _covered(path: str) -> bool:
    return path == "/usr" or path.startswith("/usr/")


def _environment(*, home: str, tmp: str, bin_dirs: list[str]) -> dict[str, str]:
    """Built from nothing: no variable of the worker's ever reaches a check."""
    return {
        "PATH": ":".join([*bin_dirs, "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": home,
        "TMPDIR": tmp,
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ left in the workspace to be committed
        "PYTHONUNBUFFERED": "1",  # output in order, and all of it if the check is killed
        # pytest's cache would leave .pytest_cache/ in the workspace, and the next commit with it.
        "PYTEST_ADDOPTS": "-p no:cacheprovider",
        # The interpreter is Autopack's, whose test plugins (pytest-django, hypothesis,
        # schemathesis, ...) are no business of the checked project's and cost about a second
        # per check to load: only the plugins a project names with -p are loaded.
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }


def _bwrap_argv(
    bwrap: str, features: frozenset[str], workspace: Path, command: str, *, memory_bytes: int
) -> list[str]:
    argv = [
        bwrap,
        "--unshare-all",  # user, pid, net, ipc, uts, cgroup namespaces
        "--unshare-user",
        *(["--disable-userns"] if "--disable-userns" in features else []),
        "--die-with-parent",
        "--new-session",  # no TIOCSTI into a terminal the worker might have
        "--cap-drop",
        "ALL",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            argv += ["--ro-bind", str(path), str(path)]
    for name in _ETC:
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    if "--size" in features:
        argv += ["--size", str(memory_bytes)]
    argv += [
        "--tmpfs",
        SANDBOX_TMP,
        "--dir",
        SANDBOX_HOME,
        "--bind",
        str(workspace),
        SANDBOX_WORKSPACE,
    ]
    # After the private /tmp: an interpreter installed under /tmp (a clone of the project
    # there, its .venv with it) would otherwise be hidden by it, and `python` not found.
    for prefix in python_paths():
        argv += ["--ro-bind", os.path.realpath(prefix), prefix]
    argv += [
        "--chdir",
        SANDBOX_WORKSPACE,
        "--remount-ro",
        "/",
        "--clearenv",
    ]
    env = _environment(home=SANDBOX_HOME, tmp=SANDBOX_TMP, bin_dirs=[str(Path(sys.prefix) / "bin")])
    for key, value in env.items():
        argv += ["--setenv", key, value]
    return [*argv, "--", "/bin/sh", "-c", command]


def run_check(
    *,
    command: str,
    workspace: Path,
    timeout: float | None = None,
    should_cancel: Callable[[], bool] | None = None,
    poll_seconds: float = 0.25,
) -> CheckResult:
    """Run `command` with `/bin/sh -c` in `workspace`, sandboxed, and wait for it.

    `should_cancel` is called about every `poll_seconds` while the check runs (and whenever it
    writes output); when it returns true the check's processes are all killed and the result is
    CANCELLED. It may read the database, so keep `poll_seconds` at what a stop may wait.
    """
    timeout = settings.AUTOPACK_CHECK_TIMEOUT_SECONDS if timeout is None else timeout
    status = sandbox_status()
    if not status.checks_run:
        return CheckResult(
            command=command,
            outcome=CheckOutcome.NOT_RUN,
            exit_code=None,
            duration_s=0.0,
            output="",
            sandboxed=False,
            reason=f"not run: {status.reason}",
        )
    workspace = Path(os.path.realpath(workspace))
    if not workspace.is_dir():
        raise FileNotFoundError(f"workspace {workspace} is not a directory")
    memory_bytes = settings.AUTOPACK_CHECK_MEMORY_MB * 1024 * 1024
    max_pids = settings.AUTOPACK_CHECK_MAX_PROCESSES
    private: str | None = None  # HOME and TMPDIR of an unsandboxed check
    cgroup = CheckCgroup.create(memory_bytes=memory_bytes, max_pids=max_pids)
    try:
        if status.available:
            assert status.bwrap is not None
            features = _probe(settings.AUTOPACK_CHECK_BWRAP).features
            inner = _bwrap_argv(
                status.bwrap, features, workspace, command, memory_bytes=memory_bytes
            )
            env: dict[str, str] = {}  # bwrap sets the check's own (--clearenv, --setenv)
            cwd = "/"
        else:
            private = tempfile.mkdtemp(prefix="autopack-check-")
            home = Path(private) / "home"
            home.mkdir()
            env = _environment(
                home=str(home), tmp=private, bin_dirs=[str(Path(sys.prefix) / "bin")]
            )
            inner = ["/bin/sh", "-c", command]
            cwd = str(workspace)
        rlimits = _prlimit_argv(memory_bytes=memory_bytes, max_pids=max_pids)
        if cgroup is not None:
            argv = ["/bin/sh", "-c", _JOIN, "sh", *cgroup.procs_files, "--", *rlimits, *inner]
        else:
            argv = [*rlimits, *inner]
        return _supervise(
            argv,
            env=env,
            cwd=cwd,
            command=command,
            timeout=timeout,
            should_cancel=should_cancel,
            poll_seconds=poll_seconds,
            cgroup=cgroup,
            sandboxed=status.available,
            max_pids=max_pids,
        )
    finally:
        if cgroup is not None:
            cgroup.remove()
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def _prlimit_argv(*, memory_bytes: int, max_pids: int) -> list[str]:
    """RLIMITs, the second line where the cgroup is missing a controller; no core files always.

    RLIMIT_NPROC counts every process of the user, the worker's own too, and never binds root,
    so it stands in for `pids.max` only where there is none. The address space is capped only
    where no memory cgroup is, at twice the memory limit: address space over-counts memory
    (reserved but untouched pages, thread stacks), so the cap is loose but stops a runaway
    allocation."""
    prlimit = shutil.which("prlimit") or (
        "/usr/bin/prlimit" if os.access("/usr/bin/prlimit", os.X_OK) else None
    )
    if prlimit is None:
        return []
    limits = ["--core=0"]
    controllers = cgroup_support().controllers
    if "pids" not in controllers:
        limits.append(f"--nproc={max_pids}")
    if "memory" not in controllers:
        limits.append(f"--as={memory_bytes * 2}")
    return [prlimit, *limits, "--"]


def _supervise(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str,
    command: str,
    timeout: float,
    should_cancel: Callable[[], bool] | None,
    poll_seconds: float,
    cgroup: CheckCgroup | None,
    sandboxed: bool,
    max_pids: int,
) -> CheckResult:
    started = time.monotonic()
    deadline = started + timeout
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        # Its own process group: a stop or timeout kills the group, not the worker.
        start_new_session=True,
        close_fds=True,
    )
    assert proc.stdout is not None
    output = _Tail(proc.stdout.fileno())
    stopped: CheckOutcome | None = None
    finished = False
    try:
        # Until the check's first process exits, its time is up, or the caller cancels it.
        while proc.poll() is None:
            now = time.monotonic()
            if now >= deadline:
                stopped = CheckOutcome.TIMED_OUT
                break
            if should_cancel is not None and should_cancel():
                stopped = CheckOutcome.CANCELLED
                break
            wait = min(poll_seconds, deadline - now)
            if output.open:
                output.read(wait)
            else:  # it closed its output but runs on
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)
        # Nothing of it may live on: in the sandbox the PID namespace ends with its first
        # process anyway; without one, background processes would. The exit code is already
        # taken (poll reaped it), so this kill cannot change it.
        _kill_tree(proc, cgroup)
        drain_until = time.monotonic() + _DRAIN_SECONDS
        while output.open and time.monotonic() < drain_until:
            output.read(drain_until - time.monotonic())
        returncode = proc.wait()
        if cgroup is not None:
            while not cgroup.empty() and time.monotonic() < drain_until:
                cgroup.kill()
                time.sleep(0.01)
        finished = True
    finally:
        if not finished:  # an exception (in should_cancel, say): the check never outlives this
            _kill_tree(proc, cgroup)
        output.close()
        proc.stdout.close()
        proc.wait()
    duration = time.monotonic() - started
    reasons = []
    if stopped is CheckOutcome.TIMED_OUT:
        reasons.append(f"timed out after {timeout:g} s; its processes were killed")
    elif stopped is CheckOutcome.CANCELLED:
        reasons.append("cancelled (a stop was asked for); its processes were killed")
    hit = cgroup.limits_hit() if cgroup is not None else []
    if "pids" in hit:
        reasons.append(f"it reached the process limit ({max_pids}, AUTOPACK_CHECK_MAX_PROCESSES)")
    if "memory" in hit:
        reasons.append(
            f"it reached the memory limit ({settings.AUTOPACK_CHECK_MEMORY_MB} MB, "
            "AUTOPACK_CHECK_MEMORY_MB); a process was killed"
        )
    if not sandboxed:
        reasons.append("ran WITHOUT a sandbox (AUTOPACK_ALLOW_UNSANDBOXED_CHECKS=true)")
    if stopped is not None:
        outcome, exit_code = stopped, None
    else:
        # A check killed by a signal: the shell's convention, 128 + signal.
        exit_code = returncode if returncode >= 0 else 128 - returncode
        outcome = CheckOutcome.PASSED if exit_code == 0 else CheckOutcome.FAILED
    return CheckResult(
        command=command,
        outcome=outcome,
        exit_code=exit_code,
        duration_s=duration,
        output=output.text(),
        sandboxed=sandboxed,
        reason="; ".join(reasons),
    )


def _kill_tree(proc: subprocess.Popen[bytes], cgroup: CheckCgroup | None) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if cgroup is not None:
        cgroup.kill()


class _Tail:
    """The check's output as it arrives, keeping only the last OUTPUT_LIMIT bytes."""

    def __init__(self, fd: int) -> None:
        self.fd, self.total, self.open = fd, 0, True
        self.buffer = bytearray()
        os.set_blocking(fd, False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(fd, selectors.EVENT_READ)

    def read(self, wait: float) -> None:
        if not self.selector.select(max(0.0, wait)):
            return
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        if not chunk:  # every process that held the output has ended or closed it
            self.open = False
            self.selector.unregister(self.fd)
            return
        self.buffer += chunk
        self.total += len(chunk)
        if len(self.buffer) > 2 * OUTPUT_LIMIT:  # trim in batches, not on every read
            del self.buffer[:-OUTPUT_LIMIT]

    def close(self) -> None:
        self.selector.close()

    def text(self) -> str:
        kept = bytes(self.buffer[-OUTPUT_LIMIT:])
        text = kept.decode("utf-8", errors="replace")
        if self.total > len(kept):
            return (
                f"[output cut: the first {self.total - len(kept):,} of {self.total:,} bytes are "
                f"not kept; the last {len(kept) // 1024} KB follow]\n{text}"
            )
        return text
