"""Once: PostgreSQL triggers that notified web processes of changed runs, tokens and users (for
a per-process cache of the status poll). The status is now cached by the run's updated_at and
tokens are checked by DRF on every request, so nothing listens; 0009 drops the triggers where
this migration had created them."""

from __future__ import annotations

from django.conf import settings
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("runs", "0001_initial"),
        ("authtoken", "0004_alter_tokenproxy_options"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations: list[migrations.operations.base.Operation] = []
