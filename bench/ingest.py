"""The ingest figure (issue 17): POST /usage/events over HTTP, against record_usage_bulk.

Distinct events (a fresh call_id each) in batches of 500 are POSTed by a few concurrent
connections to gunicorn with 2 sync workers, as an agent's reporter would send them: JSON
bodies with a run and phase, token parts and the call's time. The bodies are encoded before
the clock starts, so the client's share of the two cores is sending and reading only.

The figure is events stored per second of wall time, from the first request to the last
answer. It counts only if every event was stored exactly once: each answer must be a 201
listing its 500 call_ids as new, and afterwards the events table must hold exactly the events
sent (by count and distinct call_id) and the hourly rollups exactly their calls and tokens.

The floor is the same records through usage.services.record_usage_bulk in this one process,
in batches of 500: the storing alone, without HTTP, authentication, parsing and checking.
The server's per-user rate (AUTOPACK_API_RATE, 600/minute by default: ten batches a second
at most) is lifted by bench/settings.py, as for the status figure.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from django.utils.dateparse import parse_datetime
from rest_framework.authtoken.models import Token

from runs.models import Phase, Run
from usage.models import UsageEvent, UsageRollup, UsageSource
from usage.services import UsageRecord, record_usage_bulk
from usage.types import TokenUsage
from usage.vocabulary import RECORD_USAGE_CODENAME

from .core import Figure, Processes, Size, log, median, percentile
from .data import CATALOGUE, truncate_usage

BATCH = 500  # events per request (issue 17)
CLIENTS = 4  # concurrent connections: two per gunicorn worker, so neither waits for the next
PASSES = 2  # alternating with the floor; the best of each
ROLES = ("agent:planner", "agent:reviewer", "builder", "auditor")
TARGET = 5_000.0  # events/s


def agent_token() -> str:
    """A token of a user that may record usage and nothing else, as an agent's reporter has
    (the permission is checked on every request)."""
    user_model = get_user_model()
    user = user_model.objects.filter(username="bench-agent").first()
    if user is None:
        user = user_model.objects.create_user("bench-agent", "agent@localhost", None)
    user.user_permissions.add(Permission.objects.get(codename=RECORD_USAGE_CODENAME))
    token, _ = Token.objects.get_or_create(user=user)
    return token.key


def _events(n: int, run: Run, phases: list[int], tag: str) -> list[dict[str, Any]]:
    """n distinct events of the last hour, across the catalogue's providers and four roles."""
    now = datetime.now(UTC)
    events = []
    for i in range(n):
        provider, model = CATALOGUE[i % len(CATALOGUE)]
        prompt = 1_000 + i % 4_000
        completion = 100 + i % 900
        events.append(
            {
                "provider": provider,
                "model": model,
                "role": ROLES[i % len(ROLES)],
                "run": run.pk,
                "phase": phases[i % len(phases)],
                "call_id": f"ingest-{tag}-{i}",
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "cached_input_tokens": prompt // 4,
                "reasoning_tokens": completion // 3,
                "provider_request_id": f"req_{tag}_{i}",
                "time": (now - timedelta(milliseconds=i)).isoformat().replace("+00:00", "Z"),
            }
        )
    return events


def _records(events: list[dict[str, Any]]) -> list[UsageRecord]:
    """The records the view would hand to the store for these events (for the floor)."""
    records = []
    for e in events:
        at = parse_datetime(e["time"])
        records.append(
            UsageRecord(
                call_id=e["call_id"],
                provider=e["provider"],
                model=e["model"],
                role=e["role"],
                usage=TokenUsage(
                    prompt_tokens=e["prompt_tokens"],
                    completion_tokens=e["completion_tokens"],
                    cached_input_tokens=e["cached_input_tokens"],
                    reasoning_tokens=e["reasoning_tokens"],
                ),
                run_id=e["run"],
                phase_id=e["phase"],
                provider_request_id=e["provider_request_id"],
                created_at=at,
                source=UsageSource.API,
            )
        )
    return records


def _post(port: int, token: str, body: bytes) -> bytes:
    head = (
        f"POST /usage/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        f"Authorization: Token {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Sent:
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    answers: list[tuple[int, bytes]] = field(default_factory=list)  # (status, body) per request


async def _send_all(port: int, requests: list[bytes], clients: int) -> Sent:
    sent = Sent()
    pending = iter(requests)

    async def client() -> None:
        # gunicorn's sync workers close the connection after each answer: one per request.
        for request in pending:
            t0 = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            data = await reader.read(-1)
            writer.close()
            sent.latencies.append(time.perf_counter() - t0)
            head, _sep, body = data.partition(b"\r\n\r\n")
            try:
                status = int(head[9:12])
            except ValueError:
                status = 0
            sent.answers.append((status, body))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    sent.seconds = time.perf_counter() - start
    return sent


def send(port: int, token: str, batches: list[list[dict[str, Any]]], clients: int) -> Sent:
    requests = [_post(port, token, json.dumps({"events": b}).encode()) for b in batches]
    return asyncio.run(_send_all(port, requests, clients))


def _stored(prefix: str) -> tuple[int, int, int, int]:
    """Events (rows, distinct call_ids) with the prefix, and the rollups' calls and prompt
    tokens (the usage tables hold only this pass's events)."""
    events, rollups = UsageEvent._meta.db_table, UsageRollup._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*), count(DISTINCT call_id) FROM {events} WHERE call_id LIKE %s",  # noqa: S608
            (prefix + "%",),
        )
        rows, distinct = cursor.fetchone()
        cursor.execute(
            f"SELECT coalesce(sum(calls), 0), coalesce(sum(prompt_tokens), 0) FROM {rollups}"  # noqa: S608
        )
        calls, prompt = cursor.fetchone()
    return int(rows), int(distinct), int(calls), int(prompt)


def _check(sent: Sent, events: list[dict[str, Any]], tag: str) -> None:
    """Every event stored exactly once, or the pass does not count."""
    bad = [(s, b[:300]) for s, b in sent.answers if s != 201]
    if bad:
        raise RuntimeError(f"ingest: {len(bad)} of {len(sent.answers)} answers not 201: {bad[:3]}")
    new = sum(len(json.loads(b)["new"]) for _s, b in sent.answers)
    replayed = sum(len(json.loads(b)["already_recorded"]) for _s, b in sent.answers)
    want = (len(events), len(events), len(events), sum(e["prompt_tokens"] for e in events))
    got = _stored(f"ingest-{tag}-")
    if (new, replayed) != (len(events), 0) or got != want:
        raise RuntimeError(
            f"ingest: sent {len(events):,} events; answers: {new:,} new, {replayed:,} replayed; "
            f"stored (rows, distinct call_ids, rollup calls, rollup prompt tokens) {got}, "
            f"expected {want}"
        )


def ingest_figure(size: Size, procs: Processes, env: dict[str, str], run: Run) -> Figure:
    token = agent_token()
    phases = list(Phase.objects.filter(run=run).order_by("position").values_list("pk", flat=True))
    n = size.ingest_batches * BATCH
    server, port = procs.gunicorn(env, workers=2)
    http: list[Sent] = []
    floor_s: list[float] = []
    try:
        # Warm both workers (imports, connections, prices, the router's state), not counted.
        warm = _events(CLIENTS * 2 * BATCH, run, phases, f"warm{uuid.uuid4().hex[:8]}")
        warm_sent = send(port, token, _chunks(warm), CLIENTS)
        if any(s != 201 for s, _b in warm_sent.answers):
            raise RuntimeError(f"ingest warm-up: {warm_sent.answers[0][1][:300]!r}")
        record_usage_bulk(records=_records(warm[:BATCH]), batch_size=BATCH)
        for p in range(PASSES):
            tag = f"{p}{uuid.uuid4().hex[:8]}"
            events = _events(n, run, phases, tag)
            truncate_usage()
            sent = send(port, token, _chunks(events), CLIENTS)
            _check(sent, events, tag)
            http.append(sent)
            # The same rows (the same call_ids: the table is emptied first) in one process.
            records = _records(events)
            truncate_usage()
            t0 = time.perf_counter()
            stored = record_usage_bulk(records=records, batch_size=BATCH)
            floor_s.append(time.perf_counter() - t0)
            if stored != n:
                raise RuntimeError(f"ingest floor stored {stored:,} of {n:,}")
            log(
                f"ingest pass {p + 1}: {n / sent.seconds:,.0f} events/s over HTTP, "
                f"floor {n / floor_s[-1]:,.0f} events/s"
            )
        # A replay of a stored batch is answered 200 and stores nothing (untimed).
        replay = send(port, token, [events[:BATCH]], 1)
        replay_ok = replay.answers[0][0] == 200 and _stored(f"ingest-{tag}-")[0] == n
    finally:
        procs.stop(server)
        truncate_usage()
    best = min(http, key=lambda s: s.seconds)
    value = n / best.seconds
    floor = n / min(floor_s)
    ratio = value / floor
    lat = best.latencies
    log(f"ingest {value:,.0f} events/s over HTTP (floor {floor:,.0f}/s, {ratio:.0%})")
    return Figure(
        key="ingest",
        label=f"POST /usage/events, batches of {BATCH}, gunicorn 2 workers, {CLIENTS} connections",
        value=value,
        unit="events/s",
        floor=floor,
        floor_label=f"record_usage_bulk of the same rows in one process, batches of {BATCH}",
        target=f"≥ {TARGET:,.0f} events/s",
        met=value >= TARGET and replay_ok,
        notes=[
            f"{n:,} distinct events ({size.ingest_batches:,} batches), best of {PASSES} passes "
            f"each; {ratio:.0%} of the floor; every pass stored each event exactly once "
            "(answers, event rows, distinct call_ids and rollup calls checked)",
            f"per batch: median {median(lat) * 1e3:.0f} ms, p95 {percentile(lat, 95) * 1e3:.0f} ms "
            f"({len(lat) / best.seconds:.1f} batches/s)",
            "a replayed batch: "
            + ("200, nothing stored again" if replay_ok else "NOT answered 200 without storing"),
            "the load client (asyncio, one connection per request) and PostgreSQL run on the "
            "same 2 cores as the 2 workers",
        ],
    )


def _chunks(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
