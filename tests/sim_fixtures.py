"""Pytest plugin: the simulated provider as a real subprocess (tests/conftest.py loads it).

`sim_server` (session) starts `python -m simulator` once; `sim` (function) resets it
and points the provider env vars at it, so every test starts from the startup config with an
empty request log and no queued rules.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routing.providers import Endpoint, make_endpoint
from simulator import simulated_provider_env

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"listening on (http://\S+)")
KEY_ENVS = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "google_gemini": "GEMINI_API_KEY",
    "glm": "GLM_API_KEY",
}


class SimulatorError(AssertionError):
    """The simulator refused a control request (the message is its answer)."""


class SimulatedProvider:
    """Handle on the running simulator: its URL and its /_sim/ control API."""

    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url

    def control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 - always the local http:// simulator
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise SimulatorError(f"{method} {path}: {exc.code} {exc.read().decode()}") from None

    def reset(self) -> None:
        self.control("POST", "/_sim/reset", {})

    def release(self) -> None:
        """Answer the calls sleeping out their delay now (a held call ends)."""
        self.control("POST", "/_sim/release", {})

    def configure(self, **config: Any) -> dict[str, Any]:
        return self.control("POST", "/_sim/config", config)

    def add_fault(self, **rule: Any) -> dict[str, Any]:
        return self.control("POST", "/_sim/faults", rule)

    def add_script(self, **rule: Any) -> dict[str, Any]:
        return self.control("POST", "/_sim/script", rule)

    def requests(self) -> list[dict[str, Any]]:
        """The model calls it answered (or refused), oldest first."""
        return self.control("GET", "/_sim/requests")

    def usage_requests(self) -> list[dict[str, Any]]:
        """The reads of its providers' usage APIs (role "usage_api"), oldest first."""
        return self.control("GET", "/_sim/usage_requests")

    def base_url(self, name: str) -> str:
        env = simulated_provider_env(self.url)
        # Any other provider name is OpenAI-compatible; the simulator answers it like OpenAI.
        return env.get(f"AUTOPACK_{name.upper()}_BASE_URL", f"{self.url}/{name}/v1")

    def provider_config(self, name: str) -> Endpoint:
        """The endpoint of provider `name` on the simulator (any other name: compatible)."""
        key_env = KEY_ENVS.get(name, f"{name.upper()}_API_KEY")
        return make_endpoint(name=name, api_key_env=key_env, base_url=self.base_url(name))


def _start() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--port", "0", "--delay", "0", "--seed", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    found: list[str] = []

    def read_ready_line() -> None:
        assert proc.stdout is not None
        if match := READY.search(proc.stdout.readline()):
            found.append(match.group(1))

    # readline() blocks, so it runs in a thread and the wait below can time out.
    reader = threading.Thread(target=read_ready_line, daemon=True)
    reader.start()
    reader.join(timeout=20)
    if not found:
        proc.kill()
        proc.wait(timeout=5)
        raise RuntimeError("the simulated provider did not print its listening line within 20s")
    return proc, found[0]


@pytest.fixture(scope="session")
def sim_server() -> Iterator[SimulatedProvider]:
    yield from started_simulator()


def started_simulator() -> Iterator[SimulatedProvider]:
    """A simulated provider process of its own, answering, until the generator is closed: the
    session's (sim_server), or a module's that no other test's leftover worker can call."""
    proc, url = _start()
    server = SimulatedProvider(proc, url)
    deadline = time.monotonic() + 10
    while True:  # listening is printed after bind; make sure requests are answered too
        try:
            server.control("GET", "/_sim/health")
            break
        except (OSError, SimulatorError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@pytest.fixture
def sim(sim_server: SimulatedProvider, monkeypatch: pytest.MonkeyPatch) -> SimulatedProvider:
    return pointed_at(sim_server, monkeypatch)


def pointed_at(server: SimulatedProvider, monkeypatch: pytest.MonkeyPatch) -> SimulatedProvider:
    """`server` reset, and this process's providers pointed at it (fake keys included)."""
    server.reset()
    for name, value in simulated_provider_env(server.url).items():
        monkeypatch.setenv(name, value)
    return server


# --- scripted builder replies -------------------------------------------------------------------


def edit_reply(*edits: Any, note: str = "Done: the change is in the blocks above.") -> str:
    """A builder reply in Autopack's edit format (runs.edits) carrying `edits` (FileWrite,
    TextReplace, FileDelete), followed by `note` as its commentary. `sim.add_script(role=
    "builder", text=edit_reply(...))` scripts a builder whose change applies."""
    from runs.edits import format_edits

    return format_edits(list(edits)) + "\n" + note + "\n"


def write_reply(files: dict[str, str], *, note: str = "Done.") -> str:
    """A reply that writes each path of `files` whole with its content."""
    from runs.edits import FileWrite

    return edit_reply(*(FileWrite(path=p, content=c) for p, c in files.items()), note=note)
