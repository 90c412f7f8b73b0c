from __future__ import annotations

from runs.services import run_resume

from ._control import RunControlCommand


class Command(RunControlCommand):
    help = "Resume a paused run (or withdraw a pause not yet taken)."
    action = staticmethod(run_resume)
    verb = "resume"
