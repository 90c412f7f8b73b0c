from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from usage.provider_usage import ADMIN_KEY_ENVS, FetchResult, provider_usage_fetch


class Command(BaseCommand):
    help = (
        "Read the providers' own usage APIs now (what beat does every "
        "AUTOPACK_PROVIDER_USAGE_SECONDS): hour and day buckets of the last days, for each "
        "provider whose admin key is set (OPENAI_ADMIN_KEY, ANTHROPIC_ADMIN_KEY)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--provider", choices=sorted(ADMIN_KEY_ENVS), help="only this provider (default: all)"
        )
        parser.add_argument(
            "--days", type=int, help="UTC days to read, today included (default: the setting)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        days = options.get("days")
        if days is not None and days < 1:
            raise CommandError("--days must be at least 1")
        providers = [options["provider"]] if options.get("provider") else sorted(ADMIN_KEY_ENVS)
        failed = 0
        for provider in providers:
            result = provider_usage_fetch(provider=provider, days=days)
            self.stdout.write(self._line(result))
            failed += bool(result.error)
        if failed:
            raise CommandError(f"{failed} of {len(providers)} usage reads failed")

    @staticmethod
    def _line(result: FetchResult) -> str:
        if result.error:
            return f"{result.provider}: failed: {result.error}"
        if result.skipped:
            return f"{result.provider}: skipped ({ADMIN_KEY_ENVS[result.provider]} is not set)"
        return f"{result.provider}: {result.stored} bucket row(s) stored"
