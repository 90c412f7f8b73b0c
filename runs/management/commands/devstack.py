from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from routing.config import simulated_provider_env

SIM_READY = re.compile(rb"listening on (http://\S+)")


class Command(BaseCommand):
    help = (
        "Development stack for `make run`: migrate, make an admin login, then run the simulated "
        "provider, a Celery worker with beat, and the web server until Ctrl-C."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--addr", default=os.environ.get("AUTOPACK_WEB_ADDR", "127.0.0.1:8000"))
        parser.add_argument(
            "--sim-delay",
            type=float,
            default=float(os.environ.get("AUTOPACK_SIM_DELAY", "1.5")),
            help="seconds the simulated provider takes per call (a visible pace for the demo)",
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
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write("database ready: " + str(settings.DATABASES["default"]["NAME"]))
        login = self.ensure_admin()
        children: list[subprocess.Popen[bytes]] = []
        env = dict(os.environ)
        # `kill`, or the terminal closing, must stop the children too: by default Python dies
        # of SIGTERM and SIGHUP at once, without running the `finally` below, and the worker,
        # the web server and the simulator would go on without it.
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _exit_on_signal)
        try:
            if not real_providers:
                sim, url = self.start_simulator(sim_delay)
                children.append(sim)
                env.update(simulated_provider_env(url))
                self.stdout.write(f"simulated provider: {url} (delay {sim_delay}s per call)")
            children.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "autopack_site",
                        "worker",
                        "-B",
                        "--concurrency",
                        "2",
                        "--loglevel",
                        "INFO",
                        "-s",
                        str(settings.STATE_DIR / "celerybeat-schedule"),
                    ],
                    env=env,
                )
            )
            children.append(
                subprocess.Popen(
                    [sys.executable, "manage.py", "runserver", addr, "--noreload"],
                    env=env,
                )
            )
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
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in children:
                try:
                    child.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    child.kill()

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
        proc = subprocess.Popen(
            [sys.executable, "-m", "routing.simulator", "--port", "0", "--delay", str(delay)],
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

    def supervise(self, children: list[subprocess.Popen[bytes]]) -> None:
        try:
            while all(child.poll() is None for child in children):
                time.sleep(0.5)
            dead = next(c for c in children if c.poll() is not None)
            raise CommandError(f"{' '.join(map(str, dead.args[:5]))} exited ({dead.returncode})")
        except KeyboardInterrupt:
            self.stdout.write("\nstopping…")


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
