"""The project's vocabulary, defined once: periods, roles, complexities, severities and
permission names. Every other module imports these; none types the words again.

It lives in `usage` because `usage` is the bottom of the dependency arrows (DESIGN.md:
`runs → routing → usage`): routing and runs may import it, and it imports nothing of ours. A
top-level module would be a fourth package outside the layout DESIGN.md fixes. The choices are
Django `TextChoices` because model fields use them (`UsageEvent`, `Phase.complexity`,
`BudgetGuard.period`); a `TextChoices` member is a `str`, so JSON, f-strings and comparisons
with plain text work unchanged.
"""

from __future__ import annotations

from django.db import models


class Period(models.TextChoices):
    """A calendar period in UTC (usage.selectors.period_window says where each starts)."""

    DAY = "day", "Day"
    WEEK = "week", "Week"
    MONTH = "month", "Month"

    @property
    def adjective(self) -> str:
        # "its weekly cap": the guards' messages, the dashboard's usage panel.
        return _PERIOD_ADJECTIVES[self]


_PERIOD_ADJECTIVES = {Period.DAY: "daily", Period.WEEK: "weekly", Period.MONTH: "monthly"}
PERIODS: tuple[str, ...] = tuple(Period.values)
# What a page or an API shows when no period is asked for.
DEFAULT_PERIOD = Period.WEEK


class Role(models.TextChoices):
    """The fixed roles; an agent is `agent:<name>` (AGENT_ROLE_PREFIX) and so not enumerable."""

    BUILDER = "builder", "Builder"
    AUDITOR = "auditor", "Auditor"


FIXED_ROLES: tuple[str, ...] = tuple(Role.values)
AGENT_ROLE_PREFIX = "agent:"


def is_agent_role(role: str) -> bool:
    """`agent:<name>` with a non-empty name."""
    return role.startswith(AGENT_ROLE_PREFIX) and len(role) > len(AGENT_ROLE_PREFIX)


def is_valid_role(role: str) -> bool:
    return role in FIXED_ROLES or is_agent_role(role)


class Complexity(models.TextChoices):
    """A phase's complexity, and the column of the model mapping it selects."""

    LOW = "low", "Low"
    MEDIUM = "medium", "Medium"
    HIGH = "high", "High"


COMPLEXITIES: tuple[str, ...] = tuple(Complexity.values)


class Severity(models.TextChoices):
    """An auditor's issue severity (the verdict's `issues[].severity`)."""

    MINOR = "minor", "Minor"
    MAJOR = "major", "Major"
    CRITICAL = "critical", "Critical"


SEVERITIES: tuple[str, ...] = tuple(Severity.values)

# Permissions: the codename is what a model's Meta declares, the dotted name what `has_perm`
# asks. The dotted names name the apps that declare them (runs.Run, routing.ModelRoute).
CONTROL_RUN_CODENAME = "control_run"
OVERRIDE_MODEL_CODENAME = "override_model"
CONTROL_RUN = f"runs.{CONTROL_RUN_CODENAME}"
OVERRIDE_MODEL = f"routing.{OVERRIDE_MODEL_CODENAME}"
# POST /usage/events (an agent's token: usage.UsageEvent declares it).
RECORD_USAGE_CODENAME = "record_usage"
RECORD_USAGE = f"usage.{RECORD_USAGE_CODENAME}"
# A guard for every run takes Django's own model permissions on BudgetGuard (add, delete).
ADD_GLOBAL_GUARD = "runs.add_budgetguard"
DELETE_GLOBAL_GUARD = "runs.delete_budgetguard"
