# The providers' own usage APIs (usage.provider_usage) and their reconciliation (usage.reconcile).

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("usage", "0009_usage_source"),
    ]

    operations = [
        migrations.CreateModel(
            name="ProviderReportedUsage",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("provider", models.CharField(max_length=64)),
                (
                    "bucket_width",
                    models.CharField(choices=[("1h", "hour"), ("1d", "day")], max_length=2),
                ),
                ("bucket", models.DateTimeField(help_text="Start of the UTC hour or day")),
                ("model", models.CharField(blank=True, max_length=200)),
                ("input_tokens", models.BigIntegerField(default=0)),
                ("output_tokens", models.BigIntegerField(default=0)),
                ("cache_read_tokens", models.BigIntegerField(default=0)),
                ("cache_write_tokens", models.BigIntegerField(default=0)),
                ("requests", models.BigIntegerField(blank=True, null=True)),
                ("fetched_at", models.DateTimeField()),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(
                        fields=("provider", "bucket_width", "bucket", "model"),
                        name="providerreportedusage_key",
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("input_tokens__gte", 0)),
                        name="providerreportedusage_input_tokens_not_negative",
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("output_tokens__gte", 0)),
                        name="providerreportedusage_output_tokens_not_negative",
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("cache_read_tokens__gte", 0)),
                        name="providerreportedusage_cache_read_tokens_not_negative",
                    ),
                    models.CheckConstraint(
                        condition=models.Q(
                            (
                                "input_tokens__gte",
                                models.F("cache_read_tokens") + models.F("cache_write_tokens"),
                            )
                        ),
                        name="providerreportedusage_cache_parts_within_input",
                    ),
                ],
            },
        ),
        migrations.CreateModel(
            name="ProviderUsageFetch",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("provider", models.CharField(max_length=64, unique=True)),
                ("attempted_at", models.DateTimeField()),
                ("succeeded_at", models.DateTimeField(blank=True, null=True)),
                ("covered_from", models.DateTimeField(blank=True, null=True)),
                (
                    "error",
                    models.TextField(
                        blank=True, help_text="The last attempt's error; empty when it worked"
                    ),
                ),
                (
                    "buckets",
                    models.PositiveIntegerField(
                        default=0, help_text="Rows the last success stored"
                    ),
                ),
            ],
        ),
    ]
