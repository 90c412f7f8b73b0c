# UsageEvent.source: who reported the call (workers, POST /usage/events, OpenTelemetry, a
# provider's usage API). A constant db_default: PostgreSQL adds the column without rewriting
# the table, whatever its size.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("usage", "0008_usage_ingest"),
    ]

    operations = [
        migrations.AddField(
            model_name="usageevent",
            name="source",
            field=models.CharField(
                choices=[
                    ("worker", "Autopack's workers"),
                    ("api", "POST /usage/events"),
                    ("otel", "OpenTelemetry (POST /v1/logs, /v1/traces)"),
                    ("provider_api", "The provider's usage API"),
                ],
                db_default="worker",
                default="worker",
                max_length=16,
            ),
        ),
    ]
