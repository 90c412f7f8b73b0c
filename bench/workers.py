"""Worker figures: per-phase orchestration overhead (against a chain of empty Celery tasks on
the same broker) and a worker's memory after many phases. Real processes throughout: a Celery
worker on Redis, PostgreSQL, and the simulated provider over HTTP through the real SDKs."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from django.conf import settings

from runs import services as run_services
from runs.models import Phase, Run
from runs.plans import validate_plan
from runs.states import RunState
from simulator import simulated_provider_env

from .core import Figure, Processes, Size, log, median, percentile, rss_mb, wait_for
from .data import plan_of, windows_replaced


def _sim_requests(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/_sim/requests", timeout=30) as response:  # noqa: S310
        return list(json.loads(response.read()))


def _sim_reset(url: str) -> None:
    request = urllib.request.Request(  # noqa: S310 - the local simulator
        f"{url}/_sim/reset", data=b"{}", method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10):  # noqa: S310
        pass


def _run_to_end(phases: int, *, on_progress: Any = None) -> tuple[Run, float]:
    run = run_services.run_create(plan=validate_plan(plan_of(phases, name="Orchestration")))
    t0 = time.perf_counter()
    run_services.run_start(run_id=run.pk)

    def finished() -> bool:
        state, done = Run.objects.filter(pk=run.pk).values_list("state", "completed_phases").get()
        if on_progress is not None:
            on_progress(done)
        if state in (RunState.FAILED, RunState.STOPPED, RunState.PAUSED):
            reason = Run.objects.get(pk=run.pk).state_reason
            raise RuntimeError(f"run {run.pk} ended {state}: {reason}")
        return state == RunState.COMPLETED

    wait_for(finished, timeout=60 + phases * 3, what=f"a {phases}-phase run", every=0.2)
    elapsed = time.perf_counter() - t0
    run.refresh_from_db()
    return run, elapsed


def _gaps(run: Run, requests: list[dict[str, Any]]) -> tuple[list[float], list[float], list[float]]:
    """Per phase after the first: (commit → first provider call, commit → claim, claim → call).

    The commit is taken as the next phase's queued_at: it is written by the last statement of
    the transaction that completes the previous phase (so the figure errs long, not short).
    """
    times = sorted(r["time"] for r in requests if r.get("status") == 200)
    phases = list(
        Phase.objects.filter(run=run).order_by("position").values("queued_at", "started_at")
    )
    total, hop, prep = [], [], []
    j = 0
    for phase in phases[1:]:
        queued_at, started_at = phase["queued_at"], phase["started_at"]
        if queued_at is None or started_at is None:
            # _run_to_end waited for COMPLETED, so every phase was queued and claimed.
            raise RuntimeError(f"phase of completed run {run.pk} has no queued_at/started_at")
        queued = queued_at.timestamp()
        claimed = started_at.timestamp()
        while j < len(times) and times[j] < queued:
            j += 1
        if j == len(times):
            break
        total.append(times[j] - queued)
        hop.append(claimed - queued)
        prep.append(times[j] - claimed)
    return total, hop, prep


def _chain_floor(procs: Processes, env: dict[str, str], n: int) -> list[float]:
    from . import chain

    broker = env["CELERY_BROKER_URL"]
    worker = procs.worker("bench-chain", env, app="bench.chain")
    key = f"bench:chain:{uuid.uuid4().hex}"
    store = redis.Redis.from_url(broker)
    try:
        chain.step.apply_async((0, n, key, time.time()), queue=chain.QUEUE)
        wait_for(lambda: store.llen(key) >= n, timeout=60 + n, what="the empty task chain")
        entries = [json.loads(e) for e in store.lrange(key, 0, -1)]
    finally:
        store.delete(key)
        procs.stop(worker)
    # The first task's send is from this process; the chain proper starts at the second.
    return [started - sent for index, sent, started in entries if index > 0]


@contextmanager
def _caps_lifted() -> Iterator[None]:
    """The usage tables hold millions of generated events by now, far past every provider's
    cap, and the router would rightly pause the run for quota. The caps are lifted for the
    run (the quota state is still computed from those rollups) and put back after: the legacy
    daily/weekly/monthly caps, and the cap windows (config/models.yaml has some), which the
    router reads as well (data.windows_replaced)."""
    with windows_replaced():
        yield


def orchestration_figures(size: Size, procs: Processes, env: dict[str, str]) -> list[Figure]:
    with _caps_lifted():
        return _orchestration_figures(size, procs, env)


def _orchestration_figures(size: Size, procs: Processes, env: dict[str, str]) -> list[Figure]:
    from autopack_site.celery import app

    url = procs.simulator()
    worker_env = {**env, **simulated_provider_env(url)}
    app.control.purge()  # nothing left over from an interrupted run may reach this worker
    worker = procs.worker("bench-orchestration", worker_env)
    time.sleep(1.0)
    rss_start = rss_mb(worker.pid)
    warm: dict[str, float] = {}

    def sample(done: int) -> None:
        if "rss" not in warm and done >= size.warm_phases:
            warm["rss"] = rss_mb(worker.pid)

    try:
        run, elapsed = _run_to_end(size.orchestration_phases, on_progress=sample)
        total, hop, prep = _gaps(run, _sim_requests(url))
        _sim_reset(url)  # the request log is bounded; the memory run needs none of it
        rest = size.memory_phases - size.orchestration_phases
        elapsed2 = _run_to_end(rest)[1] if rest > 0 else 0.0
        rss_end = rss_mb(worker.pid)
    finally:
        procs.stop(worker)
    chain_gaps = _chain_floor(procs, env, size.orchestration_phases)

    med, p95 = median(total) * 1e3, percentile(total, 95) * 1e3
    floor_med, floor_p95 = median(chain_gaps) * 1e3, percentile(chain_gaps, 95) * 1e3
    log(
        f"orchestration: {med:.1f} ms median, {p95:.1f} ms p95 (floor {floor_med:.1f} / "
        f"{floor_p95:.1f} ms); memory {rss_start:.0f} → {rss_end:.0f} MB"
    )
    overhead = Figure(
        key="orchestration",
        label=f"per-phase orchestration overhead, {size.orchestration_phases}-phase run "
        "(commit → next phase's first provider call, median)",
        value=med,
        unit="ms",
        floor=floor_med,
        floor_label=f"chain of {size.orchestration_phases} empty Celery tasks, same broker",
        target="median ≤ 15 ms",
        met=med <= 15,
        notes=[
            f"median {med:.1f} ms, p95 {p95:.1f} ms (floor median {floor_med:.1f} ms, "
            f"p95 {floor_p95:.1f} ms) over {len(total)} phase transitions",
            f"of which commit → claimed by the worker: median {median(hop) * 1e3:.1f} ms; "
            f"claimed → first provider call: median {median(prep) * 1e3:.1f} ms",
            f"the whole run: {elapsed:.1f} s, {size.orchestration_phases / elapsed:.1f} "
            "phases/s with a zero-delay simulated provider (a builder and an auditor call "
            "each, through the real SDKs over HTTP); one solo-pool worker",
        ],
        extra={"hop_ms": median(hop) * 1e3, "prep_ms": median(prep) * 1e3},
    )
    memory = Figure(
        key="worker_memory",
        label=f"worker memory (RSS) after {size.memory_phases:,} phases",
        value=rss_end,
        unit="MB",
        floor=rss_start,
        floor_label="the same worker at start (ready, no task yet)",
        target="grows by < 20 MB",
        met=rss_end - rss_start < 20,
        notes=[
            f"grew {rss_end - rss_start:+.1f} MB from start; "
            f"{rss_end - warm.get('rss', rss_start):+.1f} MB after its first "
            f"{size.warm_phases} phases (RSS then {warm.get('rss', float('nan')):.0f} MB)",
            f"{size.memory_phases:,} phases in two runs ({elapsed + elapsed2:.0f} s); "
            f"DEBUG={settings.DEBUG}",
        ],
    )
    return [overhead, memory]
