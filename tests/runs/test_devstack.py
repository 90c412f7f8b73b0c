"""`make run` (manage.py devstack): its embedded stack comes up, and goes down with it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

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
