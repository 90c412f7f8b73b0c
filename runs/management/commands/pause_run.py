from __future__ import annotations

from runs.services import run_pause

from ._control import RunControlCommand


class Command(RunControlCommand):
    help = "Request a pause; it takes effect after the current phase."
    action = staticmethod(run_pause)
    verb = "pause"
