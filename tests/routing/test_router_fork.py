"""The router in a forked process: a Celery worker's prefork pool forks its children while the
worker's provider-report thread (runs.tasks.ProviderReporter) may be inside the router's
locked section. The many-runs benchmark (issue 18) caught three of eight pool processes
waiting forever on their first routing decision so."""

from __future__ import annotations

import os
import signal
import sys
import threading

import pytest

from routing.router import router

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no fork on Windows")


def test_a_process_forked_while_another_thread_holds_the_router_lock_can_still_route() -> None:
    inside, leave = threading.Event(), threading.Event()

    def reporter() -> None:
        # Stands for the report thread reading the router's state (under its lock).
        with router._lock:
            inside.set()
            leave.wait(timeout=30)

    thread = threading.Thread(target=reporter, daemon=True)
    thread.start()
    assert inside.wait(timeout=10)
    try:
        pid = os.fork()
        if pid == 0:  # the child: only the forking thread exists here
            # A wait on the inherited lock ends the child with SIGALRM (pytest-timeout's
            # handler, inherited too, would raise inside the wait instead).
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(5)
            try:
                router.invalidate()  # takes the lock, as a routing decision does
                os._exit(0)
            except BaseException:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
    finally:
        leave.set()
        thread.join(timeout=10)
    assert not os.WIFSIGNALED(status), f"the child hung and got signal {os.WTERMSIG(status)}"
    assert os.WEXITSTATUS(status) == 0
