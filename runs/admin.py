from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import IntegerField, OuterRef, Prefetch, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from rest_framework.authtoken.admin import TokenAdmin as DRFTokenAdmin
from rest_framework.authtoken.models import TokenProxy

from usage.models import RunUsageRollup, UsageEvent
from usage.selectors import lost_calls as usage_lost_calls

from . import services
from .guards import guard_provider_problem
from .models import (
    BudgetGuard,
    GuardFiring,
    HumanNote,
    Phase,
    PhaseAttempt,
    PhaseEvent,
    PhaseRoutingDecision,
    Run,
    Tier,
)
from .states import IllegalTransition


class ReadOnlyInline(admin.TabularInline):
    """Rows a run or phase shows but nobody edits: they are written by the services only."""

    extra = 0
    can_delete = False

    def get_readonly_fields(self, request: HttpRequest, obj: object = None) -> Sequence[str]:
        return self.get_fields(request, obj)

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class TierInline(ReadOnlyInline):
    model = Tier
    fields = ("index", "name", "completed_phases", "total_phases")


# A run page lists this many phases at most: rendering an inline row costs about a
# millisecond, and a run can have thousands of phases (docs/benchmarks.md).
PHASE_INLINE_ROWS = 50
PHASE_INLINE_BEFORE = 10  # of those, how many finished ones before the current phase


class _PhaseWindow(BaseInlineFormSet):
    """The phases around the run's current one (from a few finished ones on), not all."""

    def get_queryset(self) -> QuerySet[Phase]:
        if not hasattr(self, "_window"):
            run = self.instance
            current = run.current_phase_index or run.completed_phases + 1
            first = max(
                1, min(current - PHASE_INLINE_BEFORE, run.total_phases - PHASE_INLINE_ROWS + 1)
            )
            self._window = super().get_queryset().filter(position__gte=first)[:PHASE_INLINE_ROWS]
        return self._window


class PhaseInline(ReadOnlyInline):
    model = Phase
    formset = _PhaseWindow
    fields = (
        "position",
        "name",
        "category",
        "complexity",
        "state",
        "attempt_count",
        "issues_minor",
        "issues_major",
        "issues_critical",
    )
    show_change_link = True
    ordering = ("position",)

    def get_fields(self, request: HttpRequest, obj: object = None) -> tuple[str, ...]:
        return (*self.fields, "models_used")

    def get_formset(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> Any:
        if obj is not None and obj.total_phases > PHASE_INLINE_ROWS:
            self.verbose_name_plural = (
                f"Phases: {PHASE_INLINE_ROWS} of {obj.total_phases}, around the current one "
                "(the link under “Phases” above lists them all)"
            )
        return super().get_formset(request, obj, **kwargs)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Phase]:
        # One query for every phase's decisions, not one per row.
        decisions = PhaseRoutingDecision.objects.only("phase_id", "role", "model").order_by("id")
        return (
            super()
            .get_queryset(request)
            .prefetch_related(Prefetch("routing_decisions", queryset=decisions))
        )

    @admin.display(description="Models used")
    def models_used(self, phase: Phase) -> str:
        seen: dict[str, list[str]] = {}
        for decision in phase.routing_decisions.all():
            models = seen.setdefault(decision.role, [])
            if decision.model not in models:
                models.append(decision.model)
        return "; ".join(f"{role}: {', '.join(models)}" for role, models in seen.items()) or "–"


def _control(verb: str, service):  # type: ignore[no-untyped-def]
    @admin.action(description=f"{verb.capitalize()} selected runs", permissions=["control"])
    def action(modeladmin: RunAdmin, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        done, refused = [], []
        for run in queryset:
            try:
                service(run_id=run.pk)
                done.append(str(run.pk))
            except IllegalTransition as exc:
                refused.append(f"run {run.pk} is {exc.current}")
        if done:
            modeladmin.message_user(request, f"{verb.capitalize()}: run(s) {', '.join(done)}.")
        if refused:
            modeladmin.message_user(
                request, f"Cannot {verb}: {'; '.join(refused)}.", level=messages.WARNING
            )

    action.__name__ = f"{verb}_runs"
    return action


def _run_tokens(column: str) -> Any:
    # Summed from the per-run hourly rollup and the run's events not folded into it yet, in
    # the same query (so the same snapshot) as the page of runs.
    def total(rows: Any) -> Coalesce:
        rows = rows.filter(run_id=OuterRef("pk")).order_by().values("run_id")
        summed = rows.annotate(total=Sum(column)).values("total")
        return Coalesce(Subquery(summed, output_field=IntegerField()), 0)

    return total(RunUsageRollup.objects) + total(UsageEvent.objects.filter(rolled_up=False))


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "name",
        "state",
        "percent",
        "progress",
        "tokens",
        "started_at",
        "finished_at",
    )
    list_filter = ("state",)
    search_fields = ("name",)
    readonly_fields = (
        "name",
        "state",
        "state_reason",
        "progress",
        "phases",
        "workspace",
        "max_attempts",
        "guards",
        "run_context",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
        "plan",
    )
    exclude = (
        "total_tiers",
        "total_phases",
        "completed_tiers",
        "completed_phases",
        "current_tier_index",
        "current_phase_index",
        "note_count",
    )
    inlines = [TierInline, PhaseInline]
    actions = [
        _control("start", services.run_start),
        _control("pause", services.run_pause),
        _control("resume", services.run_resume),
        _control("stop", services.run_stop),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Run]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                tokens_in=_run_tokens("prompt_tokens"), tokens_out=_run_tokens("completion_tokens")
            )
        )

    def has_control_permission(self, request: HttpRequest) -> bool:
        # Start, pause, resume and stop need the permission the API and the dashboard ask for.
        return request.user.has_perm("runs.control_run")

    @admin.display(description="Progress")
    def progress(self, run: Run) -> str:
        return run.position_label

    @admin.display(description="Phases")
    def phases(self, run: Run) -> str:
        return format_html(
            '<a href="{}?run__id__exact={}">all {} phases of this run</a>',
            reverse("admin:runs_phase_changelist"),
            run.pk,
            run.total_phases,
        )

    @admin.display(description="%")
    def percent(self, run: Run) -> str:
        return f"{run.percent_complete}%"

    @admin.display(description="Tokens in / out")
    def tokens(self, run: Run) -> str:
        return f"{getattr(run, 'tokens_in', 0):,} / {getattr(run, 'tokens_out', 0):,}"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # runs come from plans: start_run, the API or the dashboard


class AttemptInline(ReadOnlyInline):
    model = PhaseAttempt
    fields = ("number", "outcome", "builder_model", "auditor_model", "started_at", "finished_at")


class EventInline(ReadOnlyInline):
    model = PhaseEvent
    fields = ("created_at", "kind", "message")


class DecisionInline(ReadOnlyInline):
    model = PhaseRoutingDecision
    fields = ("attempt_number", "role", "model", "provider", "reason", "candidates")


@admin.register(Phase)
class PhaseAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "run",
        "position",
        "name",
        "category",
        "complexity",
        "state",
        "attempt_count",
    )
    list_filter = ("state", "category", "complexity")
    list_select_related = ("run",)
    search_fields = ("name",)
    readonly_fields = [*(f.name for f in Phase._meta.fields), "lost_calls"]
    inlines = [DecisionInline, AttemptInline, EventInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="Lost calls")
    def lost_calls(self, phase: Phase) -> str:
        # Metered with their input estimated: the provider's answer never reached Autopack.
        calls = usage_lost_calls(run_id=phase.run_id, phase_id=phase.pk)
        if not calls:
            return "–"
        items = format_html_join(
            "",
            "<li>lost call: {} to {}/{} at {}: {} tokens in (estimated), 0 out</li>",
            (
                (
                    call.role,
                    call.provider,
                    call.model,
                    call.created_at.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    f"{call.prompt_tokens:,}",
                )
                for call in calls
            ),
        )
        return format_html("<ul>{}</ul>", items)


class BudgetGuardForm(forms.ModelForm):
    class Meta:
        model = BudgetGuard
        fields = ["run", "provider", "period", "threshold_percent", "action", "enabled"]

    def clean_provider(self) -> str:
        provider = self.cleaned_data["provider"]
        if problem := guard_provider_problem(provider):
            raise forms.ValidationError(problem)
        return provider


@admin.register(BudgetGuard)
class BudgetGuardAdmin(admin.ModelAdmin):
    form = BudgetGuardForm
    list_display = (
        "__str__",
        "run",
        "provider",
        "period",
        "threshold_percent",
        "action",
        "enabled",
    )
    list_filter = ("provider", "period", "action", "enabled")
    list_editable = ("enabled",)
    list_select_related = ("run",)
    raw_id_fields = ("run",)


@admin.register(GuardFiring)
class GuardFiringAdmin(admin.ModelAdmin):
    list_display = ("created_at", "run", "guard", "percent_of_cap", "message")
    list_select_related = ("run", "guard")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(HumanNote)
class HumanNoteAdmin(admin.ModelAdmin):
    list_display = ("created_at", "run", "author", "text")
    list_select_related = ("run", "author")
    readonly_fields = ("run", "author", "text", "created_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # notes go through the dashboard so they reach the workspace file too


@admin.register(PhaseRoutingDecision)
class PhaseRoutingDecisionAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "run_link",
        "phase",
        "attempt_number",
        "role",
        "category",
        "complexity",
        "model",
        "provider",
        "reason",
    )
    list_filter = ("provider", "model", "role", "category")
    list_select_related = ("phase", "phase__run")
    search_fields = ("=phase__run__id",)
    date_hierarchy = "created_at"

    @admin.display(description="Run", ordering="phase__run_id")
    def run_link(self, decision: PhaseRoutingDecision) -> str:
        return format_html(
            '<a href="../run/{}/change/">{}</a>', decision.phase.run_id, decision.phase.run_id
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


# DRF's token admin names each token by its key: every user's key would be on the list page, in
# the change and delete pages' titles and in the admin's history. Name it by its user instead;
# the key itself is only ever shown by `drf_create_token` and POST /api/token/.
def _token_label(token: TokenProxy) -> str:
    return f"API token of {token.user}"


TokenProxy.__str__ = _token_label  # type: ignore[method-assign,assignment]
admin.site.unregister(TokenProxy)


@admin.register(TokenProxy)
class ApiTokenAdmin(DRFTokenAdmin):
    """Tokens by user; deleting one revokes it at once (API and MCP answer 401)."""

    list_display = ("user", "created")
