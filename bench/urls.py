"""The project's URLs, one floor view (a constant JSON body served by the same server,
middleware and workers as the status API, without authentication or queries) and the status
API in its plain design (DRF's TokenAuthentication, the run's updated_at read by the ORM),
measured beside the one the project serves (docs/benchmarks.md)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from rest_framework.authentication import SessionAuthentication, TokenAuthentication

from autopack_site.urls import urlpatterns as project_urlpatterns
from runs.api import RunStatusApi

CONSTANT = {"run_id": 1, "state": "running", "percent_complete": 42, "position_label": "x"}


def constant(request: HttpRequest) -> HttpResponse:
    return JsonResponse(CONSTANT)


class PlainRunStatusApi(RunStatusApi):
    """The status API with DRF's own token check: the token's statement carries no run, so the
    view reads the run's updated_at through the ORM (its session path)."""

    authentication_classes = [TokenAuthentication, SessionAuthentication]


urlpatterns = [
    path("bench/constant", constant, name="bench-constant"),
    path("bench/plain/runs/<int:run_id>/status", PlainRunStatusApi.as_view()),
    *project_urlpatterns,
]
