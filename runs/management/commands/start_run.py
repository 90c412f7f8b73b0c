from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from runs.plans import PlanError, parse_plan_bytes
from runs.services import run_create, run_start


class Command(BaseCommand):
    help = "Import a plan file (YAML or JSON) and start it as a new run; prints the run id."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("plan", type=Path, help="path to the plan file")
        parser.add_argument(
            "--no-start", action="store_true", help="create the run but leave it pending"
        )

    def handle(self, *args: object, plan: Path, no_start: bool, **options: object) -> None:
        try:
            raw = plan.read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read {plan}: {exc.strerror}") from exc
        try:
            spec = parse_plan_bytes(raw, filename=plan.name)
        except PlanError as exc:
            raise CommandError(f"{plan}: {exc}") from exc
        run = run_create(plan=spec)
        if not no_start:
            run = run_start(run_id=run.pk)
        self.stdout.write(str(run.pk))
        self.stderr.write(
            f"run {run.pk} '{run.name}': {run.total_tiers} tiers, {run.total_phases} phases, "
            f"{run.state}"
        )
