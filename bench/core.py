"""What every benchmark shares: sizes, the figure record, statistics and the real processes
(simulated provider, Celery workers, gunicorn) a benchmark starts and always stops."""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
SIM_READY = re.compile(r"listening on (http://\S+)")


@dataclass(frozen=True)
class Size:
    """How much work each benchmark does. `full` is `make bench`, `smoke` the CI check."""

    name: str
    decisions: int  # select_model calls timed
    single_events: int  # record_usage calls timed (and raw INSERTs)
    bulk_events: int  # events in the bulk import (and in the COPY floor)
    events_small: int  # usage table size of the "1M" points
    events_large: int  # usage table size of the "10M" point
    page_phases: tuple[int, int]  # phases of the two runs whose pages are counted
    summary_requests: int  # timed GETs of /dashboard/usage per point
    load_seconds: float  # per load scenario of the status API
    poll_interval: float  # seconds between one poller's requests (open-loop scenario)
    orchestration_phases: int  # the run whose per-phase overhead is measured
    memory_phases: int  # phases a worker has run when its memory is read
    warm_phases: int  # phases after which the worker counts as warm (second reference)
    ingest_batches: int  # batches of 500 events POSTed to /usage/events per pass
    many_runs: int  # runs started at once (many_runs figure)
    many_phases: int  # phases of each of them
    many_workers: int  # worker processes they share (each as the README starts one)


SIZES = {
    "full": Size(
        name="full",
        decisions=200_000,
        single_events=2_000,
        bulk_events=200_000,
        events_small=1_000_000,
        events_large=10_000_000,
        page_phases=(10, 1_000),
        summary_requests=50,
        load_seconds=10.0,
        poll_interval=1.0,
        orchestration_phases=200,
        memory_phases=1_000,
        warm_phases=20,
        ingest_batches=200,
        many_runs=50,
        many_phases=20,
        many_workers=4,
    ),
    "smoke": Size(
        name="smoke",
        decisions=3_000,
        single_events=40,
        bulk_events=2_000,
        events_small=2_000,
        events_large=6_000,
        page_phases=(10, 60),
        summary_requests=5,
        load_seconds=1.0,
        poll_interval=0.5,
        orchestration_phases=5,
        memory_phases=12,
        warm_phases=3,
        ingest_batches=4,
        many_runs=6,
        many_phases=4,
        many_workers=2,
    ),
}


@dataclass
class Figure:
    """One line of the table: a measured value next to its floor from the same run."""

    key: str
    label: str
    value: float | None
    unit: str
    floor: float | None = None
    floor_label: str = ""
    target: str = ""
    met: bool | None = None  # None: no target, or not judged
    notes: list[str] = field(default_factory=list)
    # Figures other parts of the page quote (e.g. the plain design's, docs/benchmarks.md).
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "value": self.value,
            "unit": self.unit,
            "floor": self.floor,
            "floor_label": self.floor_label,
            "target": self.target,
            "met": self.met,
            "notes": self.notes,
            "extra": self.extra,
        }


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 100 samples is the 99th)."""
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-pct * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    # Loopback only; the port is released for the server to take a moment later.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    """Resident memory of one process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Processes:
    """The child processes of one benchmark run; all are stopped on exit, by their own pid."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.children: list[subprocess.Popen[bytes]] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def spawn(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        path = self.log_dir / f"{name}.log"
        out = path.open("wb")
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env or self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self.children.append(proc)
        return proc, path

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc in self.children:
            self.children.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.children)):
            self.stop(proc)

    # --- the project's processes ---

    def simulator(self) -> str:
        """The simulated provider, answering at once and always approving (one attempt per
        phase, so every phase makes exactly one builder and one auditor call)."""
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "simulator",
                "--port",
                "0",
                "--delay",
                "0",
                "--revise-rate",
                "0",
            ],
            cwd=ROOT,
            env={**self.env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=(self.log_dir / "simulator.log").open("wb"),
            text=True,
            start_new_session=True,
        )
        self.children.append(proc)  # type: ignore[arg-type]
        found: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            if match := SIM_READY.search(proc.stdout.readline()):
                found.append(match.group(1))
            # Keep draining so a full pipe never blocks the simulator.
            for _line in proc.stdout:
                pass

        threading.Thread(target=read, daemon=True).start()
        url = wait_for(lambda: found and found[0], timeout=20, what="the simulated provider")
        return str(url)

    def worker(
        self,
        name: str,
        env: dict[str, str],
        app: str = "autopack_site",
        *,
        concurrency: int | None = None,
    ) -> Any:
        """One Celery worker, ready. concurrency None: one process (solo pool), so a figure
        times one process alone; a number: as the README's Production section starts one
        (`celery -A autopack_site worker --concurrency N`: the prefork pool, gossip and
        mingle on), named apart so several can share this host."""
        return self.workers([name], env, app, concurrency=concurrency)[0]

    def workers(
        self,
        names: list[str],
        env: dict[str, str],
        app: str = "autopack_site",
        *,
        concurrency: int | None = None,
    ) -> list[Any]:
        """Several workers (see `worker`), started together and then waited for."""
        started = []
        for name in names:
            cmd = [sys.executable, "-m", "celery", "-A", app, "worker"]
            if concurrency is None:
                cmd += ["--pool", "solo", "--concurrency", "1"]
                cmd += ["--without-gossip", "--without-mingle"]
            else:
                cmd += ["--concurrency", str(concurrency)]
            # INFO: the " ready." line below is logged at that level.
            cmd += ["-n", f"{name}@%h", "--loglevel", "INFO"]
            if app != "autopack_site":
                cmd += ["-Q", "bench_chain"]
            started.append((name, *self.spawn(name, cmd, env)))

        for name, proc, path in started:

            def ready(proc: Any = proc, path: Path = path, name: str = name) -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {name} exited: {path.read_text()[-2000:]}")
                return b" ready." in path.read_bytes()

            wait_for(ready, timeout=60, what=f"worker {name}")
        return [proc for _, proc, _ in started]

    def gunicorn(self, env: dict[str, str], workers: int = 2) -> tuple[Any, int]:
        port = free_port()
        proc, path = self.spawn(
            "gunicorn",
            [
                str(Path(sys.executable).parent / "gunicorn"),
                "autopack_site.wsgi",
                "-w",
                str(workers),
                "-b",
                f"127.0.0.1:{port}",
                "--backlog",
                "2048",
            ],
            env,
        )

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/bench/constant", timeout=2
                ) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(up, timeout=60, what="gunicorn", every=0.2)
        return proc, port


@contextmanager
def processes(env: dict[str, str], log_dir: Path) -> Iterator[Processes]:
    procs = Processes(env, log_dir)
    try:
        yield procs
    finally:
        procs.stop_all()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def env_for_children(database_url: str, broker_url: str, state_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker_url,
        "DJANGO_SETTINGS_MODULE": "bench.settings",
        "AUTOPACK_STATE_DIR": str(state_dir),
        "DJANGO_SECRET_KEY": "bench-only-secret-key-not-used-anywhere-else-0123456789abcdef",
        "PYTHONUNBUFFERED": "1",
    }


def ensure_database(database_url: str) -> None:
    """Create the benchmark's own database if it is missing (never touches another one)."""
    info = psycopg.conninfo.conninfo_to_dict(database_url.replace("postgres://", "postgresql://"))
    name = str(info.pop("dbname"))
    with psycopg.connect(**{**info, "dbname": "postgres"}, autocommit=True) as conn:  # type: ignore[arg-type]
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return
        conn.execute(f'CREATE DATABASE "{name}"')
        log(f"created database {name}")
