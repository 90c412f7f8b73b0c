from __future__ import annotations

from runs.services import run_stop

from ._control import RunControlCommand


class Command(RunControlCommand):
    help = "Stop a run; the phase in flight is cancelled at its next checkpoint."
    action = staticmethod(run_stop)
    verb = "stop"
