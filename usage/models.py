"""Metered provider usage, its hourly rollups and the provider caps.

Summaries never scan UsageEvent: its rows are folded into two rollup tables, and the selectors
read those. Recording a call is one plain insert (services.record_usage sits on the path of
every LLM call); the event stays `rolled_up = false` until services.usage_fold (every few
seconds, from beat) adds it to both rollups (and to the per-minute UsageMinuteRollup the cap
windows read) and flips the flag in one statement. A summary
reads the rollups plus the few events not folded yet (a partial index holds only those) in one
statement, so it is exact at any instant: each event is counted once, before or after its
fold. Where the event is rolled up in the statement that inserts it (the bulk import, and on
SQLite every insert), it is stored already folded. Rollup buckets are UTC hours:
small enough that any window starting and ending on the hour (every calendar day, ISO week and
month in UTC) is exact, large enough that a month of usage is a few thousand rows whatever the
number of events. Windows that do not start on the hour take the whole minutes of their
partial hours from UsageMinuteRollup and only the sub-minute edges from the events.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from .vocabulary import AGENT_ROLE_PREFIX, RECORD_USAGE_CODENAME, Period, Role, is_valid_role
from .windows import (
    WINDOW_KEYS,
    CalendarUnit,
    WindowConfigError,
    WindowKind,
    WindowSpec,
    window_from_config,
)

ROLE_IS_VALID = Q(role__in=Role.values) | (
    Q(role__startswith=AGENT_ROLE_PREFIX) & ~Q(role=AGENT_ROLE_PREFIX)
)


class InvalidRoleError(ValueError):
    """A role that is not builder, auditor or agent:<name>. Raised by the services before they
    touch the database, so a caller gets this message rather than the constraint's
    IntegrityError (which names no role)."""

    def __init__(self, role: object) -> None:
        self.role = role
        super().__init__(
            f"invalid role {role!r}: a role is builder, auditor or {AGENT_ROLE_PREFIX}<name>"
        )


def check_role(role: object) -> None:
    """ROLE_IS_VALID in Python (the same rule the constraints hold), as a clear error."""
    if not (isinstance(role, str) and is_valid_role(role)):
        raise InvalidRoleError(role)


# call_id prefix of a lost call (services.in_flight_calls_lose): what tells a lost call from
# the other estimated events (a stream cut before its final usage).
LOST_CALL_PREFIX = "lost:"


TOKEN_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


def _token_constraints(prefix: str) -> list[models.BaseConstraint]:
    return [
        *(
            models.CheckConstraint(
                condition=Q(**{f"{name}__gte": 0}), name=f"{prefix}_{name}_not_negative"
            )
            for name in TOKEN_FIELDS
        ),
        # The parts are included in the totals (see usage.types.TokenUsage).
        models.CheckConstraint(
            condition=Q(prompt_tokens__gte=F("cached_input_tokens") + F("cache_write_tokens")),
            name=f"{prefix}_cache_parts_within_prompt",
        ),
        models.CheckConstraint(
            condition=Q(completion_tokens__gte=F("reasoning_tokens")),
            name=f"{prefix}_reasoning_within_completion",
        ),
    ]


class UsageSource(models.TextChoices):
    """Where a UsageEvent came from (UsageEvent.source)."""

    WORKER = "worker", "Autopack's workers"
    API = "api", "POST /usage/events"
    OTEL = "otel", "OpenTelemetry (POST /v1/logs, /v1/traces)"
    PROVIDER_API = "provider_api", "The provider's usage API"


# The sources whose usage is "outside tools": a person's own Claude Code, Codex or other tools
# reporting over OpenTelemetry. Autopack's own usage is the workers' and its agents' (api).
OUTSIDE_SOURCES = frozenset({UsageSource.OTEL.value})


class OutsideUsage(models.TextChoices):
    """ProviderQuota.outside_usage: what a provider's cap windows count."""

    # As before outside tools were seen: Autopack's usage against cap × autopack_share.
    SHARE = "share", "Autopack's usage against its share of the cap"
    # Everything seen, Autopack's and outside tools', against the whole plan cap.
    WHOLE_CAP = "whole_cap", "Everything seen against the whole cap"


class UsageEvent(models.Model):
    """The tokens one provider call billed, as the provider's API reported them."""

    provider = models.CharField(max_length=64)
    model = models.CharField(max_length=200)
    role = models.CharField(max_length=100)
    # Plain integers, not foreign keys: usage depends on nothing (runs → routing → usage), and
    # metering must outlive a deleted run.
    run_id = models.BigIntegerField(null=True, blank=True)
    phase_id = models.BigIntegerField(null=True, blank=True)
    call_id = models.CharField(max_length=255)  # idempotency key of one call: see Meta
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cached_input_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    reasoning_tokens = models.BigIntegerField(default=0)
    # The 1-hour part of cache_write_tokens (Anthropic's ephemeral_1h_input_tokens): priced at
    # its own rate, so cost_usd depends on it; the rollups do not keep it (no summary shows it,
    # and the cost it changes is summed already priced).
    cache_write_1h_tokens = models.BigIntegerField(default=0, db_default=0)
    # The model the provider says answered (a dated snapshot, Gemini's modelVersion); "" when it
    # said none or nothing answered (a lost call). `model` stays the catalogue model asked for:
    # caps and summaries group by it. db_default: raw inserts that predate it stay valid.
    reported_model = models.CharField(max_length=200, blank=True, default="", db_default="")
    provider_request_id = models.CharField(max_length=255, blank=True, default="")
    latency_ms = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(
        max_digits=24, decimal_places=12, null=True, blank=True, help_text="None: no known price"
    )
    # Indexed by the (created_at, …) indexes below, whose leading column serves range scans.
    created_at = models.DateTimeField(default=timezone.now)
    # False until services.usage_fold has added the event to the rollups (module docstring).
    rolled_up = models.BooleanField(default=False, db_default=False)
    # True when the tokens are not the provider's final count: a lost call (see InFlightCall;
    # the provider never answered Autopack, so prompt_tokens is estimated from the prompt and
    # completion_tokens is 0; call_id starts with LOST_CALL_PREFIX), or a stream cut before its
    # final usage (what the provider had reported before the cut).
    estimated = models.BooleanField(default=False, db_default=False)
    # Who reported the call. db_default: a constant default, so PostgreSQL adds the column
    # without rewriting the table, and raw inserts that predate it stay valid.
    source = models.CharField(
        max_length=16,
        choices=UsageSource.choices,
        default=UsageSource.WORKER,
        db_default=UsageSource.WORKER,
    )

    class Meta:
        # An agent's token (POST /usage/events) needs this and nothing else: no staff status.
        permissions = [(RECORD_USAGE_CODENAME, "Can record usage (POST /usage/events)")]
        constraints = [
            # A constraint rather than unique=True: the field option also builds a
            # varchar_pattern_ops "_like" index on PostgreSQL, which no query here needs.
            models.UniqueConstraint(fields=["call_id"], name="usageevent_call_id_unique"),
            *_token_constraints("usageevent"),
            models.CheckConstraint(
                condition=Q(cache_write_1h_tokens__gte=0)
                & Q(cache_write_tokens__gte=F("cache_write_1h_tokens")),
                name="usageevent_cache_write_1h_within_cache_write",
            ),
            models.CheckConstraint(condition=ROLE_IS_VALID, name="usageevent_role_valid"),
            models.CheckConstraint(condition=~Q(provider=""), name="usageevent_provider_set"),
        ]
        indexes = [
            # The run page: per-phase, per-role totals of one run.
            models.Index(
                fields=["run_id", "phase_id", "role"],
                name="usageevent_run_phase_role",
                condition=Q(run_id__isnull=False),
            ),
            models.Index(
                fields=["phase_id"], name="usageevent_phase", condition=Q(phase_id__isnull=False)
            ),
            # Ad-hoc admin filters and the partial hours of an unaligned window.
            models.Index(fields=["created_at", "provider"], name="usageevent_created_provider"),
            models.Index(fields=["created_at", "model"], name="usageevent_created_model"),
            # The events not folded yet: a few seconds' worth, whatever the table's size.
            models.Index(
                fields=["created_at"], name="usageevent_pending", condition=Q(rolled_up=False)
            ),
            # The lost calls of a run (progress page, phase page): rare, so a tiny index that
            # a status poll can afford, however many events the run has.
            models.Index(
                fields=["run_id", "phase_id"], name="usageevent_lost", condition=Q(estimated=True)
            ),
        ]

    def __str__(self) -> str:
        return f"{self.provider}/{self.model} {self.role} {self.call_id}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def is_lost_call(self) -> bool:
        return self.call_id.startswith(LOST_CALL_PREFIX)

    @property
    def model_shown(self) -> str:
        """The catalogue model, and the reported one beside it when that differs."""
        if self.reported_model and self.reported_model != self.model:
            return f"{self.model} ({self.reported_model})"
        return self.model


class InFlightCall(models.Model):
    """A provider call from just before it is sent until its answer (or error) comes back.

    A worker killed while waiting leaves its row behind: the provider has billed the call, but
    no usage ever reached Autopack. When the attempt is abandoned (the lease sweeper hands the
    phase on, or a new claim takes it over) services.in_flight_calls_lose turns each row left
    into a lost call: a UsageEvent with estimated=True. The row is deleted when the call is
    closed, so the table holds only the calls in flight (a few rows, whatever the history).
    """

    # The caller's key for this call (runs: dispatch token, attempt, step, model). Not the
    # UsageEvent's call_id, which is the provider's request id once there is an answer. At
    # most 240 characters, so that a lost call's id ("lost:" + key) fits UsageEvent.call_id.
    call_key = models.CharField(max_length=240)
    provider = models.CharField(max_length=64)
    model = models.CharField(max_length=200)  # the catalogue model
    role = models.CharField(max_length=100)
    # Plain integers for the same reason as UsageEvent's.
    run_id = models.BigIntegerField(null=True, blank=True)
    phase_id = models.BigIntegerField(null=True, blank=True)
    attempt = models.PositiveIntegerField(null=True, blank=True, help_text="Attempt number")
    estimated_prompt_tokens = models.BigIntegerField(
        help_text="From the prompt's length (services.estimate_prompt_tokens)"
    )
    started_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            # A constraint rather than unique=True (no "_like" index): the close and the
            # duplicate check look the key up by equality.
            models.UniqueConstraint(fields=["call_key"], name="inflightcall_call_key_unique"),
            models.CheckConstraint(
                condition=Q(estimated_prompt_tokens__gte=0),
                name="inflightcall_estimate_not_negative",
            ),
            models.CheckConstraint(condition=ROLE_IS_VALID, name="inflightcall_role_valid"),
            models.CheckConstraint(condition=~Q(provider=""), name="inflightcall_provider_set"),
        ]
        indexes = [
            # An abandoned attempt's calls: those of its phase.
            models.Index(fields=["phase_id"], name="inflightcall_phase"),
        ]

    def __str__(self) -> str:
        return f"{self.provider}/{self.model} {self.role} {self.call_key} (in flight)"


class _RollupBase(models.Model):
    """Summed UsageEvents of one UTC hour and key; maintained by the services only."""

    bucket = models.DateTimeField(help_text="Start of the UTC hour")
    provider = models.CharField(max_length=64)
    model = models.CharField(max_length=200)
    # In the key so that the per-model table can name the snapshots that answered for a
    # catalogue model without reading the events; summaries group by `model` and add these
    # rows up. A catalogue model answers as one or two snapshots at a time, so this adds few
    # rows. db_default: rows written by raw SQL that predates it (bench) stay valid.
    reported_model = models.CharField(max_length=200, blank=True, default="", db_default="")
    role = models.CharField(max_length=100)
    # Usage from outside tools (UsageEvent.source otel: a person's own Claude Code, Codex, …),
    # kept apart so a provider whose outside_usage is "share" leaves it out of its cap windows,
    # and the usage panel shows it on its own (OUTSIDE_SOURCES).
    outside = models.BooleanField(default=False, db_default=False)
    calls = models.BigIntegerField(default=0)
    # Calls without a known price add nothing to cost_usd; counted so a summary can say whether
    # its cost is complete.
    unpriced_calls = models.BigIntegerField(default=0)
    # Calls whose tokens are estimated (UsageEvent.estimated): counted so a summary can say
    # that part of its tokens is an estimate.
    estimated_calls = models.BigIntegerField(default=0, db_default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cached_input_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    reasoning_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=24, decimal_places=12, default=Decimal(0))

    class Meta:
        abstract = True


class UsageRollup(_RollupBase):
    """Per hour, provider, model, reported model and role: the provider, model and role
    summaries read this.

    No run in the key, so its size grows with time and distinct models, not with events or runs.
    """

    class Meta:
        constraints = [
            *_token_constraints("usagerollup"),
            models.UniqueConstraint(
                fields=["bucket", "provider", "model", "reported_model", "role", "outside"],
                name="usagerollup_key",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.bucket:%Y-%m-%d %H}h {self.provider}/{self.model} {self.role}"


class UsageMinuteRollup(models.Model):
    """Per UTC minute and provider: what the cap windows read for the partial hours at their
    edges (usage.selectors.window_usage), so that a window not starting on the hour reads at
    most 59 + 59 of these rows and two sub-minute ranges of events, not up to two hours of
    events. Written by the same statement as the hourly rollups (services: the fold, the bulk
    import), so an event is in all of them or in none. Only what windows count: tokens in and
    out, cost, calls and the first event's instant.

    Kept, not pruned: a window may start weeks back (a calendar month in a zone off the whole
    hour, an anchored window of many days), and the table holds at most 1,440 rows a day per
    provider with usage (about 0.5 M rows a year per provider), whatever the number of events.
    """

    provider = models.CharField(max_length=64)
    minute = models.DateTimeField(help_text="Start of the UTC minute")
    calls = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=24, decimal_places=12, default=Decimal(0))
    # The instant of the minute's first event: a rolling window's oldest usage (its reset) to
    # the microsecond without reading the events.
    first_at = models.DateTimeField()
    # Outside tools' usage (see _RollupBase.outside): a minute has up to two rows per provider.
    outside = models.BooleanField(default=False, db_default=False)

    class Meta:
        constraints = [
            # Its index (provider, minute, outside) serves the windows' range reads.
            models.UniqueConstraint(
                fields=["provider", "minute", "outside"], name="usageminuterollup_key"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.minute:%Y-%m-%d %H:%M} {self.provider}"


NO_RUN = 0  # run_id of events outside any run: NULL cannot be part of a portable unique key


class RunUsageRollup(_RollupBase):
    """Per hour, run, provider, model, reported model and role: run totals and summaries
    grouped by run."""

    run_id = models.BigIntegerField(default=NO_RUN, help_text="0: not part of a run")

    class Meta:
        constraints = [
            *_token_constraints("runusagerollup"),
            models.UniqueConstraint(
                fields=[
                    "bucket",
                    "run_id",
                    "provider",
                    "model",
                    "reported_model",
                    "role",
                    "outside",
                ],
                name="runusagerollup_key",
            ),
        ]
        indexes = [
            models.Index(fields=["run_id"], name="runusagerollup_run", condition=~Q(run_id=NO_RUN)),
        ]

    def __str__(self) -> str:
        return f"{self.bucket:%Y-%m-%d %H}h run {self.run_id} {self.provider}/{self.model}"


class ProviderQuota(models.Model):
    """A provider's plan caps, and how much of them Autopack may use."""

    provider = models.CharField(max_length=64, unique=True)
    # None = no cap for that period.
    daily_cap_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    weekly_cap_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    monthly_cap_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    autopack_share = models.DecimalField(
        max_digits=5,
        decimal_places=4,
        default=Decimal(1),
        validators=[MinValueValidator(Decimal(0)), MaxValueValidator(Decimal(1))],
        help_text="Fraction of each cap Autopack may use (0–1)",
    )
    soft_limit = models.DecimalField(
        max_digits=5,
        decimal_places=4,
        default=Decimal("0.8"),
        validators=[MinValueValidator(Decimal("0.0001")), MaxValueValidator(Decimal(1))],
        help_text="Fraction of the effective cap after which the router prefers fallbacks",
    )
    # Pacing (usage.forecast): while a window's cap would be reached before its reset at the last
    # hour's pace, the router treats the provider as past its soft limit for non-critical
    # categories, so a week's budget lasts the week.
    pace = models.BooleanField(
        default=False,
        help_text="Past its soft limit for non-critical categories while the last hour's pace "
        "would reach a window's cap before its reset",
    )
    outside_usage = models.CharField(
        max_length=16,
        choices=OutsideUsage.choices,
        default=OutsideUsage.SHARE,
        db_default=OutsideUsage.SHARE,
        help_text="share: the windows count Autopack's usage against cap × autopack_share; "
        "whole_cap: everything seen, outside tools' usage too, against the whole cap",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(outside_usage__in=OutsideUsage.values),
                name="providerquota_outside_usage_valid",
            ),
            models.CheckConstraint(
                condition=Q(autopack_share__gte=0, autopack_share__lte=1),
                name="providerquota_share_between_0_and_1",
            ),
            models.CheckConstraint(
                condition=Q(soft_limit__gt=0, soft_limit__lte=1),
                name="providerquota_soft_limit_in_0_1",
            ),
            models.CheckConstraint(condition=~Q(provider=""), name="providerquota_provider_set"),
        ]

    def __str__(self) -> str:
        return self.provider

    def cap(self, period: str) -> int | None:
        return {
            Period.DAY: self.daily_cap_tokens,
            Period.WEEK: self.weekly_cap_tokens,
            Period.MONTH: self.monthly_cap_tokens,
        }[Period(period)]

    @property
    def counts_everything(self) -> bool:
        """outside_usage whole_cap: every usage seen counts against the whole cap."""
        return self.outside_usage == OutsideUsage.WHOLE_CAP

    def effective_cap(self, period: str) -> int | None:
        """The part of the period's cap its usage counts against, None if no cap: cap ×
        autopack_share, or the whole cap when outside_usage is whole_cap."""
        cap = self.cap(period)
        if cap is None:
            return None
        if self.counts_everything:
            return cap
        return int(Decimal(cap) * Decimal(self.autopack_share))


class ProviderWindow(models.Model):
    """One cap window of a provider (usage.windows): calendar, anchored or rolling, with a cap
    in tokens, USD and/or requests. The legacy daily/weekly/monthly caps of ProviderQuota are
    not stored here: usage.selectors.provider_windows derives them, and a row with the same
    name (day, week, month) takes their place."""

    provider = models.CharField(max_length=64)
    name = models.CharField(max_length=64, help_text="e.g. session, week, day")
    kind = models.CharField(max_length=16, choices=WindowKind.choices)
    unit = models.CharField(
        max_length=8, choices=CalendarUnit.choices, blank=True, help_text="Calendar windows"
    )
    time_zone = models.CharField(
        max_length=64,
        blank=True,
        help_text="IANA name (calendar and anchored windows; empty: UTC)",
    )
    hours = models.PositiveIntegerField(
        null=True, blank=True, help_text="Rolling: the last N hours; anchored: length in hours"
    )
    days = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Anchored: length in days (repeats at the same local time across DST)",
    )
    anchor = models.DateTimeField(
        null=True, blank=True, help_text="Anchored: an instant the window starts at"
    )
    cap_tokens = models.PositiveBigIntegerField(null=True, blank=True, help_text="Tokens in + out")
    cap_usd = models.DecimalField(max_digits=18, decimal_places=6, null=True, blank=True)
    cap_requests = models.PositiveBigIntegerField(null=True, blank=True, help_text="Calls")
    autopack_share = models.DecimalField(
        max_digits=5,
        decimal_places=4,
        null=True,
        blank=True,
        help_text="Empty: the provider's autopack_share",
    )
    soft_limit = models.DecimalField(
        max_digits=5, decimal_places=4, null=True, blank=True, help_text="Empty: the provider's"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("provider", "name")
        constraints = [
            models.UniqueConstraint(fields=["provider", "name"], name="providerwindow_key"),
            models.CheckConstraint(condition=~Q(provider=""), name="providerwindow_provider_set"),
            models.CheckConstraint(condition=~Q(name=""), name="providerwindow_name_set"),
            models.CheckConstraint(
                condition=Q(cap_tokens__isnull=False)
                | Q(cap_usd__isnull=False)
                | Q(cap_requests__isnull=False),
                name="providerwindow_has_a_cap",
            ),
            models.CheckConstraint(
                condition=Q(cap_usd__isnull=True) | Q(cap_usd__gte=0),
                name="providerwindow_cap_usd_not_negative",
            ),
            # The shape of each kind (usage.windows.window_from_config says the same, by key).
            models.CheckConstraint(
                condition=(
                    Q(kind=WindowKind.CALENDAR, unit__in=CalendarUnit.values)
                    & Q(hours__isnull=True, days__isnull=True, anchor__isnull=True)
                )
                | (
                    Q(kind=WindowKind.ANCHORED, unit="", anchor__isnull=False)
                    & (Q(hours__gte=1, days__isnull=True) | Q(hours__isnull=True, days__gte=1))
                )
                | Q(
                    kind=WindowKind.ROLLING,
                    unit="",
                    time_zone="",
                    hours__gte=1,
                    days__isnull=True,
                    anchor__isnull=True,
                ),
                name="providerwindow_kind_shape",
            ),
            models.CheckConstraint(
                condition=Q(autopack_share__isnull=True)
                | Q(autopack_share__gte=0, autopack_share__lte=1),
                name="providerwindow_share_between_0_and_1",
            ),
            models.CheckConstraint(
                condition=Q(soft_limit__isnull=True) | Q(soft_limit__gt=0, soft_limit__lte=1),
                name="providerwindow_soft_limit_in_0_1",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.provider} · {self.name}"

    def config(self) -> dict[str, Any]:
        """The row as a models.yaml window mapping (empty fields left out)."""
        raw = {key: getattr(self, key) for key in WINDOW_KEYS}
        return {key: value for key, value in raw.items() if value is not None and value != ""}

    def spec(self) -> WindowSpec:
        return window_from_config(self.config(), provider=self.provider)

    def clean(self) -> None:
        # The same validation as models.yaml's, each problem on the field it names.
        try:
            self.spec()
        except WindowConfigError as exc:
            raise ValidationError({exc.key: exc.problem}) from None

    @classmethod
    def fields_of(cls, spec: WindowSpec) -> dict[str, Any]:
        """A WindowSpec as this model's field values."""
        return {
            "kind": str(spec.kind),
            "unit": str(spec.unit or ""),
            "time_zone": "" if spec.kind == WindowKind.ROLLING else spec.time_zone,
            "hours": spec.hours,
            "days": spec.days,
            "anchor": spec.anchor,
            "cap_tokens": spec.cap_tokens,
            "cap_usd": spec.cap_usd,
            "cap_requests": spec.cap_requests,
            "autopack_share": spec.autopack_share,
            "soft_limit": spec.soft_limit,
        }


class BucketWidth(models.TextChoices):
    HOUR = "1h", "hour"
    DAY = "1d", "day"


class ProviderReportedUsage(models.Model):
    """What a provider's own usage API (usage.provider_usage) reports for one bucket and model:
    OpenAI's organization usage API, Anthropic's usage report. Rewritten by every fetch of the
    buckets it covers (an upsert on the key), never added to: a re-read changes nothing.

    input_tokens counts every input token, cache reads and writes included (as
    TokenUsage.prompt_tokens does); output_tokens every output token, reasoning included.
    `model` is the model the provider names (a dated snapshot). requests is None where the API
    does not count them (Anthropic)."""

    provider = models.CharField(max_length=64)
    bucket_width = models.CharField(max_length=2, choices=BucketWidth.choices)
    bucket = models.DateTimeField(help_text="Start of the UTC hour or day")
    model = models.CharField(max_length=200, blank=True)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cache_read_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    requests = models.BigIntegerField(null=True, blank=True)
    fetched_at = models.DateTimeField()

    class Meta:
        constraints = [
            # Its index (provider, bucket_width, bucket, …) serves the reconciliation's range
            # reads and the fetch's upsert.
            models.UniqueConstraint(
                fields=["provider", "bucket_width", "bucket", "model"],
                name="providerreportedusage_key",
            ),
            *(
                models.CheckConstraint(
                    condition=Q(**{f"{name}__gte": 0}),
                    name=f"providerreportedusage_{name}_not_negative",
                )
                for name in ("input_tokens", "output_tokens", "cache_read_tokens")
            ),
            models.CheckConstraint(
                condition=Q(input_tokens__gte=F("cache_read_tokens") + F("cache_write_tokens")),
                name="providerreportedusage_cache_parts_within_input",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.provider} {self.bucket:%Y-%m-%d %H}h/{self.bucket_width} {self.model}"


class ProviderUsageFetch(models.Model):
    """The last read of one provider's usage API: when, up to which instant the stored buckets
    are complete (succeeded_at), and the last error in words (never the key)."""

    provider = models.CharField(max_length=64, unique=True)
    attempted_at = models.DateTimeField()
    succeeded_at = models.DateTimeField(null=True, blank=True)
    # The first bucket any successful read covered: a day before it was never read (the
    # reconciliation says so rather than comparing with nothing).
    covered_from = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True, help_text="The last attempt's error; empty when it worked")
    buckets = models.PositiveIntegerField(default=0, help_text="Rows the last success stored")

    def __str__(self) -> str:
        return f"{self.provider} usage API"
