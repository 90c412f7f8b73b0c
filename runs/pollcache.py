"""Per-process caches for what every API poll reads, kept exact by PostgreSQL notifications.

A status poll needs the token's user and the run's state. Reading them costs a database round
trip per poll, and under load a round trip costs a sync web worker about as much as all of
Django and DRF together (docs/benchmarks.md). So each web process keeps both in memory and
learns of every change from PostgreSQL itself: triggers (runs migration 0002) send
`NOTIFY autopack_runs, '<run id>'` when a run row changes and `NOTIFY autopack_auth` when a
token or user row does, and the process listens on a connection of its own. Before serving
from memory it reads what has arrived on that connection — a non-blocking socket read, not a
round trip — so a revoked token, a deactivated user or a paused run is seen by the next
request, as with no cache at all.

The caches are used only when that is safe:

- on PostgreSQL, while the listening connection is up: when it breaks (the database
  restarted), everything is dropped and requests read the database until it is back, since
  notifications sent meanwhile were lost;
- outside transactions: changes made inside an open transaction (a test's, say) are not
  notified until it commits, so a request inside one reads the database.

An entry remembers the notification count when its read began: a change notified while it
was being read invalidates it, whichever thread stores it.

PostgreSQL delivers a notification asynchronously, a fraction of a millisecond after the
COMMIT that sent it has returned. A request in another process in that instant still sees the
old entry; within this process that would be visible (a test revokes a token and at once calls
the API), so after this process itself writes, its next cached read first makes one round trip
on the listening connection, which PostgreSQL answers only after delivering every notification
committed before it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

from django.db import connection

log = logging.getLogger(__name__)

RUNS_CHANNEL = "autopack_runs"
AUTH_CHANNEL = "autopack_auth"
RECONNECT_SECONDS = 1.0  # after a failed LISTEN connection, how long requests read the DB


class _Listener:
    """One LISTEN connection per process (re-opened after a fork or a failure)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._conn: Any = None
        self._pid = 0
        self._retry_at = 0.0
        self.count = 0  # notifications applied; stamps cache entries
        self.reset_at = 0  # count when the caches were last emptied
        self.auth_changed_at = 0
        self.run_changed_at: dict[int, int] = {}
        self._wrote = False  # this process committed a write since the last sync

    def ready(self) -> bool:
        """Apply what has arrived; True when the caches may be used for this request."""
        if connection.vendor != "postgresql" or connection.in_atomic_block:
            return False
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's socket is not ours
                self._conn, self._pid = None, os.getpid()
                self._reset()
            if self._conn is None and not self._connect():
                return False
            try:
                if self._wrote:
                    self._wrote = False
                    self._conn.execute("SELECT 1")  # delivers through _on_notify
                pgconn = self._conn.pgconn
                # Twice: a server that went away first leaves its goodbye message, and only
                # the next read sees the closed socket.
                pgconn.consume_input()
                pgconn.consume_input()
                while (note := pgconn.notifies()) is not None:
                    self._apply(note.relname.decode(), note.extra.decode())
            except Exception:
                log.warning("lost the notification connection; reading the database until back")
                self._drop()
                return False
            return True

    def wrote(self) -> None:
        self._wrote = True

    def _on_notify(self, note: Any) -> None:
        with self._lock:
            self._apply(note.channel, note.payload)

    def _apply(self, channel: str, payload: str) -> None:
        self.count += 1
        if channel == AUTH_CHANNEL:
            self.auth_changed_at = self.count
        elif channel == RUNS_CHANNEL and payload.isdigit():
            self.run_changed_at[int(payload)] = self.count
        else:  # unknown: trust nothing
            self._reset()

    def _connect(self) -> bool:
        if time.monotonic() < self._retry_at:
            return False
        import psycopg

        try:
            params = connection.get_connection_params()
            params.pop("cursor_factory", None)
            params.pop("context", None)
            params.setdefault("connect_timeout", 3)  # a request waits for this at most
            self._conn = psycopg.connect(**params, autocommit=True)
            # What arrives during a query on this connection (LISTEN, the sync) comes here;
            # what arrives while it is idle is read in ready().
            self._conn.add_notify_handler(self._on_notify)
            self._conn.execute(f"LISTEN {RUNS_CHANNEL}; LISTEN {AUTH_CHANNEL}")
        except Exception:
            log.warning("cannot listen for notifications; reading the database for now")
            self._drop()
            return False
        self._reset()  # whatever changed before LISTEN was not notified
        return True

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._retry_at = time.monotonic() + RECONNECT_SECONDS
        self._reset()
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken
                conn.close()

    def _reset(self) -> None:
        self.count += 1
        self.reset_at = self.count
        self.run_changed_at.clear()
        AUTH.clear()
        STATUS.clear()

    def backend_pid(self) -> int | None:
        """The listening session's server process id (tests cut it), None when not listening."""
        conn = self._conn
        return None if conn is None else int(conn.pgconn.backend_pid)

    def close(self) -> None:
        """Close the connection (tests, before their database is dropped)."""
        with self._lock:
            self._drop()
            self._retry_at = 0.0


class _Cache:
    """key → (stamp, stored at, value); valid while nothing was notified for it since stamp."""

    def __init__(self) -> None:
        self._entries: dict[Any, tuple[int, float, Any]] = {}

    def get(self, key: Any, changed_at: int, max_age: float) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        stamp, stored, value = entry
        if stamp < max(changed_at, LISTENER.reset_at) or time.monotonic() - stored > max_age:
            self._entries.pop(key, None)
            return None
        return value

    def put(self, key: Any, stamp: int, value: Any) -> None:
        if len(self._entries) > 10_000:  # many runs or tokens: start again rather than grow
            self._entries.clear()
        self._entries[key] = (stamp, time.monotonic(), value)

    def clear(self) -> None:
        self._entries.clear()


AUTH = _Cache()
STATUS = _Cache()
LISTENER = _Listener()
# Tokens and users are notified on every change; the age only bounds a key kept by mistake.
AUTH_MAX_AGE = 3600.0


def stamp() -> int:
    """Call before reading what will be cached; hand the result to the cache's put."""
    return LISTENER.count


def auth_row(key: str) -> Any:
    return AUTH.get(key, LISTENER.auth_changed_at, AUTH_MAX_AGE)


def status_data(run_id: int, *, max_age: float) -> Any:
    """max_age: the status's counts (tokens, issues) change without a notification."""
    return STATUS.get(run_id, LISTENER.run_changed_at.get(run_id, 0), max_age)


def note_writes(execute: Any, sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
    """Execute wrapper on this process's PostgreSQL connections (runs.apps): after a statement
    that may have written commits, the next cached read syncs first (module docstring)."""
    result = execute(sql, params, many, context)
    if sql.lstrip()[:6].upper() != "SELECT":
        context["connection"].on_commit(LISTENER.wrote)
    return result


def install(sender: Any, connection: Any, **_: Any) -> None:
    """connection_created receiver: wrap the new connection's statements with note_writes."""
    if connection.vendor == "postgresql" and note_writes not in connection.execute_wrappers:
        connection.execute_wrappers.append(note_writes)
