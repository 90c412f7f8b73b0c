"""Which process holds a phase, and whether it is still alive (issue 12, item 5).

A claim records its process (`Holder`) on the phase; while it works, its lease keeper writes
the phase's heartbeat every AUTOPACK_WORKER_HEARTBEAT_SECONDS. Whoever later finds the phase in
flight (the sweeper, or the phase's own task delivered again after its worker died) asks:

- on the same machine and in the same PID namespace, is that process still there? A pid that
  is gone, a zombie, or a pid now used by a process started at another time means the holder is
  dead, for certain, at once;
- elsewhere (the pid means nothing here), has its heartbeat stopped for
  AUTOPACK_WORKER_LOST_AFTER_SECONDS?

A holder whose process is alive here keeps its phase however slow it is, until its lease
(AUTOPACK_PHASE_LEASE_SECONDS without a renewal) runs out, as before.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Holder:
    """A process, named so that another process can tell whether it still runs."""

    host: str  # the hostname, for people reading the phase
    # Where `pid` names this process: the kernel's boot id and PID namespace. Equal spaces,
    # equal pids and equal start times: the same process. "" when unknown (not Linux), and
    # then only the heartbeat tells.
    pid_space: str
    pid: int
    # The process's start time in clock ticks after boot (/proc/<pid>/stat): a pid reused by
    # a later process has another one. 0 when unknown.
    started: int


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _pid_space() -> str:
    boot_id = _read(PROC / "sys" / "kernel" / "random" / "boot_id")
    try:
        namespace = os.readlink(PROC / "self" / "ns" / "pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return f"{boot_id}/{namespace}" if boot_id else ""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start ticks) of a process from /proc, or None when it cannot be read."""
    text = _read(PROC / str(pid) / "stat")
    if text is None:
        return None
    # After the command name (which may hold spaces and parentheses): state is the first
    # field, starttime the twentieth (field 22 of proc(5)).
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def process_started(pid: int) -> int | None:
    """The start time (clock ticks after boot) of process `pid` if it runs and /proc shows
    it; None otherwise. With the pid, it names one process: a reused pid has another."""
    stat = _stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return None
    return stat[1]


@functools.cache
def _this_process(pid: int) -> Holder:
    # Cached per pid: a forked pool process has a pid (and start time) of its own.
    stat = _stat(pid)
    return Holder(
        host=socket.gethostname()[:255],
        pid_space=_pid_space(),
        pid=pid,
        started=stat[1] if stat else 0,
    )


def holder_this_process() -> Holder:
    return _this_process(os.getpid())


def holder_alive_here(holder: Holder) -> bool | None:
    """Whether `holder` still runs, when this process can tell (same machine and PID
    namespace); None when it cannot, and then only the heartbeat tells."""
    here = holder_this_process()
    if not holder.pid_space or holder.pid_space != here.pid_space or holder.pid <= 0:
        return None
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    stat = _stat(holder.pid)
    if stat is None:
        # It exists but /proc hides it (hidepid): it cannot be told from the holder, and a
        # holder is never given up on a guess.
        return True
    state, started = stat
    if state in ("Z", "X"):
        return False  # exited, not yet reaped by its parent
    return not (holder.started and started != holder.started)
