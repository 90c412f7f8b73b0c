from __future__ import annotations

from typing import Any

from django.db import migrations, models

# The protocol of the providers Autopack shipped with before `protocol` existed (frozen copy of
# routing.providers.DEFAULT_PROTOCOLS: a migration must not follow later code changes).
PROTOCOLS = {"openai": "openai", "anthropic": "anthropic", "google_gemini": "gemini", "glm": "zai"}
PRICES_IDS = {"openai": "openai", "anthropic": "anthropic", "google_gemini": "google", "glm": "zai"}


def fill(apps: Any, schema_editor: Any) -> None:
    ProviderEndpoint = apps.get_model("routing", "ProviderEndpoint")
    for endpoint in ProviderEndpoint.objects.all():
        endpoint.protocol = PROTOCOLS.get(endpoint.name, "openai_compatible")
        endpoint.prices_id = PRICES_IDS.get(endpoint.name, "")
        endpoint.save(update_fields=["protocol", "prices_id"])


class Migration(migrations.Migration):
    dependencies = [("routing", "0001_initial")]

    operations = [
        migrations.AddField(
            model_name="providerendpoint",
            name="protocol",
            field=models.CharField(default="openai_compatible", max_length=30),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name="providerendpoint",
            name="prices_id",
            field=models.CharField(blank=True, default="", max_length=50),
        ),
        migrations.RunPython(fill, migrations.RunPython.noop),
    ]
