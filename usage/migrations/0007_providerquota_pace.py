# ProviderQuota.pace (issue 16, pacing): off for every existing provider.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("usage", "0006_minute_rollup"),
    ]

    operations = [
        migrations.AddField(
            model_name="providerquota",
            name="pace",
            field=models.BooleanField(
                default=False,
                help_text="Past its soft limit for non-critical categories while the last hour's "
                "pace would reach a window's cap before its reset",
            ),
        ),
    ]
