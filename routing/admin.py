from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.forms.fields import InvalidJSONInput
from django.http import HttpRequest

from usage.models import OutsideUsage, ProviderQuota, ProviderWindow
from usage.selectors import window_usage
from usage.services import provider_quota_upsert
from usage.vocabulary import OVERRIDE_MODEL, Period

from .mapping import (
    MappingError,
    critical_categories_problem,
    model_route_set,
    provider_endpoint_set,
    routing_policy_set,
)
from .models import (
    CatalogueModel,
    ModelChange,
    ModelRoute,
    ProviderEndpoint,
    ProviderLimits,
    RoutingPolicy,
)
from .providers import PROTOCOLS
from .reach import ProviderReach, provider_reach
from .router import router


def grouped_model_choices() -> list[tuple[str, list[tuple[int, str]]]]:
    """Catalogue models grouped by provider, for choice lists."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for pk, name, provider in CatalogueModel.objects.values_list("pk", "name", "provider"):
        groups.setdefault(provider, []).append((pk, name))
    return sorted(groups.items())


class ModelRouteForm(forms.ModelForm):
    class Meta:
        model = ModelRoute
        fields = ["model"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["model"]
        assert isinstance(field, forms.ChoiceField)  # a ForeignKey's form field
        field.choices = grouped_model_choices()


@admin.register(ModelRoute)
class ModelRouteAdmin(admin.ModelAdmin):
    """Each role × category × complexity row; editing the model is a global change, recorded
    in the change history and picked up by runs started afterwards."""

    list_display = ("role", "category_label", "complexity", "model", "layer")
    list_editable = ("model",)
    list_filter = ("role", "layer", "complexity")
    list_select_related = ("model",)
    form = ModelRouteForm
    ordering = ("role", "category", "complexity")

    @admin.display(description="Category", ordering="category")
    def category_label(self, route: ModelRoute) -> str:
        return route.category or "* (any)"

    def get_changelist_form(self, request: HttpRequest, **kwargs: Any) -> type[forms.ModelForm]:
        return ModelRouteForm

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # rows come from models.yaml (import_models) or a global override

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Editing a row is a global model change: the permission the API, the dashboard and MCP
        # ask for, not "change model route".
        return request.user.has_perm(OVERRIDE_MODEL)

    def save_model(self, request: HttpRequest, obj: ModelRoute, form: Any, change: bool) -> None:
        try:
            model_route_set(route_id=obj.pk, model=obj.model.name, changed_by=request.user)
        except MappingError as exc:
            self.message_user(request, str(exc), level=messages.ERROR)


@admin.register(ModelChange)
class ModelChangeAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "scope",
        "run_id",
        "role",
        "category",
        "complexity",
        "old_model",
        "new_model",
        "changed_by",
        "via",
    )
    list_filter = ("scope", "role", "via")
    list_select_related = ("changed_by",)
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(CatalogueModel)
class CatalogueModelAdmin(admin.ModelAdmin):
    list_display = ("name", "provider")
    list_filter = ("provider",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # the catalogue is models.yaml's; change it with import_models

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ProviderEndpointForm(forms.ModelForm):
    # The registry's protocols, read when the form is built: a new protocol module needs no
    # migration (the model field has no `choices`).
    protocol = forms.ChoiceField(choices=[(p, p) for p in PROTOCOLS])

    class Meta:
        model = ProviderEndpoint
        fields = ["protocol", "prices_id"]


@admin.register(ProviderEndpoint)
class ProviderEndpointAdmin(admin.ModelAdmin):
    """Where each provider is reached comes from models.yaml; the wire protocol and the
    genai-prices id can be corrected here (a routing change: every router reloads)."""

    list_display = ("name", "protocol", "base_url", "api_key_env", "prices_id", "key_configured")
    list_filter = ("protocol",)
    readonly_fields = ("name", "api_key_env", "base_url")
    fields = ("name", "protocol", "base_url", "api_key_env", "prices_id")
    form = ProviderEndpointForm

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> Any:
        self._reach = provider_reach()  # one read of the workers' reports for the whole list
        return super().changelist_view(request, extra_context)

    def save_model(
        self, request: HttpRequest, obj: ProviderEndpoint, form: Any, change: bool
    ) -> None:
        try:
            provider_endpoint_set(
                name=obj.name,
                protocol=form.cleaned_data["protocol"],
                prices_id=form.cleaned_data["prices_id"],
            )
        except MappingError as exc:
            self.message_user(request, str(exc), level=messages.ERROR)

    @admin.display(description="API key configured (workers' report)")
    def key_configured(self, endpoint: ProviderEndpoint) -> str:
        return _reach_words(self, endpoint.name)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


class AsciiJSONField(forms.JSONField):
    """Shows a value back with \\u escapes: a refused value is put back into the page, and a
    lone surrogate (a valid JSON escape) cannot be written into a UTF-8 page."""

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, InvalidJSONInput):
            return value
        return json.dumps(value, cls=self.encoder)


class RoutingPolicyForm(forms.ModelForm):
    critical_categories = AsciiJSONField(required=False)

    class Meta:
        model = RoutingPolicy
        fields = ["critical_categories", "quota_policy"]

    def clean_critical_categories(self) -> Any:
        value = self.cleaned_data["critical_categories"]
        value = [] if value is None else value  # an emptied field: no critical categories
        if problem := critical_categories_problem(value):
            raise forms.ValidationError(problem)
        return value


@admin.register(RoutingPolicy)
class RoutingPolicyAdmin(admin.ModelAdmin):
    form = RoutingPolicyForm
    list_display = ("__str__", "quota_policy", "critical_categories")
    fields = ("critical_categories", "quota_policy", "version")
    readonly_fields = ("version",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: RoutingPolicy, form: Any, change: bool) -> None:
        routing_policy_set(
            critical_categories=list(obj.critical_categories or []), quota_policy=obj.quota_policy
        )


def _reach_words(model_admin: admin.ModelAdmin[Any], provider: str) -> str:
    """Whether the workers can call `provider`, in words: on the workers' report (routing.reach),
    never this web process's environment, which makes no calls. Names only: no key is read."""
    reach: ProviderReach | None = getattr(model_admin, "_reach", None)
    return (reach or provider_reach()).reach(provider).label


# Provider caps live in usage; their admin is here because it also shows whether each
# provider's API key is configured, which only routing knows.
class ProviderQuotaForm(forms.ModelForm):
    class Meta:
        model = ProviderQuota
        fields = [
            "provider",
            "daily_cap_tokens",
            "weekly_cap_tokens",
            "monthly_cap_tokens",
            "autopack_share",
            "soft_limit",
            "pace",
            "outside_usage",
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "outside_usage" in self.fields:
            # Left out of a post (a form predating it): the quota's own, not an error.
            self.fields["outside_usage"].required = False

    def clean_outside_usage(self) -> str:
        value = self.cleaned_data.get("outside_usage")
        return str(value or self.instance.outside_usage or OutsideUsage.SHARE)

    def clean(self) -> dict[str, Any]:
        """A daily/weekly/monthly cap that a configured cap window of the same name replaces
        (usage.selectors.provider_windows) has no effect: changing it is refused, by name."""
        cleaned = super().clean() or {}
        provider = cleaned.get("provider") or getattr(self.instance, "provider", None)
        changed = [
            (field, period)
            for field, period in _LEGACY_CAP_FIELDS.items()
            if field in self.changed_data
        ]
        if provider and changed:
            replacing = set(
                ProviderWindow.objects.filter(
                    provider=provider, name__in=[p for _, p in changed]
                ).values_list("name", flat=True)
            )
            for field, period in changed:
                if period in replacing:
                    self.add_error(
                        field,
                        f"{provider}'s {period} cap is counted by its cap window "
                        f"“{period}” (Usage › Provider windows): change that window's cap "
                        "there; this field has no effect while that window exists.",
                    )
        return cleaned


_LEGACY_CAP_FIELDS = {
    "daily_cap_tokens": Period.DAY.value,
    "weekly_cap_tokens": Period.WEEK.value,
    "monthly_cap_tokens": Period.MONTH.value,
}


@admin.register(ProviderQuota)
class ProviderQuotaAdmin(admin.ModelAdmin):
    """The cap editor: each provider with its percent of cap per period."""

    form = ProviderQuotaForm
    list_display = (
        "provider",
        "daily_cap_tokens",
        "weekly_cap_tokens",
        "monthly_cap_tokens",
        "autopack_share",
        "soft_limit",
        "pace",
        "outside_usage",
        "percent_day",
        "percent_week",
        "percent_month",
        "key_configured",
    )
    list_editable = (
        "daily_cap_tokens",
        "weekly_cap_tokens",
        "monthly_cap_tokens",
        "autopack_share",
        "soft_limit",
    )

    def get_changelist_form(self, request: HttpRequest, **kwargs: Any) -> Any:
        # The list's editable cells are refused by the same rules as the change page.
        kwargs.setdefault("form", ProviderQuotaForm)
        return super().get_changelist_form(request, **kwargs)

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> Any:
        # Every window's usage in one read for the whole list, not one per row: the day, week
        # and month columns show the window of that name in force (a configured one replaces
        # the legacy calendar period in UTC), so they agree with the usage page.
        self._windows = {(r["provider"], r["window"]): r for r in window_usage()}
        self._reach = provider_reach()
        return super().changelist_view(request, extra_context)

    def _percent(self, quota: ProviderQuota, period: str) -> str:
        row = getattr(self, "_windows", {}).get((quota.provider, period))
        if row is None or row["percent"] is None:
            return "–"
        text = f"{row['percent']:.1f}% of {row['unit']}"
        return text if row["legacy"] else f"{text} (window: {row['description']})"

    @admin.display(description="% day")
    def percent_day(self, quota: ProviderQuota) -> str:
        return self._percent(quota, Period.DAY)

    @admin.display(description="% week")
    def percent_week(self, quota: ProviderQuota) -> str:
        return self._percent(quota, Period.WEEK)

    @admin.display(description="% month")
    def percent_month(self, quota: ProviderQuota) -> str:
        return self._percent(quota, Period.MONTH)

    @admin.display(description="API key configured (workers' report)")
    def key_configured(self, quota: ProviderQuota) -> str:
        if router.state().providers.get(quota.provider) is None:
            return "no endpoint configured"
        return _reach_words(self, quota.provider)

    def save_model(self, request: HttpRequest, obj: ProviderQuota, form: Any, change: bool) -> None:
        quota = provider_quota_upsert(
            provider=obj.provider,
            daily_cap_tokens=obj.daily_cap_tokens,
            weekly_cap_tokens=obj.weekly_cap_tokens,
            monthly_cap_tokens=obj.monthly_cap_tokens,
            autopack_share=obj.autopack_share,
            soft_limit=obj.soft_limit,
        )
        # Pacing (usage.forecast) and what the windows count (outside tools' usage or not); the
        # save moves the router's version.
        if (quota.pace, quota.outside_usage) != (obj.pace, obj.outside_usage):
            quota.pace, quota.outside_usage = obj.pace, obj.outside_usage
            quota.save(update_fields=["pace", "outside_usage", "updated_at"])


@admin.register(ProviderLimits)
class ProviderLimitsAdmin(admin.ModelAdmin):
    """The "Provider limits" page: what each provider last said of its rate limits, and its
    cooldown. Read-only: the calls themselves write the rows (routing.services)."""

    list_display = (
        "provider",
        "observed_at",
        "requests_remaining",
        "requests_limit",
        "requests_reset_at",
        "tokens_remaining",
        "tokens_limit",
        "tokens_reset_at",
        "cooled_until",
        "reason",
    )
    ordering = ("provider",)
    readonly_fields = (
        "provider",
        "observed_at",
        "requests_limit",
        "requests_remaining",
        "requests_reset_at",
        "tokens_limit",
        "tokens_remaining",
        "tokens_reset_at",
        "retry_after_until",
        "cooled_until",
        "reason",
        "headers",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
