"""Many runs at once (issue 18), as a team outgrows one person: many concurrent runs share a
few workers, each started as the README's Production section starts one, with a zero-delay
simulated provider. Figure: phases per second, against the same number of empty Celery task
chains on as many workers; judged on fairness (no run starved at the half-way mark) and on
exactly-once (no phase claimed, attempted or sent to a model twice)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis
from django.db.models import Count, Max

from runs import services as run_services
from runs.models import Phase, PhaseAttempt, PhaseEvent, Run
from runs.plans import validate_plan
from runs.states import PhaseState, RunState
from simulator import simulated_provider_env
from simulator.state import LOG_LIMIT

from .core import Figure, Processes, Size, log, wait_for
from .data import plan_of, windows_replaced
from .workers import _sim_requests

# The README's worker command (`celery -A autopack_site worker`, prefork pool) with one pool
# process each: the figure's "4 worker processes" are 4 such workers, 4 phases at a time.
README_CONCURRENCY = 1
# Every phase's description carries its run and position, so the simulator's request log (which
# keeps the first 2,000 characters of a prompt; the description is in its first lines, for the
# builder and the auditor alike) tells the calls of the runs' "Phase 3"s apart.
TAG = re.compile(r"\[many-runs (\d+)\.(\d+)\]")
POLL_SECONDS = 0.05
# No phase completed by any run for this long: the runs left are stuck, not slow (a phase
# takes well under a second here), and the figure says which and where instead of waiting on.
STALL_SECONDS = 60.0
IN_FLIGHT = (PhaseState.QUEUED, PhaseState.BUILDING, PhaseState.AUDITING)


@dataclass
class Progress:
    """What one poll saw: seconds since the first start, each run's completed phases."""

    at: float
    done: list[int]


@dataclass
class Outcome:
    elapsed: float | None  # first run_start → the last run's finished_at (None: stalled)
    start_spread: float  # first run_start → the last one returned
    samples: list[Progress] = field(default_factory=list)
    stalled: str = ""  # which runs were stuck where, when none moved for STALL_SECONDS


def _plan(k: int, phases: int) -> dict[str, Any]:
    plan = plan_of(phases, name=f"Many runs {k}")
    for tier in plan["tiers"]:
        for phase in tier["phases"]:
            position = int(phase["name"].split()[-1])
            phase["description"] = f"Benchmark phase [many-runs {k}.{position}]."
    return plan


def _run_all(size: Size) -> tuple[list[int], Outcome]:
    runs = [
        run_services.run_create(plan=validate_plan(_plan(k, size.many_phases)))
        for k in range(1, size.many_runs + 1)
    ]
    ids = [run.pk for run in runs]
    t0 = time.time()
    for run_id in ids:
        run_services.run_start(run_id=run_id)
    outcome = Outcome(elapsed=None, start_spread=time.time() - t0)
    moved = {"done": -1, "at": time.monotonic()}

    def finished() -> bool:
        # One query per poll: every run's state and progress.
        rows = {
            pk: (state, done)
            for pk, state, done in Run.objects.filter(pk__in=ids).values_list(
                "pk", "state", "completed_phases"
            )
        }
        outcome.samples.append(Progress(time.time() - t0, [rows[pk][1] for pk in ids]))
        ended = [
            pk
            for pk, (state, _) in rows.items()
            if state in (RunState.FAILED, RunState.STOPPED, RunState.PAUSED)
        ]
        if ended:
            reasons = dict(Run.objects.filter(pk__in=ended).values_list("pk", "state_reason"))
            raise RuntimeError(f"runs ended before completing: {reasons}")
        if all(state == RunState.COMPLETED for state, _ in rows.values()):
            return True
        done = sum(outcome.samples[-1].done)
        if done != moved["done"]:
            moved.update(done=done, at=time.monotonic())
        elif time.monotonic() - moved["at"] > STALL_SECONDS:
            outcome.stalled = _stuck(
                [pk for pk, (state, _) in rows.items() if state != RunState.COMPLETED]
            )
            return True
        return False

    total = size.many_runs * size.many_phases
    wait_for(finished, timeout=120 + total * 0.5, what=f"{size.many_runs} runs", every=POLL_SECONDS)
    if not outcome.stalled:
        last = Run.objects.filter(pk__in=ids).aggregate(last=Max("finished_at"))["last"]
        outcome.elapsed = last.timestamp() - t0
    return ids, outcome


def _stuck(run_ids: list[int]) -> str:
    """The runs not completed, each with its phase in flight: its state, and the worker
    process holding it, if any."""
    rows = Phase.objects.filter(run_id__in=run_ids, state__in=IN_FLIGHT).values_list(
        "run_id", "position", "state", "holder_pid"
    )
    where = "; ".join(
        f"run {run_id} phase {position} {state}"
        + (f" (held by pid {pid})" if pid else " (claimed by no worker)")
        for run_id, position, state, pid in sorted(rows)
    )
    return f"{len(run_ids)} runs made no progress for {STALL_SECONDS:.0f} s: {where}"


def _half_way(samples: list[Progress], total: int) -> Progress | None:
    """The first sample at which the runs had done half of all phases together."""
    return next((s for s in samples if sum(s.done) * 2 >= total), None)


def _exactly_once(
    ids: list[int], size: Size, requests: list[dict[str, Any]], *, ended: bool = True
) -> list[str]:
    """Every breach of "no phase run twice" found after the end ([] when there is none): per
    phase one attempt, one CLAIMED event, one builder call and one auditor call. ended False
    (the runs stalled): only what happened twice counts, not what has not happened yet."""
    breaches: list[str] = []
    phases = list(Phase.objects.filter(run_id__in=ids).values_list("pk", "state"))
    total = size.many_runs * size.many_phases
    if len(phases) != total:
        breaches.append(f"{len(phases)} phases stored, {total} planned")
    not_complete = [pk for pk, state in phases if state != PhaseState.COMPLETE]
    if not_complete and ended:
        breaches.append(f"{len(not_complete)} phases not complete: {not_complete[:10]}")
    least = 1 if ended else 0

    def per_phase(counts: dict[int, int], what: str) -> None:
        wrong = {pk: n for pk, _ in phases if not least <= (n := counts.get(pk, 0)) <= 1}
        if wrong:
            sample = dict(list(wrong.items())[:10])
            breaches.append(f"{len(wrong)} phases without exactly one {what}: {sample}")

    per_phase(
        dict(
            PhaseAttempt.objects.filter(phase__run_id__in=ids)
            .values_list("phase_id")
            .annotate(n=Count("id"))
            .values_list("phase_id", "n")
        ),
        "attempt",
    )
    per_phase(
        dict(
            PhaseEvent.objects.filter(phase__run_id__in=ids, kind=PhaseEvent.Kind.CLAIMED)
            .values_list("phase_id")
            .annotate(n=Count("id"))
            .values_list("phase_id", "n")
        ),
        "CLAIMED event",
    )

    # The simulator's log of model calls: bounded (simulator.state.LOG_LIMIT), so it must
    # still hold the first call, and every call must name a phase of these runs.
    seqs = [r["seq"] for r in requests]
    if seqs != list(range(1, len(seqs) + 1)) or (ended and not seqs):
        breaches.append(
            f"the simulator's request log is not whole (seq {seqs[:1]}…{seqs[-1:]}, "
            f"{len(seqs)} entries, kept at most {LOG_LIMIT})"
        )
    calls: Counter[tuple[str, int, int]] = Counter()
    untagged = 0
    for r in requests:
        match = TAG.search(r.get("prompt") or "")
        if match is None:
            untagged += 1
            continue
        calls[(str(r.get("role")), int(match.group(1)), int(match.group(2)))] += 1
    if untagged:
        breaches.append(f"{untagged} model calls name no phase of these runs")
    expected = {
        (role, k, p)
        for role in ("builder", "auditor")
        for k in range(1, size.many_runs + 1)
        for p in range(1, size.many_phases + 1)
    }
    wrong_calls = {
        key: n for key in expected | set(calls) if not least <= (n := calls.get(key, 0)) <= 1
    }
    if wrong_calls:
        sample = dict(sorted(wrong_calls.items())[:10])
        breaches.append(
            f"{len(wrong_calls)} (role, run, phase) without exactly one model call: {sample}"
        )
    errors = Counter(str(r.get("outcome")) for r in requests if r.get("status") != 200)
    if errors:
        breaches.append(f"model calls answered with an error: {dict(errors)}")
    return breaches


def _chain_floor(procs: Processes, env: dict[str, str], size: Size) -> float:
    """Seconds for `many_runs` chains of `many_phases` empty tasks, all sent together, on
    `many_workers` workers of the bench.chain app (started as the runs' workers): first send
    → the last task's start."""
    from . import chain

    total = size.many_runs * size.many_phases
    workers = procs.workers(
        [f"bench-many-chain-{i}" for i in range(1, size.many_workers + 1)],
        env,
        app="bench.chain",
        concurrency=README_CONCURRENCY,
    )
    key = f"bench:many-chains:{uuid.uuid4().hex}"
    store = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    try:
        t0 = time.time()
        for _ in range(size.many_runs):
            chain.step.apply_async((0, size.many_phases, key, time.time()), queue=chain.QUEUE)
        wait_for(
            lambda: store.llen(key) >= total,
            timeout=60 + total,
            what="the empty task chains",
            every=POLL_SECONDS,
        )
        entries = [json.loads(e) for e in store.lrange(key, 0, -1)]
    finally:
        store.delete(key)
        for worker in workers:
            procs.stop(worker)
    return max(started for _index, _sent, started in entries) - t0


def many_runs_figure(size: Size, procs: Processes, env: dict[str, str]) -> Figure:
    # The usage tables may hold generated events past every cap by now: lifted meanwhile, as
    # for the orchestration figure (bench.workers._caps_lifted).
    with windows_replaced():
        return _many_runs_figure(size, procs, env)


def _many_runs_figure(size: Size, procs: Processes, env: dict[str, str]) -> Figure:
    from autopack_site.celery import app

    runs, phases, n_workers = size.many_runs, size.many_phases, size.many_workers
    total = runs * phases
    if 2 * total > LOG_LIMIT:
        raise RuntimeError(f"{2 * total} model calls would overflow the simulator's log")
    url = procs.simulator()
    worker_env = {**env, **simulated_provider_env(url)}
    app.control.purge()  # nothing left over from an interrupted run may reach these workers
    workers = procs.workers(
        [f"bench-many-{i}" for i in range(1, n_workers + 1)],
        worker_env,
        concurrency=README_CONCURRENCY,
    )
    try:
        ids, outcome = _run_all(size)
        requests = _sim_requests(url)
    finally:
        for worker in workers:
            procs.stop(worker)
    breaches = _exactly_once(ids, size, requests, ended=not outcome.stalled)
    floor_seconds = _chain_floor(procs, env, size)

    floor_rate = total / floor_seconds
    if outcome.elapsed is not None:
        rate: float | None = total / outcome.elapsed
        speed = (
            f"{total:,} phases in {outcome.elapsed:.1f} s (first start → last run completed); "
            f"the floor's {total:,} tasks in {floor_seconds:.1f} s: the runs go at "
            f"{total / outcome.elapsed / floor_rate:.0%} of the floor's rate (informational, "
            "not judged)"
        )
    else:
        rate = None
        speed = f"STALLED, no rate: {outcome.stalled} (the floor's tasks: {floor_seconds:.1f} s)"
    half = _half_way(outcome.samples, total)
    if half is not None:
        most, fewest = max(half.done), min(half.done)
        starved = most > 2 * fewest or (fewest == 0 and most > 0) or bool(outcome.stalled)
        fairness = (
            f"half-way (first poll with ≥ {total // 2:,} phases done, at {half.at:.1f} s): "
            f"the most phases done by one run {most}, the fewest {fewest}"
            + (" — a run starved" if starved else "")
        )
    else:
        starved = True
        fairness = "half-way never reached: runs starved"
    gaps = [b.at - a.at for a, b in zip(outcome.samples, outcome.samples[1:], strict=False)]
    log(f"many_runs: {speed}; {fairness}; breaches: {breaches or 'none'}")
    notes = [
        speed,
        fairness,
        f"{len(outcome.samples)} polls (one query each, every {POLL_SECONDS * 1000:.0f} ms; "
        f"longest gap {max(gaps, default=0) * 1000:.0f} ms); the {runs} runs were started "
        f"within {outcome.start_spread * 1000:.0f} ms",
        f"{n_workers} workers, each `celery -A autopack_site worker --concurrency "
        f"{README_CONCURRENCY}` (the README's command, prefork pool), "
        f"{n_workers * README_CONCURRENCY} phases at a time; a zero-delay simulated provider "
        "that always approves (a builder and an auditor call per phase, through the real SDKs "
        "over HTTP)",
        "exactly once: per phase one attempt, one CLAIMED event, one builder and one auditor "
        "call in the simulator's log"
        + (": held" if not breaches else " — BREACHED: " + "; ".join(breaches)),
    ]
    return Figure(
        key="many_runs",
        label=f"{runs} concurrent runs × {phases} phases on {n_workers} workers "
        "(phases per second, zero-delay provider)",
        value=rate,
        unit="phases/s",
        floor=floor_rate,
        floor_label=f"{runs} chains × {phases} empty Celery tasks on {n_workers} workers, tasks/s",
        target="no run starved (max ≤ 2× min at half-way), no phase twice",
        met=not starved and not breaches,
        notes=notes,
    )
