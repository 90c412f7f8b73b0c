"""The project's URLs and one floor view: a constant JSON body served by the same server,
middleware and workers as the status API, without authentication or queries."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

from autopack_site.urls import urlpatterns as project_urlpatterns

CONSTANT = {"run_id": 1, "state": "running", "percent_complete": 42, "position_label": "x"}


def constant(request: HttpRequest) -> HttpResponse:
    return JsonResponse(CONSTANT)


urlpatterns = [path("bench/constant", constant, name="bench-constant"), *project_urlpatterns]
