"""Budget guards name a cap window (issue 16): `window` holds it; a guard given a period (day,
week, month) watches the window of that name, as every existing guard does from here on."""

from __future__ import annotations

from typing import Any

from django.db import migrations, models
from django.db.models import F


def window_from_period(apps: Any, schema_editor: Any) -> None:
    BudgetGuard = apps.get_model("runs", "BudgetGuard")
    BudgetGuard.objects.filter(window="").update(window=F("period"))


class Migration(migrations.Migration):
    dependencies = [
        ("runs", "0006_phaseroutingdecision_scope"),
    ]

    operations = [
        migrations.AddField(
            model_name="budgetguard",
            name="window",
            field=models.CharField(
                default="", help_text="The provider's cap window, e.g. week", max_length=64
            ),
            preserve_default=False,
        ),
        migrations.RunPython(window_from_period, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="budgetguard",
            name="period",
            field=models.CharField(
                blank=True,
                choices=[("day", "Day"), ("week", "Week"), ("month", "Month")],
                default="",
                max_length=10,
            ),
        ),
        migrations.AlterModelOptions(
            name="budgetguard",
            options={"ordering": ["run_id", "provider", "window"]},
        ),
        migrations.AddConstraint(
            model_name="budgetguard",
            constraint=models.CheckConstraint(
                condition=models.Q(("window", ""), _negated=True), name="guard_window_set"
            ),
        ),
    ]
