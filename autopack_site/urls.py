from __future__ import annotations

from django.contrib import admin
from django.urls import path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from runs import api, otlp_api, usage_ingest, views

# A path under the API that no pattern matches gets a JSON 404 (Django's page is HTML).
handler404 = "runs.api_errors.page_not_found"

urlpatterns = [
    path("", RedirectView.as_view(url="/dashboard/", permanent=False)),
    # the progress page
    path("dashboard/", views.dashboard, name="dashboard"),
    path("dashboard/runs/", views.runs_page, name="dashboard-runs"),
    path("dashboard/caps/", views.usage_page, name="dashboard-caps"),
    path("dashboard/routing/", views.models_page, name="dashboard-routing"),
    path("dashboard/guards/", views.guards_page, name="dashboard-guards"),
    path("dashboard/guards/add", views.guard_add, name="dashboard-guard-add"),
    path(
        "dashboard/guards/<int:guard_id>/remove", views.guard_remove, name="dashboard-guard-remove"
    ),
    path("dashboard/live", views.live, name="dashboard-live"),
    path("dashboard/start", views.run_start_view, name="dashboard-start"),
    path("dashboard/usage/partial", views.usage_partial, name="dashboard-usage"),
    path("dashboard/mapping", views.mapping_change, name="dashboard-mapping"),
    path("dashboard/mapping/dialog", views.mapping_dialog, name="dashboard-mapping-dialog"),
    path("dashboard/runs/<int:run_id>/progress", views.progress_partial, name="dashboard-progress"),
    path("dashboard/runs/<int:run_id>/control", views.run_control, name="dashboard-control"),
    path("dashboard/runs/<int:run_id>/notes", views.note_add, name="dashboard-note"),
    path("dashboard/phases/<int:phase_id>/changes", views.phase_changes, name="dashboard-changes"),
    path("admin/", admin.site.urls),
    # REST API (paths fixed by DESIGN.md "Contracts")
    path("runs/", api.RunListApi.as_view(), name="api-runs"),
    path("runs/start", api.RunStartApi.as_view(), name="api-run-start"),
    path("runs/<int:run_id>/pause", api.RunPauseApi.as_view(), name="api-run-pause"),
    path("runs/<int:run_id>/resume", api.RunResumeApi.as_view(), name="api-run-resume"),
    path("runs/<int:run_id>/cancel", api.RunCancelApi.as_view(), name="api-run-cancel"),
    path("runs/<int:run_id>/patch", api.RunPatchApi.as_view(), name="api-run-patch"),
    path("runs/<int:run_id>/guards", api.RunGuardsApi.as_view(), name="api-run-guards"),
    path(
        "runs/<int:run_id>/guards/<int:guard_id>",
        api.RunGuardDeleteApi.as_view(),
        name="api-run-guard-delete",
    ),
    path("runs/guards", api.GuardsApi.as_view(), name="api-guards"),
    path("runs/guards/<int:guard_id>", api.GuardDeleteApi.as_view(), name="api-guard-delete"),
    path("dashboard/runs/<int:run_id>/status", api.RunStatusApi.as_view(), name="api-run-status"),
    path("dashboard/models", api.ModelMappingApi.as_view(), name="api-models"),
    path("dashboard/models/override", api.ModelOverrideApi.as_view(), name="api-models-override"),
    path("dashboard/usage", api.UsageSummaryApi.as_view(), name="api-usage"),
    path("usage/events", usage_ingest.UsageEventsRecordApi.as_view(), name="api-usage-events"),
    # OTLP/HTTP (Claude Code, Codex, GenAI spans): the paths exporters append to their endpoint
    path("v1/logs", otlp_api.OtlpLogsApi.as_view(), name="otlp-logs"),
    path("v1/metrics", otlp_api.OtlpMetricsApi.as_view(), name="otlp-metrics"),
    path("v1/traces", otlp_api.OtlpTracesApi.as_view(), name="otlp-traces"),
    path("api/token/", api.TokenObtainApi.as_view(), name="api-token"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
]
