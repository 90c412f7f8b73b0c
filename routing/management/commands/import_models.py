from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from routing.config import ModelsConfigError
from routing.mapping import load_yaml, models_import


class Command(BaseCommand):
    help = "Load a models.yaml into the database (replaces the mapping; refused whole if bad)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "path",
            nargs="?",
            type=Path,
            default=None,
            help="default: AUTOPACK_MODELS_FILE (config/models.yaml)",
        )

    def handle(self, *args: object, path: Path | None, **options: object) -> None:
        path = path or settings.AUTOPACK_MODELS_FILE
        try:
            config = models_import(data=load_yaml(path))
        except ModelsConfigError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"imported {path}: {len(config.providers)} providers, {len(config.models)} models, "
            f"{len(config.roles)} roles"
        )
