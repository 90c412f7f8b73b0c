from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.serializers.json import DjangoJSONEncoder

from runs.models import Run
from runs.selectors import RunStatus, run_status


class Command(BaseCommand):
    help = (
        "Show a run's state, position, tokens so far, auditor issue counts and its forecast "
        "(estimated tokens still needed, ETA, fit per cap window)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("run_id", type=int)
        parser.add_argument(
            "--json", action="store_true", dest="as_json", help="print the status as JSON"
        )

    def handle(self, *args: object, run_id: int, as_json: bool, **options: object) -> None:
        try:
            status = run_status(run_id=run_id)
        except Run.DoesNotExist as exc:
            raise CommandError(f"run {run_id} does not exist") from exc
        if as_json:
            # Windows carry datetimes, the forecast durations and USD: Django's encoder writes them.
            self.stdout.write(json.dumps(status.as_dict(), indent=2, cls=DjangoJSONEncoder))
            return
        self.stdout.write(self.format(status))

    @staticmethod
    def format(status: RunStatus) -> str:
        lines = [
            f"Run {status.run_id}: {status.name}",
            f"State: {status.state_label}"
            + (f" ({status.state_reason})" if status.state_reason else ""),
            f"{status.position_text} ({status.percent_complete}%)",
        ]
        lines.append(f"Tokens: {status.tokens_in:,} in / {status.tokens_out:,} out")
        issues = status.issues
        lines.append(
            f"Auditor issues: {issues['critical']} critical, {issues['major']} major, "
            f"{issues['minor']} minor"
        )
        lines.append(f"Attempts: {status.attempts:,}")
        if status.workspace_path:
            lines.append(f"Working tree: {status.workspace_path}")
        if status.branch:
            head = status.head_commit[:12] if status.head_commit else "no approved commit yet"
            lines.append(f"Branch: {status.branch} at {head}")
            lines.append(
                f"Changed: {status.files_changed_count:,} "
                f"file{'' if status.files_changed_count == 1 else 's'}, "
                f"+{status.lines_added:,} -{status.lines_removed:,} lines; "
                f"checks {status.checks_state}"
            )
        for guard in status.guards:
            lines.append(f"Guard {guard['rule']}: " + (guard["message"] or "not fired"))
        if status.forecast is not None:
            lines.extend(status.forecast.lines)
        return "\n".join(lines)
