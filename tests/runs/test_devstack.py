"""`make run` (manage.py devstack): its embedded stack comes up, and goes down with it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _group(pgid: int) -> set[int]:
    """The processes alive in a process group, read from /proc."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        # After the command name: state, ppid, pgrp; a zombie has exited already.
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.add(int(entry.name))
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_the_dev_stack_stops_its_worker_web_server_and_simulator_when_it_is_killed(
    tmp_path: Path, signum: int
) -> None:
    # The embedded defaults of `make run`: SQLite and a file broker under the state folder.
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env["AUTOPACK_STATE_DIR"] = str(tmp_path)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "devstack", "--addr", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, which the test watches
    )
    up = threading.Event()
    output: list[bytes] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if b"Autopack is up" in line:
                up.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert up.wait(90), b"".join(output)[-3000:].decode(errors="replace")
        _wait_for_port(port)  # the web server answers
        children = _group(proc.pid) - {proc.pid}
        assert len(children) >= 3  # simulator, Celery worker (and its pool), web server
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 128 + signum
        deadline = time.monotonic() + 30
        while _group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group(proc.pid), b"".join(output)[-3000:].decode(errors="replace")
    finally:
        if _group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# --- issue 12, item 4: nothing is left behind, and one stack per state folder -------------------


class Devstack:
    """`manage.py devstack` as `make run` starts it, in its own process group (which the test
    watches), its output collected."""

    def __init__(self, state_dir: Path, port: int, *args: str) -> None:
        env = {
            k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")
        }
        env["AUTOPACK_STATE_DIR"] = str(state_dir)
        self.addr, self.env = f"127.0.0.1:{port}", env
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "devstack", "--addr", self.addr, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.up, self.eof = threading.Event(), threading.Event()
        self.lines: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if b"Autopack is up" in line:
                self.up.set()
        self.eof.set()

    @property
    def output(self) -> str:
        return b"".join(self.lines).decode(errors="replace")

    def wait_up(self) -> set[int]:
        """Wait until the stack answers; returns the pids of its processes but its own."""
        assert self.up.wait(90), self.output[-3000:]
        _wait_for_port(int(self.addr.rsplit(":", 1)[1]))
        return _group(self.proc.pid) - {self.proc.pid}

    def wait_output(self, timeout: float = 30) -> str:
        """The whole output, once the process has exited and its pipe is drained."""
        self.proc.wait(timeout=timeout)
        self.eof.wait(10)  # its children share the pipe, and may hold it a moment longer
        return self.output

    def clean_up(self) -> None:
        if _group(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def _alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie has exited)."""
    alive = set()
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _cmdline(pid: int) -> list[str]:
    return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")


def _wait_gone(pids: set[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pids), {pid: _cmdline(pid) for pid in _alive(pids)}


@pytest.mark.slow
def test_a_dev_stack_killed_with_sigkill_takes_every_process_with_it_and_the_next_start_cleans_up(
    tmp_path: Path,
) -> None:
    port = _free_port()
    first = Devstack(tmp_path, port)
    second: Devstack | None = None
    try:
        children = first.wait_up()
        assert len(children) >= 3  # simulator, worker (its pool), beat, web server
        # Started with no delay given: the demo's pace, and how to change it, are said.
        assert (
            "pace: each simulated call takes 8s (the example run lasts a few minutes at 8s); "
            "change it with --sim-delay or AUTOPACK_SIM_DELAY"
        ) in first.output
        os.kill(first.proc.pid, signal.SIGKILL)  # nothing of it runs: no finally, no handler
        assert first.proc.wait(timeout=10) == -signal.SIGKILL
        _wait_gone(children)

        second = Devstack(tmp_path, port)  # the same state folder, the same address
        second.wait_up()
        assert f"devstack pid {first.proc.pid}" in second.output
        assert "ended without cleaning up" in second.output
    finally:
        first.clean_up()
        if second is not None:
            second.clean_up()


@pytest.mark.slow
def test_a_worker_killed_with_sigkill_leaves_no_beat_behind_and_the_dev_stack_says_so_and_stops(
    tmp_path: Path,
) -> None:
    stack = Devstack(tmp_path, _free_port())
    try:
        stack.wait_up()
        # Beat and the worker's pool come up after the web server answers.
        wait_for(lambda: "beat: Starting" in stack.output, what="beat to start")
        wait_for(lambda: " ready." in stack.output, what="the worker to be ready")
        children = _group(stack.proc.pid) - {stack.proc.pid}
        workers = [
            pid
            for pid in children
            if _cmdline(pid)[2:5] == ["celery", "-A", "autopack_site"]
            and "worker" in _cmdline(pid)
            and _parent(pid) == stack.proc.pid
        ]
        assert len(workers) == 1, {pid: _cmdline(pid) for pid in children}
        os.kill(workers[0], signal.SIGKILL)
        output = stack.wait_output(timeout=60)
        _wait_gone(children)  # the beat among them
        assert stack.proc.returncode == 1
        assert f"the worker (pid {workers[0]}) was killed by SIGKILL" in output
    finally:
        stack.clean_up()


@pytest.mark.slow
def test_a_second_dev_stack_says_what_is_running_and_exits_without_touching_the_first(
    tmp_path: Path,
) -> None:
    port = _free_port()
    first = Devstack(tmp_path, port)
    second: Devstack | None = None
    try:
        children = first.wait_up()
        second = Devstack(tmp_path, port)
        output = second.wait_output(timeout=60)
        assert second.proc.returncode != 0
        assert "Autopack is already running" in output
        assert f"devstack pid {first.proc.pid}" in output and f"http://{first.addr}/" in output
        assert "nothing was started" in output
        # It started nothing, and the first runs on as it was.
        assert not _group(second.proc.pid)
        assert _alive(children) == children and first.proc.poll() is None
        _wait_for_port(port, timeout=5)
    finally:
        first.clean_up()
        if second is not None:
            second.clean_up()


def _parent(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def _phase_states(state_dir: Path) -> list[str]:
    with sqlite3.connect(state_dir / "db.sqlite3", timeout=10) as db:
        return [s for (s,) in db.execute("SELECT state FROM runs_phase ORDER BY position")]


def _run_state(state_dir: Path) -> str:
    with sqlite3.connect(state_dir / "db.sqlite3", timeout=10) as db:
        (state,) = db.execute("SELECT state FROM runs_run").fetchone()
        return str(state)


@pytest.mark.slow
def test_ctrl_c_in_the_middle_of_a_phase_stops_at_once_and_the_next_start_carries_the_run_on(
    tmp_path: Path,
) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "name: Interrupted\ntiers:\n  - name: T\n    phases:\n"
        "      - {name: First, category: ui, complexity: low}\n"
        "      - {name: Second, category: ui, complexity: low}\n"
    )
    port = _free_port()
    first = Devstack(tmp_path, port, "--sim-delay", "2")
    second: Devstack | None = None
    try:
        children = first.wait_up()
        wait_for(lambda: " ready." in first.output, what="the worker to be ready")
        subprocess.run(
            [sys.executable, "manage.py", "start_run", str(plan)],
            cwd=ROOT,
            env=first.env,
            check=True,
            capture_output=True,
        )
        wait_for(lambda: "building" in _phase_states(tmp_path), what="a phase to be building")
        # Ctrl-C in a terminal signals the whole foreground process group.
        os.killpg(first.proc.pid, signal.SIGINT)
        # At once, not after the phase: the simulator is gone, so finishing the phase would
        # only retry dead calls (a warm worker shutdown held the stack up for 15 s).
        _wait_gone(children | {first.proc.pid}, timeout=5)
        # Stopping the stack is not a failure of the run: its phase waits for the next start.
        assert _run_state(tmp_path) == "running", first.output[-3000:]

        # A delay of its own: the demo's default pace would make this test minutes long.
        second = Devstack(tmp_path, port, "--sim-delay", "1.5")
        second.wait_up()
        wait_for(
            lambda: _run_state(tmp_path) in ("completed", "failed"),
            timeout=120,
            what="the run to finish after the restart",
        )
        assert _run_state(tmp_path) == "completed", second.output[-3000:]
        assert _phase_states(tmp_path) == ["complete", "complete"]
    finally:
        first.clean_up()
        if second is not None:
            second.clean_up()


@pytest.mark.slow
def test_make_run_starts_the_simulator_with_the_demo_fault_rates_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOPACK_SIM_EDIT_MISS_RATE", "0.25")
    monkeypatch.delenv("AUTOPACK_SIM_EDIT_MALFORMED_RATE", raising=False)
    monkeypatch.delenv("AUTOPACK_SIM_CHECK_FAIL_RATE", raising=False)
    stack = Devstack(tmp_path, _free_port())
    try:
        stack.wait_up()
        url = re.search(r"simulated provider: (http://\S+)", stack.output)
        assert url, stack.output[-3000:]
        # Always the local http:// simulator the stack started.
        config_url = f"{url.group(1)}/_sim/config"
        with urllib.request.urlopen(config_url, timeout=10) as response:  # noqa: S310
            config = json.loads(response.read())
        assert config["edit_miss_rate"] == 0.25
        assert config["edit_malformed_rate"] == config["check_fail_rate"] == 0.1
    finally:
        stack.clean_up()
