from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("routing", "0003_worker_provider_report"),
    ]

    operations = [
        migrations.CreateModel(
            name="ProviderLimits",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("provider", models.CharField(max_length=50, unique=True)),
                ("observed_at", models.DateTimeField()),
                ("requests_limit", models.PositiveBigIntegerField(blank=True, null=True)),
                ("requests_remaining", models.PositiveBigIntegerField(blank=True, null=True)),
                ("requests_reset_at", models.DateTimeField(blank=True, null=True)),
                ("tokens_limit", models.PositiveBigIntegerField(blank=True, null=True)),
                ("tokens_remaining", models.PositiveBigIntegerField(blank=True, null=True)),
                ("tokens_reset_at", models.DateTimeField(blank=True, null=True)),
                ("retry_after_until", models.DateTimeField(blank=True, null=True)),
                ("headers", models.JSONField(blank=True, default=dict)),
                ("cooled_until", models.DateTimeField(blank=True, null=True)),
                ("reason", models.CharField(blank=True, default="", max_length=200)),
            ],
            options={
                "verbose_name_plural": "provider limits",
                "ordering": ["provider"],
            },
        ),
    ]
