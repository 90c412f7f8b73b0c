from __future__ import annotations

from pathlib import Path

import yaml
from django.core.management.base import BaseCommand, CommandParser

from routing.mapping import models_export


class Command(BaseCommand):
    help = "Write the current mapping (with global overrides) as a valid models.yaml."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "-o",
            "--output",
            type=Path,
            default=None,
            help="file to write (default: standard output)",
        )

    def handle(self, *args: object, output: Path | None, **options: object) -> None:
        text = yaml.safe_dump(models_export(), sort_keys=False, allow_unicode=True)
        if output is None:
            self.stdout.write(text, ending="")
        else:
            output.write_text(text)
            self.stdout.write(f"wrote {output}")
