from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q

from routing.types import DecisionScope
from usage.vocabulary import CONTROL_RUN_CODENAME, FIXED_ROLES, Complexity, Period

from .states import PHASE_IN_FLIGHT, RUN_ACTIVE, PhaseState, RunState

# A terminal phase's usage totals per fixed role (Phase.builder_tokens …): the columns of its
# tokens, calls, unpriced calls and USD, in that order.
PHASE_USAGE_FIELDS: dict[str, tuple[str, str, str, str]] = {
    role: (f"{role}_tokens", f"{role}_calls", f"{role}_unpriced_calls", f"{role}_cost_usd")
    for role in FIXED_ROLES
}


class ChecksState(models.TextChoices):
    """What a change's checks said: the phase page and the API show it per attempt and phase."""

    NONE = "none", "No checks"
    PASSED = "passed", "Passed"
    FAILED = "failed", "Failed"
    NOT_RUN = "not_run", "Not run"


class Run(models.Model):
    name = models.CharField(max_length=200)
    state = models.CharField(max_length=20, choices=RunState.choices, default=RunState.PENDING)
    # Why the run paused, stopped or failed, in words a person can act on.
    state_reason = models.TextField(blank=True, default="")
    plan = models.JSONField(help_text="The validated plan as imported.")
    workspace = models.CharField(max_length=500, blank=True, default="")
    # The run's git working tree (runs.workspace), set at the first claim: workspace_path is
    # the directory really used (shown everywhere), branch holds only approved commits,
    # base_commit is where the run started and head_commit the last approved commit (the
    # savepoint every attempt starts from).
    workspace_path = models.CharField(max_length=1000, blank=True, default="")
    branch = models.CharField(max_length=200, blank=True, default="")
    base_commit = models.CharField(max_length=40, blank=True, default="")
    head_commit = models.CharField(max_length=40, blank=True, default="")
    # From the plan, kept apart from `plan` (deferred: it grows with the phases) because every
    # claim needs them: a local repository to work on instead of `workspace`, the globs no
    # edit may touch, and the commands every phase's change must pass.
    source = models.CharField(max_length=1000, blank=True, default="")
    protected_paths = models.JSONField(default=list, blank=True)
    check_commands = models.JSONField(default=list, blank=True)
    max_attempts = models.PositiveSmallIntegerField(default=3)
    guards = models.JSONField(default=list, blank=True)
    # Per-run settings that outlive a phase, e.g. model_overrides and the mapping snapshot.
    run_context = models.JSONField(default=dict, blank=True)
    # Notes to the supervisor added (runs.notes.run_note_add is the only way to add one): while
    # it is 0 a builder prompt needs no query for notes, which most runs never have.
    note_count = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    # RunProgress, kept in the same transaction as every phase's terminal transition so a
    # status poll is one row read.
    total_tiers = models.PositiveIntegerField(default=0)
    total_phases = models.PositiveIntegerField(default=0)
    completed_tiers = models.PositiveIntegerField(default=0)
    completed_phases = models.PositiveIntegerField(default=0)
    current_tier_index = models.PositiveIntegerField(null=True, blank=True)  # 1-based
    current_phase_index = models.PositiveIntegerField(null=True, blank=True)  # 1-based, run-wide

    class Meta:
        ordering = ["-created_at"]
        permissions = [(CONTROL_RUN_CODENAME, "Can start, pause, resume and stop runs")]
        indexes = [
            models.Index(
                fields=["state"], name="run_active_idx", condition=Q(state__in=sorted(RUN_ACTIVE))
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(completed_phases__lte=models.F("total_phases")),
                name="run_completed_phases_lte_total",
            ),
            models.CheckConstraint(
                condition=Q(completed_tiers__lte=models.F("total_tiers")),
                name="run_completed_tiers_lte_total",
            ),
            models.CheckConstraint(
                condition=Q(max_attempts__gte=1), name="run_max_attempts_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"Run {self.pk}: {self.name}"

    @property
    def percent_complete(self) -> int:
        if not self.total_phases:
            return 0
        return int(self.completed_phases * 100 / self.total_phases)

    @property
    def position_label(self) -> str:
        """Where the run is in the progress page's words (runs.selectors.position_text), and
        its percent: with the phase's name and whether it has finished when the row was read
        through selectors.with_position (run_status and the admin read it so), else by its
        counters alone. Never "Tier 0" or "Phase 0"."""
        # Imported here: the words are the selectors' (they read phases), the row is ours.
        from .selectors import position_of, position_text

        return f"{position_text(position_of(self))} ({self.percent_complete}%)"


class Tier(models.Model):
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="tiers")
    index = models.PositiveIntegerField()  # 1-based
    name = models.CharField(max_length=200)
    total_phases = models.PositiveIntegerField(default=0)
    completed_phases = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["run_id", "index"]
        constraints = [
            models.UniqueConstraint(fields=["run", "index"], name="tier_unique_index_per_run"),
        ]

    def __str__(self) -> str:
        return f"Tier {self.index}: {self.name}"


class Phase(models.Model):
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="phases")
    tier = models.ForeignKey(Tier, on_delete=models.CASCADE, related_name="phases")
    index = models.PositiveIntegerField(help_text="1-based position inside its tier")
    position = models.PositiveIntegerField(help_text="1-based position in the whole run")
    name = models.CharField(max_length=200)
    category = models.CharField(max_length=64)
    complexity = models.CharField(max_length=10, choices=Complexity.choices)
    description = models.TextField(blank=True, default="")
    acceptance_criteria = models.JSONField(default=list, blank=True)
    # The phase's own checks (commands), run after the plan's.
    check_commands = models.JSONField(default=list, blank=True)

    state = models.CharField(max_length=20, choices=PhaseState.choices, default=PhaseState.PENDING)
    attempt_count = models.PositiveSmallIntegerField(default=0)
    builder_output = models.TextField(blank=True, default="")
    auditor_verdict = models.JSONField(null=True, blank=True)
    failure_reason = models.TextField(blank=True, default="")
    issues_minor = models.PositiveIntegerField(default=0)
    issues_major = models.PositiveIntegerField(default=0)
    issues_critical = models.PositiveIntegerField(default=0)
    # The approved attempt's change (for a failed phase: its last attempt's), set when the
    # phase reaches its terminal state so lists need no join to the attempts.
    commit_sha = models.CharField(max_length=40, blank=True, default="")
    files_changed = models.JSONField(default=list, blank=True)
    lines_added = models.PositiveIntegerField(default=0)
    lines_removed = models.PositiveIntegerField(default=0)
    checks_state = models.CharField(
        max_length=10, choices=ChecksState.choices, default=ChecksState.NONE
    )
    # What the phase's calls billed, per fixed role (PHASE_USAGE_FIELDS): every attempt, lost
    # calls included; tokens are prompt + completion, cost_usd sums the priced calls and
    # unpriced_calls counts the others. Written from its UsageEvent rows when the phase reaches
    # its terminal state (services._set_phase_state; 0 for a phase never claimed), so the run
    # forecast reads phases, not events (runs.forecast).
    builder_tokens = models.BigIntegerField(default=0, db_default=0)
    builder_calls = models.PositiveIntegerField(default=0, db_default=0)
    builder_unpriced_calls = models.PositiveIntegerField(default=0, db_default=0)
    builder_cost_usd = models.DecimalField(
        max_digits=24, decimal_places=12, default=Decimal(0), db_default=Decimal(0)
    )
    auditor_tokens = models.BigIntegerField(default=0, db_default=0)
    auditor_calls = models.PositiveIntegerField(default=0, db_default=0)
    auditor_unpriced_calls = models.PositiveIntegerField(default=0, db_default=0)
    auditor_cost_usd = models.DecimalField(
        max_digits=24, decimal_places=12, default=Decimal(0), db_default=Decimal(0)
    )

    # Dispatch and lease: a task carries the dispatch token it was sent with, so a stale or
    # duplicate message cannot claim a phase that has been re-dispatched since.
    dispatch_token = models.CharField(max_length=64, blank=True, default="")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    lost_worker_count = models.PositiveSmallIntegerField(default=0)
    # The process that claimed the phase (runs.holders.Holder) and its last heartbeat: a dead
    # holder is found within seconds (its pid gone on this machine, or its heartbeat stopped)
    # instead of when its lease runs out.
    holder_host = models.CharField(max_length=255, blank=True, default="")
    holder_pid_space = models.CharField(max_length=100, blank=True, default="")
    holder_pid = models.PositiveIntegerField(null=True, blank=True)
    holder_started = models.BigIntegerField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["run_id", "position"]
        constraints = [
            models.UniqueConstraint(fields=["run", "position"], name="phase_unique_position"),
            models.UniqueConstraint(fields=["tier", "index"], name="phase_unique_index_per_tier"),
        ]
        indexes = [
            # The sweeper's question: which in-flight phases have an expired lease?
            models.Index(
                fields=["lease_expires_at"],
                name="phase_in_flight_lease_idx",
                condition=Q(state__in=sorted(PHASE_IN_FLIGHT)),
            ),
            # A finished phase's transaction asks "is one still in flight?" and "which is
            # next?". Without these both walk the run's finished phases: a cost per phase
            # that grew with the run's progress (docs/benchmarks.md).
            models.Index(
                fields=["run"],
                name="phase_in_flight_run_idx",
                condition=Q(state__in=sorted(PHASE_IN_FLIGHT)),
            ),
            models.Index(
                fields=["run", "position"],
                name="phase_pending_position_idx",
                condition=Q(state=PhaseState.PENDING),
            ),
        ]

    def __str__(self) -> str:
        return f"Phase {self.position}: {self.name}"

    @property
    def issue_count(self) -> int:
        return self.issues_minor + self.issues_major + self.issues_critical


class PhaseAttempt(models.Model):
    class Outcome(models.TextChoices):
        IN_PROGRESS = "in_progress", "In progress"
        APPROVED = "approved", "Approved"
        REVISE = "revise", "Revise"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"
        ABANDONED = "abandoned", "Abandoned (worker lost)"

    phase = models.ForeignKey(Phase, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveSmallIntegerField()
    dispatch_token = models.CharField(max_length=64)
    outcome = models.CharField(max_length=20, choices=Outcome.choices, default=Outcome.IN_PROGRESS)
    builder_model = models.CharField(max_length=100, blank=True, default="")
    builder_output = models.TextField(blank=True, default="")
    auditor_model = models.CharField(max_length=100, blank=True, default="")
    auditor_verdict = models.JSONField(null=True, blank=True)
    feedback = models.JSONField(default=list, blank=True, help_text="Issues given to the builder")
    # What the builder was asked (so a person can check that a note reached it).
    builder_prompt = models.TextField(blank=True, default="")
    # The attempt's commit (kept under refs/autopack/run-<id>/attempts/ when not approved).
    commit_sha = models.CharField(max_length=40, blank=True, default="")
    files_changed = models.JSONField(default=list, blank=True)
    lines_added = models.PositiveIntegerField(default=0)
    lines_removed = models.PositiveIntegerField(default=0)
    # The commit's patch, bounded (runs.workspace); diff_truncated says the tail was cut.
    diff = models.TextField(blank=True, default="")
    diff_truncated = models.BooleanField(default=False)
    # The refusal sent back to the builder when its change could not be applied.
    edit_error = models.TextField(blank=True, default="")
    # One {command, outcome, exit_code, duration_s, output, sandboxed, reason} per check.
    checks = models.JSONField(default=list, blank=True)
    checks_state = models.CharField(
        max_length=10, choices=ChecksState.choices, default=ChecksState.NONE
    )
    started_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["phase_id", "id"]
        constraints = [
            # A change that failed (or never ran) a required check cannot be approved.
            models.CheckConstraint(
                condition=~Q(outcome="approved")
                | Q(checks_state__in=[ChecksState.NONE, ChecksState.PASSED]),
                name="attempt_approved_only_with_checks_passed",
            ),
        ]

    def __str__(self) -> str:
        return f"Attempt {self.number} of phase {self.phase_id}"


class PhaseEvent(models.Model):
    """The phase's timeline: claims, provider failures, re-dispatches, checkpoints."""

    class Kind(models.TextChoices):
        CLAIMED = "claimed", "Claimed"
        PROVIDER_ERROR = "provider_error", "Provider error"
        WORKER_LOST = "worker_lost", "Worker lost"
        REDISPATCHED = "redispatched", "Re-dispatched"
        VERDICT = "verdict", "Auditor verdict"
        COMMITTED = "committed", "Change committed"
        EDIT_REFUSED = "edit_refused", "Change refused"
        CHECKS_FAILED = "checks_failed", "Checks failed"
        CANCELLED = "cancelled", "Cancelled"
        FAILED = "failed", "Failed"

    phase = models.ForeignKey(Phase, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=30, choices=Kind.choices)
    message = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["phase_id", "id"]

    def __str__(self) -> str:
        return f"{self.kind}: {self.message[:60]}"


class PhaseRoutingDecision(models.Model):
    """Which model the router chose for one call of a phase, and why."""

    phase = models.ForeignKey(Phase, on_delete=models.CASCADE, related_name="routing_decisions")
    attempt_number = models.PositiveSmallIntegerField()
    role = models.CharField(max_length=100)
    category = models.CharField(max_length=64)
    complexity = models.CharField(max_length=10)
    model = models.CharField(max_length=100)
    provider = models.CharField(max_length=50)
    # Where the model came from (routing.types.DecisionScope); "" on rows older than the
    # column. `reason` is the display text, never parsed back.
    scope = models.CharField(
        max_length=30, blank=True, default="", choices=[(s.value, s.label) for s in DecisionScope]
    )
    reason = models.CharField(max_length=200)
    candidates = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["phase_id", "id"]

    def __str__(self) -> str:
        return f"{self.role} → {self.model} ({self.reason})"


class BudgetGuard(models.Model):
    """A rule such as "stop the run if Anthropic passes 80% of its week window".

    With no run it applies to every run (edited in the admin); a run's own guards come from its
    plan's `guards`. It watches one cap window of its provider (usage.windows), by name; a guard
    given a `period` (day, week, month: the legacy UTC windows of those names) keeps it too.
    """

    Period = Period  # the one definition (usage.vocabulary), as BudgetGuard.Period

    class Action(models.TextChoices):
        PAUSE = "pause", "Pause the run"
        STOP = "stop", "Stop the run"

    run = models.ForeignKey(
        Run,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="budget_guards",
        help_text="Empty: applies to every run.",
    )
    provider = models.CharField(max_length=50)
    # The cap window watched (a name of usage.selectors.provider_windows for the provider).
    window = models.CharField(max_length=64, help_text="The provider's cap window, e.g. week")
    # Legacy: day, week or month when the guard was given as a period (its window has that
    # name); empty for a guard given by window.
    period = models.CharField(max_length=10, choices=Period.choices, blank=True, default="")
    threshold_percent = models.DecimalField(
        max_digits=6, decimal_places=2, help_text="Percent of the provider's effective cap."
    )
    action = models.CharField(max_length=10, choices=Action.choices)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run_id", "provider", "window"]
        constraints = [
            models.CheckConstraint(
                condition=Q(threshold_percent__gt=0, threshold_percent__lte=100),
                name="guard_threshold_in_range",
            ),
            models.CheckConstraint(condition=~Q(window=""), name="guard_window_set"),
        ]

    def __str__(self) -> str:
        # normalize() drops the column's trailing zeros: "80%", "80.5%", never "80.00%".
        threshold = f"{Decimal(str(self.threshold_percent)).normalize():f}"
        return f"{self.provider} > {threshold}% {self.window} → {self.action}"


class GuardFiring(models.Model):
    """A guard fired for a run (once per guard and run)."""

    guard = models.ForeignKey(BudgetGuard, on_delete=models.CASCADE, related_name="firings")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="guard_firings")
    percent_of_cap = models.DecimalField(max_digits=8, decimal_places=2)
    message = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["guard", "run"], name="guard_fires_once_per_run"),
        ]

    def __str__(self) -> str:
        return self.message


class HumanNote(models.Model):
    """A note to the supervisor: kept here, appended to the run's own notes file
    (runs.notes.notes_file), and put in the builder's prompt from the next phase on."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="notes")
    text = models.TextField()
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run_id", "id"]

    def __str__(self) -> str:
        # Which run it belongs to first: the admin titles a note's page and history by this.
        return f"Note on run {self.run_id}: {self.text[:60]}"
