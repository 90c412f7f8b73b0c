"""Shared argument handling for the run control commands."""

from __future__ import annotations

from collections.abc import Callable

from django.core.management.base import BaseCommand, CommandError, CommandParser

from runs.models import Run
from runs.states import IllegalTransition


class RunControlCommand(BaseCommand):
    action: Callable[..., Run]
    verb: str

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("run_id", type=int)

    def handle(self, *args: object, run_id: int, **options: object) -> None:
        try:
            run = type(self).action(run_id=run_id)
        except Run.DoesNotExist as exc:
            raise CommandError(f"run {run_id} does not exist") from exc
        except IllegalTransition as exc:
            raise CommandError(f"cannot {self.verb} run {run_id}: it is {exc.current}") from exc
        self.stdout.write(f"run {run.pk}: {run.state}")
