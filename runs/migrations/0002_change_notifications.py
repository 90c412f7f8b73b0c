"""PostgreSQL triggers that notify web processes of changed runs, tokens and users.

runs/pollcache.py keeps the status poll's reads in memory and drops an entry when one of these
notifications arrives. Nothing on SQLite: there the caches are not used.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import migrations

RUNS_CHANNEL = "autopack_runs"  # runs.pollcache.RUNS_CHANNEL, frozen here as migrations are
AUTH_CHANNEL = "autopack_auth"  # runs.pollcache.AUTH_CHANNEL


def _tables(apps: Any) -> tuple[str, str, str]:
    app_label, model_name = settings.AUTH_USER_MODEL.split(".")
    return (
        apps.get_model("runs", "Run")._meta.db_table,
        apps.get_model("authtoken", "Token")._meta.db_table,
        apps.get_model(app_label, model_name)._meta.db_table,
    )


def create_triggers(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    q = schema_editor.quote_name
    runs, tokens, users = _tables(apps)
    run_pk = apps.get_model("runs", "Run")._meta.pk.column
    schema_editor.execute(
        f"""
        CREATE OR REPLACE FUNCTION autopack_notify_run() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('{RUNS_CHANNEL}', OLD.{q(run_pk)}::text);
            RETURN NULL;
        END $$ LANGUAGE plpgsql;
        CREATE OR REPLACE FUNCTION autopack_notify_runs_emptied() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('{RUNS_CHANNEL}', '*');
            RETURN NULL;
        END $$ LANGUAGE plpgsql;
        CREATE OR REPLACE FUNCTION autopack_notify_auth() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('{AUTH_CHANNEL}', '');
            RETURN NULL;
        END $$ LANGUAGE plpgsql;
        CREATE TRIGGER autopack_run_changed AFTER UPDATE OR DELETE ON {q(runs)}
            FOR EACH ROW EXECUTE FUNCTION autopack_notify_run();
        CREATE TRIGGER autopack_runs_emptied AFTER TRUNCATE ON {q(runs)}
            FOR EACH STATEMENT EXECUTE FUNCTION autopack_notify_runs_emptied();
        CREATE TRIGGER autopack_token_changed AFTER UPDATE OR DELETE OR TRUNCATE ON {q(tokens)}
            FOR EACH STATEMENT EXECUTE FUNCTION autopack_notify_auth();
        CREATE TRIGGER autopack_user_changed AFTER UPDATE OR DELETE OR TRUNCATE ON {q(users)}
            FOR EACH STATEMENT EXECUTE FUNCTION autopack_notify_auth();
        """
    )


def drop_triggers(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    q = schema_editor.quote_name
    runs, tokens, users = _tables(apps)
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
        ("runs", "0001_initial"),
        ("authtoken", "0004_alter_tokenproxy_options"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [migrations.RunPython(create_triggers, drop_triggers)]
