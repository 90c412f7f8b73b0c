"""Test set-up: real PostgreSQL, Redis, Celery worker processes and the simulated provider.

In CI (CI=true) a missing service fails the session; elsewhere the tests that need it are
skipped with a message saying how to start it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.conf import settings

from simulator import simulated_provider_env

pytest_plugins = ["tests.sim_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HOW_TO_START = {
    "postgres": "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) "
    "main start   (and run tests via `make test`, which sets DATABASE_URL)",
    "redis": 'start it with: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" '
    "--appendonly no   (and run tests via `make test`, which sets CELERY_BROKER_URL)",
}


def _postgres_problem() -> str | None:
    db = settings.DATABASES["default"]
    if db["ENGINE"] != "django.db.backends.postgresql":
        return "DATABASE_URL does not point at PostgreSQL"
    try:
        import psycopg

        psycopg.connect(
            host=db.get("HOST") or "127.0.0.1",
            port=db.get("PORT") or 5432,
            user=db.get("USER") or "postgres",
            password=db.get("PASSWORD") or None,
            dbname="postgres",
            connect_timeout=3,
        ).close()
    except Exception as exc:
        return f"PostgreSQL is not reachable ({exc.__class__.__name__})"
    return None


def _redis_problem() -> str | None:
    url = settings.CELERY_BROKER_URL
    if not url.startswith("redis://"):
        return "CELERY_BROKER_URL does not point at Redis"
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except Exception as exc:
        return f"Redis is not reachable ({exc.__class__.__name__})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problems = {"postgres": _postgres_problem(), "redis": _redis_problem()}
    for service, problem in problems.items():
        if problem and IN_CI:
            pytest.exit(f"CI needs {service}: {problem}", returncode=3)
    for item in items:
        needs_db = item.get_closest_marker("django_db") is not None or any(
            f in getattr(item, "fixturenames", ()) for f in ("db", "transactional_db")
        )
        needs_worker = "celery_worker" in getattr(item, "fixturenames", ()) or (
            item.get_closest_marker("needs_broker") is not None
        )
        if needs_db and problems["postgres"]:
            item.add_marker(
                pytest.mark.skip(reason=f"{problems['postgres']}; {HOW_TO_START['postgres']}")
            )
        if needs_worker and problems["redis"]:
            item.add_marker(
                pytest.mark.skip(reason=f"{problems['redis']}; {HOW_TO_START['redis']}")
            )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_broker: the test sends tasks through Redis")


def wait_for(
    predicate: Callable[[], Any],
    *,
    timeout: float = 60,
    interval: float = 0.1,
    what: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class WorkerProcess:
    """A real `celery worker` process against the test database and the test broker."""

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        name: str,
        pool: str = "solo",
        beat: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.env, self.name, self.pool, self.beat = env, name, pool, beat
        self.extra_args = list(extra_args)
        self.log_path = log_dir / f"worker-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> WorkerProcess:
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "autopack_site",
            "worker",
            "--pool",
            self.pool,
            "--concurrency",
            "1",
            "-n",
            f"{self.name}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ]
        if self.beat:
            cmd += ["-B", "-s", str(self.log_path.with_suffix(".beat"))]
        cmd += self.extra_args
        # The log is appended to across sessions: readiness is looked for after this start.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            wait_for(self._ready, timeout=60, what=f"worker {self.name} to be ready")
        return self

    def _ready(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"worker {self.name} exited: {self.log_path.read_text()[-3000:]}")
        return b" ready." in self.log_path.read_bytes()[self._log_offset :]

    def kill(self) -> None:
        """SIGKILL the whole worker, as when a machine dies: nothing gets to clean up."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if hasattr(self, "_log"):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session", autouse=True)
def notification_listener(django_db_setup: None) -> Iterator[None]:
    """The status poll's notification connection (runs.pollcache) is closed before the test
    database is dropped, which an open session would block."""
    yield
    from runs.pollcache import LISTENER

    LISTENER.close()


@pytest.fixture(scope="session")
def worker_log_dir() -> Iterator[Path]:
    base = ROOT / "test-artifacts" / "workers"
    base.mkdir(parents=True, exist_ok=True)
    yield base


@pytest.fixture
def worker_env(django_db_setup: None, sim_server: Any, tmp_path: Path) -> dict[str, str]:
    """The environment a worker process needs to share this test's database and broker."""
    db = settings.DATABASES["default"]
    user = quote(db.get("USER") or "postgres")
    password = f":{quote(db['PASSWORD'])}" if db.get("PASSWORD") else ""
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{user}{password}@{db.get('HOST') or '127.0.0.1'}:"
        f"{db.get('PORT') or 5432}/{db['NAME']}",
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "AUTOPACK_STATE_DIR": str(tmp_path / "state"),
        # Short leases so a killed worker's phase is handed on within seconds.
        "AUTOPACK_PHASE_LEASE_SECONDS": "3",
        "AUTOPACK_SWEEP_INTERVAL_SECONDS": "1",
        "AUTOPACK_PROVIDER_BACKOFF_SECONDS": "0.05",
        "AUTOPACK_PROVIDER_TIMEOUT_SECONDS": str(settings.AUTOPACK_PROVIDER_TIMEOUT_SECONDS),
        "DJANGO_SECRET_KEY": "test-only-secret-key-not-used-anywhere-else-0123456789",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(simulated_provider_env(sim_server.url))
    return env


@pytest.fixture
def start_worker(
    worker_env: dict[str, str], worker_log_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start extra workers in a test; all are stopped at its end."""
    from autopack_site.celery import app

    app.control.purge()  # messages of earlier tests name rows that no longer exist
    started: list[WorkerProcess] = []

    def start(
        name: str | None = None,
        *,
        pool: str = "solo",
        beat: bool = True,
        wait: bool = True,
        extra_args: Sequence[str] = (),
    ) -> WorkerProcess:
        label = name or f"{request.node.name[:40]}-{len(started)}"
        worker = WorkerProcess(
            worker_env, worker_log_dir, label, pool=pool, beat=beat, extra_args=extra_args
        )
        started.append(worker)
        return worker.start(wait=wait)

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def celery_worker(start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    """One real worker process (with the beat scheduler that runs the lease sweeper)."""
    return start_worker("main")
