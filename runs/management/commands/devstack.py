from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from runs.holders import process_started

# How long the stack's processes get to end by themselves when it stops, before SIGKILL.
STOP_GRACE_SECONDS = 0.8
SIM_READY = re.compile(rb"listening on (http://\S+)")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Seconds per simulated call under `make run`: the example plan makes some two dozen calls, so
# its run lasts a few minutes, long enough to try pause and a model change from the page. The
# tests pass delays of their own and are not slowed by it.
DEMO_SIM_DELAY = 8.0
# The simulated builder's fault rates in the demo: (flag, environment variable, default).
SIM_FAULT_RATES = (
    ("edit-miss-rate", "AUTOPACK_SIM_EDIT_MISS_RATE", "0.1"),
    ("edit-malformed-rate", "AUTOPACK_SIM_EDIT_MALFORMED_RATE", "0.1"),
    ("check-fail-rate", "AUTOPACK_SIM_CHECK_FAIL_RATE", "0.1"),
)


@dataclass(frozen=True)
class Child:
    """One process of the stack, as the pid file records it."""

    name: str
    pid: int
    started: int | None  # runs.holders.process_started: tells a reused pid apart


class Command(BaseCommand):
    help = (
        "Development stack for `make run`: migrate, make an admin login, then run the simulated "
        "provider, a Celery worker, Celery beat and the web server until Ctrl-C. Its processes "
        "end with it however it ends; a second one in the same state folder is refused."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--addr", default=os.environ.get("AUTOPACK_WEB_ADDR", "127.0.0.1:8000"))
        parser.add_argument(
            "--sim-delay",
            type=float,
            default=float(os.environ.get("AUTOPACK_SIM_DELAY", str(DEMO_SIM_DELAY))),
            help="seconds the simulated provider takes per call (default "
            f"{DEMO_SIM_DELAY:g}, or AUTOPACK_SIM_DELAY): the demo's pace",
        )
        parser.add_argument(
            "--real-providers",
            action="store_true",
            default=os.environ.get("AUTOPACK_SIMULATE", "1") in ("0", "false", "no"),
            help="call the real provider APIs with keys from the environment instead of the "
            "simulated provider",
        )

    def handle(
        self, *args: object, addr: str, sim_delay: float, real_providers: bool, **options: object
    ) -> None:
        pid_file = self.claim_pid_file(addr)  # held (locked) until this process ends
        try:
            self.check_port_free(addr)
            self.run_stack(pid_file, addr, sim_delay, real_providers)
        finally:
            # Unlinked before the lock goes with the file's closing: a start that waited on
            # the lock finds no pid file rather than this one's, emptied.
            Path(pid_file.name).unlink(missing_ok=True)
            pid_file.close()

    def run_stack(
        self, pid_file: IO[str], addr: str, sim_delay: float, real_providers: bool
    ) -> None:
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write("database ready: " + str(settings.DATABASES["default"]["NAME"]))
        login = self.ensure_admin()
        children: dict[str, subprocess.Popen[bytes]] = {}
        env = dict(os.environ)
        # `kill`, or the terminal closing, must stop the children too: by default Python dies
        # of SIGTERM and SIGHUP at once, without running the `finally` below, and the worker,
        # the web server and the simulator would go on without it. (SIGKILL runs nothing
        # here: each child dies with this process by itself, see _die_with_parent.)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _exit_on_signal)
        schedule = str(settings.STATE_DIR / "celerybeat-schedule")
        celery = [sys.executable, "-m", "celery", "-A", "autopack_site"]
        try:
            if not real_providers:
                sim, url = self.start_simulator(sim_delay)
                children["simulated provider"] = sim
                env.update(simulator_env(url))
                # Its usage APIs (fake admin keys above) are read every minute, so the usage
                # page's reconciliation fills in while the demo runs; real ones: 10 minutes.
                env.setdefault("AUTOPACK_PROVIDER_USAGE_SECONDS", "60")
                self.stdout.write(f"simulated provider: {url}")
                self.stdout.write(pace_line(sim_delay))
            children["worker"] = _start(
                [*celery, "worker", "--concurrency", "2", "--loglevel", "INFO"], env=env
            )
            # Beat is a process of its own, not the worker's `-B`: the worker's embedded beat
            # outlives a SIGKILLed worker and would keep queueing beside the next start's.
            children["beat"] = _start(
                [*celery, "beat", "--loglevel", "INFO", "-s", schedule], env=env
            )
            children["web server"] = _start(
                [sys.executable, "manage.py", "runserver", addr, "--noreload"], env=env
            )
            self.write_pid_file(pid_file, addr, children)
            self.stdout.write(
                self.style.SUCCESS(
                    f"\nAutopack is up: http://{addr}/dashboard/  (admin: http://{addr}/admin/)\n"
                    f"{login}\n"
                    "Start the example run in another terminal:  make demo\n"
                    "Stop everything with Ctrl-C.\n"
                )
            )
            self.supervise(children)
        finally:
            _stop_all(children)

    # --- one stack per state folder -----------------------------------------------------------

    def claim_pid_file(self, addr: str) -> IO[str]:
        """Lock the state folder's pid file for this process's life, or refuse to start and
        say what runs. The lock, not the pid in the file, decides: the kernel drops it when
        its holder dies however it dies, so a pid file left by a `kill -9` is never taken
        for a running stack (nor a running stack for a stale file)."""
        path = Path(settings.STATE_DIR) / "devstack.pid"
        pid_file = path.open("a+")
        try:
            fcntl.flock(pid_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            running = _read_record(pid_file)
            pid_file.close()
            if running is None:  # locked, but not written yet: it is starting
                raise CommandError(
                    f"Autopack is already starting from {settings.STATE_DIR} ({path} is locked)."
                ) from None
            web = running.get("addr", "?")
            raise CommandError(
                f"Autopack is already running from {settings.STATE_DIR}: devstack pid "
                f"{running.get('pid')}, web http://{web}/dashboard/, started "
                f"{running.get('started', '?')}; "
                + ", ".join(f"{c['name']} pid {c['pid']}" for c in running.get("children", []))
                + f".\nStop it first (Ctrl-C in its terminal, or: kill {running.get('pid')}); "
                "nothing was started."
            ) from None
        stale = _read_record(pid_file)
        if stale is not None:
            self.clean_stale(path, stale)
        pid_file.seek(0)
        pid_file.truncate()
        return pid_file

    def clean_stale(self, path: Path, stale: dict[str, Any]) -> None:
        self.stdout.write(
            self.style.WARNING(
                f"The last `make run` (devstack pid {stale.get('pid')}) ended without cleaning "
                f"up (killed?); removing its pid file {path}."
            )
        )
        for entry in stale.get("children", []):
            child = Child(**entry)
            # Only the very process it started (same pid, same start time): a pid reused
            # since by some other program is left alone.
            if child.started is not None and process_started(child.pid) == child.started:
                os.kill(child.pid, signal.SIGKILL)
                self.stdout.write(f"stopped its {child.name}, still running (pid {child.pid})")

    def write_pid_file(
        self, pid_file: IO[str], addr: str, children: dict[str, subprocess.Popen[bytes]]
    ) -> None:
        record = {
            "pid": os.getpid(),
            "addr": addr,
            "started": timezone.localtime().isoformat(timespec="seconds"),
            "children": [
                asdict(Child(name, proc.pid, process_started(proc.pid)))
                for name, proc in children.items()
            ],
        }
        pid_file.seek(0)
        pid_file.truncate()
        pid_file.write(json.dumps(record) + "\n")
        pid_file.flush()

    def check_port_free(self, addr: str) -> None:
        host, _, port = addr.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family) as probe:
                # As the web server binds (SO_REUSEADDR): a port in TIME_WAIT is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, int(port)))
        except ValueError:
            raise CommandError(f"--addr {addr!r}: expected HOST:PORT") from None
        except OSError as exc:
            raise CommandError(
                f"{addr} is in use ({exc.strerror}), not by an Autopack started from "
                f"{settings.STATE_DIR}. Stop that program, or pass --addr HOST:PORT "
                "(AUTOPACK_WEB_ADDR)."
            ) from None

    # --- the processes ----------------------------------------------------------------------

    def ensure_admin(self) -> str:
        user_model = get_user_model()
        path = Path(settings.STATE_DIR) / "admin-password"
        if not user_model.objects.filter(is_superuser=True).exists():
            password = secrets.token_urlsafe(12)
            user_model.objects.create_superuser("admin", "admin@localhost", password)
            path.write_text(password + "\n")
            path.chmod(0o600)
        if path.exists() and user_model.objects.filter(username="admin").exists():
            return f"Log in as admin / {path.read_text().strip()}   (kept in {path})"
        return "Log in with your superuser (reset it: .venv/bin/python manage.py changepassword)"

    def start_simulator(self, delay: float) -> tuple[subprocess.Popen[bytes], str]:
        # The demo's builder makes a mistake now and then (a SEARCH that misses, a malformed
        # block, a failing test), so a person sees the revise loop; the simulator refuses
        # rates that are not shares, with a message on stderr.
        faults = [
            f"--{flag}={os.environ.get(env, default)}" for flag, env, default in SIM_FAULT_RATES
        ]
        proc = _start(
            [
                sys.executable,
                "-m",
                "simulator",
                "--port",
                "0",
                "--delay",
                str(delay),
                *faults,
            ],
            stdout=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if match := SIM_READY.search(line):
                return proc, match.group(1).decode()
            if not line and proc.poll() is not None:
                break
        proc.kill()
        raise CommandError("the simulated provider did not start")

    def supervise(self, children: dict[str, subprocess.Popen[bytes]]) -> None:
        """Until Ctrl-C, or until one process ends: then the stack stops, all of it. A lone
        worker, or a beat without a worker, would be a stack half up that looks up."""
        try:
            while all(child.poll() is None for child in children.values()):
                time.sleep(0.5)
            name, dead = next((n, c) for n, c in children.items() if c.poll() is not None)
            raise CommandError(
                f"the {name} (pid {dead.pid}) {_exit_status(dead.returncode)}; stopping the "
                "others. Start again with `make run`."
            )
        except KeyboardInterrupt:
            self.stdout.write("\nstopping…")


def pace_line(delay: float) -> str:
    """How the demo's pace is set, said where a newcomer looks: the output of `make run`."""
    return (
        f"pace: each simulated call takes {delay:g}s (the example run lasts a few minutes at "
        f"{DEMO_SIM_DELAY:g}s); change it with --sim-delay or AUTOPACK_SIM_DELAY, "
        "e.g. AUTOPACK_SIM_DELAY=1 make run"
    )


def simulator_env(url: str) -> dict[str, str]:
    """The environment that points the stack's providers at the simulator at `url`, as the
    simulator itself serves it: the simulator is development tooling outside the production
    apps, so this command starts it as a program and asks it rather than importing it."""
    # Always the local http:// simulator this command just started.
    with urllib.request.urlopen(f"{url}/_sim/env", timeout=10) as response:  # noqa: S310
        env = json.loads(response.read())
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise CommandError(f"the simulated provider at {url} sent no environment")
    return env


def _read_record(pid_file: IO[str]) -> dict[str, Any] | None:
    pid_file.seek(0)
    text = pid_file.read().strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {"pid": text[:20], "children": []}  # a pid file of some older form
    return record if isinstance(record, dict) else None


def _stop_all(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """Stop the whole stack at once, whether a person pressed Ctrl-C or a child died.

    The worker gets Celery's cold shutdown (SIGQUIT), not a warm one: a warm shutdown finishes
    the phase in hand, but the simulator is stopping beside it, so that phase's calls would
    fail and could fail the run, and a stack with a dead child would linger for many seconds.
    The phase's message is not acknowledged (acks_late) and its holder is gone, so the next
    start hands it on, its interrupted call metered as lost. The rest get SIGTERM; whatever
    is still there after STOP_GRACE_SECONDS is killed."""
    for name, child in children.items():
        if child.poll() is None:
            child.send_signal(signal.SIGQUIT if name == "worker" else signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for child in children.values():
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _exit_status(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec_fn that has the kernel SIGKILL the child when this process dies, by any
    signal including SIGKILL (Linux's PR_SET_PDEATHSIG); None elsewhere, where the next
    start's pid file check stops what was left."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child must not load it

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)  # the parent died before the death signal was set: go with it

    return preexec


def _start(cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    # SIGKILL, not SIGTERM: a worker that gets SIGTERM finishes its phase first (a warm
    # shutdown, minutes), and a stack whose parent was killed has nobody to wait for it.
    # Its phase is handed on by the next start's worker (runs.holders).
    return subprocess.Popen(cmd, preexec_fn=_die_with_parent(os.getpid()), **kwargs)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
