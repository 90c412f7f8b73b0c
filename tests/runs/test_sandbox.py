"""Checks run in a real bubblewrap sandbox, as real processes (runs.sandbox).

Needs `bwrap` (Debian's bubblewrap; `make test` installs it where it can). In CI (CI=true) a
missing or broken bubblewrap fails these tests; elsewhere they are skipped with the fix.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from runs.cgroups import cgroup_support
from runs.sandbox import OUTPUT_LIMIT, CheckOutcome, run_check, sandbox_status
from tests.conftest import IN_CI, ROOT, wait_for

FAKE_OPENAI_KEY = "sk-fake-openai-key-for-the-sandbox-test-31337"
FAKE_SECRET_KEY = "fake-django-secret-key-for-the-sandbox-test-31337"


@pytest.fixture
def bwrap() -> None:
    status = sandbox_status()
    if not status.available:
        if IN_CI:
            pytest.fail(f"CI needs bubblewrap: {status.reason}")
        pytest.skip(status.reason)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    return path


@pytest.fixture
def no_bwrap(settings) -> None:
    # A bwrap that is not there: the same code path as a machine without bubblewrap.
    settings.AUTOPACK_CHECK_BWRAP = "/nonexistent/autopack-test/bwrap"


def processes_with(marker: str) -> list[int]:
    """Live processes (any PID namespace) whose command line carries the marker."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue  # ended meanwhile
    return found


def sleeper(marker: str) -> str:
    """A shell word that runs a process which never ends and names the marker."""
    return f"python -c 'import time; time.sleep(3600)' {marker}"


def write_project(workspace: Path, *, passing: bool) -> None:
    (workspace / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    expected = 3 if passing else 4
    (workspace / "test_calc.py").write_text(
        f"from calc import add\n\n\ndef test_add():\n    assert add(1, 2) == {expected}\n"
    )


def test_a_passing_check_reports_exit_code_zero_and_its_output(
    bwrap: None, workspace: Path
) -> None:
    write_project(workspace, passing=True)

    result = run_check(command="python -m pytest -q", workspace=workspace, timeout=120)

    assert result.outcome is CheckOutcome.PASSED, result
    assert (result.passed, result.exit_code, result.sandboxed) == (True, 0, True)
    assert "1 passed" in result.output
    assert not result.timed_out and not result.cancelled and result.reason == ""
    # Nothing but the project is left in the workspace (no caches, no bytecode).
    assert sorted(p.name for p in workspace.iterdir()) == ["calc.py", "test_calc.py"]


def test_a_failing_check_reports_its_exit_code_and_the_failure_in_its_output(
    bwrap: None, workspace: Path
) -> None:
    write_project(workspace, passing=False)

    result = run_check(command="python -m pytest -q", workspace=workspace, timeout=120)

    assert result.outcome is CheckOutcome.FAILED
    assert (result.passed, result.exit_code) == (False, 1)
    assert "1 failed" in result.output and "assert 3 == 4" in result.output


def test_long_output_keeps_only_its_last_part_with_a_note(bwrap: None, workspace: Path) -> None:
    command = "python -c \"print('x' * 300000); print('the end')\"; exit 2"

    result = run_check(command=command, workspace=workspace, timeout=60)

    assert result.exit_code == 2
    note, _, kept = result.output.partition("\n")
    assert note.startswith("[output cut: the first ") and "of 300,009 bytes" in note
    assert kept.endswith("the end\n") and len(kept.encode()) == OUTPUT_LIMIT


def test_a_check_that_never_ends_is_killed_at_the_timeout_with_all_its_processes(
    bwrap: None, workspace: Path
) -> None:
    marker = f"never-ends-{uuid.uuid4().hex}"
    # A child in the background, a grandchild in its own session, and the foreground process.
    command = f"{sleeper(marker)} & setsid {sleeper(marker)} & {sleeper(marker)}"

    result = run_check(command=command, workspace=workspace, timeout=2)

    assert result.outcome is CheckOutcome.TIMED_OUT
    assert (result.timed_out, result.passed, result.exit_code) == (True, False, None)
    assert "timed out after 2 s" in result.reason
    assert 2 <= result.duration_s < 30
    wait_for(lambda: not processes_with(marker), timeout=10, what="the check's processes to end")


def test_a_fork_bomb_stops_at_the_process_limit_and_the_machine_stays_usable(
    bwrap: None,
    workspace: Path,
    settings,
) -> None:
    if "pids" not in cgroup_support().controllers and os.geteuid() == 0:
        message = "no pids cgroup here, and RLIMIT_NPROC does not bind root"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    settings.AUTOPACK_CHECK_MAX_PROCESSES = 40
    marker = f"fork-bomb-{uuid.uuid4().hex}"
    # Bounded on purpose: tries 200 children (5× the limit), each sleeping, and reports how
    # many it got. A real bomb would not stop where the limit failed to hold.
    (workspace / "bomb.py").write_text(
        textwrap.dedent(
            f"""
            import subprocess, sys
            started = 0
            try:
                for _ in range(200):
                    sleep = "import time; time.sleep(3600)"
                    subprocess.Popen([sys.executable, "-c", sleep, "{marker}"])
                    started += 1
            except OSError as exc:
                print("fork failed:", exc)
            print("started", started)
            """
        )
    )

    result = run_check(command="python bomb.py", workspace=workspace, timeout=60)

    assert "fork failed" in result.output, result.output
    started = int(result.output.split("started ")[-1].split()[0])
    assert 0 < started < 40
    assert "reached the process limit (40" in result.reason
    wait_for(lambda: not processes_with(marker), timeout=10, what="the children to end")
    # The machine and the sandbox still work.
    assert run_check(command="true", workspace=workspace, timeout=60).passed


def test_a_check_over_its_memory_limit_is_killed(
    bwrap: None,
    workspace: Path,
    settings,
) -> None:
    settings.AUTOPACK_CHECK_MEMORY_MB = 64
    command = "python -c \"x = [bytearray(1 << 20) for _ in range(512)]; print('survived')\""

    result = run_check(command=command, workspace=workspace, timeout=60)

    assert not result.passed and "survived" not in result.output
    if "memory" in cgroup_support().controllers:
        assert "reached the memory limit (64 MB" in result.reason


def test_a_check_cannot_write_outside_its_workspace(bwrap: None, workspace: Path) -> None:
    name = f"autopack-sandbox-{uuid.uuid4().hex}"
    targets = [
        Path("/etc") / name,
        Path("/usr") / name,
        ROOT / name,
        Path(settings.STATE_DIR) / name,
        Path(settings.BASE_DIR) / "runs" / name,
    ]
    writes = "; ".join(f"echo x > {t} || echo refused {t}" for t in targets)
    command = f"{writes}; echo x > /tmp/{name} && echo x > /workspace/{name} && echo inside"
    readme_before = (ROOT / "README.md").read_bytes()

    result = run_check(command=f"{command}; echo x >> {ROOT}/README.md", workspace=workspace)

    for target in targets:
        assert not target.exists()
        # Refused, unless it is under /tmp (a clone of the project there): then the write went
        # to the sandbox's own /tmp, which the check above shows is not the host's.
        if not target.is_relative_to("/tmp"):
            assert f"refused {target}" in result.output
    assert "inside" in result.output
    assert (workspace / name).read_text() == "x\n"  # the workspace is writable
    assert not (Path("/tmp") / name).exists()  # the sandbox's /tmp is its own
    assert (ROOT / "README.md").read_bytes() == readme_before


def test_a_check_finds_no_keys_in_its_environment_nor_in_home_or_the_state_dir(
    bwrap: None, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_OPENAI_KEY)
    monkeypatch.setenv("DJANGO_SECRET_KEY", FAKE_SECRET_KEY)
    monkeypatch.setenv("DATABASE_URL", "postgres://postgres:fake-password-31337@127.0.0.1/x")
    state = Path(settings.STATE_DIR)
    command = "; ".join(
        [
            "env",
            "cat /proc/*/environ",
            "ls -a ~ /root /home",
            "test -e /root/.ssh && echo ssh-dir-visible",
            "cat ~/.ssh/* /root/.ssh/*",
            f"ls -a {ROOT} {state}",
            f"cat {state}/secret_key {ROOT}/.env",
            "cat /etc/shadow /etc/ssh/ssh_host_*_key /etc/ssl/private/*",
            "test -e /etc/ssl/private && echo ssl-private-visible",
            "echo done",
        ]
    )

    result = run_check(command=command, workspace=workspace, timeout=60)

    assert "done" in result.output
    for secret in (FAKE_OPENAI_KEY, FAKE_SECRET_KEY, "fake-password-31337", "PRIVATE KEY"):
        assert secret not in result.output
    for name in ("OPENAI_API_KEY", "DJANGO_SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL"):
        assert f"{name}=" not in result.output
    assert "ssh-dir-visible" not in result.output and "ssl-private-visible" not in result.output
    assert "HOME=/tmp/home" in result.output
    if (state / "secret_key").exists():
        assert (state / "secret_key").read_text().strip() not in result.output
    # Only the read-only interpreter tree is under /work/main, not the project.
    assert "manage.py" not in result.output and "README.md" not in result.output


def test_a_check_cannot_open_a_network_connection(bwrap: None, workspace: Path) -> None:
    for port in (5432, 6379):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=3).close()
        except OSError:
            pytest.skip(f"nothing listens on 127.0.0.1:{port} here to be kept from")
    (workspace / "net.py").write_text(
        textwrap.dedent(
            """
            import socket
            for host, port in [("127.0.0.1", 5432), ("127.0.0.1", 6379), ("1.1.1.1", 443)]:
                try:
                    socket.create_connection((host, port), timeout=3).close()
                    print("connected", host, port)
                except OSError as exc:
                    print("refused", host, port, type(exc).__name__)
            """
        )
    )

    result = run_check(command="python net.py", workspace=workspace, timeout=60)

    assert "connected" not in result.output, result.output
    for target in ("127.0.0.1 5432", "127.0.0.1 6379", "1.1.1.1 443"):
        assert f"refused {target}" in result.output


def test_cancel_during_a_check_ends_its_whole_process_tree(bwrap: None, workspace: Path) -> None:
    marker = f"cancelled-{uuid.uuid4().hex}"
    command = f"{sleeper(marker)} & (setsid {sleeper(marker)} &) ; {sleeper(marker)}"
    stop = threading.Event()

    def stop_when_running() -> None:
        wait_for(lambda: len(processes_with(marker)) >= 3, timeout=60, what="the check to run")
        stop.set()

    stopper = threading.Thread(target=stop_when_running)
    stopper.start()
    result = run_check(
        command=command,
        workspace=workspace,
        timeout=120,
        should_cancel=stop.is_set,
        poll_seconds=0.05,
    )
    stopper.join()

    assert result.outcome is CheckOutcome.CANCELLED
    assert (result.cancelled, result.passed, result.exit_code) == (True, False, None)
    assert "cancelled" in result.reason and result.duration_s < 60
    wait_for(lambda: not processes_with(marker), timeout=10, what="the check's processes to end")


def test_a_checks_processes_end_when_the_worker_running_it_is_killed(
    bwrap: None, workspace: Path
) -> None:
    marker = f"worker-killed-{uuid.uuid4().hex}"
    command = f"{sleeper(marker)} & (setsid {sleeper(marker)} &) ; {sleeper(marker)}"
    worker_side = (
        "import sys, django; django.setup()\n"
        "from pathlib import Path\n"
        "from runs.sandbox import run_check\n"
        "run_check(command=sys.argv[2], workspace=Path(sys.argv[1]), timeout=600)\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "autopack_site.settings"}
    worker = subprocess.Popen(
        [sys.executable, "-c", worker_side, str(workspace), command], cwd=ROOT, env=env
    )
    try:
        wait_for(lambda: len(processes_with(marker)) >= 3, timeout=60, what="the check to run")
    finally:
        worker.send_signal(signal.SIGKILL)  # as a worker dies: no clean-up of its own
        worker.wait()

    wait_for(lambda: not processes_with(marker), timeout=10, what="the check's processes to end")


def test_checks_find_python_when_autopack_itself_runs_from_a_folder_under_tmp(
    bwrap: None, workspace: Path, tmp_path: Path
) -> None:
    # A clone of the project under /tmp brings its .venv there; the sandbox's own /tmp must
    # not hide that interpreter from the checks.
    under_tmp = tmp_path / "clone-venv"
    under_tmp.symlink_to(sys.prefix)
    assert str(under_tmp).startswith("/tmp/")
    worker_side = (
        "import sys, django; django.setup()\n"
        "from pathlib import Path\n"
        "from runs.sandbox import run_check\n"
        "result = run_check(command='python -c \"print(6 * 7)\"', workspace=Path(sys.argv[1]))\n"
        "print(sys.prefix, result.outcome, result.exit_code, result.output.strip())\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "autopack_site.settings"}
    done = subprocess.run(
        [str(under_tmp / "bin" / "python"), "-c", worker_side, str(workspace)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(under_tmp), "passed", "0", "42"], done.stdout


def test_without_bubblewrap_a_check_is_not_run_and_says_how_to_fix_it(
    no_bwrap: None, workspace: Path
) -> None:
    status = sandbox_status()
    assert not status.available and not status.checks_run
    assert status.describe().startswith("checks are not run: bubblewrap is not installed")

    result = run_check(command="touch ran", workspace=workspace, timeout=60)

    assert result.outcome is CheckOutcome.NOT_RUN
    assert (result.passed, result.exit_code, result.sandboxed) == (False, None, False)
    assert result.reason == (
        "not run: bubblewrap is not installed (install it with apt-get install bubblewrap, or "
        "set AUTOPACK_ALLOW_UNSANDBOXED_CHECKS=true to run checks without a sandbox)"
    )
    assert not (workspace / "ran").exists()


def test_a_bubblewrap_that_cannot_make_a_sandbox_counts_as_missing(
    settings,
    workspace: Path,
) -> None:
    settings.AUTOPACK_CHECK_BWRAP = "/bin/false"

    result = run_check(command="touch ran", workspace=workspace, timeout=60)

    assert result.outcome is CheckOutcome.NOT_RUN
    assert "bubblewrap (/bin/false) cannot make a sandbox here" in result.reason
    assert not (workspace / "ran").exists()


def test_allowed_unsandboxed_checks_run_with_a_clean_environment_and_say_so(
    no_bwrap: None,
    workspace: Path,
    settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.AUTOPACK_ALLOW_UNSANDBOXED_CHECKS = True
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_OPENAI_KEY)
    monkeypatch.setenv("DJANGO_SECRET_KEY", FAKE_SECRET_KEY)
    write_project(workspace, passing=True)
    assert sandbox_status().describe().startswith("checks run WITHOUT a sandbox")

    result = run_check(command="env; pwd; python -m pytest -q", workspace=workspace, timeout=120)

    assert result.outcome is CheckOutcome.PASSED, result
    assert (result.sandboxed, result.exit_code) == (False, 0)
    assert "ran WITHOUT a sandbox" in result.reason
    assert "1 passed" in result.output and f"\n{workspace.resolve()}\n" in result.output
    assert FAKE_OPENAI_KEY not in result.output and FAKE_SECRET_KEY not in result.output
    home = next(line for line in result.output.splitlines() if line.startswith("HOME="))
    assert home != f"HOME={os.environ.get('HOME')}" and "autopack-check-" in home
    assert not Path(home.removeprefix("HOME=")).exists()  # its private HOME is removed


def test_allowed_unsandboxed_checks_still_end_their_whole_process_tree_at_the_timeout(
    no_bwrap: None,
    workspace: Path,
    settings,
) -> None:
    settings.AUTOPACK_ALLOW_UNSANDBOXED_CHECKS = True
    marker = f"unsandboxed-{uuid.uuid4().hex}"
    command = f"{sleeper(marker)} & {sleeper(marker)}"

    result = run_check(command=command, workspace=workspace, timeout=2)

    assert result.outcome is CheckOutcome.TIMED_OUT and not result.sandboxed
    wait_for(lambda: not processes_with(marker), timeout=10, what="the check's processes to end")
