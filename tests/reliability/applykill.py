"""Loaded into a worker with `--include tests.reliability.applykill`: the worker SIGKILLs its
whole process group in the middle of applying a builder's change, right after the file write
numbered AUTOPACK_TEST_KILL_AFTER_WRITES (so earlier files are written, later ones are not).

Only the kill is added: runs.workspace's own write runs unchanged before it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from runs import workspace

_write = workspace._write
_done = [0]


def _write_or_die(root: Path, path: str, content: bytes) -> None:
    _write(root, path, content)
    _done[0] += 1
    if _done[0] == int(os.environ.get("AUTOPACK_TEST_KILL_AFTER_WRITES", "0")):
        os.killpg(os.getpgid(0), signal.SIGKILL)


workspace._write = _write_or_die
