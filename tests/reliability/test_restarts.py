"""The broker and the database restarted mid-run. Each test starts its own private server on
a free loopback port and restarts that one; the shared Redis and PostgreSQL are never touched."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import environ
import pytest
from django.db import connections

from runs.models import Phase, PhaseEvent, Run
from runs.states import PhaseState
from tests.conftest import ROOT, WorkerProcess, wait_for

from .checks import (
    assert_completed,
    assert_no_phase_ran_twice,
    assert_usage_equals_reported,
    calls_of,
    plan_bytes,
    wait_finished,
)
from .conftest import PrivatePostgres, PrivateRedis, free_port, wait_port

pytestmark = [pytest.mark.slow]


def manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def start_run_command(env: dict[str, str], plan: bytes, tmp_path: Path) -> int:
    """`manage.py start_run PLAN` as an operator would, with the given broker and database."""
    path = tmp_path / "plan.yaml"
    path.write_bytes(plan)
    return int(manage(env, "start_run", str(path)).split()[-1])


CREATE_TOKEN = (
    "from django.contrib.auth import get_user_model\n"
    "from rest_framework.authtoken.models import Token\n"
    "user = get_user_model().objects.create_user('ops', is_staff=True, is_superuser=True)\n"
    "print(Token.objects.create(user=user).key)\n"
)


@contextmanager
def django_database(url: str) -> Iterator[None]:
    """Point this process's default connection at another database, so the usual checks can
    read the private server the workers wrote to."""
    conn = connections["default"]
    saved = dict(conn.settings_dict)
    target = environ.Env.db_url_config(url)
    conn.close()
    conn.settings_dict.update({k: target[k] for k in ("NAME", "USER", "PASSWORD", "HOST", "PORT")})
    try:
        yield
    finally:
        conn.close()
        conn.settings_dict.clear()
        conn.settings_dict.update(saved)


class WebServer:
    """gunicorn serving the project, as in production."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("gunicorn")),
                "autopack_site.wsgi",
                "-w",
                "1",
                "-b",
                f"127.0.0.1:{self.port}",
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_port(self.port, up=True)

    def status(self, run_id: int, token: str) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/dashboard/runs/{run_id}/status",
            headers={"Authorization": f"Token {token}"},
        )
        return self._open(request)

    def control(self, run_id: int, action: str, token: str) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/runs/{run_id}/{action}",
            data=b"",
            method="POST",
            headers={"Authorization": f"Token {token}"},
        )
        return self._open(request)

    def _open(self, request: urllib.request.Request) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, {}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.log.close()


@pytest.mark.django_db(transaction=True)
def test_a_redis_restart_mid_run_loses_no_phase_and_the_run_completes(
    private_redis: PrivateRedis,  # first: torn down after the worker has stopped
    start_worker: Callable[..., WorkerProcess],
    worker_env: dict[str, str],
    worker_log_dir: Path,
    sim: Any,
    tmp_path: Path,
) -> None:
    tag = "redisrestart"
    sim.configure(delay=0.3, revise_rate=0)
    worker_env["CELERY_BROKER_URL"] = private_redis.url
    token = manage(worker_env, "shell", "-c", CREATE_TOKEN).split()[-1]
    suffix = uuid.uuid4().hex[:6]
    worker = start_worker(f"redis-{suffix}")
    web = WebServer(worker_env, worker_log_dir / f"web-redis-{suffix}.log")
    try:
        run = Run.objects.get(pk=start_run_command(worker_env, plan_bytes(tag, phases=5), tmp_path))
        wait_for(
            lambda: run.phases.filter(position=2, state=PhaseState.BUILDING).exists(),
            what="the second phase to be building",
        )

        private_redis.stop()  # everything queued or unacknowledged is gone with it
        # The worker finishes the phase and cannot send the next one's task.
        third = run.phases.get(position=3)
        wait_for(lambda: state_of_phase(third) == PhaseState.QUEUED, what="phase 3 queued")
        # A person pauses and resumes through the API meanwhile: resuming queues phase 3
        # again, and its task cannot be sent either; the answers are still right.
        code, body = web.control(run.pk, "pause", token)
        assert (code, body.get("state")) == (200, "paused"), body
        code, body = web.control(run.pk, "resume", token)
        assert (code, body.get("state")) == (200, "running"), body
        time.sleep(1)
        private_redis.start()
        wait_finished(run)
    finally:
        web.stop()

    assert_completed(run)
    assert_usage_equals_reported(run, sim, tag)
    assert_no_phase_ran_twice(run, sim, tag)
    log = worker.log()
    assert "Connection to broker lost" in log
    # Both failed sends were logged, and neither failed the phase's task or the request.
    assert f"phase {third.pk} is queued but its task could not be sent" in log
    assert "raised unexpected" not in log
    web_log = (worker_log_dir / f"web-redis-{suffix}.log").read_text()
    assert f"phase {third.pk} is queued but its task could not be sent" in web_log
    # The sweeper sent the lost message again once the broker was back.
    assert third.events.filter(kind=PhaseEvent.Kind.REDISPATCHED).exists()


def state_of_phase(phase: Phase) -> str:
    phase.refresh_from_db(fields=["state"])
    return phase.state


def test_a_postgresql_restart_mid_run_is_survived_by_the_worker_and_the_web_server(
    private_postgres: PrivatePostgres,  # first: stopped after the worker and web server
    start_worker: Callable[..., WorkerProcess],
    worker_env: dict[str, str],
    worker_log_dir: Path,
    sim: Any,
    tmp_path: Path,
    django_db_blocker: Any,
) -> None:
    tag = "pgrestart"
    pg = private_postgres
    worker_env["DATABASE_URL"] = pg.url
    # Long enough that the held builder call below never times out, however slow the restart.
    worker_env["AUTOPACK_PROVIDER_TIMEOUT_SECONDS"] = "300"
    manage(worker_env, "migrate", "--noinput")
    token = manage(worker_env, "shell", "-c", CREATE_TOKEN).split()[-1]
    suffix = uuid.uuid4().hex[:6]
    worker = start_worker(f"pg-{suffix}")
    web = WebServer(worker_env, worker_log_dir / f"web-pg-{suffix}.log")
    try:
        # The first builder call is held open (released below): the database restarts while
        # the worker waits on it, however long the restart takes on a busy machine.
        sim.configure(delay=240.0, revise_rate=0)
        run_id = start_run_command(worker_env, plan_bytes(tag, phases=2), tmp_path)
        assert web.status(run_id, token)[0] == 200
        wait_for(lambda: calls_of(sim, tag, role="builder"), what="the first builder call")
        sim.configure(delay=0.2)  # for the calls after it

        pg.stop()
        time.sleep(1.5)
        pg.start()

        code, body = web.status(run_id, token)  # the web server's connection was cut too
        assert code == 200 and body["state"] == "running", body
        with django_db_blocker.unblock(), django_database(pg.url):
            run = Run.objects.get(pk=run_id)
            first = run.phases.get(position=1)
            held_until = first.lease_expires_at
            # The worker's heartbeat reconnects and renews the lease while the call goes on.
            wait_for(
                lambda: run.phases.filter(
                    position=1, state=PhaseState.BUILDING, lease_expires_at__gt=held_until
                ).exists(),
                timeout=120,
                what="the lease to be renewed after the restart",
            )
            sim.release()  # the held builder call answers now
            wait_finished(run)

            assert_completed(run)
            # The builder's answer arrived on a connection the restart had broken; its usage
            # was still stored, once.
            assert_usage_equals_reported(run, sim, tag)
            assert_no_phase_ran_twice(run, sim, tag)
            assert not run.phases.filter(lost_worker_count__gt=0).exists()
        assert web.status(run_id, token)[1]["state"] == "completed"
    finally:
        web.stop()
    log = worker.log()
    assert "lease renewal failed" in log
    # The answer's first statement met the broken connection: the rate limits it carried (one
    # upsert, given up: they are advice) or, when it came first, its usage (retried until
    # stored, as asserted above).
    assert re.search(r"database unreachable recording (usage|the limits)", log)
