from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from usage.display import by_provider, zone_name
from usage.forecast import forecast_usage
from usage.selectors import (
    PERIODS,
    get_model_usage_summary,
    get_provider_usage_summary,
    period_window,
)
from usage.vocabulary import Period


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    body = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


class Command(BaseCommand):
    help = (
        "Token usage of the current calendar day, ISO week or month (UTC): per provider against "
        "its cap, and per model with its cost; then each provider's cap windows with percent, "
        "cap and reset, and their burn rates with the forecast at the last hour's pace."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        # Validated in handle, not with choices=, so call_command() gets the same CommandError.
        parser.add_argument(
            "--period", default=Period.DAY.value, help=f"one of {', '.join(PERIODS)}"
        )

    def handle(self, *args: Any, period: str, **options: Any) -> None:
        if period not in PERIODS:
            raise CommandError(f"--period must be one of {', '.join(PERIODS)}, not {period!r}")
        start, end = period_window(period)
        self.stdout.write(
            f"Usage for the {period} {start:%Y-%m-%d %H:%M} – {end:%Y-%m-%d %H:%M} UTC"
        )
        self.stdout.write("")
        self.stdout.write(self.provider_table(period))
        self.stdout.write("")
        self.stdout.write(self.model_table(period))
        self.stdout.write("")
        self.stdout.write(self.window_table())

    def provider_table(self, period: str) -> str:
        rows = [
            [
                r["provider"],
                f"{r['tokens_in']:,}",
                f"{r['tokens_out']:,}",
                f"{r['outside_tokens_in'] + r['outside_tokens_out']:,}",
                _cap_words(r),
                f"{r['percent_of_cap']:.1f}%" if r["percent_of_cap"] is not None else "–",
                # What the cap holds (ProviderQuota.outside_usage).
                "everything" if r["counts"] == "everything" else "Autopack's",
            ]
            for r in get_provider_usage_summary(period=period)
        ]
        if not rows:
            return "Providers: none"
        headers = ["provider", "tokens in", "tokens out", "outside tools", "cap", "% of cap"]
        table = _table([*headers, "counts"], rows)
        # Outside tools: a person's own Claude Code, Codex, … reporting over OpenTelemetry.
        return f"{table}\n(outside tools: in + out, included in tokens in and out)"

    def window_table(self) -> str:
        now = timezone.now()
        words = by_provider(forecast_usage(now=now), now=now)
        rows = [
            [
                provider,
                w["window"],
                w["used_text"],
                w["cap_text"],
                w["percent_text"] if w["unit"] else "–",
                w["reset_text"] or "–",
            ]
            for provider, ws in words.items()
            for w in ws
        ]
        if not rows:
            return "Cap windows: none"
        # Each window's burn rates and forecast (usage.forecast), under the table.
        paces = [
            f"{provider} {w['window']}: {w['pace_text']}"
            for provider, ws in words.items()
            for w in ws
            if w["pace_text"]
        ]
        table = _table(["provider", "window", "used", "cap", "%", "reset"], rows)
        return "\n".join([f"Cap windows (times in {zone_name()})", table, "", *paces])

    def model_table(self, period: str) -> str:
        rows = [
            [
                _model_label(r),
                f"{r['tokens_in']:,}",
                f"{r['tokens_out']:,}",
                f"${r['cost_usd']:,.4f}" if r["cost_usd"] is not None else "unknown",
                f"{r['calls']:,}"
                + (f" ({r['estimated_calls']:,} estimated)" if r["estimated_calls"] else ""),
            ]
            for r in get_model_usage_summary(period=period)
        ]
        if not rows:
            return "Models: no usage in this period"
        return _table(["model", "tokens in", "tokens out", "cost (USD)", "calls"], rows)


def _model_label(row: dict[str, Any]) -> str:
    """provider/catalogue model, and the snapshots that answered for it when they differ."""
    reported = [r for r in row["reported_models"] if r != row["model"]]
    label = f"{row['provider']}/{row['model']}"
    return f"{label} ({', '.join(reported)})" if reported else label


def _cap_words(row: dict[str, Any]) -> str:
    """The cap column: the effective cap, or the configured window that counts it instead."""
    if row["cap"] is not None:
        return f"{row['cap']:,}"
    return f"its {row['cap_window']} window" if row["cap_window"] else "no cap"
