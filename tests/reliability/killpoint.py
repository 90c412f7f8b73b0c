"""Loaded into a worker with `--include tests.reliability.killpoint`: the worker SIGKILLs its
whole process group just before it sends the task named in AUTOPACK_TEST_KILL_BEFORE_SEND.

Celery sends a phase task from `transaction.on_commit`, so this is a worker dying after the
transaction that queued the next phase committed and before the broker got the message. Only
Celery's own method is wrapped; every line of the project's code runs unchanged.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from celery import Celery

_send_task = Celery.send_task


def _send_task_or_die(self: Celery, name: str, *args: Any, **kwargs: Any) -> Any:
    if name == os.environ.get("AUTOPACK_TEST_KILL_BEFORE_SEND"):
        os.killpg(os.getpgid(0), signal.SIGKILL)
    return _send_task(self, name, *args, **kwargs)


Celery.send_task = _send_task_or_die
