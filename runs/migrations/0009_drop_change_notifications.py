"""Drop the change-notification triggers the first version of 0002 created (PostgreSQL only):
nothing listens for them any more, and each run update paid for a pg_notify."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import migrations


def drop_triggers(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    q = schema_editor.quote_name
    app_label, model_name = settings.AUTH_USER_MODEL.split(".")
    runs = apps.get_model("runs", "Run")._meta.db_table
    tokens = apps.get_model("authtoken", "Token")._meta.db_table
    users = apps.get_model(app_label, model_name)._meta.db_table
    schema_editor.execute(
        f"""
        DROP TRIGGER IF EXISTS autopack_run_changed ON {q(runs)};
        DROP TRIGGER IF EXISTS autopack_runs_emptied ON {q(runs)};
        DROP TRIGGER IF EXISTS autopack_token_changed ON {q(tokens)};
        DROP TRIGGER IF EXISTS autopack_user_changed ON {q(users)};
        DROP FUNCTION IF EXISTS autopack_notify_run();
        DROP FUNCTION IF EXISTS autopack_notify_runs_emptied();
        DROP FUNCTION IF EXISTS autopack_notify_auth();
        """
    )


class Migration(migrations.Migration):
    dependencies = [
        ("runs", "0008_phase_usage_totals"),
        ("authtoken", "0004_alter_tokenproxy_options"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [migrations.RunPython(drop_triggers, migrations.RunPython.noop)]
