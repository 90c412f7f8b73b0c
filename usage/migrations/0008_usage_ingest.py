# The permission an agent's token needs for POST /usage/events (usage.record_usage).

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("usage", "0007_providerquota_pace"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="usageevent",
            options={"permissions": [("record_usage", "Can record usage (POST /usage/events)")]},
        ),
    ]
