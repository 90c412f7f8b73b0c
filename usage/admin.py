from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import UsageEvent


@admin.register(UsageEvent)
class UsageEventAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "provider",
        "model",
        "role",
        "run_id",
        "phase_id",
        "prompt_tokens",
        "completion_tokens",
        "cached_input_tokens",
        "reasoning_tokens",
        "cost_usd",
        "latency_ms",
    )
    list_filter = ("provider", "model", "role")
    search_fields = ("=run_id", "provider_request_id", "call_id")
    date_hierarchy = "created_at"
    show_full_result_count = False  # COUNT(*) over millions of events on every page costs

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
