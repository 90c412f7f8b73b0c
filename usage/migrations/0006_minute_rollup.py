# The per-minute, per-provider rollup the cap windows read for their partial edge hours
# (usage.models.UsageMinuteRollup), filled from the events already folded so that windows stay
# exact from the first read after the migration.

from decimal import Decimal

from django.db import migrations, models

_FILL_POSTGRESQL = """
INSERT INTO usage_usageminuterollup (provider, minute, calls, prompt_tokens, completion_tokens,
    cost_usd, first_at)
SELECT provider, date_trunc('minute', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
    count(*), sum(prompt_tokens), sum(completion_tokens), coalesce(sum(cost_usd), 0),
    min(created_at)
FROM usage_usageevent WHERE rolled_up GROUP BY 1, 2
"""


def fill(apps, schema_editor):  # type: ignore[no-untyped-def]
    """The folded events' minutes (pending ones are added by their fold, as ever)."""
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(_FILL_POSTGRESQL)
        return
    UsageEvent = apps.get_model("usage", "UsageEvent")
    UsageMinuteRollup = apps.get_model("usage", "UsageMinuteRollup")
    minutes: dict[tuple[str, object], list[object]] = {}
    for e in UsageEvent.objects.filter(rolled_up=True).iterator():
        key = (e.provider, e.created_at.replace(second=0, microsecond=0))
        acc = minutes.setdefault(key, [0, 0, 0, Decimal(0), e.created_at])
        acc[0] += 1
        acc[1] += e.prompt_tokens
        acc[2] += e.completion_tokens
        acc[3] += e.cost_usd or 0
        acc[4] = min(acc[4], e.created_at)
    UsageMinuteRollup.objects.bulk_create(
        UsageMinuteRollup(
            provider=provider,
            minute=minute,
            calls=c,
            prompt_tokens=p,
            completion_tokens=o,
            cost_usd=cost,
            first_at=first,
        )
        for (provider, minute), (c, p, o, cost, first) in minutes.items()
    )


class Migration(migrations.Migration):
    dependencies = [
        ("usage", "0005_provider_windows"),
    ]

    operations: list[migrations.operations.base.Operation] = [
        migrations.CreateModel(
            name="UsageMinuteRollup",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("provider", models.CharField(max_length=64)),
                ("minute", models.DateTimeField(help_text="Start of the UTC minute")),
                ("calls", models.BigIntegerField(default=0)),
                ("prompt_tokens", models.BigIntegerField(default=0)),
                ("completion_tokens", models.BigIntegerField(default=0)),
                (
                    "cost_usd",
                    models.DecimalField(decimal_places=12, default=Decimal("0"), max_digits=24),
                ),
                ("first_at", models.DateTimeField()),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(
                        fields=("provider", "minute"), name="usageminuterollup_key"
                    )
                ],
            },
        ),
        migrations.RunPython(fill, migrations.RunPython.noop),
    ]
