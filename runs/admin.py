from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from django import forms
from django.contrib import admin, messages
from django.db.models import IntegerField, OuterRef, Prefetch, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from rest_framework.authtoken.admin import TokenAdmin as DRFTokenAdmin
from rest_framework.authtoken.models import TokenProxy

from usage.models import RunUsageRollup, UsageEvent
from usage.selectors import lost_calls as usage_lost_calls
from usage.vocabulary import CONTROL_RUN

from . import selectors, services
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
from .plans import GuardInvalid, guard_validate
from .states import RUN_TERMINAL, IllegalTransition


class ReadOnlyInline(admin.TabularInline):
    """Rows a run or phase shows but nobody edits: they are written by the services only."""

    extra = 0
    can_delete = False

    def get_readonly_fields(self, request: HttpRequest, obj: object = None) -> list[str]:
        # get_fields may group names on one line (a nested sequence); readonly_fields are flat.
        names: list[str] = []
        for entry in self.get_fields(request, obj):
            names.extend([entry] if isinstance(entry, str) else entry)
        return names

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class ReadOnlyPage:
    """A change page whose every field is written by the services: it offers no Save buttons
    (there is nothing to save) and no Delete unless has_delete_permission allows it for this
    object; Django's submit row shows "Close" instead."""

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        context = {
            **(extra_context or {}),
            "show_save": False,
            "show_save_and_continue": False,
            "show_save_and_add_another": False,
        }
        return super().change_view(request, object_id, form_url, context)  # type: ignore[misc]


# Readable JSON in the admin: indented, escaped by format_html (a plan's texts and a run's
# context are user- and model-written), in a box that scrolls rather than widening the page.
_JSON_PRE = (
    "white-space:pre;overflow:auto;max-height:32rem;max-width:100%;font-size:12px;"
    "border:1px solid #d0d7de;padding:4px;margin:0"
)


def json_pre(value: Any) -> str:
    if value in (None, "", [], {}):
        return "–"
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return format_html('<pre class="json" style="{}">{}</pre>', _JSON_PRE, text)


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


class _RunControl(Protocol):
    """A run control service: run_start, run_pause, run_resume, run_stop."""

    def __call__(self, *, run_id: int) -> Run: ...


def _control(
    verb: str, service: _RunControl
) -> Callable[[RunAdmin, HttpRequest, QuerySet[Run]], None]:
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
class RunAdmin(ReadOnlyPage, admin.ModelAdmin):
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
        "workspace_path",
        "branch",
        "base_commit",
        "head_commit",
        "patch",
        "source",
        "protected_paths",
        "check_commands",
        "max_attempts",
        "guards_view",
        "run_context_view",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
        "plan_view",
    )
    exclude = (
        "total_tiers",
        "total_phases",
        "completed_tiers",
        "completed_phases",
        "current_tier_index",
        "current_phase_index",
        "note_count",
        # Shown readable (indented JSON) by the *_view fields above, not as raw text boxes.
        "plan",
        "guards",
        "run_context",
    )
    inlines = [TierInline, PhaseInline]
    actions = [
        _control("start", services.run_start),
        _control("pause", services.run_pause),
        _control("resume", services.run_resume),
        _control("stop", services.run_stop),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Run]:
        # with_position: each row's current or halted phase in the list's own query.
        return selectors.with_position(
            super()
            .get_queryset(request)
            .annotate(
                tokens_in=_run_tokens("prompt_tokens"), tokens_out=_run_tokens("completion_tokens")
            )
        )

    def has_control_permission(self, request: HttpRequest) -> bool:
        # Start, pause, resume and stop need the permission the API and the dashboard ask for.
        return request.user.has_perm(CONTROL_RUN)

    def has_delete_permission(self, request: HttpRequest, obj: Run | None = None) -> bool:
        # Deleting a live run would pull its rows from under the worker building it: only a
        # run that has ended can go (from its page or the list's bulk delete).
        if obj is not None and obj.state not in RUN_TERMINAL:
            return False
        return super().has_delete_permission(request, obj)

    @admin.display(description="Progress")
    def progress(self, run: Run) -> str:
        # The progress page's words; the percent has its own column.
        return selectors.position_text(selectors.position_of(run))

    @admin.display(description="Guards")
    def guards_view(self, run: Run) -> str:
        return json_pre(run.guards)

    @admin.display(description="Run context")
    def run_context_view(self, run: Run) -> str:
        return json_pre(run.run_context)

    @admin.display(description="Plan")
    def plan_view(self, run: Run) -> str:
        return json_pre(run.plan)

    @admin.display(description="Phases")
    def phases(self, run: Run) -> str:
        return format_html(
            '<a href="{}?run__id__exact={}">all {} phases of this run</a>',
            reverse("admin:runs_phase_changelist"),
            run.pk,
            run.total_phases,
        )

    @admin.display(description="Patch series")
    def patch(self, run: Run) -> str:
        if not run.branch:
            return "– (no branch yet)"
        return format_html(
            '<a href="{}">download the run\'s approved change</a>',
            reverse("api-run-patch", args=[run.pk]),
        )

    @admin.display(description="%")
    def percent(self, run: Run) -> str:
        return f"{run.percent_complete}%"

    @admin.display(description="Tokens in / out")
    def tokens(self, run: Run) -> str:
        return f"{getattr(run, 'tokens_in', 0):,} / {getattr(run, 'tokens_out', 0):,}"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # runs come from plans: start_run, the API or the dashboard


# The admin has no stylesheet for a diff: its colours travel inline.
_DIFF_STYLE = {
    "add": "background:#e6ffec;color:#116329",
    "del": "background:#ffebe9;color:#a40e26",
    "hunk": "background:#ddf4ff;color:#0550ae",
    "meta": "color:#656d76;font-weight:600",
    "context": "",
}
_PRE = (
    "white-space:pre-wrap;overflow-wrap:anywhere;max-height:28rem;overflow:auto;"
    "font-size:12px;border:1px solid #d0d7de;padding:4px;margin:2px 0"
)
# The admin shows an attempt's texts whole up to this (the prompt is bounded by its budgets,
# the reply by the provider's output limit, the diff by runs.workspace.DIFF_LIMIT).
ADMIN_TEXT_CHARS = 200_000
ADMIN_DIFF_LINES = 3_000


def _pre(text: str, *, css_class: str) -> str:
    shown = text if len(text) <= ADMIN_TEXT_CHARS else text[:ADMIN_TEXT_CHARS]
    note = (
        format_html("<p>… {} more characters not shown</p>", f"{len(text) - len(shown):,}")
        if len(shown) < len(text)
        else ""
    )
    return format_html('<pre class="{}" style="{}">{}</pre>{}', css_class, _PRE, shown, note)


def _details(summary: str, body: str) -> str:
    return format_html("<details><summary>{}</summary>{}</details>", summary, body)


class AttemptInline(ReadOnlyInline):
    """Per attempt, everything a person needs to check it: what the builder was asked (did a
    note reach it?), what it answered, the change it made, the checks, the refusal sent back
    when the change could not be applied, and the auditor's verdict. All of it is model- or
    check-written text: escaped by format_html, never marked safe as it is."""

    model = PhaseAttempt
    template = "admin/edit_inline/stacked.html"
    fields = (
        "number",
        "outcome",
        "builder_model",
        "auditor_model",
        "started_at",
        "finished_at",
        "change",
        "edit_refusal",
        "check_results",
        "verdict",
        "diff_view",
        "prompt",
        "reply",
    )

    @admin.display(description="Change")
    def change(self, attempt: PhaseAttempt) -> str:
        if not attempt.commit_sha:
            return "–"
        files = attempt.files_changed if isinstance(attempt.files_changed, list) else []
        return format_html(
            "commit <code>{}</code> · {} file(s), +{} −{} · checks {}{}",
            attempt.commit_sha,
            len(files),
            attempt.lines_added,
            attempt.lines_removed,
            attempt.get_checks_state_display(),
            format_html_join("", "<br><code>{}</code>", ((str(f),) for f in files[:200])),
        )

    @admin.display(description="Edit refused")
    def edit_refusal(self, attempt: PhaseAttempt) -> str:
        return _pre(attempt.edit_error, css_class="edit-error") if attempt.edit_error else "–"

    @admin.display(description="Checks")
    def check_results(self, attempt: PhaseAttempt) -> str:
        checks = selectors.attempt_checks(attempt.checks)
        if not checks:
            return "–"
        return format_html_join(
            "",
            "<div><code>{}</code>: <strong>{}</strong> (exit {}, {} s, {}){}{}</div>",
            (
                (
                    c["command"],
                    c["outcome"],
                    "–" if c["exit_code"] is None else c["exit_code"],
                    "–" if c["duration_s"] is None else f"{c['duration_s']:.1f}",
                    "sandboxed" if c["sandboxed"] else "not sandboxed",
                    format_html(" — {}", c["reason"]) if c["reason"] else "",
                    _pre(c["output"], css_class="check-output") if c["output"] else "",
                )
                for c in checks
            ),
        )

    @admin.display(description="Verdict")
    def verdict(self, attempt: PhaseAttempt) -> str:
        verdict = attempt.auditor_verdict if isinstance(attempt.auditor_verdict, dict) else {}
        if not verdict:
            return "–"
        issues = [i for i in verdict.get("issues", []) if isinstance(i, dict)]
        return format_html(
            "<strong>{}</strong> {}<ul>{}</ul>",
            str(verdict.get("decision", "")),
            str(verdict.get("summary", "")),
            format_html_join(
                "",
                "<li>[{}] {}: {}</li>",
                (
                    (str(i.get("severity", "")), str(i.get("title", "")), str(i.get("detail", "")))
                    for i in issues
                ),
            ),
        )

    @admin.display(description="Diff")
    def diff_view(self, attempt: PhaseAttempt) -> str:
        if not attempt.diff:
            return "–"
        view = selectors.diff_view(
            diff=attempt.diff,
            truncated=attempt.diff_truncated,
            max_lines=ADMIN_DIFF_LINES,
            max_chars=ADMIN_TEXT_CHARS,
        )
        lines = format_html_join(
            "",
            '<span style="display:block;{}" class="{}">{}</span>',
            ((_DIFF_STYLE[line.kind], line.kind, line.text or " ") for line in view.lines),
        )
        note = (
            format_html(
                "<p>Diff shortened: {} of {}{} lines shown; the patch series has it whole.</p>",
                view.shown_lines,
                "more than " if attempt.diff_truncated else "",
                view.total_lines,
            )
            if view.shortened
            else ""
        )
        body = format_html(
            '<div class="diff" style="{};white-space:pre-wrap;font-family:monospace">{}</div>{}',
            _PRE,
            lines,
            note,
        )
        return _details(f"{view.total_lines} lines", body)

    @admin.display(description="Builder prompt")
    def prompt(self, attempt: PhaseAttempt) -> str:
        text = attempt.builder_prompt
        if not text:
            return "–"
        return _details(f"{len(text):,} characters", _pre(text, css_class="builder-prompt"))

    @admin.display(description="Builder reply")
    def reply(self, attempt: PhaseAttempt) -> str:
        text = attempt.builder_output
        if not text:
            return "–"
        return _details(f"{len(text):,} characters", _pre(text, css_class="builder-reply"))


class EventInline(ReadOnlyInline):
    model = PhaseEvent
    fields = ("created_at", "kind", "message")


class DecisionInline(ReadOnlyInline):
    model = PhaseRoutingDecision
    fields = ("attempt_number", "role", "model", "provider", "reason", "candidates")


@admin.register(Phase)
class PhaseAdmin(ReadOnlyPage, admin.ModelAdmin):
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

    # A phase is part of its run's plan and progress: it goes only with its run (whose delete
    # needs this model's delete permission for the cascade), so neither its page nor the
    # list offers a delete of its own.
    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        return super().change_view(
            request, object_id, form_url, {**(extra_context or {}), "show_delete": False}
        )

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    @admin.display(description="Lost calls and cut streams (estimated)")
    def lost_calls(self, phase: Phase) -> str:
        # Estimated usage: a lost call's input is estimated from its prompt (the answer never
        # reached Autopack); a cut stream counts what the provider reported before the cut.
        calls = usage_lost_calls(run_id=phase.run_id, phase_id=phase.pk)
        if not calls:
            return "–"
        items = format_html_join(
            "",
            "<li>{}: {} to {}/{} at {}: {}</li>",
            (
                (
                    "lost call" if call.is_lost_call else "cut stream",
                    call.role,
                    call.provider,
                    call.model_shown,
                    call.created_at.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    f"{call.prompt_tokens:,} tokens in (estimated), 0 out"
                    if call.is_lost_call
                    else f"{call.prompt_tokens:,} tokens in, {call.completion_tokens:,} out "
                    "(estimated: reported before the cut)",
                )
                for call in calls
            ),
        )
        return format_html("<ul>{}</ul>", items)


class BudgetGuardForm(forms.ModelForm):
    class Meta:
        model = BudgetGuard
        fields = ["run", "provider", "window", "period", "threshold_percent", "action", "enabled"]
        help_texts = {"period": "Legacy: day, week or month (the window of that name)"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["window"].required = False  # a period alone names its window

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        fields = ("provider", "window", "period", "threshold_percent", "action")
        # A field the form already refused is not asked again (its value is missing).
        if not any(self.has_error(f) for f in fields):
            try:
                spec = guard_validate(**{f: data.get(f) for f in fields})
            except GuardInvalid as exc:
                for field_name, message in exc.errors.items():
                    self.add_error(field_name, message)
            else:
                data["window"], data["period"] = spec.window, spec.period
        return data


@admin.register(BudgetGuard)
class BudgetGuardAdmin(admin.ModelAdmin):
    form = BudgetGuardForm
    list_display = (
        "__str__",
        "run",
        "provider",
        "window",
        "threshold_percent",
        "action",
        "enabled",
    )
    list_filter = ("provider", "window", "action", "enabled")
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
class HumanNoteAdmin(ReadOnlyPage, admin.ModelAdmin):
    list_display = ("created_at", "run_link", "author", "text")
    list_select_related = ("run", "author")
    readonly_fields = ("run", "author", "text", "created_at")
    # "Which notes went to run 12?": the run's id finds them.
    search_fields = ("=run__id", "text")

    @admin.display(description="Run", ordering="run_id")
    def run_link(self, note: HumanNote) -> str:
        return format_html(
            '<a href="{}">{}</a>', reverse("admin:runs_run_change", args=[note.run_id]), note.run
        )

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
        "scope",
        "reason",
    )
    # "Which calls fell back, which ran on an override?" without reading the reasons.
    list_filter = ("scope", "provider", "model", "role", "category")
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
