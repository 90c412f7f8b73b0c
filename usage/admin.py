from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import NO_RUN, InFlightCall, ProviderWindow, RunUsageRollup, UsageEvent
from .selectors import window_usage


class RunFilter(admin.SimpleListFilter):
    """The most recent runs that used tokens (read from the small per-run rollup and the
    events not folded into it yet, not from the event table, which may hold millions of rows)."""

    title = "run"
    parameter_name = "run_id"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        folded = RunUsageRollup.objects.exclude(run_id=NO_RUN).values_list("run_id", flat=True)
        pending = UsageEvent.objects.filter(rolled_up=False, run_id__isnull=False).values_list(
            "run_id", flat=True
        )
        newest = [q.order_by("-run_id").distinct()[:30] for q in (folded, pending)]
        run_ids = sorted({*newest[0], *newest[1]}, reverse=True)[:30]
        return [(str(run_id), f"run {run_id}") for run_id in run_ids]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        value = self.value()
        if value is None:
            return queryset
        if not value.isdigit():
            return queryset.none()
        return queryset.filter(run_id=int(value))


@admin.register(UsageEvent)
class UsageEventAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "provider",
        "model",
        "reported_model",
        "role",
        "run_id",
        "phase_id",
        "prompt_tokens",
        "completion_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "cache_write_1h_tokens",
        "reasoning_tokens",
        "cost_usd",
        "latency_ms",
        "estimate",
    )
    list_filter = ("provider", "model", "role", "estimated", RunFilter)
    search_fields = ("=run_id", "provider_request_id", "call_id")
    # The detail page (view only): what was asked for and what answered side by side, the
    # cache writes with their 1-hour part, and whether the counts are an estimate.
    fields = (
        ("provider", "model", "reported_model"),
        ("role", "run_id", "phase_id"),
        ("call_id", "provider_request_id"),
        ("prompt_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_1h_tokens"),
        ("completion_tokens", "reasoning_tokens"),
        ("cost_usd", "latency_ms", "created_at"),
        ("estimate", "rolled_up"),
    )
    readonly_fields = ("estimate",)

    @admin.display(description="estimated", ordering="estimated")
    def estimate(self, event: UsageEvent) -> str:
        if not event.estimated:
            return "no"
        if event.is_lost_call:
            return "yes: lost call (input from the prompt)"
        return "yes: stream cut (reported before the cut)"

    date_hierarchy = "created_at"
    show_full_result_count = False  # COUNT(*) over millions of events on every page costs

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(InFlightCall)
class InFlightCallAdmin(admin.ModelAdmin):
    """The provider calls sent and not answered yet: a row left behind by a dead worker becomes
    a lost call when its phase is handed on."""

    list_display = (
        "started_at",
        "provider",
        "model",
        "role",
        "run_id",
        "phase_id",
        "attempt",
        "estimated_prompt_tokens",
    )
    search_fields = ("=run_id", "=phase_id", "call_key")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ProviderWindow)
class ProviderWindowAdmin(admin.ModelAdmin):
    """The cap windows of each provider (usage.windows). A bad value is refused on the field it
    names by ProviderWindow.clean, the same validation models.yaml's import uses. The legacy
    daily/weekly/monthly caps stay on the provider quota page; a window named day, week or
    month here takes their place."""

    list_display = (
        "provider",
        "name",
        "kind",
        "span",
        "cap_tokens",
        "cap_usd",
        "cap_requests",
        "autopack_share",
        "soft_limit",
        "percent_now",
    )
    list_filter = ("provider", "kind")
    fieldsets = (
        (None, {"fields": ("provider", "name", "kind")}),
        ("Span", {"fields": ("unit", "time_zone", "hours", "days", "anchor")}),
        ("Caps", {"fields": ("cap_tokens", "cap_usd", "cap_requests")}),
        ("Overrides of the provider's", {"fields": ("autopack_share", "soft_limit")}),
    )

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> Any:
        # Every window's percent in one read for the whole list, not one per row.
        self._usage = {(r["provider"], r["window"]): r for r in window_usage()}
        return super().changelist_view(request, extra_context)

    @admin.display(description="span")
    def span(self, window: ProviderWindow) -> str:
        try:
            return window.spec().describe()
        except ValueError:
            return "invalid"

    @admin.display(description="% now")
    def percent_now(self, window: ProviderWindow) -> str:
        row = getattr(self, "_usage", {}).get((window.provider, window.name))
        if row is None or row["percent"] is None:
            return "–"
        return f"{row['percent']:.1f}% of {row['unit']}"
