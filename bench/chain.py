"""Floor of the orchestration figure: a chain of empty Celery tasks on the same broker.

Each task notes when it started and sends the next one, as a finished phase does (send on
commit); the gap from one send to the next start is what the broker and Celery cost alone.
"""

from __future__ import annotations

import json
import os
import time

import redis
from celery import Celery

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/13")
QUEUE = "bench_chain"

# Not the current app: the bench's own process imports this module for the floors, and the
# engine sends a phase's task through `current_app` (runs.services), which must stay the
# project's app, or the next figure's phases land on this app's queue that no worker of the
# project reads.
app = Celery("bench_chain", broker=BROKER, set_as_current=False)
# The same delivery settings as the project's app (autopack_site.settings CELERY_*).
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    task_default_queue=QUEUE,
    worker_hijack_root_logger=False,
)
_redis: redis.Redis | None = None


def _log() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(BROKER)
    return _redis


@app.task(name="bench.chain.step")
def step(index: int, total: int, key: str, sent_at: float) -> None:
    started = time.time()
    _log().rpush(key, json.dumps([index, sent_at, started]))
    if index + 1 < total:
        step.apply_async((index + 1, total, key, time.time()), queue=QUEUE)
